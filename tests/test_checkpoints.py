"""Runs and checkpoints: a run directory belongs to one run, a stop leaves a checkpoint to resume from, --resume
refuses a changed run and skips damaged checkpoints, writes are whole or absent, the export is whole."""

from __future__ import annotations

import copy
import errno
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import config
import files
import loader
import model_utils
import prepare
import train
import trainable
from conftest import DEMO_DIR, QUICK_FLAGS, ROOT, error_lines, logged, run_main, train_config
from parallel import World


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
    real_lr_at, sent = trainable.lr_at, []

    def lr_at_then_sigterm(step, config, max_steps):
        if step == 1 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, config, max_steps)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainable, "lr_at", lr_at_then_sigterm)
        status, stdout, stderr = run_main("--cache", str(cache), "--out-dir", str(out), "--run-name", "run", "--max-steps", "3",
                                      "--save-every", "1", "--keep-last", "5", *QUICK_FLAGS)
    return {"run": out / "run", "status": status, "out": stdout, "err": stderr, "cache": cache,
            "handler_restored": signal.getsignal(signal.SIGTERM) is handler}


def _copy(stopped, tmp_path) -> pathlib.Path:
    run = tmp_path / "runs" / "run"
    shutil.copytree(stopped["run"], run)
    return run


def _resume(stopped, run: pathlib.Path, *extra: str) -> tuple[int, str, str]:
    return run_main("--cache", str(stopped["cache"]), "--out-dir", str(run.parent), "--run-name", run.name, "--max-steps", "3",
                "--save-every", "1", "--keep-last", "5", "--resume", *QUICK_FLAGS, *extra)


def _files(folder: pathlib.Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in sorted(folder.rglob("*")) if path.is_file()}


# --- signals ---------------------------------------------------------------------------------------------------


def test_sigterm_stop_saves_says_how_to_resume_and_exits_143(stopped):
    assert stopped["status"] == 128 + signal.SIGTERM == 143
    assert "SIGTERM: stopping with a checkpoint after this step" in stopped["err"]
    assert "stopped at step 2" in stopped["out"]
    command = stopped["out"].split("continue with: ")[1].splitlines()[0]
    assert command.startswith("python train.py --cache ") and command.endswith(" --run-name run --resume")
    assert f"--out-dir {stopped['run'].parent}" in command and "--max-steps 3" in command
    assert [path.name for path in checkpoints.step_checkpoints(stopped["run"] / "checkpoints")] == ["step_00000001.pt", "step_00000002.pt"]
    assert not (stopped["run"] / "export").exists()
    assert stopped["handler_restored"]


def test_the_printed_command_continues_the_run(stopped, tmp_path):
    """The stop message's command, run as printed (with this copy's --out-dir), finishes the run."""
    run = _copy(stopped, tmp_path)
    command = shlex.split(stopped["out"].split("continue with: ")[1].splitlines()[0])
    assert command[:2] == ["python", "train.py"]
    arguments = command[2:]
    arguments[arguments.index("--out-dir") + 1] = str(run.parent)
    status, out, err = run_main(*arguments)
    assert status == 0, err
    assert "resumed from" in out and "done: 3 steps" in out


# --- a run directory belongs to one run --------------------------------------------------------------------------


