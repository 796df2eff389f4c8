"""From the formats speech corpora come in to our manifest: one importer per format, and their command.

    python importers.py ljspeech LJSpeech-1.1 --out data/lj.jsonl           # metadata.csv + wavs/
    python importers.py folders  my_voices    --out data/mine.jsonl --language en   # SPEAKER/CLIP.wav + CLIP.txt|.lab
    python importers.py kaldi    data/train   --out data/kaldi.jsonl         # wav.scp, text, utt2spk [, segments]
    python importers.py hf       my_dataset   --out data/hf.jsonl --split train  # save_to_disk, parquet or arrow
    python importers.py lhotse   cuts.jsonl.gz --out data/cuts.jsonl        # a lhotse CutSet

Each importer turns its source into speaker-grouped rows (`id`, `audio`,
`text`, `speaker`, and `language` where known, as a canonical tag) or
`Unusable` entries; `run_import` writes the rows as a manifest that
`prepare.py` takes as it is (audio paths relative to it), counts the unusable
ones by reason as prepare counts its rejections, and lists each in
`OUT.report.jsonl`. Audio that is no file of its own (a Kaldi segment, a
lhotse cut of a longer recording, audio stored inside a Hugging Face dataset)
is written once, as a file in `clips/` beside the manifest, for a row that is
kept (never for an entry rejected); a re-run reuses it. What a format carries
that a manifest has no place for is named in `DROPPED` and printed. The clips
themselves are checked by `prepare.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import commands  # light: it must catch a Ctrl-C while the rest loads

if __name__ == "__main__":
    commands.quiet_ctrl_c_while_loading()

import numpy as np
import soundfile as sf

import files
import manifest

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
TRANSCRIPT_SUFFIXES = (".txt", ".lab")

# What each format carries that a manifest row has no field for.
DROPPED = {
    "ljspeech": "the raw transcript (column 2; the normalised column 3 is kept)",
    "folders": "nothing but files that are neither audio nor transcripts",
    "kaldi": "spk2gender, utt2dur, reco2file_and_channel, feats.scp, cmvn.scp; wav.scp commands (pipes) are not run",
    "hf": "every column besides id, audio, text, speaker and language (printed per dataset)",
    "lhotse": "alignments, features, custom fields, gender, channel layout (clips are mixed down by prepare)",
}


@dataclass(frozen=True)
class Unusable:
    """A source entry that makes no row: where it is, its id if it has one, why, and the details."""

    where: str
    id: str | None
    reason: str
    detail: str


# A row's audio: a file, or a clip still to be written (a `ClipFiles` call), which `run_import` writes only for a
# row it keeps, so that no clip is left behind for an entry rejected later (its text, its id taken).
Audio = Path | Callable[[], Path]


@dataclass(frozen=True)
class Row:
    """A source entry that makes a row: where it is, and the row's fields (its `audio` an `Audio`)."""

    where: str
    fields: dict


@dataclass(frozen=True)
class Options:
    """What a source may not say itself: its language and (LJSpeech) speaker; which split and columns (hf)."""

    language: str | None = None
    speaker: str | None = None
    split: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (role, column) given on the command line


