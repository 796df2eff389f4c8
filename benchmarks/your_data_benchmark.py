"""Your data, measured: importer rows/s, the segmenter's cuts and WER, prepare's clips/s in 1 and 2 processes.

    python benchmarks/your_data_benchmark.py [--rows 2000] [--clips 24] [--skip importers,segment,prepare,flows]
                                             [--voice-prompts DIR]

* importers: a corpus of `--rows` rows in each format, written here from the shared voice prompts
  (`--voice-prompts`, ../shared/data/voice_prompts by default; hard links,
  so they cost no disk), imported and timed; the formats whose audio is no file of its own (Kaldi segments,
  Hugging Face stored audio, lhotse parts of recordings) write a clip per row, which is timed too;
* segment: the five English voice prompts joined by pauses of known position (0.8-1.6 s), segmented with
  pocketsphinx; each cut's distance to its true pause (0 inside it) and to the pause's middle, and each clip's WER;
* prepare: `--clips` distinct clips (the demo clips, each copy with a little noise so its content differs),
  prepared by `python prepare.py` and by `torchrun --nproc-per-node 2 prepare.py`, each run again on its finished
  cache to measure what is not encoding (start-up, validation, writing), in wall and CPU seconds; and the encode rate of one process with
  the tiny tokenizer and with a HuBERT-base semantic teacher (the released tokenizer's teacher size), from
  which the hours for 10,000 hours of audio on 8 processes are projected;
* flows: each kind of source (five rows, or the joined recording) to a training run in three commands (import
  or segment, prepare, train 5 steps of the tiny preset), each timed end to end as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import importers  # noqa: E402
import metrics  # noqa: E402
import model_utils  # noqa: E402
import segment  # noqa: E402
import voice_prompts  # noqa: E402

ENGLISH = ("en_woman", "en_man", "vex", "belinda", "chadwick")


def text_of(prompts: Path, name: str) -> str:
    return (prompts / f"{name}.txt").read_text(encoding="utf-8").strip()


# --------------------------------------------------------------------------
# Importers
# --------------------------------------------------------------------------


def write_sources(folder: Path, rows: int, prompts: Path) -> dict[str, Path]:
    """One source of `rows` rows per format, two speakers; audio files are hard links to the five English voice
    prompts in turn, Kaldi segments and lhotse parts start at 0-4 s of one recording."""
    lj = folder / "lj"
    (lj / "wavs").mkdir(parents=True)
    for index in range(rows):
        os.link(prompts / f"{ENGLISH[index % 5]}.wav", lj / "wavs" / f"u{index}.wav")
    (lj / "metadata.csv").write_text("".join(f"u{i}|raw|{text_of(prompts, ENGLISH[i % 5])}\n" for i in range(rows)), encoding="utf-8")
    voices = folder / "voices"
    for index in range(rows):
        speaker = voices / f"s{index % 2}"
        speaker.mkdir(parents=True, exist_ok=True)
        os.link(prompts / f"{ENGLISH[index % 5]}.wav", speaker / f"u{index}.wav")
        (speaker / f"u{index}.txt").write_text(text_of(prompts, ENGLISH[index % 5]), encoding="utf-8")
    kaldi = folder / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text(f"rec {prompts / 'belinda.wav'}\n")
    (kaldi / "segments").write_text("".join(f"u{i} rec {i % 5}.0 {i % 5 + 1.2}\n" for i in range(rows)))
    (kaldi / "text").write_text("".join(f"u{i} {text_of(prompts, 'belinda')}\n" for i in range(rows)))
    (kaldi / "utt2spk").write_text("".join(f"u{i} s{i % 2}\n" for i in range(rows)))
    return {"ljspeech": lj, "folders": voices, "kaldi": kaldi, "hf": write_dataset(folder, rows, prompts),
            "lhotse": write_cuts(folder, rows, prompts)}


def write_dataset(folder: Path, rows: int, prompts: Path) -> Path:
    import datasets

    payloads = [(prompts / f"{name}.wav").read_bytes() for name in ENGLISH]
    table = {"id": [f"u{i}" for i in range(rows)], "audio": [{"bytes": payloads[i % 5], "path": "x.wav"} for i in range(rows)],
             "text": [text_of(prompts, ENGLISH[i % 5]) for i in range(rows)], "speaker_id": [f"s{i % 2}" for i in range(rows)]}
    datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio()).save_to_disk(str(folder / "hf"))
    return folder / "hf"


def write_cuts(folder: Path, rows: int, prompts: Path) -> Path:
    """Half the cuts whole recordings (their file kept), half parts of one (written out)."""
    from lhotse import CutSet, Recording, SupervisionSegment

    recording = Recording.from_file(str(prompts / "en_man.wav"), recording_id="en_man")
    cuts = []
    for index in range(rows):
        cut = (recording.to_cut() if index % 2 else recording.to_cut().truncate(offset=index % 5, duration=1.5)).with_id(f"c{index}")
        cut.supervisions = [SupervisionSegment(f"s{index}", "en_man", cut.start, cut.duration, text="words", speaker="m")]
        cuts.append(cut)
    CutSet.from_cuts(cuts).to_file(str(folder / "cuts.jsonl.gz"))
    return folder / "cuts.jsonl.gz"


def bench_importers(rows: int, prompts: Path) -> None:
    print(f"importers, {rows} rows each (rows/s over the whole import: parsing, checks, clips written, manifest)")
    with tempfile.TemporaryDirectory() as folder:
        sources = write_sources(Path(folder), rows, prompts)
        for fmt, source in sources.items():
            started = time.perf_counter()
            result = importers.run_import(fmt, source, Path(folder) / "out" / f"{fmt}.jsonl")
            seconds = time.perf_counter() - started
            print(f"  {fmt:<9} {len(result.rows) / seconds:>8.0f} rows/s  ({len(result.rows)} rows, "
                  f"{result.clips.written} clips written, {seconds:.2f} s)")


# --------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------


def write_joined(folder: Path, prompts: Path) -> tuple[list[tuple[float, float]], float]:
    """`folder/joined/long.wav`: the English prompts joined by pauses of 0.8-1.6 s; each prompt's span and the length."""
    parts, spans, position = [], [], 0.0
    for name, pause in zip(ENGLISH, (0.8, 1.6, 1.0, 1.2, 0.0)):
        samples, rate = sf.read(prompts / f"{name}.wav", dtype="float32")
        samples = librosa.resample(samples, orig_sr=rate, target_sr=24000) if rate != 24000 else samples
        spans.append((position, position + len(samples) / 24000))
        parts += [samples, np.zeros(round(pause * 24000), dtype=np.float32)]
        position += len(samples) / 24000 + pause
    (folder / "joined").mkdir()
    sf.write(folder / "joined" / "long.wav", np.concatenate(parts), 24000)
    return spans, position


