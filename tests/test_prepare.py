"""Tests of prepare.py: the prepare step's code cache, its command line, damaged shards, the lock, a read-only disk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_manifest import messy, row, write_manifest, write_tone  # noqa: F401 (messy is a fixture)

import manifest
import model_utils
import prepare
from codes import EncodedClips, PreparedCodes, audio_tokenizer_id, read_index, read_prepared, read_shard, verify_shard

# --------------------------------------------------------------------------

# --------------------------------------------------------------------------
# The prepare step and its cache
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six distinct clips, a copy of one under another name, and a manifest of all of them."""
    folder = tmp_path_factory.mktemp("clips")
    for index in range(6):
        write_tone(folder / f"{index}.wav", 250 + 45 * index)
    (folder / "copy-of-0.wav").write_bytes((folder / "0.wav").read_bytes())
    rows = [row("s0", "0.wav", speaker="s"), row("s1", "1.wav", speaker="s"), row("s2", "2.wav", speaker="s"),
            row("t0", "3.wav", speaker="t"), row("t1", "copy-of-0.wav", speaker="t"),
            dict(id="p0", ref_audio="0.wav", ref_text="Hello there.", audio="4.wav", text="One."),
            dict(id="p1", ref_audio="0.wav", ref_text="Hello there.", audio="5.wav", text="Two.")]
    return folder, write_manifest(folder / "manifest.jsonl", rows)


@pytest.fixture(scope="module")
def prepared(clips, tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare.prepare(clips[1], cache, tiny.audio_tokenizer, options=prepare.Options(batch_size=4))


def test_each_clip_is_encoded_once_even_as_reference_and_target_and_under_two_names(prepared):
    _, result = prepared
    assert result.checked.summary() == "rows read 7 = kept 7 + rejected 0"
    # 7 rows name 9 clip uses and 7 files, of which 6 are distinct.
    assert (result.encoded, result.reused) == (6, 1)


def test_cached_codes_equal_on_the_fly_codes_and_give_the_same_samples(prepared, clips, tiny):
    cache, _ = prepared
    cached = read_prepared(cache, audio_tokenizer_id(tiny.audio_tokenizer))
    on_the_fly = EncodedClips(tiny.audio_tokenizer)
    paths = sorted({r[key] for r in cached.rows for key in ("audio", "ref_audio") if key in r})
    assert len(paths) == 7
    for path in paths:
        assert torch.equal(cached.codes(path), on_the_fly(path)), path
    assert isinstance(np.load(next((cache / "shards").glob("*.npy")), mmap_mode="r"), np.memmap)

    for pair in manifest.training_pairs(cached.rows, seed=0, epoch=0)[0]:
        a = manifest.pair_to_sample(pair, tiny.tokenizer, cached.codes)
        b = manifest.pair_to_sample(pair, tiny.tokenizer, on_the_fly)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.audio_ids_concat, b.audio_ids_concat)


def test_training_reads_the_counts_that_prepare_printed(prepared):
    cache, result = prepared
    assert read_prepared(cache).summary == result.checked.summary()
    report = (cache / "report.jsonl").read_text()
    assert report == ""


def test_a_rerun_reuses_every_clip(prepared, clips, tiny):
    cache, first = prepared
    before = (cache / "manifest.jsonl").read_text()
    again = prepare.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert (again.encoded, again.reused) == (0, 7)
    assert (cache / "manifest.jsonl").read_text() == before


