"""Runs and files: a run directory belongs to one run, --resume refuses a changed run and skips damaged
checkpoints, writes are whole or absent, every bad flag or file is one line, signals stop resumably."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import files
import model_utils
import checkpoints
import prepare
import train
from conftest import DEMO_DIR, ROOT

FLAGS = ["--val-manifest", "", "--device", "cpu", "--precision", "fp32", "--eval-every", "0", "--warmup-steps", "1"]


def _run(*args: str) -> tuple[int, str, str]:
    """train.main in this process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train.main(list(args))
    return status, out.getvalue(), err.getvalue()


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny):
    """The code cache of two paired rows on two demo clips, each the other's reference (encoded once, for every run)."""
    first, second = (str(DEMO_DIR / f"en_male_{k}.flac") for k in (0, 1))
    rows = [{"id": "a", "ref_audio": first, "ref_text": "The weather is lovely today.", "audio": second,
             "text": "Please bring me a cup of tea."},
            {"id": "b", "ref_audio": second, "ref_text": "Please bring me a cup of tea.", "audio": first,
             "text": "The weather is lovely today."}]
    folder = tmp_path_factory.mktemp("cache")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    prepare.prepare(str(folder / "pairs.jsonl"), folder / "codes", tiny.audio_tokenizer)
    return folder / "codes"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, cache):
    """A 3-step run stopped by SIGTERM during step 2: checkpoints step 1 and 2, its exit status and output."""
    out = tmp_path_factory.mktemp("stopped")
    real_lr_at, sent = train.lr_at, []

    def lr_at_then_sigterm(step, config):
        if step == 1 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, config)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "lr_at", lr_at_then_sigterm)
        status, stdout, stderr = _run("--cache", str(cache), "--out-dir", str(out), "--run-name", "run", "--max-steps", "3",
                                      "--save-every", "1", "--keep-last", "5", *FLAGS)
    return {"run": out / "run", "status": status, "out": stdout, "err": stderr, "cache": cache,
            "handler_restored": signal.getsignal(signal.SIGTERM) is handler}


def _copy(stopped, tmp_path) -> pathlib.Path:
    run = tmp_path / "runs" / "run"
    shutil.copytree(stopped["run"], run)
    return run


def _resume(stopped, run: pathlib.Path, *extra: str) -> tuple[int, str, str]:
    return _run("--cache", str(stopped["cache"]), "--out-dir", str(run.parent), "--run-name", run.name, "--max-steps", "3",
                "--save-every", "1", "--keep-last", "5", "--resume", *FLAGS, *extra)


def _files(folder: pathlib.Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in sorted(folder.rglob("*")) if path.is_file()}


# --- signals ---------------------------------------------------------------------------------------------------


def test_sigterm_stop_saves_says_how_to_resume_and_exits_143(stopped):
    assert stopped["status"] == 128 + signal.SIGTERM == 143
    assert "SIGTERM: stopping with a checkpoint after this step" in stopped["err"]
    assert "stopped at step 2" in stopped["out"] and f"--out-dir {stopped['run'].parent} --run-name run --resume" in stopped["out"]
    assert [path.name for path in checkpoints.step_checkpoints(stopped["run"] / "checkpoints")] == ["step_00000001.pt", "step_00000002.pt"]
    assert not (stopped["run"] / "export").exists()
    assert stopped["handler_restored"]


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


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    monkeypatch.setattr(model_utils, "load_bundle", interrupted_load)
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "run", *FLAGS]) == 130
    assert _error_lines(capsys.readouterr().err) == ["error: interrupted during start-up: nothing was trained"]


