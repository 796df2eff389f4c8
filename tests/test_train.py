"""The training loop: loss falls, resume is exact, evaluation and the export work, signals and start-up errors
are one line, and the loop's derived values live beside the config, not in it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import config
import data
import heldout
import infer
import model_utils
import prepare
import train
import trainable
from conftest import QUICK_FLAGS, ROOT, error_lines, logged, run_main, serve_engine, train_config
from parallel import World


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_manifest):
    out = tmp_path_factory.mktemp("work") / "runs"
    return train.train(train_config(out, small_manifest, max_steps=14, lr=5e-3, val_manifest=str(small_manifest),
                               eval_every=7, eval_max_seconds=1.0))


def test_loss_falls_and_tensorboard_has_the_scalars(trained_run):
    losses = logged(trained_run)
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
    assert (image.width, image.height) == (1000, 740)  # plots.mel_figure: three stacked panels at 100 dpi
    assert (trained_run / "checkpoints" / "best.pt").is_file()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, small_manifest):
    straight = train.train(train_config(tmp_path / "a", small_manifest, max_steps=5))
    train.train(train_config(tmp_path / "b", small_manifest, max_steps=5, stop_after=2))
    resumed = train.train(train_config(tmp_path / "b", small_manifest, max_steps=5, resume=True))
    assert logged(straight) == logged(resumed)
    assert len(logged(straight)) == 5


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, small_manifest):
    """Each of 2 DDP processes takes 1 sample per step; 1 process accumulates 2 micro-batches of 1 (FSDP2:
    tests/test_parallel.py, across two launchers)."""
    common = ["--train-manifest", str(small_manifest), "--val-manifest", "", "--out-dir", str(tmp_path), "--max-steps", "3",
              "--batch-size", "1", "--device", "cpu", "--precision", "fp32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "train.py")]
    runs = {
        "two": torchrun + common + ["--run-name", "two", "--parallel", "ddp"],
        "one": [sys.executable, str(ROOT / "train.py")] + common + ["--run-name", "one", "--grad-accum", "2"],
    }
    for command in runs.values():
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for tag in ("loss/total", "train/grad_norm"):
        one, two = logged(tmp_path / "one", tag), logged(tmp_path / "two", tag)
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


def test_inspect_prints_the_first_batch_and_writes_or_removes_nothing_under_the_out_dir(tmp_path, short_manifest, capsys):
    stray = tmp_path / "old" / "checkpoints" / "step_00000001.pt.tmp-4242"  # what a --resume would clean up
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    before = sorted(tmp_path.rglob("*"))
    common = ["--train-manifest", str(short_manifest), "--out-dir", str(tmp_path), "--inspect", "--device", "cpu"]
    assert train.main([*common, "--run-name", "look"]) == 0
    out = capsys.readouterr().out
    assert "<|start_header_id|>assistant<|end_header_id|>" in out
    assert "(context, not trained)" in out and "(target, trained)" in out
    assert "text labels on 4 of" in out and "-100" not in out
    assert sorted(tmp_path.rglob("*")) == before, "--inspect claims no name"
    assert train.main([*common, "--run-name", "old", "--resume"]) == 0
    assert sorted(tmp_path.rglob("*")) == before, "--inspect cleans no run and reads no checkpoint"


def test_the_printed_resume_command_is_the_same_on_a_gpu_machine_and_a_cpu_one(tmp_path):
    given = config.parse_config(["--out-dir", str(tmp_path), "--max-steps", "9"])
    assert (given.device, given.precision) == ("auto", "auto")
    commands = set()
    for cuda in (True, False):
        settled = config.settle_auto(given, cuda)
        plan = train.RunPlan(settled.precision, World(device=settled.device), 9, 9)
        run = train.Run(settled, given, plan, tmp_path / "run", None, [], {}, {}, heldout.Guards([]))
        commands.add(run.resume_command())
    assert commands == {f"python train.py --out-dir {tmp_path} --max-steps 9 --run-name run --resume"}


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


def test_export_loads_in_the_serve_engine(trained_run, tiny_audio_tokenizer_dir):
    export = trained_run / "export"
    engine = serve_engine(export, tiny_audio_tokenizer_dir)
    ours = model_utils.load_bundle(str(export)).model.state_dict()
    assert all(torch.equal(ours[name], value) for name, value in engine.model.state_dict().items())


def test_export_records_its_layout(export):
    recorded = data.read_prompt_layout(export)
    assert recorded == data.RecordedLayout(data.PromptLayout(ref_in_system=True, scene=None), data.normalization_version())


def test_infer_without_arguments_uses_the_newest_export(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained_run.parent.parent)
    out = tmp_path / "clone.wav"
    assert infer.main(["--out", str(out), "--max-seconds", "0.5"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model:"))
    assert line.startswith(f"model: runs/{trained_run.name}/export (the newest export under runs/, written ")
    assert line.endswith("; --model or --checkpoint chooses another)")
    assert out.is_file()


def test_training_from_a_prepared_cache_equals_training_from_the_manifest(tmp_path, small_manifest, tiny):
    prepare.prepare(str(small_manifest), tmp_path / "cache", tiny.audio_tokenizer)
    raw = train.train(train_config(tmp_path / "raw", small_manifest, max_steps=2))
    cached = train.train(train_config(tmp_path / "cached", small_manifest, max_steps=2, cache=str(tmp_path / "cache"),
                                 train_manifest="/nonexistent.jsonl"))
    assert logged(raw) == logged(cached)


def test_compile_and_activation_checkpointing_keep_the_losses(tmp_path, small_manifest):
    plain = logged(train.train(train_config(tmp_path / "plain", small_manifest, max_steps=2)))
    wrapped = logged(train.train(train_config(tmp_path / "wrapped", small_manifest, max_steps=2, compile=True, grad_checkpoint=True)))
    assert sorted(plain) == sorted(wrapped) == [1, 2]
    assert all(abs(plain[step] - wrapped[step]) <= 1e-4 * plain[step] for step in plain), (plain, wrapped)


def test_epochs_set_the_number_of_steps(tmp_path, small_manifest):
    """4 rows, 2 per micro-batch, 1 micro-batch per step: an epoch is 2 steps."""
    run = train.train(train_config(tmp_path, small_manifest, epochs=1.5))
    assert json.loads((run / "plan.json").read_text())["max_steps"] == 3
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4, "config.json holds the flags as given"
    assert sorted(logged(run)) == [1, 2, 3]


def test_a_second_signal_stops_at_once(capsys):
    previous = {signum: signal.getsignal(signum) for signum in train.STOP_SIGNALS}
    try:
        stop = train.StopRequested()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(train.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; it must not wait for the step to finish
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert stopped.value.signum == signal.SIGINT and "without a checkpoint" in stopped.value.message
    assert "SIGINT again to stop at once" in capsys.readouterr().err


def test_processes_agree_to_stop_at_a_logged_step_without_a_collective_of_their_own(monkeypatch):
    """A single process stops at the step after a signal; under torchrun the flags travel with a logged step's
    statistics (one all-reduce that the read makes anyway), so a step that logs nothing runs no collective."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *args, **kwargs: pytest.fail("a collective"))
    stop = object.__new__(train.StopRequested)  # the flag without installing signal handlers
    stop.signum = signal.SIGTERM
    one, two = train.World(), train.World(rank=0, size=2)
    assert stop.agreed(None, one)
    assert not stop.agreed(None, two), "not on a step that does not log"
    logged = trainable.StepValues({}, 0.0, 0.0, 0.0, {}, 0.0, False, kl=math.nan, stop=True)
    assert stop.agreed(logged, two) and not stop.agreed(dataclasses.replace(logged, stop=False), two)


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    monkeypatch.setattr(model_utils, "load_bundle", interrupted_load)
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "run", *QUICK_FLAGS]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: during start-up, before the first step: nothing was trained; "
                                               "run the same command again")


