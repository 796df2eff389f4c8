"""Long recordings to training clips: cut at pauses, transcribed, filtered, written as a manifest.

    python segment.py podcasts/ --out data/podcasts --language en                  # pocketsphinx, English
    python segment.py talks/*.flac --out data/talks --asr-model /models/whisper-small --speaker-from file

Each recording (WAV/FLAC/OGG/MP3 that libsndfile reads; a folder is searched
for them) is read once at its own rate. Voice activity detection
(`silero-vad`, whose model ships in its wheel) finds the stretches of speech;
neighbouring stretches are merged into one clip only across a short pause
(at most `MAX_MERGE_PAUSE` seconds), only while the speaker stays the same
(their speaker embeddings, `metrics.py`'s encoder, at least
`SAME_SPEAKER_COSINE` alike) and only while the clip stays within
`--max-seconds`; every longer pause ends a clip, and a cut between two clips
lies in the middle of the pause between them (`plan_clips`). Each clip is
transcribed (`metrics.py`'s transcribers: a local Whisper directory, or
pocketsphinx's bundled en-us model for English) and kept or rejected, each
rejection counted by reason: too short or too long, clipped, too quiet, empty
transcript, implausible characters per second, a predicted MOS under
`--min-mos` (`metrics.py`'s naturalness judge). The speaker is the
recording's folder or file name.

`OUT/clips/` holds the kept clips (24-bit FLAC at the recording's rate),
`OUT/manifest.jsonl` the speaker-grouped rows that `prepare.py` takes as they
are, `OUT/report.jsonl` every rejection. Each finished recording is recorded
in `OUT/done/`, so a run stopped in any way is run again with the same
command and redoes only the recordings it had not finished; a recording
changed since is segmented again, and the clips of its old version removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import commands  # light: it must catch a Ctrl-C while the rest loads

if __name__ == "__main__":
    commands.quiet_ctrl_c_while_loading()

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import data
import files
import importers
import manifest
import metrics

VAD_RATE = 16000
# Pauses shorter than this do not end a stretch of speech for the VAD: the gaps between words.
MIN_PAUSE_MS = 300
# Silence kept before and after a clip's speech, within the pause: a clip that starts or ends mid-breath
# teaches the model abrupt onsets.
EDGE_PAD_SECONDS = 0.15
# A clip is clipped when more than this fraction of its samples sit at full scale.
CLIPPED_FRACTION = 1e-3
FULL_SCALE = 0.999
# Quieter than this (RMS over the clip) is far-field or noise-floor speech.
MIN_RMS_DBFS = -45.0
# Letters and digits per second of a clip: read speech runs 10-20; outside these the transcript is wrong
# (an ASR that dropped or invented words) or the clip is mostly not speech.
MIN_CHARS_PER_SECOND, MAX_CHARS_PER_SECOND = 3.0, metrics.MAX_CHARS_PER_SECOND
# The longest pause a clip is merged across: the pauses between a speaker's sentences run 0.3-0.8 s; a longer
# one (a turn, a new topic, an edit) ends the clip.
MAX_MERGE_PAUSE = 0.8
# Neighbouring stretches whose resemblyzer embeddings are less alike than this are taken to be two speakers and
# never merged. Measured on the shared voice prompts (benchmarks/mos_benchmark.py): different speakers' stretches
# and 1.5-4 s windows reach 0.832 at most (belinda against en_woman), so 0.85 merged no two speakers there; the
# same speaker's neighbouring stretches fall under it often (short stretches embed noisily), which only
# splits a clip in two at its pause.
SAME_SPEAKER_COSINE = 0.85
# The default --min-mos (distillmos, 1-5): the seven shared voice prompts' first 7.68 s score 3.04-4.64 clean and
# 1.73-2.08 with white noise at 5 dB SNR (benchmarks/mos_benchmark.py); 3.0 keeps clean speech, cartoon voices
# included, and drops noisy speech, as Emilia's DNSMOS >= 3.0 does.
DEFAULT_MIN_MOS = 3.0
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class Settings:
    """What decides the clips; a resumed run must use the same (they are recorded in `OUT/settings.json`)."""

    min_seconds: float = 1.0
    max_seconds: float = 30.0
    language: str | None = None
    asr: str = "pocketsphinx-en-us"
    speaker_from: str = "folder"
    min_mos: float = DEFAULT_MIN_MOS  # 0: off

    def check(self) -> None:
        limits = data.LIMITS
        if not 0 <= self.min_mos <= 5:
            raise ValueError(f"--min-mos {self.min_mos:g} must lie in 0-5 (0 = off; MOS runs 1-5)")
        if not limits.min_target_seconds <= self.min_seconds < self.max_seconds <= limits.max_target_seconds:
            raise ValueError(f"--min-seconds {self.min_seconds:g} and --max-seconds {self.max_seconds:g} must satisfy "
                             f"{limits.min_target_seconds:g} <= min < max <= {limits.max_target_seconds:g} (data.LIMITS)")
        if self.max_seconds < 2 * EDGE_PAD_SECONDS + 0.5:
            raise ValueError(f"--max-seconds {self.max_seconds:g} leaves no room for speech")


@dataclass(frozen=True)
class Rejection:
    recording: str
    start: float | None  # seconds in the recording; None for a recording rejected whole
    end: float | None
    reason: str
    detail: str

    def where(self) -> str:
        """The recording, with the clip's span in it for a rejected clip."""
        return self.recording if self.start is None else f"{self.recording} {self.start}-{self.end} s"


