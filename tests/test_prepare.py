"""Tests of data.py's manifests: validation of every bad-input kind, the prepare step's code cache, speaker pairing."""

import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT
from test_data import insert_chunk_after_fmt

import data
import model_utils

RATE = 16000


def write_tone(path, freq, seconds=0.4, rate=RATE, channels=1, fmt=None):
    """A tone whose frequency makes its content (and so its cache key) distinct."""
    t = np.arange(int(seconds * rate)) / rate
    samples = np.stack([0.3 * np.sin(2 * np.pi * (freq + 50 * c) * t) for c in range(channels)], axis=1)
    sf.write(str(path), samples.astype(np.float32), rate, subtype="PCM_16", format=fmt)
    return path


def write_manifest(path, lines):
    """Rows as dicts (JSON-encoded) or raw bytes (written as they are)."""
    raw = [line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode() for line in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def row(id, audio, speaker="a", text="Hello there.", **extra):
    return dict(id=id, audio=audio, text=text, speaker=speaker, **extra)


# --------------------------------------------------------------------------
# Every bad-input kind, each a row of one manifest, counted under its reason
# --------------------------------------------------------------------------


def truncated(fmt, fraction=0.5):
    def write(path):
        whole = write_tone(path.with_suffix(".whole"), 500, fmt=fmt)
        path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * fraction)])

    return write


def write_samples(samples, rate=RATE, subtype="PCM_16"):
    def write(path):
        sf.write(str(path), samples, rate, subtype=subtype, format="WAV")

    return write