def test_ctrl_c_while_the_script_imports_is_one_line_and_status_130(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out-dir", str(tmp_path), *FLAGS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and _error_lines(err) == ["error: interrupted during start-up: nothing was trained"]


# --- a run directory belongs to one run --------------------------------------------------------------------------


def test_a_run_name_in_use_needs_resume_and_nothing_is_touched(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    before = _files(run)
    status, _, err = _run("--cache", str(stopped["cache"]), "--out-dir", str(run.parent), "--run-name", "run", "--max-steps", "2", *FLAGS)
    assert status == 2
    assert _error_lines(err) == [f"error: {run} already holds a run: continue it with --resume, or pick another --run-name"]
    assert _files(run) == before


def test_resume_refuses_flags_that_change_the_run_naming_them(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    before = _files(run)
    status, _, err = _resume(stopped, run, "--seed", "1", "--batch-size", "1", "--ref-in-system")
    assert status == 2
    [line] = _error_lines(err)
    assert "--seed 0 (now 1)" in line and "--batch-size 2 (now 1)" in line and "--ref-in-system False (now True)" in line
    assert "step_00000002.pt" in line
    status, _, err = _resume(stopped, run, "--max-steps", "10")
    assert status == 2 and "--max-steps 3 (now 10)" in err and "to train longer, start a new run" in err
    assert _files(run) == before


def test_resume_without_a_checkpoint_or_an_intact_one_is_one_line(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    for path in checkpoints.step_checkpoints(run / "checkpoints"):
        path.write_bytes(b"")
    status, _, err = _resume(stopped, run)
    assert status == 2
    assert _error_lines(err) == [f"error: --resume: no intact checkpoint in {run / 'checkpoints'}: "
                                 "step_00000002.pt (empty file); step_00000001.pt (empty file)"]
    shutil.rmtree(run / "checkpoints")
    status, _, err = _resume(stopped, run)
    assert status == 2 and len(_error_lines(err)) == 1 and "no checkpoint in" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes", "foreign dict"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(stopped, tmp_path, damage, capsys):
    run = _copy(stopped, tmp_path)
    newest = run / "checkpoints" / "step_00000002.pt"
    whole = newest.read_bytes()
    if damage == "foreign dict":
        torch.save({"weights": torch.zeros(3)}, newest)
    else:
        newest.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "random bytes": os.urandom(4096)}[damage])
    path, state = checkpoints.newest_intact_checkpoint(run, train.Dist(), print)
    assert path == run / "checkpoints" / "step_00000001.pt" and state["step"] == 1
    out = capsys.readouterr().out
    assert f"unreadable checkpoint {newest}" in out and f"resuming from {path} instead" in out
    assert not newest.exists() and newest.with_name(newest.name + ".corrupt").is_file()


def test_resume_uses_the_intact_checkpoint_cleans_strays_records_safe_changes_and_purges_events(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    newest = run / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    stray = [run / "checkpoints" / "step_00000003.pt.tmp-4242", run / "export.tmp-abcd"]
    stray[0].write_bytes(b"half")
    stray[1].mkdir()
    (stray[1] / "config.json").write_text("{}")
    status, out, err = _resume(stopped, run, "--save-every", "7", "--keep-last", "3")
    assert status == 0, err
    assert f"removed what an interrupted write left: {stray[0]}, {stray[1]}" in out
    assert f"unreadable checkpoint {newest}" in out and "resumed from" in out and "step_00000001.pt at step 1" in out
    assert not any(path.exists() for path in stray)
    config = json.loads((run / "config.json").read_text())
    assert config["save_every"] == 7 and config["keep_last"] == 3 and config["resume"] is True
    [entry] = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 1 and entry["checkpoint"].endswith("step_00000001.pt")
    assert entry["changed"] == {"out_dir": [str(stopped["run"].parent), str(run.parent)], "save_every": [1, 7], "keep_last": [5, 3]}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3], "the interrupted attempt's step 2 is purged"
    assert model_utils.newest_export(str(run.parent)) == str(run / "export")


# --- checkpoints: pruning by step number, never the one just written ---------------------------------------------


def test_pruning_keeps_the_newest_by_step_number_and_never_the_one_just_written(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_99999999.pt", "step_100000000.pt", "step_100000001.pt", "best.pt"):
        (folder / name).write_bytes(b"x")
    assert checkpoints.latest_checkpoint(tmp_path) == folder / "step_100000001.pt"
    written = folder / "step_00000005.pt"
    written.write_bytes(b"x")
    checkpoints.prune_checkpoints(folder, 1, written)
    assert sorted(path.name for path in folder.iterdir()) == ["best.pt", "step_00000005.pt", "step_100000001.pt"]


# --- writes are whole or absent ----------------------------------------------------------------------------------


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_leaves_no_temporary(stopped, tmp_path, monkeypatch):
    run = _copy(stopped, tmp_path)

    def disk_full(state, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    status, _, err = _resume(stopped, run)
    assert status == 2
    assert _error_lines(err) == [f"error: cannot write {run / 'checkpoints' / 'step_00000003.pt'}: No space left on device"]
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]


def test_an_export_cut_short_by_a_full_disk_leaves_nothing_for_infer(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run" / "export"

    def disk_full(path, seed):
        pathlib.Path(path).mkdir(parents=True)
        (pathlib.Path(path) / "model.pth").write_bytes(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_utils, "save_tiny_audio_tokenizer", disk_full)
    with pytest.raises(files.WriteError, match=f"^cannot write {out}: No space left on device$"):
        train.export_model(tiny.model, train.TrainConfig(device="cpu"), tiny, train.Dist(), out)
    assert list(out.parent.iterdir()) == [] and model_utils.newest_export(str(tmp_path)) is None


def test_cleaning_removes_temporaries_and_puts_back_an_export_whose_replacement_never_arrived(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000004.pt.tmp-77").write_bytes(b"half")
    (tmp_path / "checkpoints" / "step_00000003.pt").write_bytes(b"whole")
    for name in ("export.tmp-new", "export.old-new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    assert checkpoints.clean_temporaries(tmp_path) == [tmp_path / "checkpoints" / "step_00000004.pt.tmp-77", tmp_path / "export.tmp-new"]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoints", "export"]
    assert (tmp_path / "export" / "config.json").read_text() == "export.old-new"
    assert [entry.name for entry in (tmp_path / "checkpoints").iterdir()] == ["step_00000003.pt"]


def test_newest_export_skips_an_export_cut_short(tmp_path, capsys):
    from safetensors.torch import save_file

    for name in ("old", "new", "newer"):
        export = tmp_path / name / "export"
        (export / "audio_tokenizer").mkdir(parents=True)
        (export / "config.json").write_text("{}")
        save_file({"weight": torch.zeros(64)}, export / "model.safetensors")
        torch.save({"weight": torch.zeros(64)}, export / "audio_tokenizer" / "model.pth")
        time.sleep(0.01)
    assert model_utils.newest_export(str(tmp_path)) == str(tmp_path / "newer" / "export")
    weights = tmp_path / "newer" / "export" / "audio_tokenizer" / "model.pth"
    weights.write_bytes(weights.read_bytes()[:300])
    tensors = tmp_path / "new" / "export" / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])
    (tmp_path / "newest" / "export.tmp-1234").mkdir(parents=True)
    (tmp_path / "newest" / "export.tmp-1234" / "config.json").write_text("{}")
    assert model_utils.newest_export(str(tmp_path)) == str(tmp_path / "old" / "export")
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'newer' / 'export'}: audio_tokenizer/model.pth is truncated" in err
    assert f"skipping {tmp_path / 'new' / 'export'}: model.safetensors is truncated" in err


def test_a_read_only_out_dir_is_one_line_naming_it(tmp_path, monkeypatch):
    out = tmp_path / "read-only"
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    status, _, err = _run("--out-dir", str(out), "--run-name", "run", *FLAGS)
    assert status == 2
    assert _error_lines(err) == [f"error: {out / 'run'}: Read-only file system"]


# --- flags, --config and data: one line each --------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--save-every", "0", "--save-every must be at least 1, not 0"),
    ("--log-every", "0", "--log-every must be at least 1, not 0"),
    ("--grad-accum", "0", "--grad-accum must be at least 1, not 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
    ("--batch-size", "-2", "--batch-size must be at least 1, not -2"),
    ("--batch-tokens", "-1", "--batch-tokens must be at least 0, not -1"),
    ("--max-steps", "0", "--max-steps must be at least 1, not 0"),
    ("--epochs", "-1", "--epochs must be at least 0, not -1.0"),
    ("--lr", "0", "--lr must be positive, not 0.0"),
    ("--lr", "nan", "--lr must be positive, not nan"),
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0, not -1"),
    ("--keep-last", "-1", "--keep-last must be at least 1, not -1"),
    ("--keep-last", "0", "--keep-last must be at least 1, not 0"),
    ("--eval-every", "-5", "--eval-every must be at least 0, not -5"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must be in [0, 1], not 2.0"),
    ("--lora-dropout", "1", "--lora-dropout must be in [0, 1), not 1.0"),
    ("--seed", "-1", "--seed must be in [0, 4294967295], not -1"),
    ("--batch-size", "two", "argument --batch-size: invalid int value: 'two' (see --help)"),
])
def test_every_numeric_flag_is_checked_at_parse_time(tmp_path, flag, value, message):
    status, out, err = _run("--out-dir", str(tmp_path), *FLAGS, flag, value)
    assert status == 2 and _error_lines(err) == [f"error: {message}"] and not out
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_every_numeric_field_has_a_limit():
    numeric = {name for name, value in asdict(train.TrainConfig()).items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numeric == set(train.LIMITS)


def test_eval_every_zero_means_never_and_is_valid():
    assert train.parse_config(["--eval-every", "0"]).eval_every == 0


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "No such file or directory"),
    ("bad.json", '{"lr": 0.001,}', "invalid JSON at line 1"),
    ("bad.yaml", "lr: [0.001\nseed: 2\n", "invalid YAML at line 2"),
    ("unknown.yaml", "lr: 0.001\nbatchsize: 4\n", "unknown keys ['batchsize']"),
    ("type.json", '{"batch_size": "4"}', "batch_size must be int, not '4'"),
    ("bool.json", '{"max_steps": true}', "max_steps must be int, not True"),
    ("list.yaml", "- lr\n", "expected a mapping of field names to values, not list"),
    ("range.json", '{"save_every": 0}', "--save-every must be at least 1, not 0"),
])
def test_config_file_problems_are_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    status, _, err = _run("--config", str(path), "--out-dir", str(tmp_path / "runs"), *FLAGS)
    assert status == 2
    [line] = _error_lines(err)
    assert message in line and (name in line or name == "range.json")


def test_config_file_values_apply_and_flags_override_them(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lr: 1\nbatch_size: 3\nrun_name: null\n")
    config = train.parse_config(["--config", str(path), "--batch-size", "4"])
    assert (config.lr, config.batch_size, config.run_name) == (1, 4, None)


def test_a_manifest_with_no_usable_row_is_one_line_after_the_counts(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"id": "a", "audio": "missing.wav", "text": "hi", "speaker": "s"}\n{"id": "b"}\n')
    status, out, err = _run("--train-manifest", str(manifest), "--out-dir", str(tmp_path / "runs"), "--run-name", "run", *FLAGS)
    assert status == 2
    assert "rows read 2 = kept 0 + rejected 2" in out
    assert _error_lines(err) == [f"error: {manifest}: no usable row to train on (counts above)"]