def bench_segment(prompts: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        spans, position = write_joined(Path(folder), prompts)
        started = time.perf_counter()
        result = segment.segment([str(Path(folder) / "joined")], Path(folder) / "out", segment.Settings(1.0, 11.0, "en"))
        seconds = time.perf_counter() - started
    clips = [(row["start"], row["end"]) for row in result.rows]
    pause_spans = [(left[1], right[0]) for left, right in zip(spans, spans[1:])]
    # The cut at each inserted pause: the middle between the last clip ending before its end and the first starting
    # after its start. Other cuts fall inside one prompt, at its own pauses (a short pause between two stretches
    # the speaker check did not join).
    cuts = [(max(end for _, end in clips if end <= b) + min(start for start, _ in clips if start >= a)) / 2 for a, b in pause_spans]
    outside = [max(a - cut, cut - b, 0.0) for cut, (a, b) in zip(cuts, pause_spans)]
    from_middle = [abs(cut - (a + b) / 2) for cut, (a, b) in zip(cuts, pause_spans)]
    print(f"segment: {position:.1f} s of audio in {seconds:.1f} s ({position / seconds:.2f} s of audio per s, "
          f"VAD, speaker embeddings, pocketsphinx, MOS); {len(clips)} clips for {len(ENGLISH)} prompts "
          f"({len(clips) - len(ENGLISH)} cuts inside a prompt); {result.summary()}")
    print(f"  cut at each inserted pause, outside it: mean {1000 * np.mean(outside):.0f} ms, max {1000 * max(outside):.0f} ms; "
          f"from the pause's middle: mean {1000 * np.mean(from_middle):.0f} ms, max {1000 * max(from_middle):.0f} ms")
    words = errors = 0.0
    for (start, end), name in zip(spans, ENGLISH):  # a prompt may give several clips (one voice, short pauses): their texts joined
        said = " ".join(row["text"] for row in result.rows if start - 0.15 <= row["start"] < row["end"] <= end + 0.15)
        truth = text_of(prompts, name)
        wer = metrics.error_rate(truth, said, "en")
        count = len(metrics.normalize_for_scoring(truth).split())
        words, errors = words + count, errors + wer * count
        print(f"  {name:<9} WER {wer:.3f}  {said!r}")
    print(f"  WER over all {int(words)} words: {errors / words:.3f}")


# --------------------------------------------------------------------------
# prepare in 1 and 2 processes
# --------------------------------------------------------------------------


def write_clips(folder: Path, count: int) -> tuple[Path, float]:
    """`count` distinct clips (demo clips with a little noise each) and their manifest; returns it and the audio's seconds."""
    demo = ROOT / "demo" / "data"
    rows = [json.loads(line) for line in (demo / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    rng, lines, seconds = np.random.default_rng(0), [], 0.0
    for index in range(count):
        source = rows[index % len(rows)]
        samples, rate = sf.read(demo / source["audio"], dtype="float32")
        samples = samples + rng.normal(0, 1e-3, samples.shape).astype(np.float32)
        sf.write(folder / f"c{index}.wav", samples, rate)
        seconds += len(samples) / rate
        lines.append(json.dumps({"id": f"c{index}", "audio": f"c{index}.wav", "text": source["text"],
                                 "speaker": source["speaker"]}, ensure_ascii=False))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "m.jsonl", seconds


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, of the command and every process it waited for) of a command."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def encode_rate(audio_tokenizer, prompts: Path, seconds: float = 6.0) -> float:
    """Seconds of audio one process encodes per CPU second (the best of three encodes of a `seconds`-long clip):
    its rate on a core of its own, whatever else the machine runs."""
    samples = data.load_audio(prompts / "en_woman.wav", audio_tokenizer.sampling_rate)
    clip = np.resize(samples, round(seconds * audio_tokenizer.sampling_rate))
    best = min(_time(lambda: data.encode_clip(audio_tokenizer, clip)) for _ in range(3))
    return seconds / best


def _time(function) -> float:
    started = time.process_time()
    function()
    return time.process_time() - started


def hubert_base_tokenizer():
    """The tiny preset's codec with a HuBERT-base semantic teacher (12 layers, 768 wide: the released
    teacher's size), random weights, codebooks marked initialised as the tiny preset's are."""
    from transformers import HubertConfig

    tokenizer = model_utils._construct_audio_tokenizer(model_utils.TINY_AUDIO_TOKENIZER_CONFIG, HubertConfig(), "cpu")
    for codebook in model_utils._codebooks(tokenizer):
        codebook.inited.fill_(1.0)
    return tokenizer.eval()


def bench_prepare(count: int, prompts: Path) -> None:
    """1 and 2 processes, each run twice on one cache: the second run encodes nothing, so the difference is the
    encoding. The cores are shared with other jobs, so CPU seconds (which contention does not inflate) measure
    the work, and wall seconds what this machine gave. torchrun gives each process one OpenMP thread; the single
    process gets the same, so that the two compare processes, not threads."""
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as folder:
        manifest_path, audio_seconds = write_clips(Path(folder), count)
        print(f"prepare: {count} clips, {audio_seconds:.1f} s of audio, tiny preset's audio tokenizer, CPU, one thread a process")
        cpu_per_clip = {}
        for processes in (1, 2):
            launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                                "--standalone", "--nproc-per-node", str(processes)]
            command = launcher + ["prepare.py", "--manifest", str(manifest_path), "--out", f"{folder}/cache{processes}",
                                  "--device", "cpu", "--batch-size", "4"]
            (wall, cpu), (wall_again, cpu_again) = timed(command, one_thread), timed(command, one_thread)
            cpu_per_clip[processes] = (cpu - cpu_again) / count
            print(f"  {processes} process(es): wall {wall:.1f} s ({wall_again:.1f} s of it start-up, validation and "
                  f"writing: a run on the finished cache), {count / (wall - wall_again):.2f} clips/s encoding, "
                  f"{count / wall:.2f} clips/s end to end; CPU {cpu:.1f} s ({cpu_again:.1f} s), "
                  f"{cpu_per_clip[processes]:.2f} CPU-s per clip encoded: {1 / cpu_per_clip[processes]:.2f} clips/s "
                  f"per process on a core of its own")
        print(f"  load average (1, 5, 15 min) at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}")
    efficiency = cpu_per_clip[1] / cpu_per_clip[2]
    torch.set_num_threads(1)  # one thread per process, as under torchrun
    tiny, base = encode_rate(model_utils.build_tiny_audio_tokenizer(), prompts), encode_rate(hubert_base_tokenizer(), prompts)
    print(f"  2 processes spend {100 / efficiency:.0f}% of one process's CPU per clip: {100 * min(1.0, efficiency):.0f}% "
          "scaling efficiency with a core per process")
    print(f"  one process, one thread, encodes {tiny:.2f} s of audio per CPU-s (tiny teacher), {base:.2f} (HuBERT-base teacher)")
    hours = 10_000 / (8 * base * min(1.0, efficiency))
    print(f"  projection: 10,000 h of audio on 8 processes at {base:.2f} s/s each and {100 * min(1.0, efficiency):.0f}% "
          f"scaling: {hours:,.0f} h (a CPU core's rate per process; a GPU's rate was not measured here)")


def bench_flows(prompts: Path) -> None:
    """Each kind of source to a training run in three commands (tiny preset, CPU, 5 training steps), timed."""
    print("three commands per source (tiny preset, CPU): import or segment, prepare, train 5 steps; seconds each")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sources = write_sources(folder, 5, prompts)
        write_joined(folder, prompts)
        first = {fmt: [sys.executable, "importers.py", fmt, str(source), "--out", f"{folder}/out/{fmt}.jsonl", "--language", "en"]
                 for fmt, source in sources.items()}
        first["segment"] = [sys.executable, "segment.py", str(folder / "joined"), "--out", f"{folder}/out/segment",
                            "--language", "en", "--max-seconds", "11"]
        for kind, command in first.items():
            manifest_path = f"{folder}/out/segment/manifest.jsonl" if kind == "segment" else f"{folder}/out/{kind}.jsonl"
            prepare = [sys.executable, "prepare.py", "--manifest", manifest_path, "--out", f"{folder}/cache/{kind}"]
            train = [sys.executable, "train.py", "--cache", f"{folder}/cache/{kind}", "--val-manifest", "", "--max-steps", "5",
                     "--eval-every", "0", "--save-every", "5", "--device", "cpu", "--precision", "fp32",
                     "--out-dir", f"{folder}/runs", "--run-name", kind]
            seconds = [timed(step)[0] for step in (command, prepare, train)]
            kept = json.loads(Path(f"{folder}/cache/{kind}/summary.json").read_text())["kept"]
            print(f"  {kind:<9} {kept} rows kept: {seconds[0]:5.1f} s, {seconds[1]:5.1f} s, {seconds[2]:5.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="your_data_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows per importer source [2000]")
    parser.add_argument("--clips", type=int, default=24, help="clips prepared [24]")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: importers, segment, prepare, flows")
    voice_prompts.add_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = voice_prompts.folder(args)
    skip = set(args.skip.split(","))
    if "importers" not in skip:
        bench_importers(args.rows, prompts)
    if "segment" not in skip:
        bench_segment(prompts)
    if "prepare" not in skip:
        bench_prepare(args.clips, prompts)
    if "flows" not in skip:
        bench_flows(prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