def test_a_run_name_in_use_needs_resume_and_nothing_is_touched(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    before = _files(run)
    status, _, err = run_main("--cache", str(stopped["cache"]), "--out-dir", str(run.parent), "--run-name", "run", "--max-steps", "2", *QUICK_FLAGS)
    assert status == 2
    assert error_lines(err) == [f"error: {run} already holds a run: continue it with --resume, or pick another --run-name"]
    assert _files(run) == before


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh_under_its_name(cache, tmp_path):
    """Issue 25 item 8: two SIGTERMs 0.3 s apart before the first checkpoint left a name that neither a plain start
    (`already holds a run`) nor --resume (`nothing to resume`) would take. Either now starts it afresh, saying so."""
    flags = ["--cache", str(cache), "--out-dir", str(tmp_path / "runs"), "--run-name", "run", "--max-steps", "2",
             "--save-every", "2", *QUICK_FLAGS]
    real_lr_at = trainable.lr_at

    def two_sigterms(step, config, max_steps):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, config, max_steps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainable, "lr_at", two_sigterms)
        assert run_main(*flags)[0] == 143
    run = tmp_path / "runs" / "run"
    assert (run / "config.json").is_file() and not list((run / "checkpoints").glob("*"))
    shutil.copytree(run, tmp_path / "copy" / "run")
    for attempt, extra in ((run, ()), (tmp_path / "copy" / "run", ("--resume",))):
        status, out, err = run_main(*flags, "--out-dir", str(attempt.parent), *extra)
        assert status == 0, err
        assert f"note: {attempt} holds an attempt stopped before its first checkpoint: starting it afresh" in out
        assert "done: 2 steps" in out and sorted(logged(attempt)) == [1, 2]


