"""The benchmark scripts: each prints its help without running anything or needing data; the step benchmark's
loop gives train.py's losses and its GPU check runs on the CPU; the sync benchmark finds only the package's
syncs in the step."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import loader
import memory_plan
import syncs
import train
from conftest import ROOT, logged, train_config
from parallel import World

sys.path.insert(0, str(ROOT / "benchmarks"))

import step_benchmark  # noqa: E402
import sync_benchmark  # noqa: E402

# The command-line scripts: every file that runs as `python FILE` (data.py's is the old spelling of prepare.py).
SCRIPTS = sorted(path for path in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
                 if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8") and path.name != "data.py")
READING_VOICE_PROMPTS = [path.stem for path in SCRIPTS if "voice_prompts.add_flag(" in path.read_text(encoding="utf-8")]


@pytest.fixture(scope="module")
def tiny_config():
    return memory_plan.model_config("tiny")


def test_every_script_prints_its_help_without_running_anything(tmp_path):
    """`python SCRIPT --help` for every script, in an empty folder that stays empty, with no GPU visible. One
    process runs them all, each as `__main__` from its file (a process each, each importing torch and the
    package afresh, took minutes on 2 shared cores)."""
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *map(str, SCRIPTS)], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    helped = json.loads(done.stdout.splitlines()[-1])
    assert len(helped) == len(SCRIPTS) >= 17 and str(ROOT / "memory_plan.py") in helped
    for path, (status, out) in helped.items():
        assert status == 0 and out.startswith("usage: "), f"{path}: exit status {status}, printed {out[:300]!r}"
    assert not any(tmp_path.iterdir()), "--help wrote nothing"


# Runs each script given as `python SCRIPT --help` would (its folder first on the path, `__name__` "__main__"),
# and prints {script: [exit status, what it printed]} as one JSON line.
HELP_OF_EACH = """
import contextlib, io, json, os, runpy, sys
helped = {}
for path in sys.argv[1:]:
    sys.argv, printed, search_path = [path, "--help"], io.StringIO(), list(sys.path)
    sys.path.insert(0, os.path.dirname(path))
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(path, run_name="__main__")
        status = "returned without exiting"
    except SystemExit as stop:
        status = stop.code
    sys.path[:] = search_path
    helped[path] = [status, printed.getvalue()]
print(json.dumps(helped))
"""


@pytest.mark.parametrize("script", READING_VOICE_PROMPTS)
def test_a_missing_voice_prompts_folder_is_one_error_line_naming_it_and_the_flag(script, tmp_path, capsys):
    missing = tmp_path / "voice_prompts"
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).main(["--voice-prompts", str(missing)])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1
    assert str(missing) in error and "--voice-prompts DIR" in error
    assert len(READING_VOICE_PROMPTS) == 8


def test_the_benchmarked_loop_gives_train_py_s_losses_for_the_same_batches(tmp_path, small_manifest, tiny, tiny_config):
    """The step benchmark's loop (a model of the tiny layout seeded as the preset is, `trainable.train_step`)
    against a train.py run: the micro-batches train.py takes, in its order, give the losses it logged."""
    settings = train_config(tmp_path, small_manifest, max_steps=3, grad_accum=2, batch_size=1, grad_clip=0.5)
    run = train.train(settings)
    [training_set] = loader.training_sets(settings, tiny, World(), tmp_path)
    order = loader.micro_batches([training_set], settings, loader.DataPosition(), World())
    steps = [[training_set.builder.batch(next(order).pairs) for _ in range(settings.grad_accum)] for _ in range(settings.max_steps)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = memory_plan.build_training_model(tiny_config, settings)
    _, losses = step_benchmark.our_loop(model, steps, settings, "cpu", warmup=0)
    assert [float(torch.tensor(loss, dtype=torch.float32)) for loss in losses] == list(logged(run).values())


def test_the_gpu_check_runs_on_the_cpu_with_the_tiny_preset(tmp_path):
    """`python benchmarks/step_benchmark.py gpu` on the CPU, tiny preset, eager backend for the compiled cases:
    four cases, each timed and planned; the eager ones count host syncs (none of ours) and time the Trainer;
    one JSON file."""
    out = tmp_path / "gpu_check.json"
    assert step_benchmark.main(["gpu", "--device", "cpu", "--model", "tiny", "--tokens", "256", "--steps", "1", "--warmup",
                                "0", "--compile-backend", "eager", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["scope"], row["compile"]) for row in rows] == [("lora", False), ("lora", True), ("audio", False), ("audio", True)]
    for row in rows:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu_pct"] > 0 and row["planned_gib"] > 0
        assert row["grad_checkpoint"] and row["precision"] == "bf16"
        if not row["compile"]:
            assert row["syncs_ours"] == 0 and row["syncs_package"] > 0, row["syncs_ours_sites"]
            assert row["trainer_step_s"] > 0


def test_planned_syncs_of_the_released_layout_are_the_package_s_alone(tiny_config):
    """The sync benchmark's fake step: each layer's syncs are the package's, the same in every layer; ours 0."""
    summary = sync_benchmark.planned_syncs(tiny_config, memory_plan.step_settings(scope="audio", grad_checkpoint=True), tokens=512)
    assert summary[syncs.OURS] == 0
    layers = [summary["by_layer"][f"layer {index}"] for index in range(tiny_config.text_config.num_hidden_layers)]
    assert all(layer == layers[0] and layer[syncs.PACKAGE] > 0 for layer in layers)
    assert "package recompute" in summary["by_phase"], "checkpointed layers run their forward again in backward"
