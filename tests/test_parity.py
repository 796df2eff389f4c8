"""The parity suite passes, every known community bug makes it fail, and the official example's normalisation holds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from boson_multimodal.data_types import AudioContent, Message

import collate
import data
import model_utils
import parity


PREFIX = "prompt ids = training ids up to the generation point"
OFFICIAL = "prompt ids = the official example's prompt"
COLLATED = "collated prompt = prompt part of the training batch"
LABELS = "only the target turn carries loss"
LOGITS = "teacher-forced logits = cached generation logits"
MEMORISE = "memorised sample regenerates exactly"
CHUNKED = "chunked prompt = upstream's generation script's"


def test_parity_passes_with_reference_as_assistant_turn(tiny, parity_case):
    results = parity.run_parity(tiny, parity_case)
    assert [result.name for result in results] == [PREFIX, OFFICIAL, COLLATED, LABELS, LOGITS, MEMORISE, CHUNKED]
    assert all(result.passed for result in results), [r for r in results if not r.passed]


def test_parity_passes_with_reference_in_system_message_and_whisper(tiny_whisper, parity_case_system):
    """The Whisper-plus-codes conditioning of the original brief, with real Whisper features."""
    results = parity.run_parity(tiny_whisper, parity_case_system)
    assert all(result.passed for result in results), [r for r in results if not r.passed]


def test_parity_passes_with_a_scene(tiny, parity_case):
    case = replace(parity_case, scene="Audio is recorded from a quiet room.")
    results = parity.run_parity(tiny, case, checks=("prefix", "official", "collated", "labels", "logits"))
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
    sample = parity._training_sample(tokenizer, case)
    messages = data.build_messages(case.ref_text, data.normalize_text(case.text), data.PromptLayout(scene=case.scene))
    messages.append(Message("assistant", AudioContent(audio_url="")))
    _, labels = data.tokenize_messages(messages, tokenizer, start_index=None)
    sample.label_ids = torch.tensor(labels)
    return sample


def _prompt_with_another_system_message(tokenizer, case):
    return parity._inference_prompt(tokenizer, replace(case, scene="Audio is recorded from a quiet room."))


MUTATIONS = {
    "no loss shift": (parity.Pipeline(loss=_unshifted_loss), {MEMORISE}),
    "delay pattern off in training only": (parity.Pipeline(training_collator=_collator_without_delay_pattern), {COLLATED, LOGITS}),
    "audio labels from input codes": (parity.Pipeline(loss=_labels_from_input_codes), {LABELS}),
    "reference turn trained": (parity.Pipeline(training_sample=_sample_with_reference_turn_trained), {LABELS}),
    "different system prompt at inference": (parity.Pipeline(inference_prompt=_prompt_with_another_system_message), {PREFIX, COLLATED, OFFICIAL}),
}
CHECK_OF = {PREFIX: "prefix", OFFICIAL: "official", COLLATED: "collated", LABELS: "labels", LOGITS: "logits", MEMORISE: "memorise"}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_known_bug_fails_parity(tiny, parity_case, mutation):
    """Each bug fails the checks that catch it; only those run (the memorisation check trains 300 steps, and
    only the loss-shift bug needs it)."""
    pipeline, expected = MUTATIONS[mutation]
    checks = tuple(check for name, check in CHECK_OF.items() if name in expected)
    failing = {result.name for result in parity.run_parity(tiny, parity_case, pipeline, checks=checks) if not result.passed}
    assert expected <= failing, f"{mutation}: expected {expected} to fail, failing: {failing}"


def test_official_check_fails_when_the_tag_table_is_changed_back(tiny, parity_case, monkeypatch):
    """The event-tag table from before upstream's "se fix": the official check holds normalisation to the example's outputs."""
    monkeypatch.setitem(data._EVENT_TAGS, "[humming start]", "<SE>[Humming]</SE>")
    [result] = parity.run_parity(tiny, parity_case, checks=("official",))
    assert result.name == OFFICIAL and not result.passed
    assert "[humming start]" in result.detail


# ---- normalisation: the official example's, held to a table of its outputs ------------------------------


def test_normalisation_gives_the_official_outputs():
    assert parity.official_normalisation_differences() == []
    assert data.normalize_text("[humming start] la la") == "<SE_s>[Humming]</SE_s> la la."


def test_the_official_table_covers_every_mapping_and_closing_mark():
    inputs = "".join(text for text, _ in parity.OFFICIAL_NORMALISATION)
    for table in (data._CHINESE_PUNCTUATION, data._SYMBOLS, data._EVENT_TAGS):
        assert [key for key in table if key not in inputs] == []
    outputs = [expected for _, expected in parity.OFFICIAL_NORMALISATION]
    assert [mark for mark in data._CLOSING_MARKS if not any(out.endswith(mark) for out in outputs)] == []


def test_the_old_humming_tag_is_a_normalisation_difference(monkeypatch):
    monkeypatch.setitem(data._EVENT_TAGS, "[humming start]", "<SE>[Humming]</SE>")
    differences = parity.official_normalisation_differences()
    assert len(differences) == 1 and "[humming start]" in differences[0]