def test_a_prepare_stopped_midway_resumes_with_the_clips_it_did_not_encode(clips, tiny, tmp_path):
    folder, _ = clips
    rows = [row(f"s{i}", f"{i}.wav", speaker="s") for i in range(3)] + [row("gone", "gone.wav", speaker="s")]
    rows += [row(f"s{i}", f"{i}.wav", speaker="s") for i in range(3, 6)]
    manifest_path = write_manifest(folder / "stops.jsonl", rows)
    cache = tmp_path / "cache"

    with pytest.raises(manifest.ManifestError, match=r"stops.jsonl:4: missing_audio"):
        prepare.prepare(manifest_path, cache, tiny.audio_tokenizer, options=prepare.Options(strict=True, batch_size=2))
    assert len(read_index(cache)) == 3  # a full shard of 2 and the 1 flushed at the stop
    with pytest.raises(FileNotFoundError, match="no finished prepare"):
        read_prepared(cache)

    resumed = prepare.prepare(manifest_path, cache, tiny.audio_tokenizer, options=prepare.Options(batch_size=2))
    assert (resumed.encoded, resumed.reused) == (3, 3)
    assert resumed.checked.summary() == "rows read 7 = kept 6 + rejected 1 (missing_audio 1)"


def test_a_strict_stop_leaves_the_previous_finished_prepare_readable(prepared, clips, tiny, tmp_path):
    cache, result = prepared
    manifest_path = write_manifest(tmp_path / "m.jsonl", [row("s0", str(clips[0] / "0.wav")), row("x", "gone.wav")])
    with pytest.raises(manifest.ManifestError, match="m.jsonl:2: missing_audio"):
        prepare.prepare(manifest_path, cache, tiny.audio_tokenizer, options=prepare.Options(strict=True))
    assert read_prepared(cache).summary == result.checked.summary()


def test_files_of_an_interrupted_commit_are_ignored_and_removed(prepared, clips, tiny, tmp_path, capsys):
    source, _ = prepared
    cache = tmp_path / "cache"
    (cache / "shards").mkdir(parents=True)
    shard = next((source / "shards").glob("*.npy"))
    # Killed while writing codes (a temporary file), and between the codes and the entries that commit them.
    (cache / "shards" / "deadbeef.npy.tmp").write_bytes(shard.read_bytes()[:100])
    (cache / "shards" / "deadbeef.npy").write_bytes(shard.read_bytes())
    assert read_index(cache) == {}

    result = prepare.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert "removed 2 uncommitted file(s)" in capsys.readouterr().err
    assert (result.encoded, result.reused) == (6, 1)
    assert sorted(p.suffix for p in (cache / "shards").iterdir()) == [".json", ".npy"]