# --------------------------------------------------------------------------
# Where to cut
# --------------------------------------------------------------------------


def speech_spans(samples: np.ndarray, vad, max_seconds: float) -> list[tuple[float, float]]:
    """Stretches of speech (start, end) in seconds of mono audio at `VAD_RATE`; a stretch longer than
    `max_seconds` is split by silero at its quietest point."""
    from silero_vad import get_speech_timestamps

    stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), vad,
                                   sampling_rate=VAD_RATE, min_silence_duration_ms=MIN_PAUSE_MS, speech_pad_ms=0,
                                   max_speech_duration_s=max_seconds)
    return [(stamp["start"] / VAD_RATE, stamp["end"] / VAD_RATE) for stamp in stamps]


def plan_clips(spans: list[tuple[float, float]], duration: float, max_seconds: float, pad: float = EDGE_PAD_SECONDS,
               max_pause: float = MAX_MERGE_PAUSE,
               same_speaker: Callable[[list[int], int], bool] | None = None) -> list[tuple[float, float]]:
    """Clips (start, end) from stretches of speech: a stretch joins the clip before it when the pause between
    them is at most `max_pause`, the clip with `pad` of silence on each side stays within `max_seconds`, and
    `same_speaker(indices of the clip's stretches, index of the stretch)` holds (None: not checked); the cut
    between two clips is the middle of the pause between them, and each clip keeps up to `pad` of that pause
    on each side."""
    groups: list[list[float]] = []
    members: list[list[int]] = []
    for index, (start, end) in enumerate(spans):
        if (groups and start - groups[-1][1] <= max_pause and end - groups[-1][0] + 2 * pad <= max_seconds
                and (same_speaker is None or same_speaker(members[-1], index))):
            groups[-1][1] = end
            members[-1].append(index)
        else:
            groups.append([start, end])
            members.append([index])
    cuts = [0.0] + [(left[1] + right[0]) / 2 for left, right in zip(groups, groups[1:])] + [duration]
    return [(max(cuts[i], start - pad), min(cuts[i + 1], end + pad)) for i, (start, end) in enumerate(groups)]


# --------------------------------------------------------------------------
# Which clips to keep
# --------------------------------------------------------------------------


class SpeakerTurns:
    """Whether a stretch of speech is spoken by the voice of the clip before it: the cosine between the stretch's
    embedding and the clip's (its stretches' embeddings averaged by duration, as resemblyzer averages its
    windows), against `SAME_SPEAKER_COSINE`. A stretch is embedded once, when first compared."""

    def __init__(self, encoder: metrics.SpeakerEncoder, samples: np.ndarray, spans: list[tuple[float, float]]):
        self.encoder, self.samples, self.spans = encoder, samples, spans
        self.embeddings: dict[int, np.ndarray | None] = {}

    def embedding(self, index: int) -> np.ndarray | None:
        if index not in self.embeddings:
            start, end = self.spans[index]
            self.embeddings[index] = self.encoder.embed(self.samples[round(start * VAD_RATE) : round(end * VAD_RATE)], VAD_RATE)
        return self.embeddings[index]

    def __call__(self, clip: list[int], index: int) -> bool:
        embedded = [i for i in clip if self.embedding(i) is not None]
        if not embedded or self.embedding(index) is None:
            return False  # a stretch with no voice to compare is not merged: a split costs less than a mixed clip
        voice = sum((self.spans[i][1] - self.spans[i][0]) * self.embeddings[i] for i in embedded)
        return metrics.cosine(voice, self.embeddings[index]) >= SAME_SPEAKER_COSINE