def test_resume_refuses_flags_that_change_the_run_naming_them(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    before = _files(run)
    status, _, err = _resume(stopped, run, "--seed", "1", "--batch-size", "1", "--ref-in-system")
    assert status == 2
    [line] = error_lines(err)
    assert "--seed 0 (now 1)" in line and "--batch-size 2 (now 1)" in line and "--ref-in-system False (now True)" in line
    assert "step_00000002.pt" in line
    status, _, err = _resume(stopped, run, "--max-steps", "10")
    assert status == 2 and "--max-steps 3 (now 10)" in err and "to train longer, start a new run" in err
    assert _files(run) == before


def test_resume_without_a_run_or_an_intact_checkpoint_is_one_line(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    for path in checkpoints.step_checkpoints(run / "checkpoints"):
        path.write_bytes(b"")
    status, _, err = _resume(stopped, run)
    assert status == 2
    assert error_lines(err) == [f"error: --resume: no intact checkpoint in {run / 'checkpoints'}: "
                                 "step_00000002.pt (empty file); step_00000001.pt (empty file); each set aside as *.corrupt"]
    other = tmp_path / "runs" / "other"
    status, _, err = _resume(stopped, other)
    assert status == 2 and error_lines(err) == [f"error: --resume: no run in {other}: nothing to resume (check --out-dir and --run-name)"]
    assert not other.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes", "foreign dict", "bytes flipped mid-tensor"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(stopped, tmp_path, damage, capsys):
    run = _copy(stopped, tmp_path)
    newest = run / "checkpoints" / "step_00000002.pt"
    whole = newest.read_bytes()
    if damage == "foreign dict":
        torch.save({"weights": torch.zeros(3)}, newest)
    elif damage == "bytes flipped mid-tensor":  # still a loadable file: only its digest tells
        flipped = bytearray(whole)
        flipped[len(whole) // 2 : len(whole) // 2 + 8] = bytes(b ^ 0x5A for b in flipped[len(whole) // 2 : len(whole) // 2 + 8])
        newest.write_bytes(bytes(flipped))
        assert torch.load(newest, weights_only=True)["step"] == 2
    else:
        newest.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "random bytes": os.urandom(4096)}[damage])
    path, record = checkpoints.newest_intact_checkpoint(run, World(), print)
    assert path == run / "checkpoints" / "step_00000001.pt" and record.step == 1
    out = capsys.readouterr().out
    assert f"unreadable checkpoint {newest}" in out and f"resuming from {path} instead" in out
    assert not newest.exists() and newest.with_name(newest.name + ".corrupt").is_file()
    if damage == "bytes flipped mid-tensor":
        assert "its bytes differ from the SHA-256 written with it" in out


def _flip_bytes(path: pathlib.Path) -> None:
    """8 bytes flipped mid-file: still a loadable file, whose digest alone tells."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 8] = bytes(b ^ 0x5A for b in content[middle : middle + 8])
    path.write_bytes(bytes(content))


def test_a_damaged_newest_checkpoint_falls_back_to_a_later_best_pt_which_holds_a_whole_state(cache, tmp_path):
    """Issue 25 item 1: evaluated every 2 steps and saved every 4, stopped after step 3, then 8 bytes flipped in
    step_00000003.pt: --resume refused (`no intact checkpoint`) though best.pt, of step 2, is a whole resumable
    state. Now the damaged file is named once and set aside, and the run resumes from best.pt, exactly."""
    flags = ["--cache", str(cache), "--val-manifest", str(cache.parent / "pairs.jsonl"), "--out-dir", str(tmp_path),
             "--run-name", "run", "--max-steps", "6", "--eval-every", "2", "--eval-prompts", "0", "--save-every", "4",
             "--device", "cpu", "--precision", "fp32", "--warmup-steps", "1"]
    assert run_main(*flags, "--stop-after", "3")[0] == 0
    run = tmp_path / "run"
    step_3_loss = logged(run)[3]
    damaged = run / "checkpoints" / "step_00000003.pt"
    _flip_bytes(damaged)
    status, out, err = run_main(*flags, "--resume", "--stop-after", "4")
    assert status == 0, err
    assert (out + err).count(damaged.name) == 1, out + err
    assert f"unreadable checkpoint {damaged} (its bytes differ from the SHA-256 written with it" in out
    assert f"resumed from {run / 'checkpoints' / 'best.pt'} at step 2" in out and "stopped at step 4" in out
    assert damaged.with_name(damaged.name + ".corrupt").is_file() and not damaged.with_name(damaged.name + ".sha256").exists()
    assert logged(run)[3] == step_3_loss, "best.pt's state resumes as the step's own checkpoint would"


def test_with_no_intact_checkpoint_each_damaged_one_is_named_once_and_set_aside(cache, tmp_path):
    flags = ["--cache", str(cache), "--out-dir", str(tmp_path), "--run-name", "run", "--max-steps", "4", "--save-every", "1",
             *QUICK_FLAGS]
    assert run_main(*flags, "--stop-after", "2")[0] == 0
    folder = tmp_path / "run" / "checkpoints"
    for path in checkpoints.step_checkpoints(folder):
        _flip_bytes(path)
    status, out, err = run_main(*flags, "--resume")
    assert status == 2
    [line] = error_lines(err)
    assert line.startswith(f"error: --resume: no intact checkpoint in {folder}: step_00000002.pt (its bytes differ")
    assert (out + err).count("step_00000002.pt") == 1 and "set aside as *.corrupt" in line, out + err
    assert sorted(path.name for path in folder.glob("*.corrupt")) == ["step_00000001.pt.corrupt", "step_00000002.pt.corrupt"]
    status, _, err = run_main(*flags, "--resume")
    assert status == 2 and error_lines(err) == [f"error: --resume: no intact checkpoint in {folder}: the damaged ones were "
                                                "set aside (step_00000001.pt.corrupt, step_00000002.pt.corrupt)"]


# A micro-batch that takes a while to build in torch's C++ (long clips, a slow disk), as the prefetch thread
# builds it: the thread is still inside it when the run ends.
SLOW_BATCHES = """
import sys, torch
sys.path.insert(0, {root!r})
import loader, train
built = loader._build_micro_batch
def slowly_built(source):
    batch = built(source)
    product = torch.ones(1200, 1200)
    for _ in range(3):
        product = product @ product / 1200
    return batch
loader._build_micro_batch = slowly_built
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_stop_after_past_a_damaged_checkpoint_ends_every_thread_and_exits_0(stopped, tmp_path):
    """Issue 25 item 3: `--resume --stop-after N` after falling back past a damaged checkpoint (no step to take)
    ended with `terminate called without an active exception`, status 134: the prefetch thread, still building a
    batch, was left running as Python exited. The real command, in a process of its own."""
    run = _copy(stopped, tmp_path)
    newest = run / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = subprocess.run([sys.executable, "-c", SLOW_BATCHES.format(root=str(ROOT)), "--cache", str(stopped["cache"]),
                             "--out-dir", str(run.parent), "--run-name", run.name, "--max-steps", "3", "--save-every", "1",
                             "--keep-last", "5", "--resume", "--stop-after", "1", *QUICK_FLAGS],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "stopped at step 1" in result.stdout


def test_a_damaged_shard_of_a_sharded_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, capsys):
    """FSDP checkpoints (`step_N.dcp/`): a truncated `.distcp` shard is named and the previous checkpoint used;
    reading it anyway is one ValueError, not torch's CheckpointException (a BaseException)."""
    model = trainable.prepare_model(copy.deepcopy(tiny.model), config.TrainConfig(scope="audio"), World())
    optimizer = trainable.build_optimizer(model, config.TrainConfig(), "cpu")
    run = tmp_path / "run"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for step in (1, 2):
            record = checkpoints.CheckpointRecord(step=step, position=loader.DataPosition(), best_score=1.0, config={})
            checkpoints.save_checkpoint(run, model, optimizer, record, World(), keep_last=2, sharded=True)
        newest = run / "checkpoints" / "step_00000002.dcp"
        [shard] = newest.glob("*.distcp")
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        with pytest.raises(ValueError, match="its shards cannot be read"):
            checkpoints.load_checkpoint(newest, model, optimizer, World())
        path, record = checkpoints.newest_intact_checkpoint(run, World(), print)
    finally:
        dist.destroy_process_group()
    assert path == run / "checkpoints" / "step_00000001.dcp" and record.step == 1
    assert f"{shard.name}: its bytes differ" in capsys.readouterr().out


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
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["save_every"] == 7 and recorded["keep_last"] == 3 and recorded["resume"] is True
    [entry] = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 1 and entry["checkpoint"].endswith("step_00000001.pt")
    assert entry["changed"] == {"out_dir": [str(stopped["run"].parent), str(run.parent)], "save_every": [1, 7], "keep_last": [5, 3]}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3], "the interrupted attempt's step 2 is purged"
    assert model_utils.newest_export(str(run.parent)) == str(run / "export")