def start_prepare_until_a_shard(manifest, cache) -> subprocess.Popen:
    """`python prepare.py` (one clip per shard) in a subprocess, returned once a shard is committed
    (or it ended, or 120 s passed)."""
    command = [sys.executable, str(ROOT / "prepare.py"), "--manifest", str(manifest), "--out", str(cache),
               "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cache.glob("shards/*.json")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return process


def test_a_killed_prepare_leaves_whole_shards_and_resumes(clips, tiny, tmp_path):
    _, manifest = clips
    cache = tmp_path / "cache"
    process = start_prepare_until_a_shard(manifest, cache)
    process.kill()
    assert process.wait() != 0, "the prepare finished before it could be killed"

    committed = read_index(cache)
    assert 1 <= len(committed) < 6
    for entry_file in cache.glob("shards/*.json"):
        entries = read_shard(entry_file)["entries"]
        verify_shard(entry_file)
        codes = np.load(entry_file.with_suffix(".npy"))
        assert codes.shape == (8, sum(entry["frames"] for entry in entries.values()))

    resumed = prepare.prepare(manifest, cache, tiny.audio_tokenizer)
    assert (resumed.encoded, resumed.reused) == (6 - len(committed), 1 + len(committed))
    assert not list(cache.glob("shards/*.tmp"))


def test_another_audio_tokenizer_never_reuses_the_codes(clips, tiny, tmp_path):
    folder, _ = clips
    manifest = write_manifest(folder / "two.jsonl", [row("s0", "0.wav"), row("s1", "1.wav")])
    cache = tmp_path / "cache"
    other = model_utils.build_tiny_audio_tokenizer(seed=1)
    first = prepare.prepare(manifest, cache, tiny.audio_tokenizer)
    second = prepare.prepare(manifest, cache, other)

    assert (second.encoded, second.reused) == (2, 0)
    assert {r["audio_key"] for r in first.checked.kept}.isdisjoint(r["audio_key"] for r in second.checked.kept)
    cached = read_prepared(cache, audio_tokenizer_id(other))
    path = cached.rows[0]["audio"]
    assert torch.equal(cached.codes(path), EncodedClips(other)(path))
    assert not torch.equal(cached.codes(path), EncodedClips(tiny.audio_tokenizer)(path))
    with pytest.raises(ValueError, match="prepare it again"):
        read_prepared(cache, audio_tokenizer_id(tiny.audio_tokenizer))
    # Both tokenizers' codes stay, each under its own key.
    assert prepare.prepare(manifest, cache, tiny.audio_tokenizer).reused == 2


def test_the_command_line_prints_the_reconciliation(clips, tmp_path, capsys):
    _, manifest = clips
    assert prepare.main(["--manifest", str(manifest), "--out", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "clips: 6 encoded, 1 already in the cache" in out
    assert out.strip().endswith("rows read 7 = kept 7 + rejected 0")


def test_the_command_line_strict_stop_is_one_error_line(messy, tmp_path, capsys):
    manifest, numbers = messy
    code = prepare.main(["--manifest", str(manifest), "--out", str(tmp_path / "cache"), "--strict"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {manifest}:{numbers['missing-file']}: missing_audio:")


# --------------------------------------------------------------------------
# Damaged shards, the prepare lock, a read-only cache directory
# --------------------------------------------------------------------------


@pytest.fixture
def damaged_copy(prepared, tmp_path):
    """A copy of the prepared cache (7 rows, 6 clips in shards of 4 and 2) and its shard files, largest first."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(prepared[0], cache)
    shards = sorted((cache / "shards").glob("*.npy"), key=lambda path: -path.stat().st_size)
    return cache, shards


def test_a_truncated_shard_is_an_error_naming_it_at_start_or_when_opened(damaged_copy, tiny):
    cache, shards = damaged_copy
    shards[0].write_bytes(shards[0].read_bytes()[:-40])
    with pytest.raises(ValueError, match="fail their checksum") as error:
        read_prepared(cache)
    assert str(shards[0]) in str(error.value) and "prepare" in str(error.value)

    # Unverified, the shard is still checked when first opened, hours into a run: the error names it.
    unverified = read_prepared(cache, verify=False)
    with pytest.raises(ValueError) as error:
        for kept in unverified.rows:
            unverified.codes(kept["audio"])
    assert str(shards[0]) in str(error.value)


@pytest.mark.parametrize("damage", ["empty", "one-byte-changed"])
def test_an_empty_or_altered_shard_fails_its_checksum(damaged_copy, damage):
    cache, shards = damaged_copy
    codes = bytearray(shards[1].read_bytes())
    codes[-3] ^= 0xFF
    shards[1].write_bytes(b"" if damage == "empty" else bytes(codes))
    with pytest.raises(ValueError, match="fail their checksum") as error:
        read_prepared(cache)
    assert str(shards[1]) in str(error.value)


def test_a_bad_entry_file_is_an_error_naming_it(damaged_copy):
    cache, shards = damaged_copy
    entry_file = shards[0].with_suffix(".json")
    entry_file.write_text('{"entries": {"abc', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_prepared(cache)
    assert str(entry_file) in str(error.value)


def test_prepare_re_encodes_the_damaged_shards(damaged_copy, clips, tiny, capsys):
    cache, shards = damaged_copy
    frames = [sum(e["frames"] for e in read_shard(s.with_suffix(".json"))["entries"].values()) for s in shards]
    shards[0].write_bytes(shards[0].read_bytes()[:-40])
    shards[1].with_suffix(".json").write_text("not json", encoding="utf-8")

    again = prepare.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert again.repaired == 2 and (again.encoded, again.reused) == (6, 1), frames
    err = capsys.readouterr().err
    assert str(shards[0]) in err and str(shards[1].with_suffix(".json")) in err
    cached = read_prepared(cache, audio_tokenizer_id(tiny.audio_tokenizer))
    on_the_fly = EncodedClips(tiny.audio_tokenizer)
    assert all(torch.equal(cached.codes(r["audio"]), on_the_fly(r["audio"])) for r in cached.rows)
    assert json.loads((cache / "summary.json").read_text())["repaired"] == 2


def test_training_from_a_damaged_cache_stops_at_start_with_one_line(damaged_copy, tmp_path, capsys):
    import train

    cache, shards = damaged_copy
    shards[0].write_bytes(shards[0].read_bytes()[:-40])
    args = ["--cache", str(cache), "--val-manifest", "", "--out-dir", str(tmp_path / "runs"), "--device", "cpu",
            "--precision", "fp32", "--max-steps", "1"]
    assert train.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(shards[0]) in errors[0]


def test_a_second_prepare_of_a_cache_is_refused_naming_the_lock_and_its_holder(clips, tmp_path, capsys):
    import signal

    _, manifest = clips
    cache = tmp_path / "cache"
    first = start_prepare_until_a_shard(manifest, cache)
    try:
        first.send_signal(signal.SIGSTOP)  # mid-prepare, holding the cache
        assert first.poll() is None, "the first prepare finished before the second could start"

        assert prepare.main(["--manifest", str(manifest), "--out", str(cache)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert str(cache / "prepare.lock") in errors[0] and f"pid {first.pid}" in errors[0]
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert not (cache / "prepare.lock").exists()
    assert read_prepared(cache).summary == "rows read 7 = kept 7 + rejected 0"


def test_the_lock_of_a_killed_prepare_is_taken_over(clips, tiny, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "prepare.lock").write_text(f"pid {dead.pid} on this host\n")
    result = prepare.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert result.checked.summary() == "rows read 7 = kept 7 + rejected 0"
    assert f"took over {cache / 'prepare.lock'} from pid {dead.pid}" in capsys.readouterr().err
    assert not (cache / "prepare.lock").exists()


def test_a_read_only_output_directory_is_one_error_line(clips, tmp_path):
    import os

    _, manifest = clips
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    prepare_command = [sys.executable, str(ROOT / "prepare.py"), "--manifest", str(manifest), "--out", str(read_only / "cache")]
    if os.geteuid() == 0:  # root writes through permissions: mount a read-only file system there instead
        command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{read_only}" && exec "$@"', "sh"] + prepare_command
    else:
        read_only.chmod(0o555)
        command = prepare_command
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: {read_only / 'cache'}: " + ("Read-only file system" if os.geteuid() == 0 else "Permission denied")]


# --------------------------------------------------------------------------
# Language tags and train/val overlap (issue 18)
# --------------------------------------------------------------------------


def test_language_takes_the_usual_spellings_and_rows_store_the_canonical_tag(clips, tmp_path, capsys):
    folder, _ = clips
    rows = [row("a", str(folder / "0.wav"), speaker="s", language="en"), row("b", str(folder / "1.wav"), speaker="s", language="en_us")]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    for spelling in ("EN", "eng", "en"):  # before: EN and eng kept no row
        assert prepare.main(["--manifest", str(path), "--out", str(tmp_path / "cache"), "--language", spelling]) == 0
        kept = [json.loads(line) for line in (tmp_path / "cache" / "manifest.jsonl").read_text().splitlines()]
        assert [(r["id"], r["language"]) for r in kept] == [("a", "en"), ("b", "en-US")], spelling
    capsys.readouterr()
    assert prepare.main(["--manifest", str(path), "--out", str(tmp_path / "cache"), "--language", "english"]) == 2
    assert capsys.readouterr().err.strip() == "error: 'english' is not a language tag (Expected a language code, got 'english')"


def test_prepare_reports_train_val_overlap_and_strict_overlap_refuses_it(clips, tmp_path, capsys):
    folder, _ = clips
    train = write_manifest(tmp_path / "train.jsonl", [row("a", str(folder / "0.wav"), speaker="s"),
                                                       row("b", str(folder / "1.wav"), speaker="s")])
    val = write_manifest(tmp_path / "val.jsonl", [row("v0", str(folder / "copy-of-0.wav"), speaker="new"),
                                                   row("v1", str(folder / "2.wav"), speaker="s")])
    command = ["--manifest", str(train), "--out", str(tmp_path / "cache"), "--val-manifest", str(val)]
    assert prepare.main(command) == 0
    assert ("train/val overlap: 1 speaker(s) (s) and 1 validation row(s) whose clip is a training clip (v0)"
            in capsys.readouterr().out)
    (tmp_path / "cache" / "summary.json").unlink()
    assert prepare.main(command + ["--strict-overlap"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: train/val overlap: 1 speaker(s)")
    assert err[0].endswith("--strict-overlap refuses it: take them out of one of the sets")
    assert not (tmp_path / "cache" / "summary.json").exists(), "a refused prepare leaves no finished cache"


# --------------------------------------------------------------------------
# Many processes: torchrun over gloo, one cache
# --------------------------------------------------------------------------


def _worker_pids(launcher: subprocess.Popen, rank: int) -> list[int]:
    """Processes started by `launcher` (torchrun) whose environment says RANK=`rank`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            status = (environ.parent / "status").read_text()
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if parent == launcher.pid and f"RANK={rank}".encode() in variables:
            found.append(int(environ.parent.name))
    return found


def _torchrun_prepare(manifest_path, cache) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "prepare.py"), "--manifest", str(manifest_path), "--out", str(cache), "--device", "cpu",
               "--batch-size", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cache_contents(cache):
    """What a finished prepare holds: kept rows, the report, the counts that are not work done, and each clip's codes."""
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    summary = json.loads((cache / "summary.json").read_text())
    counts = {key: summary[key] for key in ("rows_read", "kept", "rejected", "audio_tokenizer", "targets_only")}
    codes = PreparedCodes(cache, rows, 24000)
    clips = {r[key]: codes(r[key]).tolist() for r in rows for key in ("ref_audio", "audio") if key in r}
    return rows, (cache / "report.jsonl").read_text(), counts, clips


def test_two_gloo_processes_make_the_cache_one_makes_and_resume_after_one_is_killed(clips, tmp_path):
    folder, _ = clips
    write_tone(folder / "blip.wav", 900, seconds=0.01)
    rows = [row("s0", "0.wav", speaker="s"), row("s1", "1.wav", speaker="s"), row("s2", "2.wav", speaker="s"),
            row("gone", "gone.wav", speaker="s"), row("blip", "blip.wav", speaker="s"),
            dict(id="p0", ref_audio="0.wav", ref_text="Hello there.", audio="3.wav", text="One.")]
    manifest_path = write_manifest(folder / "two-processes.jsonl", rows)
    assert prepare.main(["--manifest", str(manifest_path), "--out", str(tmp_path / "one")]) == 0

    cache = tmp_path / "two"
    killed = _torchrun_prepare(manifest_path, cache)
    deadline = time.time() + 180
    while not list(cache.glob("shards/*.json")) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in _worker_pids(killed, rank=1):
        os.kill(pid, signal.SIGKILL)
    assert killed.wait(timeout=180) != 0, "the two processes finished before one could be killed"
    assert not (cache / "summary.json").exists()
    committed = read_index(cache)
    assert 1 <= len(committed) < 4

    resumed = _torchrun_prepare(manifest_path, cache)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["encoded"] == 4 - len(committed), "the resumed run encodes only what the killed one had not"
    assert _cache_contents(cache) == _cache_contents(tmp_path / "one")
    assert "rows read 6 = kept 4 + rejected 2 (missing_audio 1, too_short 1)" in output


# --------------------------------------------------------------------------
# Inputs checked before anything is made, and nothing usable (issue 25)
# --------------------------------------------------------------------------


def test_a_missing_manifest_is_refused_before_the_cache_folder_is_made(clips, tmp_path, capsys):
    _, manifest_path = clips
    for args, missing in ((["--manifest", str(tmp_path / "missing.jsonl")], tmp_path / "missing.jsonl"),
                          (["--manifest", str(manifest_path), "--val-manifest", str(tmp_path / "nope.jsonl")], tmp_path / "nope.jsonl")):
        assert prepare.main(args + ["--out", str(tmp_path / "cache")]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no such manifest: {missing}"
        assert not (tmp_path / "cache").exists()


def test_a_manifest_with_no_usable_row_is_an_error_and_prints_no_next_command(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert prepare.main(["--manifest", str(empty), "--out", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: nothing usable found in {empty}: it holds no row"
    assert not (tmp_path / "cache").exists()
    rejected = write_manifest(tmp_path / "rejected.jsonl", [row("a", str(tmp_path / "missing.wav"), speaker="s")])
    assert prepare.main(["--manifest", str(rejected), "--out", str(tmp_path / "cache")]) == 2
    printed = capsys.readouterr()
    assert "rows read 1 = kept 0 + rejected 1 (missing_audio 1)" in printed.out and "train with" not in printed.out
    assert printed.err.strip().splitlines()[-1] == (f"error: nothing usable found in {rejected}: no row kept; "
                                                    f"report: {tmp_path / 'cache' / 'report.jsonl'}")


def test_min_mos_rejects_noisy_clips_as_low_mos_and_names_its_judge(tmp_path, capsys):
    """Two clean voice-prompt clips of one speaker and one with white noise at 5 dB SNR (MOS about 2, the clean
    ones about 4: tests/test_metrics.py)."""
    import soundfile as sf
    from conftest import VOICE_PROMPTS

    import data

    speech = {name: data.load_audio(VOICE_PROMPTS / f"{name}.wav", 16000)[int(0.3 * 16000) : int(3.3 * 16000)]
              for name in ("en_man", "en_woman")}  # 3 s of speech, past the prompts' leading silence
    noise = np.random.default_rng(0).standard_normal(3 * 16000) * np.sqrt(np.mean(speech["en_man"] ** 2) / 10 ** 0.5)
    speech["noisy"] = (speech["en_man"] + noise).astype(np.float32)
    for name, samples in speech.items():
        sf.write(tmp_path / f"{name}.wav", samples, 16000)
    manifest_path = write_manifest(tmp_path / "m.jsonl", [row(name, f"{name}.wav", speaker="s") for name in speech])
    cache = tmp_path / "cache"
    assert prepare.main(["--manifest", str(manifest_path), "--out", str(cache), "--min-mos", "3"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("rows read 3 = kept 2 + rejected 1 (low_mos 1)") and "clips: 2 encoded" in out
    [rejection] = [json.loads(line) for line in (cache / "report.jsonl").read_text().splitlines()]
    assert rejection["id"] == "noisy" and "(distillmos-0.9.1), under --min-mos 3" in rejection["detail"]
    assert json.loads((cache / "summary.json").read_text())["mos_filter"] == {"min_mos": 3.0, "mos_model": "distillmos-0.9.1"}
    assert prepare.main(["--manifest", str(manifest_path), "--out", str(tmp_path / "c2"), "--min-mos", "6"]) == 2
    assert capsys.readouterr().err.strip() == "error: --min-mos 6 must lie in 0-5 (0 = off; MOS runs 1-5)"
