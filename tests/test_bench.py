"""bench.py measures the step train.py runs: the same losses for the same batches, and a memory plan that adds up
and matches the measured step."""

from __future__ import annotations

import pytest
import torch

import bench
import loader
import train
from conftest import logged, train_config
from parallel import World


@pytest.fixture(scope="module")
def tiny_config():
    return bench.model_config("tiny")


def test_plan_breakdown_adds_up(tiny_config):
    settings = bench.bench_config(scope="lora", precision="bf16")
    plan = bench.plan_step(tiny_config, settings, tokens=1024)
    model = bench.build_training_model(tiny_config, settings, "meta")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.weights_bytes == plan.param_bytes + buffers
    trained = [p for p in model.parameters() if p.requires_grad]
    assert plan.optimizer_bytes == sum(2 * 4 * p.numel() + 4 for p in trained), "fp32 exp_avg, exp_avg_sq and step"
    assert plan.peak_gib == pytest.approx(plan.weights_gib + plan.gradients_gib + plan.optimizer_gib + plan.activations_gib)
    assert plan.text_labels == 3 and plan.tokens == 1024 - 1024 % 8


def test_plan_matches_the_measured_step(tiny_config):
    """The fake step and the real one, under the same tracker, agree (the fake tensors lose no allocation)."""
    for settings in (bench.bench_config(scope="full", precision="fp32", text_logits="all"),
                     bench.bench_config(scope="audio", precision="fp32", grad_checkpoint=True)):
        planned = bench.plan_step(tiny_config, settings, tokens=1024).peak_gib
        measured = bench.measure_step(tiny_config, settings, tokens=1024)["tracked_gib"]
        assert planned == pytest.approx(measured, rel=0.01), settings


def test_plan_shows_what_each_fix_saves(tiny_config):
    before = bench.bench_config(scope="lora", frozen_bf16=False, text_logits="all")
    plans = {name: bench.plan_step(tiny_config, settings, tokens=1024) for name, settings in
             (("before", before), ("bf16", bench.replace(before, frozen_bf16=True)),
              ("labelled", bench.replace(before, text_logits="labelled")))}
    assert plans["bf16"].weights_bytes < plans["before"].weights_bytes
    assert plans["labelled"].peak_gib < plans["before"].peak_gib
    assert plans["labelled"].text_logits_gib * 100 < plans["before"].text_logits_gib


def test_the_benchmarked_loop_gives_train_py_s_losses_for_the_same_batches(tmp_path, small_manifest, tiny, tiny_config):
    """bench.py's loop (a model of the tiny layout seeded as the preset is, `training.train_step`) against a
    train.py run: the micro-batches train.py takes, in its order, give the losses it logged."""
    settings = train_config(tmp_path, small_manifest, max_steps=3, grad_accum=2, batch_size=1, grad_clip=0.5)
    run = train.train(settings)
    [training_set] = loader.training_sets(settings, tiny, World(), tmp_path)
    order = loader.micro_batches([training_set], settings, loader.DataPosition(), World())
    steps = [[training_set.builder.batch(next(order).pairs) for _ in range(settings.grad_accum)] for _ in range(settings.max_steps)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = bench.build_training_model(tiny_config, settings)
    _, losses = bench.our_loop(model, steps, settings, "cpu", warmup=0)
    assert [float(torch.tensor(loss, dtype=torch.float32)) for loss in losses] == list(logged(run).values())
