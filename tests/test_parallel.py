"""Beyond one process: two "nodes" on localhost, FSDP2's bf16 policy, sharded checkpoints that resume exactly.

Every multi-process run here is a real `torchrun` launch over gloo on the CPU,
training from a prepared cache so that no process re-encodes the clips.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import checkpoints
import collate
import loader
import manifest
import model_utils
import parallel
import prepare
import train
from codes import read_prepared
from conftest import ROOT, logged, train_config

STEPS = 4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def short_rows(short_manifest) -> list[dict]:
    """The small manifest's rows with each clip cut short (`short_manifest`): encoding a clip costs ~5 CPU-seconds
    per 2.5 s, and every process of every run encodes its validation clips."""
    return [json.loads(line) for line in short_manifest.read_text(encoding="utf-8").splitlines()]


def _write_manifest(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, short_rows, tiny):
    folder = tmp_path_factory.mktemp("cache")
    prepare.prepare(str(_write_manifest(folder / "train.jsonl", short_rows)), folder / "cache", tiny.audio_tokenizer)
    return folder / "cache"


@pytest.fixture(scope="module")
def val_manifest(tmp_path_factory, short_rows):
    """Two utterances of one speaker: validation (and best.dcp) at the cost of encoding two short clips."""
    return _write_manifest(tmp_path_factory.mktemp("val") / "val.jsonl", short_rows[:2])


def _train_args(out_dir, cache, run_name: str, *extra: str) -> list[str]:
    """One sample per process and micro-batch: 2 processes see what 1 process sees with --grad-accum 2. No
    validation unless `extra` names a set."""
    validation = [] if "--val-manifest" in extra else ["--val-manifest", ""]
    return [str(ROOT / "train.py"), "--cache", str(cache), *validation, "--out-dir", str(out_dir),
            "--run-name", run_name, "--max-steps", str(STEPS), "--batch-size", "1", "--warmup-steps", "2",
            "--device", "cpu", "--parallel", "fsdp", *extra]


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_manifest, cache):
    """The reference: one process, --grad-accum 2, fp32."""
    out = tmp_path_factory.mktemp("one")
    return train.train(train_config(out, small_manifest, cache=str(cache), batch_size=1, grad_accum=2, max_steps=STEPS))


def test_two_nodes_on_localhost_match_one_process_with_the_same_global_batch(tmp_path, cache, one_process):
    """Two torchrun launchers, one process each, meet at a c10d rendezvous on 127.0.0.1, as two machines would."""
    port = _free_port()
    args = _train_args(tmp_path, cache, "nodes", "--precision", "fp32", "--save-every", "2")
    launchers = [
        subprocess.Popen(TORCHRUN + ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
                                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--max-restarts", "0"] + args,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(output[-2000:] for output in outputs)
    assert "2 process(es), fsdp" in "".join(outputs)
    # measured: losses bit-identical, gradient norms within 8.6e-6 (FSDP sums squares per shard, then over processes)
    for tag, tolerance in (("loss/total", 1e-5), ("train/grad_norm", 5e-5)):
        one, two = logged(one_process, tag), logged(tmp_path / "nodes", tag)
        assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
        assert all(abs(one[s] - two[s]) <= tolerance * abs(one[s]) for s in one), (tag, one, two)
    shards = tmp_path / "nodes" / "checkpoints" / f"step_{STEPS:08d}.dcp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", checkpoints.TRAIN_STATE} <= {path.name for path in shards.iterdir()}
    exported = model_utils.load_bundle(str(tmp_path / "nodes" / "export")).model.state_dict()
    reference = model_utils.load_bundle(str(one_process / "export")).model.state_dict()
    assert all(torch.allclose(exported[name], reference[name], atol=1e-5) for name in reference)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, cache, val_manifest):
    """FSDP2 with the bf16 policy on 2 gloo processes: straight through, and stopped at step 2 then resumed."""
    out = tmp_path_factory.mktemp("bf16")
    standalone = TORCHRUN + ["--standalone", "--nproc-per-node", "2"]
    extra = ("--precision", "bf16", "--val-manifest", str(val_manifest), "--eval-every", "2", "--save-every", "2", "--keep-last", "1")
    _run(standalone + _train_args(out, cache, "straight", *extra))
    _run(standalone + _train_args(out, cache, "resumed", *extra, "--stop-after", "2"))
    partial = out / "resumed" / "checkpoints" / f"step_{4:08d}.dcp.tmp"  # what a save killed midway leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"cut short")
    resumed = _run(standalone + _train_args(out, cache, "resumed", *extra, "--resume"))
    return out, resumed


def test_fsdp_bf16_policy_trains_close_to_fp32_and_validates(bf16_runs, one_process):
    """bf16 compute moves the losses a little off the fp32 ones, not more (gloo gathers bf16 and reduces fp32)."""
    out, _ = bf16_runs
    bf16, fp32 = logged(out / "straight"), logged(one_process)
    assert sorted(bf16) == list(range(1, STEPS + 1))
    assert all(abs(bf16[s] - fp32[s]) <= 3e-3 * fp32[s] for s in fp32), (bf16, fp32)  # measured: 2.9e-4 at most
    assert bf16 != fp32
    assert sorted(logged(out / "straight", "val/total")) == [2, 4]
    assert (out / "straight" / "export" / "config.json").is_file()


def test_sharded_checkpoints_are_per_process_shards_kept_last_and_best(bf16_runs):
    out, _ = bf16_runs
    folder = out / "straight" / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["best.dcp", f"step_{4:08d}.dcp"], "step 2 pruned (--keep-last 1)"
    latest = checkpoints.latest_checkpoint(out / "straight")
    assert latest == folder / f"step_{4:08d}.dcp"
    state = torch.load(latest / checkpoints.TRAIN_STATE, weights_only=True)
    assert state["step"] == 4 and len(state["rng"]) == 2 and state["config"]["precision"] == "bf16"
    # each process wrote its own half: no process held the full parameters and AdamW state
    n_parameters = sum(p.numel() for p in model_utils.build_tiny_model(model_utils.build_tiny_text_tokenizer()).parameters())
    full_bytes = 3 * 4 * n_parameters  # fp32 parameters and two AdamW moments
    sizes = [(latest / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert all(0.4 * full_bytes < size < 0.6 * full_bytes for size in sizes), (sizes, full_bytes)


def test_sharded_checkpoint_resumes_exactly(bf16_runs):
    """Per-step training and validation losses after resuming equal an uninterrupted run's; a partial save is ignored."""
    out, resumed = bf16_runs
    assert f"step_{2:08d}.dcp at step 2" in resumed
    for tag in ("loss/total", "train/grad_norm", "val/total"):
        assert logged(out / "resumed", tag) == logged(out / "straight", tag), tag
    names = {path.name for path in (out / "resumed" / "checkpoints").iterdir()}
    assert names == {"best.dcp", f"step_{4:08d}.dcp"}, "the partial save was replaced"


@pytest.mark.parametrize("precision, gathered", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_fsdp_policy_gathers_in_bf16_and_keeps_fp32_master_weights_and_gradients(tmp_path, tiny, small_manifest, cache,
                                                                                 precision, gathered):
    """One-process gloo group: what a layer computes with, and what the optimizer sees."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = model_utils.build_tiny_model(tiny.tokenizer, seed=0).train()
        settings = train_config(tmp_path, small_manifest, precision=precision, parallel="fsdp")
        parallel.shard_model(model, settings.precision)
        seen = []
        projection = model.layers[0].self_attn.q_proj
        projection.register_forward_hook(lambda module, inputs, output: seen.append((module.weight.dtype, inputs[0].dtype)))
        prepared = read_prepared(cache)
        maker = loader.BatchBuilder(tiny, settings, prepared.codes)
        batch = maker.batch(manifest.training_pairs(prepared.rows, 0, 0)[0][:1])
        loss = model_utils.compute_loss(model(**collate.batch_to_model_inputs(batch, "cpu")), batch.label_audio_ids)
        loss.total.backward()
    finally:
        dist.destroy_process_group()
    assert seen == [(gathered, gathered)]
    assert torch.isfinite(loss.total)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
