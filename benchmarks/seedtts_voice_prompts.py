"""`--eval` on a Seed-TTS-eval list made of the English recordings of the shared voice prompts.

    python benchmarks/seedtts_voice_prompts.py [--out DIR] [--voice-prompts DIR] [-- more infer.py flags]

Each of the five English prompts (en_man, en_woman, belinda, chadwick, vex)
clones the next one's transcript, in a list of four-field lines
`utt|prompt_text|prompt_wav|target_text` with paths relative to the list (no
real recording of the target text exists in that voice, so no fifth field).
The list is written to `DIR/meta.lst` and evaluated into `DIR/eval` with the
offline default judge (resemblyzer, pocketsphinx) and `--language en`, since
a Seed-TTS-eval list carries no language.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import infer  # noqa: E402
import voice_prompts  # noqa: E402

ENGLISH = ("en_man", "en_woman", "belinda", "chadwick", "vex")


def write_list(folder: Path, prompts: Path) -> Path:
    lines = []
    for index, prompt in enumerate(ENGLISH):
        target = ENGLISH[(index + 1) % len(ENGLISH)]
        prompt_text = (prompts / f"{prompt}.txt").read_text(encoding="utf-8").strip()
        target_text = (prompts / f"{target}.txt").read_text(encoding="utf-8").strip()
        wav = os.path.relpath(prompts / f"{prompt}.wav", folder)
        lines.append(f"{target}_in_{prompt}|{prompt_text}|{wav}|{target_text}")
    path = folder / "meta.lst"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seedtts_voice_prompts.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for meta.lst and eval/ [a temporary one]")
    parser.add_argument("extra", nargs="*", help="more infer.py flags (after --)")
    voice_prompts.add_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = voice_prompts.folder(args)
    folder = Path(args.out or tempfile.mkdtemp(prefix="seedtts-"))
    folder.mkdir(parents=True, exist_ok=True)
    listed = write_list(folder, prompts)
    print(f"list: {listed}")
    return infer.main(["--eval", str(listed), "--out", str(folder / "eval"), "--model", "tiny", "--language", "en",
                       "--seed", "0", *args.extra])


if __name__ == "__main__":
    sys.exit(main())