def test_resuming_a_finished_run_says_it_is_finished_and_trains_nothing(cache, tmp_path):
    """Issue 25 item 16: --resume of a run that took all its steps printed `final train loss nan`. It says the run is
    finished, exit 0; an export missing since is written again."""
    flags = ["--cache", str(cache), "--out-dir", str(tmp_path), "--run-name", "run", "--max-steps", "2", *QUICK_FLAGS]
    assert run_main(*flags)[0] == 0
    export = tmp_path / "run" / "export"
    written = export.stat().st_mtime_ns
    status, out, err = run_main(*flags, "--resume")
    assert status == 0, err
    assert f"{tmp_path / 'run'} is already finished (2 of 2 steps): nothing to train" in out
    assert "nan" not in out + err and export.stat().st_mtime_ns == written
    shutil.rmtree(export)
    status, out, err = run_main(*flags, "--resume")
    assert status == 0 and "is already finished" in out and "writing it again" in out, err
    assert model_utils.export_problem(export) is None


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
    """A save that fails twice stops the run in one line naming the last good checkpoint and the command that
    continues; nothing half-written is left."""
    run = _copy(stopped, tmp_path)

    def disk_full(state, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(checkpoints, "RETRY_AFTER_SECONDS", 0.0)
    status, _, err = _resume(stopped, run)
    assert status == 2
    [line] = error_lines(err)
    assert line.startswith(f"error: cannot write {run / 'checkpoints' / 'step_00000003.pt'}: No space left on device (tried twice); "
                           f"the last good checkpoint is {run / 'checkpoints' / 'step_00000002.pt'}; once there is room, "
                           "continue with: python train.py ")
    assert line.endswith("--run-name run --resume")
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == [
        "step_00000001.pt", "step_00000001.pt.sha256", "step_00000002.pt", "step_00000002.pt.sha256"]


def test_a_really_full_disk_while_saving_is_one_line_saying_so_and_status_2(cache, small_disk, monkeypatch):
    """Issue 25 item 4: a checkpoint that fills a real disk (an 8 MB tmpfs; a checkpoint here is 15 MB). torch's
    writer hides the OSError (`[enforce fail at inline_container.cc:664] . unexpected pos ...`): the free space
    left tells that the disk is full. Nothing half-written is left."""
    out = small_disk(8)
    monkeypatch.setattr(checkpoints, "RETRY_AFTER_SECONDS", 0.0)
    status, _, err = run_main("--cache", str(cache), "--out-dir", str(out), "--run-name", "run", "--max-steps", "2",
                              "--save-every", "1", *QUICK_FLAGS)
    assert status == 2
    [line] = error_lines(err)
    assert line.startswith(f"error: cannot write {out / 'run' / 'checkpoints' / 'step_00000001.pt'}: No space left on device "
                           "(tried twice); the last good checkpoint is none"), line
    assert list((out / "run" / "checkpoints").iterdir()) == []


def test_a_save_that_fails_once_is_retried_and_the_run_goes_on(stopped, tmp_path, monkeypatch):
    run = _copy(stopped, tmp_path)
    real_save, failures = torch.save, []

    def full_once(state, handle):
        if not failures:
            failures.append(1)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(state, handle)

    monkeypatch.setattr(torch, "save", full_once)
    monkeypatch.setattr(checkpoints, "RETRY_AFTER_SECONDS", 0.0)
    status, out, err = _resume(stopped, run)
    assert status == 0 and failures == [1], err
    assert checkpoints.latest_checkpoint(run).name == "step_00000003.pt" and (run / "export").is_dir()


def test_an_export_cut_short_by_a_full_disk_leaves_nothing_for_infer(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run" / "export"

    def disk_full(folder, *args):  # the last file of the export, after the weights
        (pathlib.Path(folder) / model_utils.AUDIO_TOKENIZER_POINTER).write_text('{"audio_tok')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_utils, "write_audio_tokenizer_pointer", disk_full)
    with pytest.raises(files.WriteError, match=f"^cannot write {out}: No space left on device$"):
        checkpoints.export_model(tiny.model, config.TrainConfig(device="cpu"), tiny, World(), out)
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


def test_a_read_only_out_dir_is_one_line_naming_it(tmp_path, monkeypatch):
    out = tmp_path / "read-only"
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    status, _, err = run_main("--out-dir", str(out), "--run-name", "run", *QUICK_FLAGS)
    assert status == 2
    assert error_lines(err) == [f"error: {out / 'run'}: Read-only file system"]


# --- flags, --config and data: one line each --------------------------------------------------------------------


# --- a resumed run trains on the data it started with, and compares scores measured alike -------------------------


def test_resume_checks_the_data_and_compares_only_scores_measured_alike(tmp_path, short_manifest):
    """One run, resumed three times: with other evaluation settings (a new best starts, the old best.pt kept),
    then with its training data changed in place (refused in one line), then with --allow-data-change."""
    manifest_path = tmp_path / "train.jsonl"
    shutil.copy(short_manifest, manifest_path)
    flags = ["--train-manifest", str(manifest_path), "--val-manifest", str(manifest_path), "--out-dir", str(tmp_path / "runs"),
             "--run-name", "run", "--max-steps", "3", "--save-every", "1", "--eval-every", "1", "--eval-prompts", "0",
             "--device", "cpu", "--precision", "fp32"]
    checkpoints_dir = tmp_path / "runs" / "run" / "checkpoints"
    assert run_main(*flags, "--stop-after", "1")[0] == 0
    old_best = torch.load(checkpoints_dir / "best.pt", weights_only=True)["best_score"]
    status, out, err = run_main(*flags, "--resume", "--stop-after", "2", "--eval-max-seconds", "2")
    assert status == 0, err
    assert "--resume: the evaluation changed (eval_max_seconds), so earlier scores are not comparable: a new best starts" in out
    assert torch.load(checkpoints_dir / "best-until-step-1.pt", weights_only=True)["best_score"] == old_best
    assert torch.load(checkpoints_dir / "best.pt", weights_only=True)["step"] == 2, "the first evaluation after it is the new best"

    rows = manifest_path.read_text(encoding="utf-8").splitlines()
    rows[0] = rows[0].replace('"text": "', '"text": "Changed. ')
    manifest_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    status, _, err = run_main(*flags, "--resume", "--eval-max-seconds", "2")
    assert status == 2
    assert error_lines(err) == [f"error: --resume: the training data and validation data changed since "
                                f"{checkpoints_dir / 'step_00000002.pt'} was written (its content fingerprint differs): resume "
                                "with the data it was trained on, or add --allow-data-change to go on knowingly"]
    status, out, err = run_main(*flags, "--resume", "--eval-max-seconds", "2", "--allow-data-change")
    assert status == 0, err
    assert "changed since" in out and "going on (--allow-data-change)" in out and "done: 3 steps" in out


def test_an_export_whose_weights_changed_is_named_and_skipped(export, tmp_path, capsys):
    copy_of = tmp_path / "runs" / "run" / "export"
    shutil.copytree(export, copy_of)
    assert model_utils.newest_export(str(tmp_path / "runs")) == str(copy_of)
    weights = copy_of / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-100] ^= 0xFF  # inside the last tensor: a whole, loadable file with other weights
    weights.write_bytes(bytes(content))
    with pytest.raises(ValueError, match="model.safetensors: its bytes differ from the SHA-256 written with it"):
        model_utils.load_bundle(str(copy_of))
    assert model_utils.newest_export(str(tmp_path / "runs")) is None
    assert "model.safetensors: its bytes differ" in capsys.readouterr().err


