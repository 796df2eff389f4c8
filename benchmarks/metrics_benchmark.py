"""How well the offline clone-quality metrics work on real speech, and what they cost.

    python benchmarks/metrics_benchmark.py [--voice-prompts DIR]

Prints, on the shared voice prompts (../shared/data/voice_prompts): speaker similarity of two halves of
one recording vs halves of two speakers (and of noise), the offline ASR's WER
on each English prompt, and the metrics' time per clip on this CPU.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import metrics  # noqa: E402
import voice_prompts  # noqa: E402

SPEAKERS = ("en_man", "en_woman", "belinda", "chadwick", "vex", "shrek_donkey_es", "zh_man_sichuan")
ENGLISH = ("en_man", "en_woman", "belinda", "chadwick", "vex")
RATE = 24000


def measure(prompts: Path) -> None:
    started = time.time()
    judge = metrics.build_judge()
    print(f"loading the speaker encoder and ASR: {time.time() - started:.2f} s")
    clips = {name: data.load_audio(prompts / f"{name}.wav", RATE) for name in SPEAKERS}
    texts = {name: (prompts / f"{name}.txt").read_text(encoding="utf-8") for name in SPEAKERS}
    judge.encoder.embed(clips["vex"][:RATE], RATE)  # the first LSTM call pays one-time setup

    halves, embed_seconds, audio_seconds = {}, 0.0, 0.0
    for name, clip in clips.items():
        middle = len(clip) // 2
        for index, part in enumerate((clip[:middle], clip[middle:])):
            started = time.time()
            halves[name, index] = judge.encoder.embed(part, RATE)
            embed_seconds += time.time() - started
            audio_seconds += len(part) / RATE
    same = {name: metrics.cosine(halves[name, 0], halves[name, 1]) for name in SPEAKERS}
    different = [metrics.cosine(halves[a, 0], halves[b, 1]) for a, b in itertools.permutations(SPEAKERS, 2)]
    noise = np.random.default_rng(0).normal(0.0, 0.1, 3 * RATE).astype(np.float32)
    noise_sim = [metrics.cosine(judge.encoder.embed(noise, RATE), halves[name, 0]) for name in SPEAKERS]
    print(f"\nSIM ({judge.encoder.name}), first vs second half of each prompt:")
    for name, value in same.items():
        print(f"  {name:<16} {value:.3f}")
    print(f"same speaker:      mean {np.mean(list(same.values())):.3f}, lowest {min(same.values()):.3f}")
    print(f"different speakers: mean {np.mean(different):.3f}, highest {max(different):.3f} ({len(different)} pairs)")
    print(f"margin (mean same - mean different): {np.mean(list(same.values())) - np.mean(different):.3f}")
    print(f"noise vs each speaker: highest {max(noise_sim):.3f}")
    print(f"embedding time: {embed_seconds / len(halves):.3f} s per clip ({audio_seconds / embed_seconds:.1f} s of audio per s)")

    print(f"\nWER ({judge.asr.name}):")
    errors = words = asr_seconds = asr_audio = 0.0
    for name in ENGLISH:
        started = time.time()
        transcript = judge.asr.transcribe(clips[name], RATE, "en")
        asr_seconds += time.time() - started
        asr_audio += len(clips[name]) / RATE
        rate = metrics.error_rate(texts[name], transcript, "en")
        n = len(metrics.normalize_for_scoring(texts[name]).split())
        errors, words = errors + rate * n, words + n
        print(f"  {name:<10} WER {rate:.3f} ({n} words): {transcript}")
    print(f"all five: WER {errors / words:.3f} over {int(words)} words")
    noise_wer = metrics.error_rate(texts["en_man"], judge.asr.transcribe(noise, RATE, "en"), "en")
    print(f"noise: WER {noise_wer:.3f}")
    print(f"ASR time: {asr_seconds / len(ENGLISH):.2f} s per clip ({asr_audio / asr_seconds:.1f} s of audio per s)")

    started = time.time()
    for name in ENGLISH:
        judge.score_clip(clips[name], RATE, halves[name, 0], texts[name], "en")
    per_clip = (time.time() - started) / len(ENGLISH)
    mean_seconds = np.mean([len(clips[name]) / RATE for name in ENGLISH])
    print(f"\nall metrics of one clip (SIM + ASR + WER + timing): {per_clip:.2f} s per clip of {mean_seconds:.1f} s on average")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metrics_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    voice_prompts.add_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    measure(voice_prompts.folder(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