class ClipFiles:
    """Audio that is no file of its own, written once into `folder`. A file is named by its clip's id and
    content, so a re-run reuses a file already there (whole: it was written through `files.atomic_file`) only
    when the clip is unchanged; a clip whose source changed under the same id gets a new file."""

    def __init__(self, folder: Path):
        self.folder, self.written, self.reused = folder, 0, 0

    def path(self, clip_id: str, payload: bytes, suffix: str) -> Path:
        # Ids may hold any character; the digest keeps ids that differ only there apart, and contents too.
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id)[:80]
        digest = hashlib.sha1(clip_id.encode() + b"\0" + payload).hexdigest()[:12]
        return self.folder / f"{safe}-{digest}{suffix}"

    def from_bytes(self, clip_id: str, payload: bytes, suffix: str) -> Path:
        """An encoded audio file (WAV, FLAC, ...) as it is, without decoding it."""
        path = self.path(clip_id, payload, suffix)
        if path.is_file():
            self.reused += 1
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with files.atomic_file(path) as handle:
            handle.write(payload)
        self.written += 1
        return path

    def from_samples(self, clip_id: str, samples: np.ndarray, rate: int) -> Path:
        """Samples (frames, channels) as 24-bit FLAC: lossless for 16- and 24-bit sources."""
        buffer = io.BytesIO()
        with ctrl_c_held():
            sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_24")
        return self.from_bytes(clip_id, buffer.getvalue(), ".flac")


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Ctrl-C waits for the block to end. soundfile writes an in-memory file through cffi callbacks, and a
    KeyboardInterrupt raised inside one is swallowed (cffi prints "Exception ignored" and the write goes on), so
    a Ctrl-C there was lost and the import finished with status 0. A SIGINT that comes meanwhile is delivered
    as the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def entry(where: str, clip_id: str, audio: Audio | None, text: str | None, speaker: str | None,
          language: str | None) -> Row | Unusable:
    """A row, or why the source entry makes none: no audio file, no transcript, no speaker, no known language."""
    if audio is None or (isinstance(audio, Path) and not audio.is_file()):
        return Unusable(where, clip_id, "missing_audio", f"no audio file {audio}" if audio else "no audio")
    if text is None:
        return Unusable(where, clip_id, "missing_transcript", f"no transcript for {audio}")
    if not text.strip():
        return Unusable(where, clip_id, "empty_text", "the transcript is empty")
    if not speaker:
        return Unusable(where, clip_id, "missing_speaker", "no speaker id")
    row = {"id": clip_id, "audio": audio, "text": " ".join(text.split()), "speaker": speaker}
    if language:
        try:
            row["language"] = manifest.canonical_language(language)
        except ValueError as error:
            return Unusable(where, clip_id, "bad_language", str(error))
    return Row(where, row)


# --------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------


def ljspeech(source: Path, options: Options, clips: ClipFiles) -> Iterator[Row | Unusable]:
    """LJSpeech: `metadata.csv` (`id|raw transcript|normalised transcript`, no quoting) beside `wavs/ID.wav`; one
    speaker, `--speaker` or the folder's name."""
    table = source / "metadata.csv" if source.is_dir() else source
    speaker = options.speaker or table.parent.name
    with table.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{table}:{number}"
            try:
                line = raw.decode("utf-8-sig").rstrip("\r\n")
            except UnicodeDecodeError as error:
                yield Unusable(where, None, "non_utf8", f"byte {error.start} is not UTF-8")
                continue
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) not in (2, 3) or not fields[0].strip():
                yield Unusable(where, None, "bad_line", f"{len(fields)} fields separated by |; expected id|text or id|raw|normalised")
                continue
            clip_id = fields[0].strip()
            yield entry(where, clip_id, table.parent / "wavs" / f"{clip_id}.wav", fields[-1], speaker, options.language)


def folders(source: Path, options: Options, clips: ClipFiles) -> Iterator[Row | Unusable]:
    """A folder per speaker, each clip (at any depth in it) beside a transcript of the same stem (`.txt` or `.lab`);
    a clip at the top of the source, in no speaker folder, is `--speaker`'s (unusable without it)."""
    for speaker_dir in sorted(path for path in source.iterdir() if path.is_dir()):
        found = sorted(path for path in speaker_dir.rglob("*") if path.is_file())
        yield from _folder_clips(speaker_dir, found, speaker_dir.name, f"{speaker_dir.name}/", options.language)
    top = sorted(path for path in source.iterdir() if path.is_file())
    yield from _folder_clips(source, top, options.speaker, "", options.language)


def _folder_clips(folder: Path, found: list[Path], speaker: str | None, prefix: str,
                  language: str | None) -> Iterator[Row | Unusable]:
    """The entries of the clips and transcripts `found` in `folder`, ids `PREFIX/path/in/folder/STEM`."""
    stems = {path.with_suffix("") for path in found if path.suffix.lower() in AUDIO_SUFFIXES}
    for path in found:
        clip_id = f"{prefix}{path.relative_to(folder).with_suffix('')}"
        if path.suffix.lower() in AUDIO_SUFFIXES:
            if speaker is None:
                yield Unusable(str(path), clip_id, "no_speaker_folder", f"a clip at the top of {folder}, in no speaker "
                               "folder: move it into a folder named by its speaker, or name its speaker with --speaker")
                continue
            transcript = next((path.with_suffix(s) for s in TRANSCRIPT_SUFFIXES if path.with_suffix(s).is_file()), None)
            try:
                text = transcript.read_text(encoding="utf-8-sig") if transcript else None
            except UnicodeDecodeError as error:
                yield Unusable(str(transcript), clip_id, "non_utf8", f"byte {error.start} is not UTF-8")
                continue
            yield entry(str(path), clip_id, path, text, speaker, language)
        elif path.suffix.lower() in TRANSCRIPT_SUFFIXES and path.with_suffix("") not in stems:
            yield Unusable(str(path), clip_id, "missing_audio", f"a transcript without a clip of stem {path.stem}")


