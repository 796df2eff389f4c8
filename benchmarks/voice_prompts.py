"""Where the benchmarks find the shared voice prompts (real recorded speech, a .wav and a .txt transcript per
speaker): `--voice-prompts DIR`, by default ../shared/data/voice_prompts beside the checkout, and the one-line
error, exit status 2, when that folder is missing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "voice_prompts"


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voice-prompts", type=Path, default=DEFAULT, metavar="DIR",
                        help=f"the shared voice prompts: NAME.wav and NAME.txt per speaker [{DEFAULT}]")


def folder(args: argparse.Namespace) -> Path:
    """`--voice-prompts`, checked once the flags are read (so that --help needs no data)."""
    if not args.voice_prompts.is_dir():
        print(f"error: no voice prompts at {args.voice_prompts}: put the shared data beside the checkout "
              f"(../shared/data/voice_prompts) or give --voice-prompts DIR", file=sys.stderr)
        raise SystemExit(2)
    return args.voice_prompts


def joined_with_pauses(folder: Path, names: list[str], rate: int, pause: float) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The named prompts one after another with `pause` seconds of silence between them, as one recording at
    `rate`, and each speaker's stretch in it (start and end seconds, name): a conversation to segment."""
    import data

    parts, stretches, position = [], [], 0.0
    for name in names:
        samples = data.load_audio(folder / f"{name}.wav", rate)
        stretches.append((position, position + len(samples) / rate, name))
        parts += [samples, np.zeros(round(pause * rate), dtype=np.float32)]
        position += len(samples) / rate + pause
    return np.concatenate(parts[:-1]), stretches
