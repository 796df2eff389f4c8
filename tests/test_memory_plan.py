"""memory_plan.py plans the step train.py runs: a breakdown that adds up, optimizer state counted exactly, the
plan equal to the same step measured, and what each memory fix saves."""

from __future__ import annotations

from dataclasses import replace

import pytest

import memory_plan


@pytest.fixture(scope="module")
def tiny_config():
    return memory_plan.model_config("tiny")


def test_plan_breakdown_adds_up(tiny_config):
    settings = memory_plan.step_settings(scope="lora", precision="bf16")
    plan = memory_plan.plan_step(tiny_config, settings, tokens=1024)
    model = memory_plan.build_training_model(tiny_config, settings, "meta")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.weights_bytes == plan.param_bytes + buffers
    trained = [p for p in model.parameters() if p.requires_grad]
    assert plan.optimizer_bytes == sum(2 * 4 * p.numel() + 4 for p in trained), "fp32 exp_avg, exp_avg_sq and step"
    assert plan.peak_gib == pytest.approx(plan.weights_gib + plan.gradients_gib + plan.optimizer_gib + plan.activations_gib)
    assert plan.text_labels == 3 and plan.tokens == 1024 - 1024 % 8


def test_the_plan_counts_8bit_adamw_moments_exactly(tiny_config):
    """torchao's AdamW8bit: uint8 codes and an fp32 scale per 256 values, a 256-entry table per moment, for
    tensors of at least 4096 values (a multiple of 256); fp32 moments for the rest; an fp32 step count."""
    settings = memory_plan.step_settings(scope="full", precision="fp32", optimizer="adamw8bit")
    plan = memory_plan.plan_step(tiny_config, settings, tokens=1024)
    trained = [p.numel() for p in memory_plan.build_training_model(tiny_config, settings, "meta").parameters() if p.requires_grad]
    quantized = [n for n in trained if n >= 4096 and n % 256 == 0]
    assert quantized and len(quantized) < len(trained)
    expected = sum(2 * (n + n // 256 * 4 + 256 * 4) if n in quantized else 2 * 4 * n for n in trained) + 4 * len(trained)
    assert plan.optimizer_bytes == expected


def test_plan_matches_the_measured_step(tiny_config):
    """The fake step and the real one, under the same tracker, agree (the fake tensors lose no allocation)."""
    for settings in (memory_plan.step_settings(scope="full", precision="fp32", text_logits="all"),
                     memory_plan.step_settings(scope="audio", precision="fp32", grad_checkpoint=True)):
        planned = memory_plan.plan_step(tiny_config, settings, tokens=1024).peak_gib
        measured = memory_plan.measure_step(tiny_config, settings, tokens=1024)["tracked_gib"]
        assert planned == pytest.approx(measured, rel=0.01), settings


def test_plan_shows_what_each_fix_saves(tiny_config):
    before = memory_plan.step_settings(scope="lora", frozen_bf16=False, text_logits="all")
    plans = {name: memory_plan.plan_step(tiny_config, settings, tokens=1024) for name, settings in
             (("before", before), ("bf16", replace(before, frozen_bf16=True)),
              ("labelled", replace(before, text_logits="labelled")))}
    assert plans["bf16"].weights_bytes < plans["before"].weights_bytes
    assert plans["labelled"].peak_gib < plans["before"].peak_gib
    assert plans["labelled"].text_logits_gib * 100 < plans["before"].text_logits_gib


def test_grpo_sampling_cache_is_keys_and_values_of_every_layer_in_bf16():
    """The released layout: 28 layers x 8 KV heads x 128 wide, keys and values, 2 bytes: 112 KiB a position."""
    assert memory_plan.sampling_cache_gib(memory_plan.released_config(), 4, 1024) * 2**30 == 2 * 28 * 8 * 128 * 2 * 4 * 1024