def clip_problem(samples: np.ndarray, rate: int, text: str, settings: Settings) -> tuple[str, str] | None:
    """(reason, detail) of a clip that is not kept, or None: too short or long, clipped, too quiet, no
    transcript, an implausible number of characters per second, a transcript over the text limit."""
    seconds = len(samples) / rate
    if seconds < settings.min_seconds:
        return "too_short", f"{seconds:.2f} s, under --min-seconds {settings.min_seconds:g}"
    if seconds > settings.max_seconds:
        return "too_long", f"{seconds:.2f} s, over --max-seconds {settings.max_seconds:g}"
    clipped = float(np.mean(np.abs(samples) >= FULL_SCALE))
    if clipped > CLIPPED_FRACTION:
        return "clipped", f"{100 * clipped:.2f}% of its samples at full scale"
    rms = 20 * np.log10(max(float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))), 1e-10))
    if rms < MIN_RMS_DBFS:
        return "too_quiet", f"RMS {rms:.1f} dBFS, under {MIN_RMS_DBFS:g}"
    characters = metrics.text_characters(text)
    if not characters:
        return "empty_transcript", "the ASR heard no word"
    if not MIN_CHARS_PER_SECOND <= characters / seconds <= MAX_CHARS_PER_SECOND:
        return "implausible_rate", (f"{characters / seconds:.1f} characters per second, outside "
                                    f"{MIN_CHARS_PER_SECOND:g}-{MAX_CHARS_PER_SECOND:g} ({text!r})")
    if len(text) > data.LIMITS.max_text_chars:
        return "text_too_long", f"{len(text)} characters, over {data.LIMITS.max_text_chars}"
    return None


# --------------------------------------------------------------------------
# One recording, and many
# --------------------------------------------------------------------------


@dataclass
class Segmenter:
    """The VAD, the transcriber and where clips go: what every recording of a run shares."""

    out: Path
    settings: Settings
    vad: object
    asr: metrics.Transcriber
    encoder: metrics.SpeakerEncoder
    mos: metrics.MosPredictor | None  # None: --min-mos 0

    def recording(self, path: Path, speaker: str) -> tuple[list[dict], list[Rejection]]:
        """The kept rows (clip paths relative to the output folder, which may move) and the rejections of one recording."""
        try:
            samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            return [], [Rejection(str(path), None, None, "unreadable_audio", files.first_line(error))]
        mono = samples.mean(axis=1)
        try:
            at_vad_rate = data.to_model_rate(mono, rate, VAD_RATE, str(path))
        except data.AudioError as error:
            return [], [Rejection(str(path), None, None, "bad_audio", str(error))]
        spans = speech_spans(at_vad_rate, self.vad, self.settings.max_seconds - 2 * EDGE_PAD_SECONDS)
        if not spans:  # reported, so that a recording that yields nothing is never silently counted as done
            return [], [Rejection(str(path), None, None, "no_speech", f"the VAD found no speech in its {len(mono) / rate:.1f} s")]
        rows, rejections = [], []
        turns = SpeakerTurns(self.encoder, at_vad_rate, spans)
        for index, (start, end) in enumerate(plan_clips(spans, len(mono) / rate, self.settings.max_seconds, same_speaker=turns)):
            span = slice(round(start * rate), round(end * rate))
            clip = mono[span]
            text = self.asr.transcribe(clip, rate, self.settings.language) if len(clip) else ""
            text = " ".join(text.split())
            problem = clip_problem(clip, rate, text, self.settings)
            mos = None
            if problem is None and self.mos is not None:
                mos = self.mos.score(clip, rate)
                if mos < self.settings.min_mos:
                    problem = "low_mos", f"MOS {mos:.2f} ({self.mos.name}), under --min-mos {self.settings.min_mos:g}"
            if problem:
                rejections.append(Rejection(str(path), round(start, 3), round(end, 3), *problem))
                continue
            clip_id = f"{speaker}/{path.stem}/{index:04d}"
            audio = importers.ClipFiles(self.out / "clips" / speaker).from_samples(clip_id, samples[span], rate)
            row = {"id": clip_id, "audio": str(audio.relative_to(self.out)), "text": text, "speaker": speaker,
                   "source": str(path), "start": round(start, 3), "end": round(end, 3)}
            row |= {"mos": round(mos, 3)} if mos is not None else {}
            rows.append(dict(row, language=self.settings.language) if self.settings.language else row)
        return rows, rejections


