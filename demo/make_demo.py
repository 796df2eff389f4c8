"""Makes the committed demo dataset: espeak-ng speech, four speakers, English and Arabic.

Run from the repository root (needs the Debian package espeak-ng):

    python demo/make_demo.py

It writes `demo/data/<speaker>_<n>.flac` (24 kHz mono 16-bit) and
`demo/data/manifest.jsonl`, one speaker-grouped row per clip:
`{"id", "audio", "text", "speaker", "language"}`, paths relative to the
manifest. Speech synthesis is deterministic, so re-running reproduces the
files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import to_model_rate  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_RATE = 24000

SPEAKERS = {
    "en_male": ("en-us+m3", "en"),
    "en_female": ("en-gb+f2", "en"),
    "ar_male": ("ar+m1", "ar"),
    "ar_female": ("ar+f3", "ar"),
}
UTTERANCES = {
    "en": [
        "The weather is lovely today.",
        "Please bring me a cup of tea.",
        "We will meet at the station at noon.",
    ],
    "ar": [
        "الجو جميل اليوم.",
        "من فضلك أحضر لي كوبا من الشاي.",
        "سنلتقي في المحطة عند الظهر.",
    ],
}


def speak(voice: str, text: str) -> tuple:
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", wav.name, text], check=True)
        samples, rate = sf.read(wav.name, dtype="float32")
    return samples, rate


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for speaker, (voice, language) in SPEAKERS.items():
        for index, text in enumerate(UTTERANCES[language]):
            samples, rate = speak(voice, text)
            name = f"{speaker}_{index}"
            sf.write(OUT_DIR / f"{name}.flac", to_model_rate(samples, rate, SAMPLE_RATE, name), SAMPLE_RATE, subtype="PCM_16")
            rows.append({"id": name, "audio": f"{name}.flac", "text": text, "speaker": speaker, "language": language})
    manifest = OUT_DIR / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} clips and {manifest}")


if __name__ == "__main__":
    main()