def test_ctrl_c_while_the_script_imports_is_one_line_and_status_130(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out-dir", str(tmp_path), *QUICK_FLAGS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted: while loading, before reading any input: nothing was written"


def test_a_manifest_with_no_usable_row_is_one_line_after_the_counts(tmp_path):
    manifest_path = tmp_path / "bad.jsonl"
    manifest_path.write_text('{"id": "a", "audio": "missing.wav", "text": "hi", "speaker": "s"}\n{"id": "b"}\n')
    status, out, err = run_main("--train-manifest", str(manifest_path), "--out-dir", str(tmp_path / "runs"), "--run-name", "run", *QUICK_FLAGS)
    assert status == 2
    assert "rows read 2 = kept 0 + rejected 2" in out
    assert error_lines(err) == [f"error: {manifest_path}: no usable row to train on (counts above)"]


def test_a_failing_evaluation_is_reported_and_training_goes_on(tmp_path, short_manifest, monkeypatch, capsys):
    """bf16 on the CPU, where the speaker encoder's LSTM has no bf16 kernel, judges its first clips; then a
    validation clip deleted mid-run makes the next evaluation fail: reported in one line, and the run ends
    with its export."""
    rows = [json.loads(line) for line in short_manifest.read_text(encoding="utf-8").splitlines()]
    doomed = tmp_path / "doomed.wav"
    doomed.write_bytes(pathlib.Path(rows[1]["audio"]).read_bytes())
    rows[1]["audio"] = str(doomed)
    manifest_path = tmp_path / "val.jsonl"
    manifest_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    real_lr_at = trainable.lr_at

    def delete_after_the_first_evaluation(step, settings, max_steps):
        if step == 1:
            doomed.unlink(missing_ok=True)
        return real_lr_at(step, settings, max_steps)

    monkeypatch.setattr(trainable, "lr_at", delete_after_the_first_evaluation)
    run = train.train(train_config(tmp_path, manifest_path, val_manifest=str(manifest_path), max_steps=2, eval_every=1,
                                   eval_prompts=2, eval_max_seconds=0.3, precision="bf16"))
    err = capsys.readouterr().err
    assert "warning: step 2: the validation clips could not be generated or scored (AudioError: " in err
    assert "no such audio file); training goes on" in err
    assert list(logged(run, "quality/sim")) == [1], "the first evaluation, in bf16, was judged"
    assert list(logged(run, "eval/failures")) == [2] and (run / "export" / "config.json").is_file()


@pytest.fixture(scope="module")
def language_manifests(tmp_path_factory, short_manifest) -> dict[str, str]:
    """The short manifest's Arabic and English rows, each a manifest of its own."""
    rows = [json.loads(line) for line in short_manifest.read_text(encoding="utf-8").splitlines()]
    folder = tmp_path_factory.mktemp("languages")
    paths = {}
    for language in ("ar", "en"):
        paths[language] = folder / f"{language}.jsonl"
        paths[language].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows if row["language"] == language),
                                   encoding="utf-8")
    return {language: str(path) for language, path in paths.items()}


