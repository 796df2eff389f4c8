"""Parity suite passes, every known community bug makes it fail, and the clone CLI works end to end."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from boson_multimodal.data_types import AudioContent, Message

import collate
import data
import infer
import model_utils
from conftest import ROOT, VOICE_PROMPTS


def _failing(bundle, case, pipeline=None) -> set[str]:
    return {result.name for result in infer.run_parity(bundle, case, pipeline) if not result.passed}


PREFIX = "prompt ids = training ids up to the generation point"
OFFICIAL = "prompt ids = the official example's prompt"
COLLATED = "collated prompt = prompt part of the training batch"
LABELS = "only the target turn carries loss"
LOGITS = "teacher-forced logits = cached generation logits"
MEMORISE = "memorised sample regenerates exactly"


def test_parity_passes_with_reference_as_assistant_turn(tiny, parity_case):
    results = infer.run_parity(tiny, parity_case)
    assert [result.name for result in results] == [PREFIX, OFFICIAL, COLLATED, LABELS, LOGITS, MEMORISE]
    assert all(result.passed for result in results), [r for r in results if not r.passed]


def test_parity_passes_with_reference_in_system_message_and_whisper(tiny_whisper, parity_case_system):
    """The Whisper-plus-codes conditioning of the original brief, with real Whisper features."""
    results = infer.run_parity(tiny_whisper, parity_case_system)
    assert all(result.passed for result in results), [r for r in results if not r.passed]


def test_parity_passes_with_a_scene(tiny, parity_case):
    case = replace(parity_case, scene="Audio is recorded from a quiet room.")
    results = infer.run_parity(tiny, case, checks=("prefix", "official", "collated", "labels", "logits"))
    assert all(result.passed for result in results), [r for r in results if not r.passed]


# ---- mutations: each bug that public fine-tuning scripts shipped ---------------------------


def _unshifted_loss(outputs, batch):
    """The bug: each position is scored against its own input token (the model learns to copy)."""
    text = F.cross_entropy(outputs.logits[0].float(), outputs.expanded_labels[0], ignore_index=-100)
    labels = batch.label_audio_ids
    audio = torch.stack([F.cross_entropy(outputs.audio_logits[:, k].float(), labels[k], ignore_index=-100) for k in range(labels.shape[0])])
    return model_utils.LossBreakdown(text + audio.mean(), text, audio.mean(), audio, 0, 0)


def _collator_without_delay_pattern(config, whisper):
    collator = collate.build_collator(config, whisper)
    collator.use_delay_pattern = False
    return collator


def _labels_from_input_codes(outputs, batch):
    return model_utils.compute_loss(outputs, batch.audio_out_ids)


def _sample_with_reference_turn_trained(tokenizer, case):
    sample = infer._training_sample(tokenizer, case)
    messages = data.build_messages(case.ref_text, data.normalize_text(case.text), data.PromptLayout(scene=case.scene))
    messages.append(Message("assistant", AudioContent(audio_url="")))
    _, labels = data.tokenize_messages(messages, tokenizer, start_index=None)
    sample.label_ids = torch.tensor(labels)
    return sample


def _prompt_with_another_system_message(tokenizer, case):
    return infer._inference_prompt(tokenizer, replace(case, scene="Audio is recorded from a quiet room."))


MUTATIONS = {
    "no loss shift": (infer.Pipeline(loss=_unshifted_loss), {MEMORISE}),
    "delay pattern off in training only": (infer.Pipeline(training_collator=_collator_without_delay_pattern), {COLLATED, LOGITS}),
    "audio labels from input codes": (infer.Pipeline(loss=_labels_from_input_codes), {LABELS}),
    "reference turn trained": (infer.Pipeline(training_sample=_sample_with_reference_turn_trained), {LABELS}),
    "different system prompt at inference": (infer.Pipeline(inference_prompt=_prompt_with_another_system_message), {PREFIX, COLLATED, OFFICIAL}),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_known_bug_fails_parity(tiny, parity_case, mutation):
    pipeline, expected = MUTATIONS[mutation]
    failing = _failing(tiny, parity_case, pipeline)
    assert expected <= failing, f"{mutation}: expected {expected} to fail, failing: {failing}"


def test_official_check_fails_when_the_tag_table_is_changed_back(tiny, parity_case, monkeypatch):
    """The event-tag table from before upstream's "se fix": the official check holds normalisation to the example's outputs."""
    monkeypatch.setitem(data._EVENT_TAGS, "[humming start]", "<SE>[Humming]</SE>")
    [result] = infer.run_parity(tiny, parity_case, checks=("official",))
    assert result.name == OFFICIAL and not result.passed
    assert "[humming start]" in result.detail


# ---- the clone command ---------------------------------------------------------------------


def test_clone_writes_a_playable_24khz_wav(tmp_path, capsys):
    out = tmp_path / "clone.wav"
    code = infer.main([
        "--model", "tiny", "--ref-audio", str(VOICE_PROMPTS / "belinda.wav"),
        "--ref-text", (VOICE_PROMPTS / "belinda.txt").read_text(encoding="utf-8"),
        "--text", "Hello from the tiny model.", "--out", str(out), "--max-seconds", "1", "--seed", "3",
    ])
    assert code == 0, capsys.readouterr().err
    waveform, rate = sf.read(out)
    assert rate == 24000
    assert 0 < len(waveform) <= 24000 + 960
    assert torch.isfinite(torch.as_tensor(waveform)).all()


def test_clone_is_repeatable_greedy(tmp_path):
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for path in paths:
        assert infer.main(["--model", "tiny", "--text", "Same words.", "--greedy", "--max-seconds", "0.5", "--out", str(path)]) == 0
    first, second = (sf.read(path)[0] for path in paths)
    assert len(first) > 0 and (first == second).all()


def test_text_file_gives_one_wav_per_line(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line.\n", encoding="utf-8")
    assert infer.main(["--model", "tiny", "--text-file", str(lines), "--out", str(tmp_path / "wavs"), "--max-seconds", "0.4"]) == 0
    assert sorted(path.name for path in (tmp_path / "wavs").iterdir()) == ["0000.wav", "0001.wav"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ref-audio", "missing.wav", "--ref-text", "hi", "--text", "x"], "no such audio file"),
        (["--text", "   "], "--text is empty"),
        (["--model", "/nonexistent/model", "--audio-tokenizer", "/nonexistent/audio"], "model directory not found"),
        (["--ref-audio", str(ROOT / "requirements.txt"), "--ref-text", "hi"], "unreadable audio"),
        (["--parity", "--checks", "prefix,bogus"], "unknown parity checks"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
    assert infer.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "--ref-audio", str(tmp_path / "none.wav"), "--ref-text", "x"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no such audio file" in result.stderr


def test_parity_command_prints_one_line_per_check(capsys):
    assert infer.main(["--parity", "--checks", "prefix,official,collated"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 6 and all(line.startswith("PASS") for line in lines)


def _delayed_stream(frames: torch.Tensor, ended: bool) -> torch.Tensor:
    """A delay-pattern stream as the package's `generate` leaves it: a BOS column, codebook k shifted by k
    with BOS before, and, when the model ended it, the EOS diagonal without its final all-EOS column."""
    n_q, count = frames.shape
    bos, eos = 1024, 1025
    stream = torch.full((n_q, count + n_q + 1), eos)  # the last column all EOS
    for k in range(n_q):
        stream[k, : k + 1] = bos
        stream[k, k + 1 : k + 1 + count] = frames[k]
    return stream[:, :-1] if ended else stream[:, : count + 1]


def test_a_stream_the_model_ended_is_told_from_one_the_length_limit_cut(capsys):
    frames = torch.randint(0, 1024, (8, 12))
    ended = _delayed_stream(frames, ended=True)
    assert infer.stream_ended(ended, 1024, use_delay_pattern=True)
    assert torch.equal(infer.audio_sequence_to_codes(ended, 1024, True), frames)
    assert capsys.readouterr().err == ""
    cut = _delayed_stream(frames, ended=False)
    assert not infer.stream_ended(cut, 1024, use_delay_pattern=True)
    assert infer.audio_sequence_to_codes(cut, 1024, True).shape[1] == 12 - 7
    assert "reached --max-seconds" in capsys.readouterr().err
