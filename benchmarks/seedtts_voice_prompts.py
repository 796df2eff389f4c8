"""`--eval` on a Seed-TTS-eval list made of the English recordings in ../shared/data/voice_prompts.

    python benchmarks/seedtts_voice_prompts.py [--out DIR] [-- more infer.py flags]

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

VOICE_PROMPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "voice_prompts"
ENGLISH = ("en_man", "en_woman", "belinda", "chadwick", "vex")


def write_list(folder: Path) -> Path:
    lines = []
    for index, prompt in enumerate(ENGLISH):
        target = ENGLISH[(index + 1) % len(ENGLISH)]
        prompt_text = (VOICE_PROMPTS / f"{prompt}.txt").read_text(encoding="utf-8").strip()
        target_text = (VOICE_PROMPTS / f"{target}.txt").read_text(encoding="utf-8").strip()
        wav = os.path.relpath(VOICE_PROMPTS / f"{prompt}.wav", folder)
        lines.append(f"{target}_in_{prompt}|{prompt_text}|{wav}|{target_text}")
    path = folder / "meta.lst"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for meta.lst and eval/ [a temporary one]")
    parser.add_argument("extra", nargs="*", help="more infer.py flags (after --)")
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="seedtts-"))
    folder.mkdir(parents=True, exist_ok=True)
    listed = write_list(folder)
    print(f"list: {listed}")
    return infer.main(["--eval", str(listed), "--out", str(folder / "eval"), "--model", "tiny", "--language", "en",
                       "--seed", "0", *args.extra])


if __name__ == "__main__":
    sys.exit(main())
