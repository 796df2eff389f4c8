"""The Seed-TTS-eval protocol (seedtts.py): its list format with every bad line counted, its normalisation and WER,
its aggregates."""

from __future__ import annotations

import pytest
import soundfile as sf

import evaluate
import seedtts
from conftest import DEMO_CLIP


@pytest.fixture
def listed(tmp_path):
    """A list beside two clips, good lines of 4 and 5 fields among one bad line of each kind."""
    samples, rate = sf.read(DEMO_CLIP)
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "prompt.wav", samples[: int(1.5 * rate)], rate)
    sf.write(tmp_path / "wavs" / "gt.wav", samples[: int(1.2 * rate)], rate)
    lines = [
        b"u1|the prompt's words|wavs/prompt.wav|Say this, please.",  # 1 kept
        b"u2|the prompt's words|wavs/prompt.wav|And this.|wavs/gt.wav",  # 2 kept, with its real recording
        b"",  # blank: not a line
        b"u3|only three fields|wavs/prompt.wav",  # 4 bad_line
        b"u1|a copy|wavs/prompt.wav|Again.",  # 5 duplicate_id
        b"|no utt|wavs/prompt.wav|Text.",  # 6 missing_field
        b"u4|text|wavs/nowhere.wav|Text.",  # 7 missing_audio
        b"u5|text|wavs/prompt.wav|...",  # 8 empty_text
        b"u6|caf\xe9|wavs/prompt.wav|Text.",  # 9 non_utf8
        b"u7|text|wavs/prompt.wav|Text.|wavs/gt-missing.wav",  # 10 missing_audio (the real recording)
    ]
    path = tmp_path / "meta.lst"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_list_is_read_with_every_bad_line_counted_by_reason(listed):
    result = seedtts.read_list(listed, evaluate.CheckedClips(24000, 8))
    assert [row["id"] for row in result.kept] == ["u1", "u2"]
    assert result.kept[0]["ref_audio"] == str(listed.parent / "wavs" / "prompt.wav") and "audio" not in result.kept[0]
    assert result.kept[1]["audio"] == str(listed.parent / "wavs" / "gt.wav")
    assert [(r.row, r.reason) for r in result.rejections] == [
        (4, "bad_line"), (5, "duplicate_id"), (6, "missing_field"), (7, "missing_audio"), (8, "empty_text"),
        (9, "non_utf8"), (10, "missing_audio")]
    assert result.summary() == ("rows read 9 = kept 2 + rejected 7 (missing_audio 2, bad_line 1, duplicate_id 1, "
                                "missing_field 1, empty_text 1, non_utf8 1)")
    assert seedtts.is_seedtts_list(listed) and not seedtts.is_seedtts_list(DEMO_CLIP.parent / "manifest.jsonl")


def test_the_protocols_normalisation_and_per_utterance_wer():
    assert seedtts.normalize("Hello, World! It's 5-6 p.m.", "en") == "hello world it's 56 pm"
    assert seedtts.normalize("你好，世界。", "zh") == "你 好 世 界"
    assert seedtts.normalize("Hola.", "es") is None
    assert seedtts.utterance_wer("Hello, world!", "hello world", "en") == 0.0
    assert seedtts.utterance_wer("one two three four", "one too three", "en") == 0.5
    assert seedtts.utterance_wer("你好世界", "你好世间", "zh") == 0.25
    assert seedtts.utterance_wer("Hola.", "hola", "es") is None


def test_aggregates_are_means_of_utterances_times_100():
    records = [{"wer_seedtts": 0.0, "sim": 0.6, "target_wer_seedtts": None},
               {"wer_seedtts": 0.5, "sim": 0.8, "target_wer_seedtts": 0.1},
               {"wer_seedtts": None, "sim": None, "target_wer_seedtts": None}]
    figures = seedtts.aggregates(records)
    assert figures["wer"] == {"n": 2, "value": 25.0} and figures["target_wer"] == {"n": 1, "value": pytest.approx(10.0)}
    assert figures["sim"]["n"] == 2 and figures["sim"]["value"] == pytest.approx(70.0)
    printed = seedtts.format_aggregates(figures, "pocketsphinx-en-us", "resemblyzer")
    assert "WER 25.00 (n=2), SIM 70.00 (n=2)" in printed and "WER 2.44, SIM 67.70" in printed