def test_a_mixture_resumes_exactly_and_logs_the_shares_it_drew(tmp_path, language_manifests):
    """Arabic 3 : English 1, one micro-batch a step, the forgetting term on the English (replay) micro-batches:
    the draws go ar, ar, en, ar, ar, ar (`loader.next_set`), and a run stopped at step 3 and resumed logs what
    the uninterrupted one logs."""
    mixture = dict(train_manifest=(f"ar:3={language_manifests['ar']}", f"en:1={language_manifests['en']}"), batch_size=1,
                   scope="lora", lora_rank=4, kl_weight=10.0, kl_replay="en", max_steps=6)
    straight = train.train(train_config(tmp_path / "a", language_manifests["ar"], **mixture))
    train.train(train_config(tmp_path / "b", language_manifests["ar"], **mixture, stop_after=3))
    resumed = train.train(train_config(tmp_path / "b", language_manifests["ar"], **mixture, resume=True))
    for tag in ("loss/total", "loss/kl", "mixture/en/share", "mixture/ar/epoch"):
        assert logged(straight, tag) == logged(resumed, tag), tag
    assert sorted(logged(straight)) == [1, 2, 3, 4, 5, 6]
    assert list(logged(straight, "loss/kl")) == [3], "the term is taken on the English micro-batch alone"
    assert logged(straight, "mixture/en/share") == pytest.approx({1: 0, 2: 0, 3: 1 / 3, 4: 1 / 4, 5: 1 / 5, 6: 1 / 6})
    assert logged(straight, "mixture/ar/epoch") == {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2}, "2 Arabic pairs an epoch"
    saved = torch.load(checkpoints.latest_checkpoint(resumed), weights_only=True)
    assert saved["data"].keys() == {"train:ar", "train:en"} and saved["position"]["sets"]["en"]["drawn"] == 1