def test_8bit_adamw_state_survives_a_checkpoint_exactly(tmp_path, tiny, batches):
    """--optimizer adamw8bit: torchao's 8-bit moments go through save_checkpoint and load_checkpoint (what
    --resume runs) unchanged, so the next step gives bit-identical losses and weights."""
    settings = config.TrainConfig(device="cpu", scope="full", optimizer="adamw8bit")

    def fresh():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = trainable.prepare_model(copy.deepcopy(tiny.model), settings, World()).train()
        return model, trainable.build_optimizer(model, settings, "cpu")

    def steps(model, optimizer, count):
        return [trainable.train_step(model, optimizer, [batches[1]], settings, World(), 1e-3).read(World()).losses["total"]
                for _ in range(count)]

    model, optimizer = fresh()
    steps(model, optimizer, 1)
    record = checkpoints.CheckpointRecord(step=1, position=loader.DataPosition(), best_score=float("inf"), config={})
    path = checkpoints.save_checkpoint(tmp_path, model, optimizer, record, World(), keep_last=2)
    resumed, resumed_optimizer = fresh()
    assert checkpoints.load_checkpoint(path, resumed, resumed_optimizer, World()).step == 1
    assert any(type(state["exp_avg"]).__name__ == "OptimState8bit" for state in resumed_optimizer.state.values())
    assert steps(resumed, resumed_optimizer, 1) == steps(model, optimizer, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


# --- the record: one versioned type, written and read whole; checkpoints written before it resume -----------------


def test_the_record_is_written_and_read_whole_with_its_version():
    record = checkpoints.CheckpointRecord(
        step=3, position=loader.DataPosition({"train": loader.SetPosition(1, 2, 5, 10)}), best_score=-0.8,
        config={"best_by": "sim"}, stale_evals=2, data={"train": "ab"}, eval_settings={"best_by": "sim"},
        guard_first={"wer<=+0.1": 0.3})
    written = record.to_dict()
    assert written["version"] == checkpoints.CheckpointRecord.VERSION == 1 and "best_loss" not in written
    assert checkpoints.CheckpointRecord.from_dict(written) == record
    with pytest.raises(ValueError, match=r"written by a newer train.py \(record version 2; this one reads up to 1\)"):
        checkpoints.CheckpointRecord.from_dict({**written, "version": 2})
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        checkpoints.CheckpointRecord.from_dict({"weights": torch.zeros(3)})


def test_an_unversioned_record_reads_best_loss_as_the_best_score_and_lacks_the_later_fields():
    """The layout of the first checkpoints: the score under its old name, a one-set data position, nothing else."""
    record = checkpoints.CheckpointRecord.from_dict({"step": 4, "position": {"epoch": 1, "index": 2}, "best_loss": 1.5,
                                                     "config": {"seed": 0}})
    assert record == checkpoints.CheckpointRecord(step=4, position=loader.DataPosition({"train": loader.SetPosition(1, 2)}),
                                                  best_score=1.5, config={"seed": 0})
    assert (record.stale_evals, record.data, record.eval_settings, record.guard_first) == (0, None, None, {})


# The keys train.py wrote beside the tensors before the record was versioned (commit 4d3e32a: LoopState.saved
# and Run.save), in their order; the first checkpoints held only the first four.
UNVERSIONED_KEYS = ("step", "position", "best_loss", "stale_evals", "config", "data", "eval_settings", "guard_first")
FIRST_KEYS = UNVERSIONED_KEYS[:3] + ("config",)


def _write_unversioned(path: pathlib.Path, keys: tuple[str, ...]) -> None:
    """Rewrite a checkpoint as train.py wrote it before the record had a version, with its digest."""
    state = torch.load(path, weights_only=True)
    assert state.pop("version") == 1
    state["best_loss"] = state.pop("best_score")
    torch.save({**{key: state[key] for key in keys}, **{key: state[key] for key in checkpoints.TENSOR_KEYS}}, path)
    files.write_sidecar_digest(path)


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory, short_manifest):
    """4 steps evaluated at each (`--device` and `--precision` left `auto`): straight through, and stopped at step 2."""
    out = tmp_path_factory.mktemp("evaluated")
    settings = dict(val_manifest=str(short_manifest), eval_every=1, eval_prompts=0, save_every=1, device="auto", precision="auto")
    straight = train.train(train_config(out / "straight", short_manifest, **settings))
    stopped = train.train(train_config(out / "stopped", short_manifest, stop_after=2, **settings))
    return straight, stopped


