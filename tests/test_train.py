"""The training loop: loss falls, resume is exact, scopes freeze what they say, signals and export work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import HubertConfig

import data
import infer
import model_utils
import checkpoints
import train
from conftest import DEMO_DIR, ROOT


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    """Two speakers (one English, one Arabic) with two utterances each, from the committed demo clips."""
    rows = [json.loads(line) for line in (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    keep = [row for row in rows if row["id"] in {"en_female_0", "en_female_1", "ar_male_0", "ar_male_2"}]
    for row in keep:
        row["audio"] = str(DEMO_DIR / row["audio"])
    path = tmp_path_factory.mktemp("manifest") / "small.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in keep), encoding="utf-8")
    return path


def _config(tmp_path, manifest, **changes) -> train.TrainConfig:
    values = dict(train_manifest=str(manifest), val_manifest="", out_dir=str(tmp_path), run_name="run", device="cpu",
                  precision="fp32", batch_size=2, max_steps=4, save_every=100, warmup_steps=2)
    values.update(changes)
    return train.TrainConfig(**values)


def _losses(run_dir, tag="loss/total") -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_manifest):
    out = tmp_path_factory.mktemp("work") / "runs"
    return train.train(_config(out, small_manifest, max_steps=14, lr=5e-3, val_manifest=str(small_manifest),
                               eval_every=7, eval_max_seconds=1.0))


def test_loss_falls_and_tensorboard_has_the_scalars(trained_run):
    losses = _losses(trained_run)
    assert sorted(losses) == list(range(1, 15))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (12, 13, 14)) / 3
    assert last < first - 1.0, losses
    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/text", "loss/audio", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
                "train/padding_fraction"} | {f"loss/codebook_{k}" for k in range(8)}
    assert expected <= tags
    assert json.loads((trained_run / "config.json").read_text())["max_steps"] == 14


def test_evaluation_logs_validation_losses_audio_and_spectrograms(trained_run):
    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "audio": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/total", "val/text", "val/audio"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("val/total")] == [7, 14]
    assert len(tags["audio"]) == 2 and len(tags["images"]) == 2
    image = events.Images(tags["images"][0])[-1]
    assert image.height == 80 and image.width > 100
    assert (trained_run / "checkpoints" / "best.pt").is_file()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, small_manifest):
    straight = train.train(_config(tmp_path / "a", small_manifest, max_steps=5))
    train.train(_config(tmp_path / "b", small_manifest, max_steps=5, stop_after=2))
    resumed = train.train(_config(tmp_path / "b", small_manifest, max_steps=5, resume=True))
    assert _losses(straight) == _losses(resumed)
    assert len(_losses(straight)) == 5


@pytest.mark.parametrize("scope", ["audio", "full"])
def test_scope_trains_what_it_says_and_freezes_the_rest(tmp_path, small_manifest, scope):
    run = train.train(_config(tmp_path, small_manifest, max_steps=2, scope=scope))
    tokenizer = model_utils.build_tiny_text_tokenizer()
    before = model_utils.build_tiny_model(tokenizer, seed=0).state_dict()
    after = model_utils.load_bundle(str(run / "export")).model.state_dict()
    audio = [name for name in before if any(marker in name for marker in train.AUDIO_PARAMETER_MARKERS)]
    text = [name for name in before if name not in audio and "rotary" not in name]
    assert audio and text
    assert all(not torch.equal(before[name], after[name]) for name in audio), "every trained tensor moves"
    unchanged = [name for name in text if torch.equal(before[name], after[name])]
    if scope == "audio":
        assert unchanged == text, "the text LLM stays bit-identical"
    else:
        assert not unchanged


def test_lora_trains_adapters_on_attention_and_both_ffns_and_merges_on_export(tmp_path, small_manifest):
    run = train.train(_config(tmp_path, small_manifest, max_steps=2, scope="lora", lora_rank=4))
    saved = torch.load(checkpoints.latest_checkpoint(run), weights_only=True)["model"]
    assert saved and all("lora_" in name for name in saved)
    assert any("audio_mlp" in name for name in saved), "the audio FFN is adapted, not attention alone"
    before = model_utils.build_tiny_model(model_utils.build_tiny_text_tokenizer(), seed=0).state_dict()
    merged = model_utils.load_bundle(str(run / "export")).model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], merged[name])}
    targeted = {name for name in before if name.endswith(".weight") and name.split(".")[-2] in train.LORA_TARGETS}
    assert changed == targeted


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, small_manifest, parallel):
    """Each of 2 processes takes 1 sample per step; 1 process accumulates 2 micro-batches of 1."""
    common = ["--train-manifest", str(small_manifest), "--val-manifest", "", "--out-dir", str(tmp_path), "--max-steps", "3",
              "--batch-size", "1", "--device", "cpu", "--precision", "fp32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "train.py")]
    runs = {
        "two": torchrun + common + ["--run-name", "two", "--parallel", parallel],
        "one": [sys.executable, str(ROOT / "train.py")] + common + ["--run-name", "one", "--grad-accum", "2"],
    }
    for command in runs.values():
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for tag in ("loss/total", "train/grad_norm"):
        one, two = _losses(tmp_path / "one", tag), _losses(tmp_path / "two", tag)
        assert sorted(one) == sorted(two) == [1, 2, 3]
        assert all(abs(one[s] - two[s]) <= 1e-5 * abs(one[s]) for s in one), (tag, one, two)
    exported = model_utils.load_bundle(str(tmp_path / "two" / "export")).model.state_dict()
    reference = model_utils.load_bundle(str(tmp_path / "one" / "export")).model.state_dict()
    assert all(torch.allclose(exported[name], reference[name], atol=1e-5) for name in reference)


def test_non_finite_losses_stop_the_run_naming_the_samples(tmp_path, small_manifest, capsys):
    args = ["--train-manifest", str(small_manifest), "--val-manifest", "", "--out-dir", str(tmp_path), "--device", "cpu",
            "--precision", "fp32", "--lr", "1e30", "--warmup-steps", "1", "--grad-clip", "0", "--max-bad-steps", "3"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite loss, step skipped" in err
    assert "3 non-finite losses in a row" in err and ("en_female" in err or "ar_male" in err)


def test_inspect_prints_the_first_batch_and_trains_nothing(tmp_path, small_manifest, capsys):
    assert train.main(["--train-manifest", str(small_manifest), "--out-dir", str(tmp_path), "--run-name", "look", "--inspect", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "<|start_header_id|>assistant<|end_header_id|>" in out
    assert "(context, not trained)" in out and "(target, trained)" in out
    assert "text labels on 4 of" in out and "-100" not in out
    assert not (tmp_path / "look" / "checkpoints").exists()


def test_sigterm_saves_a_loadable_checkpoint(tmp_path, small_manifest):
    command = [sys.executable, str(ROOT / "train.py"), "--train-manifest", str(small_manifest), "--val-manifest", "", "--out-dir", str(tmp_path),
               "--run-name", "run", "--max-steps", "10000", "--device", "cpu", "--precision", "fp32"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = tmp_path / "run" / "tensorboard"
    deadline = time.time() + 120
    while not (events.is_dir() and any(events.iterdir())) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output  # 128 + SIGTERM: stopped, resumable
    assert "stopped at step" in output and "--resume" in output
    checkpoint = checkpoints.latest_checkpoint(tmp_path / "run")
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] >= 0 and state["model"] and state["optimizer"]["state"] is not None


def test_export_loads_in_the_serve_engine(trained_run):
    export = trained_run / "export"
    teacher = HubertConfig.from_pretrained(export / "audio_tokenizer" / "semantic_teacher")
    with model_utils._offline_semantic_teacher(teacher):
        engine = HiggsAudioServeEngine(str(export), str(export / "audio_tokenizer"), device="cpu", torch_dtype=torch.float32,
                                       kv_cache_lengths=[512])
    ours = model_utils.load_bundle(str(export)).model.state_dict()
    assert all(torch.equal(ours[name], value) for name, value in engine.model.state_dict().items())


def test_export_records_its_layout(export):
    recorded = data.read_prompt_layout(export)
    assert recorded == data.RecordedLayout(data.PromptLayout(ref_in_system=True, scene=None), data.normalization_version())


def test_infer_without_arguments_uses_the_newest_export(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained_run.parent.parent)
    out = tmp_path / "clone.wav"
    assert infer.main(["--out", str(out), "--max-seconds", "0.5"]) == 0
    assert f"model: runs/{trained_run.name}/export" in capsys.readouterr().out
    assert out.is_file()


def test_training_from_a_prepared_cache_equals_training_from_the_manifest(tmp_path, small_manifest, tiny):
    prepare.prepare(str(small_manifest), tmp_path / "cache", tiny.audio_tokenizer)
    raw = train.train(_config(tmp_path / "raw", small_manifest, max_steps=2))
    cached = train.train(_config(tmp_path / "cached", small_manifest, max_steps=2, cache=str(tmp_path / "cache"),
                                 train_manifest="/nonexistent.jsonl"))
    assert _losses(raw) == _losses(cached)


def test_token_budget_micro_batches_stay_within_the_budget(tmp_path, small_manifest, tiny):
    import collate
    import data

    config = _config(tmp_path, small_manifest, batch_tokens=500)
    codes = prepare.EncodedClips(tiny.audio_tokenizer)
    rows = manifest.validate_manifest(small_manifest, codes).kept
    maker = train.SampleMaker(tiny, config, codes)
    batches = train.epoch_batches(rows, config, 0, maker)
    assert sum(len(pairs) for pairs in batches) == len(rows) and max(len(pairs) for pairs in batches) > 1
    with torch.no_grad():
        for pairs in batches:
            outputs = tiny.model(**collate.batch_to_model_inputs(maker.batch(pairs), "cpu"))
            assert outputs.attention_mask.numel() <= 500


def test_compile_and_activation_checkpointing_keep_the_losses(tmp_path, small_manifest):
    plain = _losses(train.train(_config(tmp_path / "plain", small_manifest, max_steps=2)))
    wrapped = _losses(train.train(_config(tmp_path / "wrapped", small_manifest, max_steps=2, compile=True, grad_checkpoint=True)))
    assert sorted(plain) == sorted(wrapped) == [1, 2]
    assert all(abs(plain[step] - wrapped[step]) <= 1e-4 * plain[step] for step in plain), (plain, wrapped)


def test_epochs_set_the_number_of_steps(tmp_path, small_manifest):
    """4 rows, 2 per micro-batch, 1 micro-batch per step: an epoch is 2 steps."""
    run = train.train(_config(tmp_path, small_manifest, epochs=1.5))
    assert json.loads((run / "config.json").read_text())["max_steps"] == 3
    assert sorted(_losses(run)) == [1, 2, 3]
