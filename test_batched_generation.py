"""Batched generation (batched_generation.py): B prompts per decoding step give, row by row, the codes the package's
batch-1 `generate` gives each prompt alone; what it cannot prove is refused; a job that yields no clip is a clone
carrying its error."""

from __future__ import annotations

import copy

import pytest
import torch

import batched_generation
import collate
import data
import generation
import parity

def test_greedy_batched_codes_equal_the_packages_batch_1_generate_row_by_row(tiny, parity_case):
    result = parity.check_batched_generation(tiny, parity_case, parity.ParityTolerance(batched_rows=4, batched_seconds=1.0))
    assert result.passed, result.detail
    rows = result.detail.split("; ")[1:]
    assert len(rows) == 4 and len({row.split(":")[0] for row in rows}) == 4, result.detail  # four prompt lengths


def test_with_the_reference_in_the_system_message_and_whisper_features_too(tiny_whisper, parity_case_system):
    result = parity.check_batched_generation(tiny_whisper, parity_case_system,
                                             parity.ParityTolerance(batched_rows=2, batched_seconds=0.6))
    assert result.passed, result.detail


def test_the_check_fails_when_a_row_ignores_its_delay_pattern(tiny, parity_case, monkeypatch):
    """The fault injected: codebooks are no longer held at BOS for their first steps."""
    def released_at_once(stream, column, config):
        stream.released = config.audio_num_codebooks

    monkeypatch.setattr(batched_generation, "_hold_to_delay_pattern", released_at_once)
    result = parity.check_batched_generation(tiny, parity_case, parity.ParityTolerance(batched_rows=2, batched_seconds=0.4))
    assert not result.passed and "DIFFERENT" in result.detail


def test_sampled_rows_draw_what_the_package_draws_for_each_alone(tiny, parity_case):
    """Temperature, top-p and repetition-aware resampling, seeded: each row's generator draws as the package's does."""
    config = tiny.model.config
    sampling = generation.Sampling(seed=5, max_seconds=0.6)
    prompts = parity._prompts_of_different_lengths(tiny, parity_case, 3)
    collator = collate.build_collator(config)
    alone = []
    for prompt in prompts:
        inputs = collate.batch_to_model_inputs(collate.collate(collator, [prompt], config.audio_codebook_size), "cpu")
        with torch.inference_mode():
            _, streams = generation.generate(tiny, inputs, sampling, [generation.ForceTokens([config.audio_out_bos_token_id])])
        alone.append(streams[0])
    together = batched_generation.generate_batch(tiny, prompts, sampling)
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    assert not all(torch.equal(alone[0], other) for other in alone[1:]), "the rows should differ"


def test_what_is_not_proven_is_refused(tiny, parity_case):
    job = batched_generation.Job(generation.Reference("hi", parity_case.ref_codes, None, 24000), "Hello.")
    clips = batched_generation.clone_many(tiny, [job, job], generation.Sampling(), data.PromptLayout(), force_audio=False,
                                          batch_size=2)
    with pytest.raises(ValueError, match="--no-force-audio runs with --batch-size 1"):
        next(clips)
    config = copy.deepcopy(tiny.model.config)
    config.use_delay_pattern = False
    assert "delay pattern" in batched_generation.unsupported(config)
    assert batched_generation.unsupported(tiny.model.config) is None


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_job_that_yields_no_clip_is_a_clone_carrying_its_error(tiny, parity_case, batch_size):
    job = batched_generation.Job(generation.Reference("hi", parity_case.ref_codes, None, 24000), "Hello.")
    no_frame = generation.Sampling(greedy=True, max_seconds=0.01)  # under one frame: the stream ends with none
    clones = list(batched_generation.clone_many(tiny, [job] * batch_size, no_frame, data.PromptLayout(), batch_size=batch_size))
    assert clones == [generation.Clone(None, False, "the model ended the clip before producing any frame")] * batch_size