def kaldi(source: Path, options: Options, clips: ClipFiles) -> Iterator[Row | Unusable]:
    """A Kaldi data directory: `wav.scp` (recording -> file), `text`, `utt2spk`, and where present `segments`
    (utterance -> recording, start, end: each segment is written out as a clip) and `utt2lang`."""
    recordings = _kaldi_table(source / "wav.scp")
    texts, speakers = _kaldi_table(source / "text"), _kaldi_table(source / "utt2spk")
    languages = _kaldi_table(source / "utt2lang") if (source / "utt2lang").is_file() else {}
    segments = _kaldi_table(source / "segments") if (source / "segments").is_file() else None
    utterances = list(segments or recordings)
    for utterance in utterances:
        where = f"{source / ('segments' if segments else 'wav.scp')}: {utterance}"
        recording = segments[utterance].split()[0] if segments else utterance
        # Checked before a segment is read: an utterance that makes no row costs no read of its recording.
        for table, name, reason in ((texts, "text", "missing_transcript"), (speakers, "utt2spk", "missing_speaker")):
            if utterance not in table:
                yield Unusable(where, utterance, reason, f"not in {name}")
                break
        else:
            audio = _kaldi_audio(source, recordings.get(recording), utterance, segments, clips)
            if isinstance(audio, Unusable):
                yield Unusable(where, utterance, audio.reason, audio.detail)
            else:
                yield entry(where, utterance, audio, texts[utterance], speakers[utterance],
                            languages.get(utterance, options.language))
    for utterance in texts.keys() - set(utterances):
        yield Unusable(f"{source / 'text'}: {utterance}", utterance, "missing_audio", "in text, not in wav.scp or segments")


KALDI_FILES = ("wav.scp", "text", "utt2spk", "segments", "utt2lang")


def _kaldi_path(source: Path, location: str) -> Path:
    """A wav.scp file name: absolute, or relative to the data directory."""
    return Path(location) if os.path.isabs(location) else source / location