def tone_with(value):
    samples = 0.3 * np.sin(2 * np.pi * 300 * np.arange(RATE // 2) / RATE)
    samples[100] = value
    return samples


BAD_AUDIO = {  # name -> (writer of the row's clip, reason)
    "missing-file": (lambda path: None, "missing_audio"),
    "truncated-wav": (truncated("WAV"), "truncated_audio"),
    "truncated-flac": (truncated("FLAC"), "corrupt_audio"),
    "header-only-wav": (truncated("WAV", 0.003), "corrupt_audio"),
    "garbage": (lambda path: path.write_bytes(bytes(range(256)) * 16), "corrupt_audio"),
    "zero-length": (write_samples(np.zeros(0)), "empty_audio"),
    "all-silent": (write_samples(np.zeros(RATE)), "silent_audio"),
    "nan-samples": (write_samples(tone_with(np.nan), subtype="FLOAT"), "nonfinite_audio"),
    "16-channels": (lambda path: write_tone(path, 520, channels=16, fmt="WAV"), "channels"),
    "96kHz": (lambda path: write_tone(path, 530, rate=96000, fmt="WAV"), "sample_rate"),
    "4kHz": (lambda path: write_tone(path, 540, rate=4000, fmt="WAV"), "sample_rate"),
}

BAD_ROWS = {  # name -> (the row, reason); a0.wav and a1.wav are good clips of speaker a
    "empty-text": (row("empty-text", "a0.wav", text=""), "empty_text"),
    "whitespace-text": (row("whitespace-text", "a0.wav", text=" \t "), "empty_text"),
    "text-of-parentheses": (row("text-of-parentheses", "a0.wav", text="( )"), "empty_text"),
    "whitespace-ref-text": (dict(id="whitespace-ref-text", ref_audio="a0.wav", ref_text="  ", audio="a1.wav", text="Hi."),
                            "empty_text"),
    "over-long-text": (row("over-long-text", "a0.wav", text="word " * 201), "text_too_long"),
    "control-token": (row("control-token", "a0.wav", text="say <|eot_id|> now"), "control_token"),
    "invalid-json": (b'{"id": "invalid-json", "audio": ', "invalid_json"),
    "json-array": (b'["a0.wav", "Hello."]', "invalid_json"),
    "missing-text": (dict(id="missing-text", audio="a0.wav", speaker="a"), "missing_field"),
    "missing-speaker": (dict(id="missing-speaker", audio="a0.wav", text="Hi."), "missing_field"),
    "missing-ref-text": (dict(id="missing-ref-text", ref_audio="a0.wav", audio="a1.wav", text="Hi."), "missing_field"),
    "empty-audio-path": (row("empty-audio-path", " "), "missing_field"),
    "null-id": (row(None, "a0.wav"), "missing_field"),
    "numeric-text": (row("numeric-text", "a0.wav", text=42), "bad_field"),
    "duplicate-id": (row("a0", "a1.wav"), "duplicate_id"),
    "non-utf8": (b'{"id": "non-utf8", "audio": "a0.wav", "text": "caf\xe9", "speaker": "a"}', "non_utf8"),
    "missing-reference-clip": (
        dict(id="missing-reference-clip", ref_audio="nope.wav", ref_text="Hi.", audio="a1.wav", text="Hello."),
        "missing_audio",
    ),
    "lone-speaker": (row("lone-speaker", "c0.wav", speaker="c"), "lone_speaker"),
    "self-reference": (dict(id="self-reference", ref_audio="a1.wav", ref_text="Hi.", audio="./a1.wav", text="Hi."),
                       "self_reference"),
}
EXPECTED = {name: reason for name, (_, reason) in {**BAD_AUDIO, **BAD_ROWS}.items()}
GOOD = ["a0", "a1", "b0", "b1", "paired", "six-channels", "11025Hz", "crlf", "extra-chunks"]


def good_lines(folder):
    for index, name in enumerate(("a0", "a1", "b0", "b1", "c0", "p0")):
        write_tone(folder / f"{name}.wav", 200 + 40 * index)
    write_tone(folder / "six.wav", 460, channels=6)
    write_tone(folder / "odd-rate.wav", 470, rate=11025)
    # Editors add LIST chunks before and after the data chunk: not a truncation.
    plain = write_tone(folder / "plain.wav", 480).read_bytes()
    tagged = insert_chunk_after_fmt(plain, b"LIST", b"INFOISFT" + struct.pack("<I", 4) + b"ed\0\0") + b"LIST" + bytes(4)
    (folder / "tagged.wav").write_bytes(tagged[:4] + struct.pack("<I", len(tagged) - 8) + tagged[8:])
    return {
        "a0": row("a0", "a0.wav", language="en"),
        "a1": row("a1", str(folder / "a1.wav")),  # an absolute path
        "b0": row("b0", "b0.wav", speaker="b", language="ar"),
        "b1": row("b1", "b1.wav", speaker="b", text="Again."),
        "paired": dict(id="paired", ref_audio="a0.wav", ref_text="Hello there.", audio="p0.wav", text="New words.",
                       scene="A quiet room."),
        "six-channels": row("six-channels", "six.wav", speaker="b"),
        "11025Hz": row("11025Hz", "odd-rate.wav", speaker="b"),
        "crlf": json.dumps(row("crlf", "b0.wav", speaker="b")).encode() + b"\r",
        "extra-chunks": row("extra-chunks", "tagged.wav", speaker="b"),
        "blank-line": b"  ",
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A manifest of good rows, a blank line and one row per bad-input kind; returns (path, line number of each)."""
    folder = tmp_path_factory.mktemp("messy")
    lines = good_lines(folder)
    for name, (write, _) in BAD_AUDIO.items():
        write(folder / f"{name}.wav")
        lines[name] = row(name, f"{name}.wav")
    lines.update({name: value for name, (value, _) in BAD_ROWS.items()})
    manifest = write_manifest(folder / "manifest.jsonl", list(lines.values()))
    return manifest, {name: number for number, name in enumerate(lines, start=1)}


@pytest.fixture(scope="module")
def messy_codes(tiny):
    return data.CodeCache(tiny.audio_tokenizer)


@pytest.fixture(scope="module")
def validated(messy, messy_codes):
    return data.validate_manifest(messy[0], messy_codes)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_bad_row_is_rejected_with_its_row_number_and_reason(messy, validated, name):
    _, numbers = messy
    found = [r for r in validated.rejections if r.row == numbers[name]]
    assert len(found) == 1, f"{name} (line {numbers[name]}) is not reported once: {found}"
    assert found[0].reason == EXPECTED[name], found[0]
    assert found[0].detail


def test_good_rows_are_kept_with_absolute_paths_and_clip_lengths(messy, validated):
    manifest, _ = messy
    assert [kept["id"] for kept in validated.kept] == GOOD
    for kept in validated.kept:
        assert kept["audio"] == str((manifest.parent / kept["audio"]).resolve())
        assert kept["seconds"] == pytest.approx(0.4, abs=0.01) and kept["frames"] in (10, 11)
    paired = validated.kept[GOOD.index("paired")]
    assert paired["ref_audio"] == str(manifest.parent / "a0.wav") and paired["ref_frames"] in (10, 11)


def test_counts_reconcile_and_the_report_lists_every_rejection(messy, validated, tmp_path):
    manifest, numbers = messy
    non_blank = [line for line in manifest.read_bytes().split(b"\n") if line.strip()]
    assert validated.rows_read == len(non_blank) == len(GOOD) + len(EXPECTED)
    assert len(validated.kept) + len(validated.rejections) == validated.rows_read
    expected_counts = {reason: list(EXPECTED.values()).count(reason) for reason in set(EXPECTED.values())}
    assert validated.counts() == expected_counts
    assert validated.summary().startswith(f"rows read {len(non_blank)} = kept {len(GOOD)} + rejected {len(EXPECTED)} (")

    validated.write_report(tmp_path / "report.jsonl")
    report = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert [(entry["row"], entry["reason"]) for entry in report] == sorted(
        (numbers[name], reason) for name, reason in EXPECTED.items()
    )
    assert report[0].keys() == {"row", "id", "reason", "detail"}


def test_counts_that_do_not_add_up_are_an_error():
    assert data.reconcile(5, 3, {"missing_audio": 2}) == "rows read 5 = kept 3 + rejected 2 (missing_audio 2)"
    with pytest.raises(ValueError, match="do not reconcile"):
        data.reconcile(5, 3, {"missing_audio": 1})


def test_strict_stops_at_the_first_bad_row_with_one_line(messy, messy_codes):
    manifest, numbers = messy
    first_bad = min(numbers[name] for name in EXPECTED)
    with pytest.raises(data.ManifestError) as error:
        data.validate_manifest(manifest, messy_codes, strict=True)
    message = str(error.value)
    assert message.startswith(f"{manifest}:{first_bad}: missing_audio: ") and "\n" not in message


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lengths_manifest(tmp_path_factory):
    """Speaker s: clips of 0.3, 0.3, 0.6, 1.2, 0.6 (ar) and 0.6 s (no language); speaker t: one clip."""
    folder = tmp_path_factory.mktemp("lengths")
    rows = []
    for index, (seconds, language) in enumerate([(0.3, "en"), (0.3, "en"), (0.6, "en"), (1.2, "en"), (0.6, "ar"), (0.6, None)]):
        write_tone(folder / f"{index}.wav", 300 + 30 * index, seconds=seconds)
        rows.append(row(f"r{index}", f"{index}.wav", speaker="s", **({"language": language} if language else {})))
    rows.append(row("t-copy", "2.wav", speaker="t", language="en"))  # speaker t has this one clip only
    return write_manifest(folder / "manifest.jsonl", rows)


@pytest.fixture(scope="module")
def lengths_codes(tiny):
    return data.CodeCache(tiny.audio_tokenizer)


def test_duration_and_language_filters_count_each_exclusion(lengths_manifest, lengths_codes):
    filters = data.Filters(min_seconds=0.5, max_seconds=1.0, languages=("en", "ar"))
    result = data.validate_manifest(lengths_manifest, lengths_codes, filters=filters)

    assert [kept["id"] for kept in result.kept] == ["r2", "r4"]
    assert [(r.id, r.reason) for r in result.rejections] == [
        ("r0", "too_short"), ("r1", "too_short"), ("r3", "too_long"), ("r5", "language"), ("t-copy", "lone_speaker")
    ]


def test_max_tokens_measures_a_speaker_row_with_its_longest_possible_reference(lengths_manifest, lengths_codes, tiny):
    by_id = {kept["id"]: kept for kept in data.validate_manifest(lengths_manifest, lengths_codes).kept}

    def tokens(target, reference):
        sample = data.build_sample(tiny.tokenizer, by_id[reference]["text"], lengths_codes(by_id[reference]["audio"]),
                                   by_id[target]["text"], target_codes=lengths_codes(by_id[target]["audio"]))
        return data.collate.sample_tokens(sample, 8)

    budget = tokens("r0", "r3")  # a 0.3 s clip with the longest clip (1.2 s) as reference
    # A 0.6 s clip fits with a 0.3 s reference, not with the 1.2 s one it may be drawn.
    assert tokens("r2", "r0") <= budget < tokens("r2", "r3")
    result = data.validate_manifest(lengths_manifest, lengths_codes, tiny.tokenizer, data.Filters(max_tokens=budget))

    assert [kept["id"] for kept in result.kept] == ["r0", "r1"]
    rejected = {r.id: r for r in result.rejections}
    assert {name: r.reason for name, r in rejected.items()} == {
        "r2": "too_many_tokens", "r3": "too_many_tokens", "r4": "too_many_tokens", "r5": "too_many_tokens",
        "t-copy": "lone_speaker",
    }
    assert rejected["r2"].detail == f"its sample takes {tokens('r2', 'r3')} tokens, over {budget}"
    # The longest clip is measured with the longest other one.
    assert rejected["r3"].detail == f"its sample takes {tokens('r3', 'r2')} tokens, over {budget}"


def test_max_tokens_needs_the_text_tokenizer(lengths_manifest, lengths_codes):
    with pytest.raises(ValueError, match="needs the text tokenizer"):
        data.validate_manifest(lengths_manifest, lengths_codes, filters=data.Filters(max_tokens=9))


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
    return cache, data.prepare(clips[1], cache, tiny.audio_tokenizer, batch_size=4)


def test_each_clip_is_encoded_once_even_as_reference_and_target_and_under_two_names(prepared):
    _, result = prepared
    assert result.validation.summary() == "rows read 7 = kept 7 + rejected 0"
    # 7 rows name 9 clip uses and 7 files, of which 6 are distinct.
    assert (result.encoded, result.reused) == (6, 1)


def test_cached_codes_equal_on_the_fly_codes_and_give_the_same_samples(prepared, clips, tiny):
    cache, _ = prepared
    cached = data.read_prepared(cache, data.audio_tokenizer_id(tiny.audio_tokenizer))
    on_the_fly = data.CodeCache(tiny.audio_tokenizer)
    paths = sorted({r[key] for r in cached.rows for key in ("audio", "ref_audio") if key in r})
    assert len(paths) == 7
    for path in paths:
        assert torch.equal(cached.codes(path), on_the_fly(path)), path
    assert isinstance(np.load(next((cache / "shards").glob("*.npy")), mmap_mode="r"), np.memmap)

    for pair in data.training_pairs(cached.rows, seed=0, epoch=0)[0]:
        a = data.pair_to_sample(pair, tiny.tokenizer, cached.codes)
        b = data.pair_to_sample(pair, tiny.tokenizer, on_the_fly)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.audio_ids_concat, b.audio_ids_concat)


def test_training_reads_the_counts_that_prepare_printed(prepared):
    cache, result = prepared
    assert data.read_prepared(cache).summary == result.validation.summary()
    report = (cache / "report.jsonl").read_text()
    assert report == ""


def test_a_rerun_reuses_every_clip(prepared, clips, tiny):
    cache, first = prepared
    before = (cache / "manifest.jsonl").read_text()
    again = data.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert (again.encoded, again.reused) == (0, 7)
    assert (cache / "manifest.jsonl").read_text() == before


def test_a_prepare_stopped_midway_resumes_with_the_clips_it_did_not_encode(clips, tiny, tmp_path):
    folder, _ = clips
    rows = [row(f"s{i}", f"{i}.wav", speaker="s") for i in range(3)] + [row("gone", "gone.wav", speaker="s")]
    rows += [row(f"s{i}", f"{i}.wav", speaker="s") for i in range(3, 6)]
    manifest = write_manifest(folder / "stops.jsonl", rows)
    cache = tmp_path / "cache"

    with pytest.raises(data.ManifestError, match=r"stops.jsonl:4: missing_audio"):
        data.prepare(manifest, cache, tiny.audio_tokenizer, strict=True, batch_size=2)
    assert len(data.read_index(cache)) == 3  # a full shard of 2 and the 1 flushed at the stop
    with pytest.raises(FileNotFoundError, match="no finished prepare"):
        data.read_prepared(cache)

    resumed = data.prepare(manifest, cache, tiny.audio_tokenizer, batch_size=2)
    assert (resumed.encoded, resumed.reused) == (3, 3)
    assert resumed.validation.summary() == "rows read 7 = kept 6 + rejected 1 (missing_audio 1)"


def test_a_strict_stop_leaves_the_previous_finished_prepare_readable(prepared, clips, tiny, tmp_path):
    cache, result = prepared
    manifest = write_manifest(tmp_path / "m.jsonl", [row("s0", str(clips[0] / "0.wav")), row("x", "gone.wav")])
    with pytest.raises(data.ManifestError, match="m.jsonl:2: missing_audio"):
        data.prepare(manifest, cache, tiny.audio_tokenizer, strict=True)
    assert data.read_prepared(cache).summary == result.validation.summary()


def test_files_of_an_interrupted_commit_are_ignored_and_removed(prepared, clips, tiny, tmp_path, capsys):
    source, _ = prepared
    cache = tmp_path / "cache"
    (cache / "shards").mkdir(parents=True)
    shard = next((source / "shards").glob("*.npy"))
    # Killed while writing codes (a temporary file), and between the codes and the entries that commit them.
    (cache / "shards" / "deadbeef.npy.tmp").write_bytes(shard.read_bytes()[:100])
    (cache / "shards" / "deadbeef.npy").write_bytes(shard.read_bytes())
    assert data.read_index(cache) == {}

    result = data.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert "removed 2 uncommitted file(s)" in capsys.readouterr().err
    assert (result.encoded, result.reused) == (6, 1)
    assert sorted(p.suffix for p in (cache / "shards").iterdir()) == [".json", ".npy"]


def start_prepare_until_a_shard(manifest, cache) -> subprocess.Popen:
    """`python data.py prepare` (one clip per shard) in a subprocess, returned once a shard is committed
    (or it ended, or 120 s passed)."""
    command = [sys.executable, str(ROOT / "data.py"), "prepare", "--manifest", str(manifest), "--out", str(cache),
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

    committed = data.read_index(cache)
    assert 1 <= len(committed) < 6
    for entry_file in cache.glob("shards/*.json"):
        entries = data.read_shard(entry_file)["entries"]
        data.verify_shard(entry_file)
        codes = np.load(entry_file.with_suffix(".npy"))
        assert codes.shape == (8, sum(entry["frames"] for entry in entries.values()))

    resumed = data.prepare(manifest, cache, tiny.audio_tokenizer)
    assert (resumed.encoded, resumed.reused) == (6 - len(committed), 1 + len(committed))
    assert not list(cache.glob("shards/*.tmp"))


def test_another_audio_tokenizer_never_reuses_the_codes(clips, tiny, tmp_path):
    folder, _ = clips
    manifest = write_manifest(folder / "two.jsonl", [row("s0", "0.wav"), row("s1", "1.wav")])
    cache = tmp_path / "cache"
    other = model_utils.build_tiny_audio_tokenizer(seed=1)
    first = data.prepare(manifest, cache, tiny.audio_tokenizer)
    second = data.prepare(manifest, cache, other)

    assert (second.encoded, second.reused) == (2, 0)
    assert {r["audio_key"] for r in first.validation.kept}.isdisjoint(r["audio_key"] for r in second.validation.kept)
    cached = data.read_prepared(cache, data.audio_tokenizer_id(other))
    path = cached.rows[0]["audio"]
    assert torch.equal(cached.codes(path), data.CodeCache(other)(path))
    assert not torch.equal(cached.codes(path), data.CodeCache(tiny.audio_tokenizer)(path))
    with pytest.raises(ValueError, match="prepare it again"):
        data.read_prepared(cache, data.audio_tokenizer_id(tiny.audio_tokenizer))
    # Both tokenizers' codes stay, each under its own key.
    assert data.prepare(manifest, cache, tiny.audio_tokenizer).reused == 2


def test_the_command_line_prints_the_reconciliation(clips, tmp_path, capsys):
    _, manifest = clips
    assert data.main(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "clips: 6 encoded, 1 already in the cache" in out
    assert out.strip().endswith("rows read 7 = kept 7 + rejected 0")


def test_the_command_line_strict_stop_is_one_error_line(messy, tmp_path, capsys):
    manifest, numbers = messy
    code = data.main(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "cache"), "--strict"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {manifest}:{numbers['missing-file']}: missing_audio:")


# --------------------------------------------------------------------------
# Speaker pairing
# --------------------------------------------------------------------------


def speaker_rows():
    rows = [row(f"{speaker}{i}", f"/clips/{speaker}{i}.wav", speaker=speaker) for speaker, n in (("a", 5), ("b", 2))
            for i in range(n)]
    rows.append(row("a0-again", "/clips/a0.wav", speaker="a"))  # the same clip as a0 under another id
    rows.append(row("c0", "/clips/c0.wav", speaker="c"))
    rows.append(dict(id="p", ref_audio="/clips/b0.wav", ref_text="Ref.", audio="/clips/x.wav", text="Target."))
    return rows


def test_pairs_take_another_clip_of_the_same_speaker_never_their_own():
    rows = speaker_rows()
    speaker_of = {r["audio"]: r["speaker"] for r in rows if "speaker" in r}
    for epoch in range(30):
        pairs, lonely = data.training_pairs(rows, seed=3, epoch=epoch)
        assert lonely == ["c0"]
        for pair in pairs[:-1]:
            assert pair.ref_audio != pair.audio
            assert speaker_of[pair.ref_audio] == speaker_of[pair.audio]
        assert pairs[-1] == data.Pair("p", "/clips/b0.wav", "Ref.", "/clips/x.wav", "Target.")


def test_pairs_are_drawn_anew_each_epoch_deterministically_and_cover_every_other_clip():
    rows = speaker_rows()
    assert data.training_pairs(rows, seed=3, epoch=4) == data.training_pairs(rows, seed=3, epoch=4)
    epochs = [data.training_pairs(rows, seed=3, epoch=epoch)[0] for epoch in range(40)]
    assert len({tuple(pairs) for pairs in epochs}) > 30
    assert data.training_pairs(rows, seed=4, epoch=4) != data.training_pairs(rows, seed=3, epoch=4)
    references = {pair.ref_audio for pairs in epochs for pair in pairs if pair.id == "a1"}
    assert references == {f"/clips/a{i}.wav" for i in (0, 2, 3, 4)}


def test_validation_reports_a_speaker_whose_other_rows_are_the_same_clip(tmp_path, tiny):
    write_tone(tmp_path / "one.wav", 300)
    manifest = write_manifest(tmp_path / "m.jsonl", [row("x", "one.wav"), row("y", "one.wav")])
    result = data.validate_manifest(manifest, data.CodeCache(tiny.audio_tokenizer))
    assert result.kept == [] and [r.reason for r in result.rejections] == ["lone_speaker", "lone_speaker"]


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
        data.read_prepared(cache)
    assert str(shards[0]) in str(error.value) and "prepare" in str(error.value)

    # Unverified, the shard is still checked when first opened, hours into a run: the error names it.
    unverified = data.read_prepared(cache, verify=False)
    with pytest.raises(ValueError) as error:
        for row in unverified.rows:
            unverified.codes(row["audio"])
    assert str(shards[0]) in str(error.value)


@pytest.mark.parametrize("damage", ["empty", "one-byte-changed"])
def test_an_empty_or_altered_shard_fails_its_checksum(damaged_copy, damage):
    cache, shards = damaged_copy
    codes = bytearray(shards[1].read_bytes())
    codes[-3] ^= 0xFF
    shards[1].write_bytes(b"" if damage == "empty" else bytes(codes))
    with pytest.raises(ValueError, match="fail their checksum") as error:
        data.read_prepared(cache)
    assert str(shards[1]) in str(error.value)


def test_a_bad_entry_file_is_an_error_naming_it(damaged_copy):
    cache, shards = damaged_copy
    entry_file = shards[0].with_suffix(".json")
    entry_file.write_text('{"entries": {"abc', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        data.read_prepared(cache)
    assert str(entry_file) in str(error.value)


def test_prepare_re_encodes_the_damaged_shards(damaged_copy, clips, tiny, capsys):
    cache, shards = damaged_copy
    frames = [sum(e["frames"] for e in data.read_shard(s.with_suffix(".json"))["entries"].values()) for s in shards]
    shards[0].write_bytes(shards[0].read_bytes()[:-40])
    shards[1].with_suffix(".json").write_text("not json", encoding="utf-8")

    again = data.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert again.repaired == 2 and (again.encoded, again.reused) == (6, 1), frames
    err = capsys.readouterr().err
    assert str(shards[0]) in err and str(shards[1].with_suffix(".json")) in err
    cached = data.read_prepared(cache, data.audio_tokenizer_id(tiny.audio_tokenizer))
    on_the_fly = data.CodeCache(tiny.audio_tokenizer)
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

        assert data.main(["prepare", "--manifest", str(manifest), "--out", str(cache)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        assert str(cache / "prepare.lock") in errors[0] and f"pid {first.pid}" in errors[0]
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert not (cache / "prepare.lock").exists()
    assert data.read_prepared(cache).summary == "rows read 7 = kept 7 + rejected 0"


def test_the_lock_of_a_killed_prepare_is_taken_over(clips, tiny, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "prepare.lock").write_text(f"pid {dead.pid} on this host\n")
    result = data.prepare(clips[1], cache, tiny.audio_tokenizer)
    assert result.validation.summary() == "rows read 7 = kept 7 + rejected 0"
    assert f"took over {cache / 'prepare.lock'} from pid {dead.pid}" in capsys.readouterr().err
    assert not (cache / "prepare.lock").exists()


def test_a_read_only_output_directory_is_one_error_line(clips, tmp_path):
    import os

    _, manifest = clips
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    prepare = [sys.executable, str(ROOT / "data.py"), "prepare", "--manifest", str(manifest), "--out", str(read_only / "cache")]
    if os.geteuid() == 0:  # root writes through permissions: mount a read-only file system there instead
        command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{read_only}" && exec "$@"', "sh"] + prepare
    else:
        read_only.chmod(0o555)
        command = prepare
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: {read_only / 'cache'}: " + ("Read-only file system" if os.geteuid() == 0 else "Permission denied")]