@pytest.mark.parametrize("keys", [UNVERSIONED_KEYS, FIRST_KEYS], ids=["before the version", "before fingerprints"])
def test_a_checkpoint_written_before_the_record_had_a_version_resumes_exactly(evaluated_runs, tmp_path, short_manifest,
                                                                               keys, capsys):
    straight, stopped = evaluated_runs
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    for name in ("step_00000002.pt", "best.pt"):
        _write_unversioned(run / "checkpoints" / name, keys)
    capsys.readouterr()
    train.train(train_config(tmp_path, short_manifest, val_manifest=str(short_manifest), eval_every=1, eval_prompts=0,
                             save_every=1, device="auto", precision="auto", resume=True))
    out = capsys.readouterr().out
    assert "resumed from" in out and "a new best starts" not in out
    assert ("predates data fingerprints" in out) == (keys == FIRST_KEYS)
    for tag in ("loss/total", "val/total"):
        assert logged(run, tag) == logged(straight, tag), tag
    best, resumed_best = (torch.load(each / "checkpoints" / "best.pt", weights_only=True) for each in (straight, run))
    assert (resumed_best["step"], resumed_best["best_score"]) == (best["step"], best["best_score"])
    assert json.loads((run / "plan.json").read_text())["precision"] == "fp32", "auto, settled on this CPU machine"