def _kaldi_table(path: Path) -> dict[str, str]:
    """A Kaldi table: the first field of each line -> the rest."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a Kaldi data directory needs wav.scp, text and utt2spk")
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, rest = line.strip().partition(" ")
        if key:
            table[key] = rest.strip()
    return table


def _kaldi_audio(source: Path, location: str | None, utterance: str, segments: dict | None,
                 clips: ClipFiles) -> Audio | Unusable:
    """The audio file of an utterance: its wav.scp file, or its segment of one, to be written out."""
    if location is None:
        return Unusable("", utterance, "missing_audio", "its recording is not in wav.scp")
    if location.endswith("|"):
        return Unusable("", utterance, "pipe_command", f"wav.scp runs a command ({location}); write its output to a file")
    path = _kaldi_path(source, location)
    if segments is None:
        return path
    _, start, end = segments[utterance].split()
    try:
        with sf.SoundFile(str(path)) as recording:
            rate, frames = recording.samplerate, recording.frames
            first, last = round(float(start) * rate), round(float(end) * rate)
            # A segment may end a little past the recording (times rounded); one outside it is a mistake.
            if not 0 <= first < last <= frames + 0.01 * rate:
                return Unusable("", utterance, "bad_segment", f"{start}-{end} s lies outside {path} ({frames / rate:.2f} s)")
            recording.seek(first)
            samples = recording.read(last - first, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        return Unusable("", utterance, "missing_audio" if not path.is_file() else "unreadable_audio", f"{path}: {error}")
    return partial(clips.from_samples, utterance, samples, rate)


def huggingface(source: Path, options: Options, clips: ClipFiles) -> Iterator[Row | Unusable]:
    """A Hugging Face dataset: a `save_to_disk` folder, or parquet or arrow files (a file or a folder of them).
    Audio stored in it is written out once; columns are found by their usual names unless given."""
    import datasets

    dataset = _open_dataset(source, options.split)
    columns = _dataset_columns(dataset, dict(options.columns))
    if isinstance(dataset.features[columns["audio"]], datasets.Audio):
        dataset = dataset.cast_column(columns["audio"], datasets.Audio(decode=False))  # bytes as stored, no decoder
    print(f"hf: columns used {columns}; not kept: {', '.join(sorted(set(dataset.column_names) - set(columns.values()))) or 'none'}")
    for index, item in enumerate(dataset):
        clip_id = str(item[columns["id"]]) if "id" in columns else f"{index:08d}"
        where = f"{source} row {index}"
        audio = _dataset_audio(item[columns["audio"]], clip_id, source, clips)
        if isinstance(audio, Unusable):
            yield Unusable(where, clip_id, audio.reason, audio.detail)
            continue
        speaker = str(item[columns["speaker"]]) if "speaker" in columns and item[columns["speaker"]] is not None else options.speaker
        language = item[columns["language"]] if "language" in columns else None
        yield entry(where, clip_id, audio, item[columns["text"]], speaker, language or options.language)


# The first column of these names that a dataset has plays the role, unless --ROLE-column names another.
DATASET_COLUMNS = {
    "audio": ("audio", "speech", "wav"),
    "text": ("text", "normalized_text", "transcription", "transcript", "sentence", "raw_text"),
    "speaker": ("speaker_id", "speaker", "client_id", "spk_id"),
    "language": ("language", "locale", "lang"),
    "id": ("id", "utterance_id", "audio_id", "segment_id", "key"),
}


def _open_dataset(source: Path, split: str | None):
    import datasets

    if source.is_dir() and ((source / "state.json").is_file() or (source / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(source))
    else:
        found = sorted(source.glob("**/*.parquet")) + sorted(source.glob("**/*.arrow")) if source.is_dir() else [source]
        if not found:
            raise FileNotFoundError(f"{source}: no save_to_disk folder, parquet or arrow file")
        if found[0].suffix == ".parquet":
            loaded = datasets.Dataset.from_parquet([str(path) for path in found])
        else:
            loaded = datasets.concatenate_datasets([datasets.Dataset.from_file(str(path)) for path in found])
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) > 1:
            raise ValueError(f"{source} has splits {', '.join(loaded)}: choose one with --split")
        split = split or next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}, only {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _dataset_columns(dataset, given: dict[str, str]) -> dict[str, str]:
    """Role -> column: those given, else the first usual name the dataset has; audio and text are required."""
    columns = {}
    for role, names in DATASET_COLUMNS.items():
        name = given.get(role) or next((name for name in names if name in dataset.column_names), None)
        if name is not None and name not in dataset.column_names:
            raise ValueError(f"--{role}-column {name}: the dataset has columns {', '.join(dataset.column_names)}")
        if name is not None:
            columns[role] = name
    missing = [role for role in ("audio", "text") if role not in columns]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} column among {', '.join(dataset.column_names)}: "
                         f"name it with --{missing[0]}-column")
    return columns


def _dataset_audio(value, clip_id: str, source: Path, clips: ClipFiles) -> Audio | Unusable:
    """A dataset's audio cell as a file: its stored bytes to be written out, its samples to be written as FLAC, or
    the file it names (relative to the dataset)."""
    if not isinstance(value, dict):
        return Unusable("", clip_id, "missing_audio", f"the audio cell holds a {type(value).__name__}")
    name = value.get("path") or ""
    if value.get("bytes"):
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in AUDIO_SUFFIXES else ".wav"
        return partial(clips.from_bytes, clip_id, value["bytes"], suffix)
    if value.get("array") is not None and value.get("sampling_rate"):
        return partial(clips.from_samples, clip_id, np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]))
    for path in (Path(name), (source if source.is_dir() else source.parent) / name):
        if name and path.is_file():
            return path
    return Unusable("", clip_id, "missing_audio", f"no stored audio and no file {name!r}")


def lhotse_cuts(source: Path, options: Options, clips: ClipFiles) -> Iterator[Row | Unusable]:
    """A lhotse CutSet (`cuts.jsonl.gz`), read with lhotse: a cut that is a whole one-file recording keeps its
    file, any other (part of a recording, several channels or files) is written out as a clip; its
    supervisions give the text (joined in time order), the one speaker and the language."""
    for index, cut in enumerate(_read_cuts(source)):
        where = f"{source} cut {index}"
        supervisions = sorted(cut.supervisions, key=lambda supervision: supervision.start)
        speakers = {supervision.speaker for supervision in supervisions}
        if len(speakers) > 1:
            yield Unusable(where, cut.id, "several_speakers", f"speakers {', '.join(sorted(map(str, speakers)))} in one cut")
            continue
        if not cut.has_recording:
            yield Unusable(where, cut.id, "missing_audio", "the cut has no recording")
            continue
        try:
            audio = _whole_recording_file(cut) or partial(clips.from_samples, cut.id, cut.load_audio().T, cut.sampling_rate)
        except Exception as error:  # lhotse raises whatever its audio backend raises
            yield Unusable(where, cut.id, "unreadable_audio", files.first_line(error))
            continue
        text = " ".join(s.text for s in supervisions if s.text) if supervisions else None
        speaker = next(iter(speakers), None) or options.speaker
        language = next((s.language for s in supervisions if s.language), None) or options.language
        yield entry(where, cut.id, audio, text, speaker, language)


def _read_cuts(source: Path) -> Iterator:
    """The cuts of a CutSet file; a damaged one (truncated, not gzip, not JSON lines of cuts) is one error naming it."""
    from lhotse import CutSet

    try:
        yield from CutSet.from_file(source)
    # gzip's EOFError (truncated) and BadGzipFile (an OSError), json's ValueError, and lhotse's TypeError or
    # KeyError for a JSON line that is no cut.
    except (EOFError, OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{source}: not a whole CutSet file ({files.first_line(error)})") from None


def _whole_recording_file(cut) -> Path | None:
    """The file of a cut that spans the whole of a one-channel recording stored as one file, else None."""
    recording = cut.recording
    sources = recording.sources
    whole = cut.start == 0 and abs(cut.duration - recording.duration) < 1e-3 and recording.num_channels == 1
    if whole and len(sources) == 1 and sources[0].type == "file":
        return Path(sources[0].source)
    return None


IMPORTERS = {"ljspeech": ljspeech, "folders": folders, "kaldi": kaldi, "hf": huggingface, "lhotse": lhotse_cuts}


# --------------------------------------------------------------------------
# Writing the manifest
# --------------------------------------------------------------------------


@dataclass
class ImportResult:
    manifest: Path
    rows: list[dict]
    unusable: list[Unusable]
    clips: ClipFiles
    seconds: float

    def counts(self) -> dict[str, int]:
        return dict(Counter(item.reason for item in self.unusable).most_common())

    def summary(self) -> str:
        """`rows read N = kept K + rejected R (reason n, ...)`, as prepare counts."""
        return manifest.reconcile(len(self.rows) + len(self.unusable), len(self.rows), self.counts())


def run_import(fmt: str, source: str | Path, out: str | Path, options: Options = Options()) -> ImportResult:
    """Import `source` in format `fmt` into the manifest `out` (audio paths relative to it), the unusable entries
    listed in `OUT.report.jsonl` (written, empty or not, so that an old report never stays); an `out` that is a
    file the import reads is refused before anything is written."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"no such source: {source}")
    refuse_overwriting_inputs(fmt, source, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clips = ClipFiles(out.parent / "clips")
    rows, unusable, seen, started = [], [], set(), time.perf_counter()
    for item in IMPORTERS[fmt](source, options, clips):
        if isinstance(item, Row) and item.fields["id"] in seen:
            clip_id = item.fields["id"]
            item = Unusable(item.where, clip_id, "duplicate_id", f"id {clip_id!r} is taken by an earlier row")
        if isinstance(item, Unusable):
            unusable.append(item)
            continue
        seen.add(item.fields["id"])
        audio = item.fields["audio"]
        audio = audio if isinstance(audio, Path) else audio()  # the row is kept: its clip is written now
        rows.append(dict(item.fields, audio=os.path.relpath(audio, out.parent)))
    files.write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    files.write_text(report_path(out), "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in unusable))
    return ImportResult(out, rows, unusable, clips, time.perf_counter() - started)


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.jsonl")


def refuse_overwriting_inputs(fmt: str, source: Path, out: Path) -> None:
    """Refuse an `out` (or its report) that is, or links to, a file the import reads: the manifest and report
    replace their files whole, so such an import would destroy its own source. Audio is refused by its suffix,
    which also covers recordings read without being named in advance (a lhotse cut's)."""
    inputs = input_files(fmt, source)
    for path, name in ((out, f"--out {out}"), (report_path(out), f"--out {out}: its report {report_path(out)}")):
        if path.suffix.lower() in AUDIO_SUFFIXES:
            raise ValueError(f"{name} is named as audio ({path.suffix}), which imports read: the manifest is JSONL, "
                             "write it elsewhere")
        if path.resolve() in inputs:
            raise ValueError(f"{name} is {path.resolve()}, a file this import reads: write the manifest elsewhere")


def input_files(fmt: str, source: Path) -> set[Path]:
    """The files, resolved, that an import of `source` reads besides its audio: the source file itself, else the
    format's files in the source folder (a Kaldi directory's recordings included)."""
    if source.is_file():
        return {source.resolve()}
    if fmt == "ljspeech":
        found = [source / "metadata.csv"]
    elif fmt == "kaldi":
        found = [source / name for name in KALDI_FILES]
        if found[0].is_file():
            found += [_kaldi_path(source, location) for location in _kaldi_table(found[0]).values()]
    else:  # folders: its clips and transcripts; hf: a save_to_disk folder's or parquet or arrow files
        suffixes = AUDIO_SUFFIXES + TRANSCRIPT_SUFFIXES if fmt == "folders" else (".parquet", ".arrow", ".json")
        found = [path for path in source.rglob("*") if path.suffix.lower() in suffixes]
    return {path.resolve() for path in found}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    kept = f"no manifest written; the clips written so far (in {Path(args.out).parent / 'clips'}) are reused when the same command runs again"
    return commands.run(lambda: _import_and_report(args), lambda _: commands.interrupted(kept))


def _import_and_report(args: argparse.Namespace) -> int:
    columns = tuple((role, getattr(args, f"{role}_column")) for role in DATASET_COLUMNS if getattr(args, f"{role}_column"))
    language = manifest.canonical_language(args.language) if args.language else None
    result = run_import(args.format, args.source, args.out, Options(language, args.speaker, args.split, columns))
    commands.list_first([f"{item.where} ({item.id or 'no id'}): {item.reason}: {item.detail}" for item in result.unusable])
    print(f"dropped by this format: {DROPPED[args.format]}\n"
          f"clips written to {result.clips.folder}: {result.clips.written} (and {result.clips.reused} already there)\n"
          f"report: {report_path(result.manifest)}\n"
          f"{result.summary()}; {len(result.rows) / max(result.seconds, 1e-9):.0f} rows/s")
    if not result.rows:  # nothing to prepare: an error, and no next command
        return commands.fail(ValueError(f"nothing usable found in {args.source}: no row kept; "
                                        f"report: {report_path(result.manifest)}"))
    print(f"next: python prepare.py --manifest {result.manifest} --out cache/{result.manifest.stem}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="importers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("format", choices=list(IMPORTERS), help="the source's format")
    add("source", help="the source: a folder, or its main file (metadata.csv, cuts.jsonl.gz, a parquet file)")
    add("--out", required=True, help="the manifest to write (JSONL); clips written out go to clips/ beside it")
    add("--language", help="language of rows whose source says none (any BCP 47 spelling; stored canonical) [none]")
    add("--speaker", help="speaker of rows whose source names none (LJSpeech: one speaker; folders: the clips in no "
        "speaker folder) [ljspeech: the folder's name; folders: none, such clips are unusable]")
    add("--split", help="hf: the split of a dataset with several [its only one]")
    for role, names in DATASET_COLUMNS.items():
        add(f"--{role}-column", help=f"hf: the {role} column [the first of {', '.join(names)}]")
    return parser.parse_args(argv)


if __name__ == "__main__":
    commands.loaded()
    sys.exit(main())
