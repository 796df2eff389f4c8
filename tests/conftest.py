"""Shared fixtures: the tiny preset is built once per session, real speech comes from ../shared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import infer  # noqa: E402
import model_utils  # noqa: E402

VOICE_PROMPTS = ROOT.parent / "shared" / "data" / "voice_prompts"
DEMO_DIR = ROOT / "demo" / "data"


@pytest.fixture(scope="session")
def tiny() -> model_utils.Bundle:
    """The tiny preset: random model, BPE text tokenizer, random audio tokenizer (seed 0)."""
    return model_utils.load_bundle(model_utils.TINY_PRESET)


@pytest.fixture(scope="session")
def tiny_whisper(tiny) -> model_utils.Bundle:
    """The tiny preset with a Whisper tower, sharing the tiny audio tokenizer."""
    tokenizer = model_utils.build_tiny_text_tokenizer()
    model = model_utils.build_tiny_model(tokenizer, seed=0, whisper=True)
    return model_utils.Bundle(model, tokenizer, tiny.audio_tokenizer)


@pytest.fixture(scope="session")
def voice_prompt():
    """A real recorded clip (first 2 s, at the audio tokenizer's 24 kHz) and its transcript."""
    if not VOICE_PROMPTS.is_dir():
        pytest.fail(f"{VOICE_PROMPTS} is missing: the shared voice prompts must sit beside the checkout")
    waveform = data.load_audio(VOICE_PROMPTS / "en_woman.wav", 24000)[: 2 * 24000]
    return waveform, (VOICE_PROMPTS / "en_woman.txt").read_text(encoding="utf-8").strip()


@pytest.fixture(scope="session")
def parity_case(tiny) -> infer.ParityCase:
    return infer.demo_case(tiny)


@pytest.fixture(scope="session")
def parity_case_system(tiny_whisper) -> infer.ParityCase:
    return infer.demo_case(tiny_whisper, ref_in_system=True)
