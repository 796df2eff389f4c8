"""Long-form speed and drift: chunks per second and the real-time factor of a 500-word text, at batch 1 and 4.

    python benchmarks/longform_benchmark.py                          # tiny preset, 500 words, B = 1 and 4
    python benchmarks/longform_benchmark.py --words 200 --batch-sizes 1 --max-seconds 4 [--voice-prompts DIR]

The text is the English transcripts of the shared voice prompts
(../shared/data/voice_prompts) repeated to `--words` words; the reference is
one of those recordings. B = 1 speaks the text once (the package's
`generate` per chunk, what `infer.py --text-file F --out F.wav` runs); B = 4
speaks four copies at once, each row at its own chunk (our batched loop).
Sampled with the serve engine's defaults, `--seed`, `--chunk-chars` and
`--context-chunks` as infer.py's defaults. Printed per batch size: chunks,
failed chunks, audio seconds, wall seconds (generation and decoding), chunks/s
and the real-time factor (wall / audio seconds; under 1 is faster than real
time). Then the drift of the B = 1 text, judged by the offline default judge
(resemblyzer, pocketsphinx): plumbing only on the tiny preset, whose weights
are random.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import generation  # noqa: E402
import longform  # noqa: E402
import metrics  # noqa: E402
import model_utils  # noqa: E402
import voice_prompts  # noqa: E402

SPEAKERS = ("en_woman", "en_man", "belinda", "chadwick")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longform_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=model_utils.TINY_PRESET, help="preset or model directory [tiny]")
    parser.add_argument("--audio-tokenizer", help="audio tokenizer directory, with a model directory")
    parser.add_argument("--words", type=int, default=500, help="words of the text [500]")
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes [1,4]")
    parser.add_argument("--chunk-chars", type=int, default=longform.DEFAULT_CHUNK_CHARS, help="[%(default)s]")
    parser.add_argument("--context-chunks", type=int, default=longform.DEFAULT_CONTEXT_CHUNKS, help="[%(default)s]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    parser.add_argument("--max-seconds", type=float, default=generation.Sampling.max_seconds,
                        help="longest chunk, as infer.py's flag [%(default)s]; the random tiny model often runs to it")
    voice_prompts.add_flag(parser)
    return parser


def long_text(prompts: Path, words: int) -> str:
    said = " ".join((prompts / f"{name}.txt").read_text(encoding="utf-8").strip() for name in SPEAKERS).split()
    return " ".join(said[index % len(said)] for index in range(words))


def speak(bundle, documents, sampling, args, batch_size: int) -> tuple[list[longform.LongClone], float]:
    started = time.perf_counter()
    clips = dict(longform.speak_documents(bundle, documents, sampling, data.PromptLayout(), args.context_chunks,
                                          batch_size=batch_size))
    return [clips[index] for index in range(len(documents))], time.perf_counter() - started


def report(batch_size: int, clips: list[longform.LongClone], wall: float, rate: int) -> None:
    chunks = sum(len(clip.chunks) for clip in clips)
    failed = sum(chunk.failure is not None for clip in clips for chunk in clip.chunks)
    seconds = sum(len(chunk.clone.waveform) for clip in clips for chunk in clip.chunks if chunk.clone.waveform is not None) / rate
    print(f"B = {batch_size}: {len(clips)} text(s), {chunks} chunks ({failed} failed), {seconds:.1f} s of audio in {wall:.1f} s: "
          f"{chunks / wall:.2f} chunks/s, real-time factor {wall / seconds:.2f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = voice_prompts.folder(args)
    bundle = model_utils.load_bundle(args.model, args.audio_tokenizer, seed=args.seed)
    rate = bundle.audio_tokenizer.sampling_rate
    reference_path = prompts / "en_woman.wav"
    reference = generation.encode_reference(bundle, str(reference_path), (prompts / "en_woman.txt").read_text().strip(), False)
    chunks = longform.chunk_text(long_text(prompts, args.words), args.chunk_chars)
    print(f"{args.words} words in {len(chunks)} chunks of at most {args.chunk_chars} characters, "
          f"context {args.context_chunks} chunks, at most {args.max_seconds:g} s a chunk, model {args.model}")
    sampling = generation.Sampling(seed=args.seed, max_seconds=args.max_seconds)
    first = None
    for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
        documents = [longform.Document(reference, chunks) for _ in range(batch_size)]
        clips, wall = speak(bundle, documents, sampling, args, batch_size)
        report(batch_size, clips, wall, rate)
        first = first or clips[0]
    judge = metrics.build_judge()
    embedding = judge.reference_embedding(str(reference_path), lambda: data.load_audio(reference_path, rate), rate)
    drift = longform.measure_drift(judge, first, embedding, "en", rate)
    print("drift of the first text: " + ", ".join(f"{name} {metrics.fmt(value)}" for name, value in drift["summary"].items()))
    print("per chunk SIM: " + " ".join(metrics.fmt(row.get("sim"), 2) for row in drift["chunks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
