"""Real-target scores cached on disk (score_cache.py): a second run never scores a target again; another file,
reference or scorer misses."""

from __future__ import annotations

import shutil

import pytest

import data
import metrics
import score_cache
from conftest import VOICE_PROMPTS

RATE = 24000


@pytest.fixture(scope="module")
def encoder_and_asr():
    return metrics.speaker_encoder(), metrics.transcriber()


@pytest.fixture
def clips(tmp_path):
    for name in ("en_man", "en_woman"):
        shutil.copy(VOICE_PROMPTS / f"{name}.wav", tmp_path / f"{name}.wav")
    return tmp_path / "en_woman.wav", tmp_path / "en_man.wav"  # target, reference


def _score(judge: metrics.Judge, target, reference, loads: list):
    def load():
        loads.append(target)
        return data.load_audio(target, RATE)[: 2 * RATE]

    embedding = judge.reference_embedding(str(reference), lambda: data.load_audio(reference, RATE)[: 2 * RATE], RATE)
    return judge.score_target(str(target), load, RATE, str(reference), embedding, "the device would work", "en")


def test_a_second_run_scores_no_target_again(encoder_and_asr, clips, tmp_path):
    encoder, asr = encoder_and_asr
    target, reference = clips

    def judge() -> metrics.Judge:  # a new judge per run: nothing kept in memory between them
        made = metrics.Judge(encoder, asr, target_cache=None)
        made.target_cache = score_cache.TargetScores(tmp_path / "cache", made.identity())
        return made

    first_loads, second_loads = [], []
    first_judge, second_judge = judge(), judge()
    first = _score(first_judge, target, reference, first_loads)
    second = _score(second_judge, target, reference, second_loads)
    assert first_loads == [target] and second_loads == []  # the target was not even read
    assert second == first and first.transcript is not None and first.error_rate is not None
    assert (first_judge.target_cache.misses, second_judge.target_cache.hits) == (1, 1)

    moved = tmp_path / "renamed.wav"  # the same bytes elsewhere still hit
    shutil.copy(target, moved)
    assert _score(judge(), moved, reference, []) == first

    edited = data.load_audio(target, RATE)[: 2 * RATE] * 0.5  # other bytes miss
    import soundfile as sf

    sf.write(moved, edited, RATE)
    loads = []
    _score(judge(), moved, reference, loads)
    assert loads == [moved]


def test_another_scorer_misses_and_a_damaged_entry_is_said(encoder_and_asr, clips, tmp_path, capsys):
    encoder, asr = encoder_and_asr
    target, reference = clips
    cache = score_cache.TargetScores(tmp_path / "cache", "scorer-a")
    other = score_cache.TargetScores(tmp_path / "cache", "scorer-b")
    assert cache.key(str(target), str(reference), "en") != other.key(str(target), str(reference), "en")
    assert cache.key(str(target), str(reference), "en") != cache.key(str(target), str(reference), "zh")
    key = cache.key(str(target), str(reference), "en")
    (tmp_path / "cache" / f"{key}.json").write_text("{half an entr")
    assert cache.get(key) is None and cache.misses == 1
    assert "is not a cache entry" in capsys.readouterr().err