def recordings(inputs: list[str]) -> list[Path]:
    """The audio files named, and those inside the folders named, in order, each once."""
    found: dict[Path, None] = {}
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found.update(dict.fromkeys(sorted(p for p in path.rglob("*") if p.suffix.lower() in importers.AUDIO_SUFFIXES)))
        elif path.is_file():
            found[path] = None
        else:
            raise FileNotFoundError(f"no such recording or folder: {path}")
    return [path.resolve() for path in found]


def done_record(out: Path, recording: Path) -> Path:
    """Where a finished recording's rows and rejections are kept; named by its path, size and modification time,
    so a recording changed since is segmented again."""
    stat = recording.stat()
    key = hashlib.sha256(f"{recording}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return out / "done" / f"{key}.json"


@dataclass
class SegmentResult:
    rows: list[dict]
    rejections: list[Rejection]
    redone: int  # recordings segmented by this run
    reused: int  # recordings an earlier run had finished

    def summary(self) -> str:
        counts = dict(Counter(rejection.reason for rejection in self.rejections).most_common())
        return manifest.reconcile(len(self.rows) + len(self.rejections), len(self.rows), counts)


def segment(inputs: list[str], out: str | Path, settings: Settings, asr: metrics.Transcriber | None = None,
            progress: bool = False) -> SegmentResult:
    """Segment every recording of `inputs` into `out` (see the module's docstring), skipping those an earlier
    run with the same settings finished; writes the manifest and the report of all of them, then removes the
    clips of the recordings' versions from before they changed."""
    settings.check()
    out = Path(out)
    paths = recordings(inputs)
    if not paths:  # refused before the output folder is made
        kinds = ", ".join(suffix[1:].upper() for suffix in importers.AUDIO_SUFFIXES)
        raise ValueError(f"nothing usable found in {', '.join(inputs)}: no recording ({kinds})")
    _check_settings(out, settings)
    segmenter = None
    rows, rejections, redone, records = [], [], 0, {}
    for path in tqdm(paths, desc="recordings", disable=not progress):
        record = records[str(path)] = done_record(out, path)
        if not record.is_file():
            segmenter = segmenter or _segmenter(out, settings, asr)
            speaker = path.parent.name if settings.speaker_from == "folder" else path.stem
            found, rejected = segmenter.recording(path, speaker)
            record.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(record, json.dumps({"rows": found, "rejections": [asdict(r) for r in rejected]}, ensure_ascii=False))
            redone += 1
        finished = json.loads(record.read_text(encoding="utf-8"))
        rows += finished["rows"]
        rejections += [Rejection(**rejection) for rejection in finished["rejections"]]
    _write_outputs(out, rows, rejections)
    _remove_replaced(out, records, rows)
    return SegmentResult(rows, rejections, redone, len(paths) - redone)


def _segmenter(out: Path, settings: Settings, asr: metrics.Transcriber | None) -> Segmenter:
    from silero_vad import load_silero_vad

    asr = asr or metrics.transcriber(None if settings.asr == "pocketsphinx-en-us" else settings.asr)
    if not asr.supports(settings.language):
        raise ValueError(f"{asr.name} does not transcribe language {settings.language!r}: give --language en, "
                         "or a Whisper directory with --asr-model")
    mos = metrics.mos_predictor() if settings.min_mos > 0 else None
    return Segmenter(out, settings, load_silero_vad(), asr, metrics.speaker_encoder(), mos)


def _check_settings(out: Path, settings: Settings) -> None:
    """Record the settings of a new output folder; refuse other settings for one already begun (a clip written).
    A folder whose first run stopped before writing anything (no --language for pocketsphinx) takes the new ones."""
    path = out / SETTINGS_FILE
    begun = any((out / "done").glob("*")) or any((out / "clips").rglob("*"))
    if path.is_file() and begun:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != asdict(settings):
            changed = ", ".join(f"{name} {recorded.get(name)!r} (now {value!r})" for name, value in asdict(settings).items()
                                if recorded.get(name) != value)
            raise ValueError(f"{out} was segmented with {changed}: use the same settings to resume, or another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(path, json.dumps(asdict(settings), indent=2))


def _remove_replaced(out: Path, current: dict[str, Path], rows: list[dict]) -> None:
    """Remove the done records that this run's recordings had before they changed, and the clips those records
    list that no row uses now: the segmenter wrote them for that recording, whose manifest rows no longer name
    them. Nothing else in `out` is touched (a record of a recording not in this run stays, with its clips)."""
    used, kept = {row["audio"] for row in rows}, set(current.values())
    for record in sorted((out / "done").glob("*.json")):
        if record in kept:
            continue
        finished = json.loads(record.read_text(encoding="utf-8"))
        entries = [row["source"] for row in finished["rows"]] + [r["recording"] for r in finished["rejections"]]
        if entries and entries[0] in current:
            for row in finished["rows"]:
                if row["audio"] not in used:
                    (out / row["audio"]).unlink(missing_ok=True)
            record.unlink()  # last: a run stopped before this removes the clips next time


def _write_outputs(out: Path, rows: list[dict], rejections: list[Rejection]) -> None:
    """The manifest (clip paths relative to it) and the report."""
    files.write_text(out / "manifest.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    files.write_text(out / "report.jsonl", "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejections))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    return commands.run(lambda: _segment_and_report(args),
                        lambda _: commands.interrupted(f"each recording finished so far is kept in {Path(args.out) / 'done'}; "
                                                       "run the same command again to segment the rest"))


def _segment_and_report(args: argparse.Namespace) -> int:
    language = manifest.canonical_language(args.language) if args.language else None
    settings = Settings(args.min_seconds, args.max_seconds, language, args.asr_model or Settings.asr, args.speaker_from,
                        args.min_mos)
    result = segment(args.inputs, args.out, settings, progress=True)
    commands.list_first([f"{r.where()}: {r.reason}: {r.detail}" for r in result.rejections])
    out = Path(args.out)
    print(f"recordings: {result.redone} segmented, {result.reused} already done\n"
          f"report: {out / 'report.jsonl'}\n{result.summary()}")
    if not result.rows:  # nothing to prepare: an error, and no next command
        return commands.fail(ValueError(f"nothing usable found in {', '.join(args.inputs)}: no clip kept; "
                                        f"report: {out / 'report.jsonl'}"))
    print(f"next: python prepare.py --manifest {out / 'manifest.jsonl'} --out cache/{out.name}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segment.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", help="recordings, or folders searched for them")
    add("--out", required=True, help="output folder: clips/, manifest.jsonl, report.jsonl, done/ (run again to resume)")
    add("--min-seconds", type=float, default=Settings.min_seconds, help=f"shortest clip kept [{Settings.min_seconds:g}]")
    add("--max-seconds", type=float, default=Settings.max_seconds, help=f"longest clip [{Settings.max_seconds:g}]")
    add("--language", help="the recordings' language (any BCP 47 spelling; stored canonical); pocketsphinx needs en [none]")
    add("--asr-model", help="local Whisper directory for the transcripts [pocketsphinx en-us: English only]")
    add("--speaker-from", choices=("folder", "file"), default="folder",
        help="the speaker id is the recording's folder name, or its file name [folder]")
    add("--min-mos", type=float, default=Settings.min_mos,
        help=f"drop clips whose predicted MOS (distillmos, 1-5) is under this, as low_mos; 0 = off [{Settings.min_mos:g}]")
    return parser.parse_args(argv)


if __name__ == "__main__":
    commands.loaded()
    sys.exit(main())
