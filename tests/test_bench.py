"""bench.py measures the step train.py runs: the same losses for the same batches, and a memory plan that adds up
and matches the measured step."""

from __future__ import annotations

import json

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


def test_the_plan_counts_8bit_adamw_moments_exactly(tiny_config):
    """torchao's AdamW8bit: uint8 codes and an fp32 scale per 256 values, a 256-entry table per moment, for
    tensors of at least 4096 values (a multiple of 256); fp32 moments for the rest; an fp32 step count."""
    settings = bench.bench_config(scope="full", precision="fp32", optimizer="adamw8bit")
    plan = bench.plan_step(tiny_config, settings, tokens=1024)
    trained = [p.numel() for p in bench.build_training_model(tiny_config, settings, "meta").parameters() if p.requires_grad]
    quantized = [n for n in trained if n >= 4096 and n % 256 == 0]
    assert quantized and len(quantized) < len(trained)
    expected = sum(2 * (n + n // 256 * 4 + 256 * 4) if n in quantized else 2 * 4 * n for n in trained) + 4 * len(trained)
    assert plan.optimizer_bytes == expected


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


def test_the_gpu_check_runs_on_the_cpu_with_the_tiny_preset(tmp_path):
    """`python bench.py gpu` on the CPU, tiny preset, eager backend for the compiled cases: four cases, each
    timed and planned; the eager ones count host syncs (none of ours) and time the Trainer; one JSON file."""
    out = tmp_path / "gpu_check.json"
    assert bench.main(["gpu", "--device", "cpu", "--model", "tiny", "--tokens", "256", "--steps", "1", "--warmup", "0",
                       "--compile-backend", "eager", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["scope"], row["compile"]) for row in rows] == [("lora", False), ("lora", True), ("audio", False), ("audio", True)]
    for row in rows:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu_pct"] > 0 and row["planned_gib"] > 0
        assert row["grad_checkpoint"] and row["precision"] == "bf16"
        if not row["compile"]:
            assert row["syncs_ours"] == 0 and row["syncs_package"] > 0, row["syncs_ours_sites"]
            assert row["trainer_step_s"] > 0


def test_planned_syncs_of_the_released_layout_are_the_package_s_alone(tiny_config):
    """`bench.py syncs` on fake tensors: each layer's syncs are the package's, the same in every layer; ours 0."""
    summary = bench.planned_syncs(tiny_config, bench.bench_config(scope="audio", grad_checkpoint=True), tokens=512)
    assert summary[bench.syncs.OURS] == 0
    layers = [summary["by_layer"][f"layer {index}"] for index in range(tiny_config.text_config.num_hidden_layers)]
    assert all(layer == layers[0] and layer[bench.syncs.PACKAGE] > 0 for layer in layers)
    assert "package recompute" in summary["by_phase"], "checkpointed layers run their forward again in backward"
