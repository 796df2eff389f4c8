"""Tests of manifest.py: validation of every bad-input kind, filters, speaker pairing, planned sample lengths."""

import json
import struct

import numpy as np
import pytest
import soundfile as sf
from test_data import insert_chunk_after_fmt

import collate
import config
import data
import loader
import manifest
import model_utils
from codes import EncodedClips

RATE = 16000


def write_tone(path, freq, seconds=1.0, rate=RATE, channels=1, fmt=None):
    """A tone whose frequency makes its content (and so its cache key) distinct; 1 s, the shortest reference."""
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
    "header-only-wav": (truncated("WAV", 0.001), "corrupt_audio"),
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
    return EncodedClips(tiny.audio_tokenizer)


@pytest.fixture(scope="module")
def validated(messy, messy_codes):
    return manifest.check_manifest(messy[0], messy_codes)


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
        assert kept["seconds"] == pytest.approx(1.0, abs=0.01) and kept["frames"] in (25, 26)
    paired = validated.kept[GOOD.index("paired")]
    assert paired["ref_audio"] == str(manifest.parent / "a0.wav") and paired["ref_frames"] in (25, 26)


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
    assert manifest.reconcile(5, 3, {"missing_audio": 2}) == "rows read 5 = kept 3 + rejected 2 (missing_audio 2)"
    with pytest.raises(ValueError, match="do not reconcile"):
        manifest.reconcile(5, 3, {"missing_audio": 1})


def test_strict_stops_at_the_first_bad_row_with_one_line(messy, messy_codes):
    manifest_path, numbers = messy
    first_bad = min(numbers[name] for name in EXPECTED)
    with pytest.raises(manifest.ManifestError) as error:
        manifest.check_manifest(manifest_path, messy_codes, strict=True)
    message = str(error.value)
    assert message.startswith(f"{manifest_path}:{first_bad}: missing_audio: ") and "\n" not in message


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lengths_manifest(tmp_path_factory):
    """Speaker s: clips of 1.0, 1.0, 1.2, 1.6, 1.2 (ar) and 1.2 s (no language); speaker t: one clip."""
    folder = tmp_path_factory.mktemp("lengths")
    rows = []
    for index, (seconds, language) in enumerate([(1.0, "en"), (1.0, "en"), (1.2, "en"), (1.6, "en"), (1.2, "ar"), (1.2, None)]):
        write_tone(folder / f"{index}.wav", 300 + 30 * index, seconds=seconds)
        rows.append(row(f"r{index}", f"{index}.wav", speaker="s", **({"language": language} if language else {})))
    rows.append(row("t-copy", "2.wav", speaker="t", language="en"))  # speaker t has this one clip only
    return write_manifest(folder / "manifest.jsonl", rows)


@pytest.fixture(scope="module")
def lengths_codes(tiny):
    return EncodedClips(tiny.audio_tokenizer)


def test_duration_and_language_filters_count_each_exclusion(lengths_manifest, lengths_codes):
    filters = manifest.Filters(min_seconds=1.1, max_seconds=1.4, languages=("en", "ar"))
    result = manifest.check_manifest(lengths_manifest, lengths_codes, filters=filters)

    assert [kept["id"] for kept in result.kept] == ["r2", "r4"]
    assert [(r.id, r.reason) for r in result.rejections] == [
        ("r0", "too_short"), ("r1", "too_short"), ("r3", "too_long"), ("r5", "language"), ("t-copy", "lone_speaker")
    ]


def test_max_tokens_measures_a_speaker_row_with_its_longest_possible_reference(lengths_manifest, lengths_codes, tiny):
    by_id = {kept["id"]: kept for kept in manifest.check_manifest(lengths_manifest, lengths_codes).kept}

    def tokens(target, reference):
        sample = data.build_sample(tiny.tokenizer, by_id[reference]["text"], lengths_codes(by_id[reference]["audio"]),
                                   by_id[target]["text"], target_codes=lengths_codes(by_id[target]["audio"]))
        return data.collate.sample_tokens(sample, 8)

    budget = tokens("r0", "r3")  # a 1.0 s clip with the longest clip (1.6 s) as reference
    # A 1.2 s clip fits with a 1.0 s reference, not with the 1.6 s one it may be drawn.
    assert tokens("r2", "r0") <= budget < tokens("r2", "r3")
    result = manifest.check_manifest(lengths_manifest, lengths_codes, tiny.tokenizer, manifest.Filters(max_tokens=budget))

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
        manifest.check_manifest(lengths_manifest, lengths_codes, filters=manifest.Filters(max_tokens=9))


# --------------------------------------------------------------------------
# Speaker pairing
# --------------------------------------------------------------------------


def speaker_rows():
    rows = [row(f"{speaker}{i}", f"/clips/{speaker}{i}.wav", speaker=speaker, seconds=2.0) for speaker, n in (("a", 5), ("b", 2))
            for i in range(n)]
    rows.append(row("a0-again", "/clips/a0.wav", speaker="a", seconds=2.0))  # the same clip as a0 under another id
    rows.append(row("c0", "/clips/c0.wav", speaker="c", seconds=2.0))
    rows.append(dict(id="p", ref_audio="/clips/b0.wav", ref_text="Ref.", audio="/clips/x.wav", text="Target."))
    return rows


def test_pairs_take_another_clip_of_the_same_speaker_never_their_own():
    rows = speaker_rows()
    speaker_of = {r["audio"]: r["speaker"] for r in rows if "speaker" in r}
    for epoch in range(30):
        pairs, lonely = manifest.training_pairs(rows, seed=3, epoch=epoch)
        assert lonely == ["c0"]
        for pair in pairs[:-1]:
            assert pair.ref_audio != pair.audio
            assert speaker_of[pair.ref_audio] == speaker_of[pair.audio]
        assert pairs[-1] == manifest.Pair("p", "/clips/b0.wav", "Ref.", "/clips/x.wav", "Target.")


def test_pairs_are_drawn_anew_each_epoch_deterministically_and_cover_every_other_clip():
    rows = speaker_rows()
    assert manifest.training_pairs(rows, seed=3, epoch=4) == manifest.training_pairs(rows, seed=3, epoch=4)
    epochs = [manifest.training_pairs(rows, seed=3, epoch=epoch)[0] for epoch in range(40)]
    assert len({tuple(pairs) for pairs in epochs}) > 30
    assert manifest.training_pairs(rows, seed=4, epoch=4) != manifest.training_pairs(rows, seed=3, epoch=4)
    references = {pair.ref_audio for pairs in epochs for pair in pairs if pair.id == "a1"}
    assert references == {f"/clips/a{i}.wav" for i in (0, 2, 3, 4)}


def test_validation_reports_a_speaker_whose_other_rows_are_the_same_clip(tmp_path, tiny):
    write_tone(tmp_path / "one.wav", 300)
    manifest_path = write_manifest(tmp_path / "m.jsonl", [row("x", "one.wav"), row("y", "one.wav")])
    result = manifest.check_manifest(manifest_path, EncodedClips(tiny.audio_tokenizer))
    assert result.kept == [] and [r.reason for r in result.rejections] == ["lone_speaker", "lone_speaker"]


# --------------------------------------------------------------------------
# Planned lengths: exact, from the numbers the rows carry, no sample built
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_rows(tiny, tmp_path_factory):
    """Six demo rows (English and Arabic), one given a scene, tags and symbols, and a paired row with a scene;
    validated and encoded."""
    from conftest import DEMO_DIR

    rows = [json.loads(line) for line in (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = rows[:3] + rows[6:9]  # an English and an Arabic speaker
    for row in rows:
        row["audio"] = str(DEMO_DIR / row["audio"])
    rows[1] = dict(rows[1], text="Please [laugh] bring (me) tea at 5°C，now", scene="A quiet room.")
    rows.append(dict(id="paired", ref_audio=rows[0]["audio"], ref_text="  The weather is lovely today. ",
                     audio=rows[4]["audio"], text="New words [applause]", scene="Outdoors, windy."))
    manifest_path = tmp_path_factory.mktemp("planning") / "manifest.jsonl"
    manifest_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    codes = EncodedClips(tiny.audio_tokenizer)
    kept = manifest.check_manifest(manifest_path, codes).kept
    assert len(kept) == len(rows)
    return kept, codes


@pytest.mark.parametrize("ref_in_system", [False, True], ids=["reference-turn", "reference-in-system"])
def test_planned_lengths_equal_the_built_samples(tiny, demo_rows, ref_in_system):
    rows, codes = demo_rows
    manifest.add_text_token_counts(rows, tiny.tokenizer)
    for epoch in range(3):  # speaker rows draw another reference each epoch
        pairs, _ = manifest.training_pairs(rows, seed=0, epoch=epoch)
        planned = manifest.sample_lengths(pairs, rows, tiny.tokenizer, 8, ref_in_system)
        built = [collate.sample_tokens(manifest.pair_to_sample(pair, tiny.tokenizer, codes, ref_in_system), 8) for pair in pairs]
        assert planned == built


def test_an_epoch_is_planned_without_building_or_reading_a_sample(tiny, demo_rows):
    rows, codes = demo_rows
    manifest.add_text_token_counts(rows, tiny.tokenizer)
    settings = config.TrainConfig(batch_tokens=600, device="cpu")
    planned = loader.epoch_batches(rows, settings, 1, loader.BatchBuilder(tiny, settings, codes=None))  # no codes to read
    maker = loader.BatchBuilder(tiny, settings, codes)
    assert sorted(pair.id for pairs in planned for pair in pairs) == sorted(row["id"] for row in rows)
    for pairs in planned:
        lengths = [collate.sample_tokens(sample, 8) for sample in maker.samples(pairs)]
        assert collate.padded_tokens(lengths) <= 600


def test_counts_of_another_text_tokenizer_are_not_reused(tiny):
    other = model_utils.build_tiny_text_tokenizer()
    other.add_tokens(["lovely today"])
    assert manifest.text_counting_id(other) != manifest.text_counting_id(tiny.tokenizer)
    assert manifest.text_counting_id(model_utils.build_tiny_text_tokenizer()) == manifest.text_counting_id(tiny.tokenizer)


def test_rows_without_counts_are_an_error():
    with pytest.raises(ValueError, match="add_text_token_counts"):
        manifest.sample_lengths([], [{"id": "x", "audio": "a", "text": "Hi.", "frames": 3}], None, 8)


def test_a_row_with_nothing_speakable_is_rejected(tiny, tmp_path):
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text(json.dumps({"id": "a", "ref_audio": "r.wav", "ref_text": "hi", "audio": "t.wav", "text": "😀"}) + "\n")
    result = manifest.check_manifest(manifest_path, EncodedClips(tiny.audio_tokenizer))
    assert result.counts() == {"empty_text": 1}


# --------------------------------------------------------------------------
# One table of limits; language tags; train/val overlap
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_references(tmp_path_factory):
    """Speaker s: clips of 1.0, 1.0 and 0.2 s; speaker t: 1.0 and 0.2 s; a paired row with a 0.2 s reference;
    a row whose clip lasts 0.01 s, under what the audio tokenizer can encode."""
    folder = tmp_path_factory.mktemp("short-references")
    for name, seconds in (("s0", 1.0), ("s1", 1.0), ("s-short", 0.2), ("t0", 1.0), ("t-short", 0.2), ("blip", 0.01)):
        write_tone(folder / f"{name}.wav", 200 + 20 * len(name) + 100 * seconds, seconds=seconds)
    rows = [row("s0", "s0.wav", speaker="s"), row("s1", "s1.wav", speaker="s"), row("s-short", "s-short.wav", speaker="s"),
            row("t0", "t0.wav", speaker="t"), row("t-short", "t-short.wav", speaker="t"),
            dict(id="paired-short", ref_audio="s-short.wav", ref_text="Hi.", audio="s0.wav", text="Hello."),
            row("blip", "blip.wav", speaker="s")]
    return write_manifest(folder / "manifest.jsonl", rows)


def test_a_reference_outside_the_limits_is_never_used_and_is_counted(short_references, tiny):
    """Issue 18 #10: training and --eval (both check_manifest + training_pairs) took 0.2 s references that
    infer.py refuses."""
    result = manifest.check_manifest(short_references, EncodedClips(tiny.audio_tokenizer))
    # t0 has no other clip that can refer, and once it is out neither has t-short.
    assert {r.id: r.reason for r in result.rejections} == {
        "t0": "lone_speaker", "t-short": "lone_speaker", "paired-short": "reference_too_short", "blip": "too_short"}
    assert "a voice prompt must last 1 to 30 s" in next(r.detail for r in result.rejections if r.id == "paired-short")
    # The 0.2 s clip of s is kept as a target, never drawn as a reference, and counted as such.
    assert [kept["id"] for kept in result.kept] == ["s0", "s1", "s-short"]
    assert result.summary().endswith("; 1 kept clip(s) outside 1 to 30 s serve as targets only, never as references")
    for epoch in range(20):
        pairs, lonely = manifest.training_pairs(result.kept, seed=0, epoch=epoch)
        assert not lonely and {pair.ref_audio.rsplit("/", 1)[1] for pair in pairs} <= {"s0.wav", "s1.wav"}


def test_the_limits_are_one_table_that_filters_narrow_and_never_widen(short_references, tiny):
    assert (data.LIMITS.min_reference_seconds, data.LIMITS.max_reference_seconds) == (1.0, collate.WHISPER_MAX_SECONDS)
    assert not data.LIMITS.reference_fits(0.2) and not data.LIMITS.reference_fits(60.0) and data.LIMITS.reference_fits(1.0)
    assert manifest.Filters().max_text_chars == data.LIMITS.max_text_chars
    with pytest.raises(ValueError, match="over the 1000 of data.LIMITS"):
        manifest.check_manifest(short_references, EncodedClips(tiny.audio_tokenizer),
                                   filters=manifest.Filters(max_text_chars=5000))


@pytest.mark.parametrize("tag,canonical", [("EN", "en"), ("en-US", "en-US"), ("en_us", "en-US"), ("eng", "en"),
                                           ("zh-hans", "zh-Hans"), (" ar ", "ar")])
def test_usual_language_tag_spellings_become_one_canonical_form(tag, canonical):
    assert manifest.canonical_language(tag) == canonical


@pytest.mark.parametrize("tag", ["english", "xx", "", "en-!!"])
def test_what_is_no_language_tag_is_an_error(tag):
    with pytest.raises(ValueError, match="language"):
        manifest.canonical_language(tag)


def test_rows_store_the_canonical_tag_and_a_filter_keeps_its_regional_variants(tmp_path, tiny):
    for index in range(4):
        write_tone(tmp_path / f"{index}.wav", 700 + 30 * index)
    rows = [row("a", "0.wav", language="EN"), row("b", "1.wav", language="en_us"), row("c", "2.wav", language="en-GB"),
            row("d", "3.wav", language="ar"), row("e", "3.wav", language="english")]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    result = manifest.check_manifest(path, EncodedClips(tiny.audio_tokenizer),
                                        filters=manifest.Filters(languages=("en",)))
    assert [(kept["id"], kept["language"]) for kept in result.kept] == [("a", "en"), ("b", "en-US"), ("c", "en-GB")]
    assert result.counts() == {"language": 1, "bad_language": 1}
    with pytest.raises(ValueError, match="canonical tag 'en'"):
        manifest.Filters(languages=("EN",)).check()


def test_overlap_names_shared_speakers_and_clips_by_content(tmp_path):
    write_tone(tmp_path / "a.wav", 300)
    (tmp_path / "copy-of-a.wav").write_bytes((tmp_path / "a.wav").read_bytes())
    write_tone(tmp_path / "b.wav", 310)
    write_tone(tmp_path / "c.wav", 320)
    train_rows = [row("t1", str(tmp_path / "a.wav"), speaker="alice"), row("t2", str(tmp_path / "b.wav"), speaker="bob")]
    val_rows = [row("v1", str(tmp_path / "copy-of-a.wav"), speaker="carol"), row("v2", str(tmp_path / "c.wav"), speaker="bob"),
                dict(id="v3", ref_audio=str(tmp_path / "b.wav"), ref_text="Hi.", audio=str(tmp_path / "c.wav"), text="Yo.")]
    found = manifest.overlap(train_rows, val_rows)
    assert (found.speakers, found.clip_rows) == (["bob"], ["v1", "v3"])
    assert found.describe() == ("train/val overlap: 1 speaker(s) (bob) and 2 validation row(s) whose clip is a training "
                                "clip (v1, v3): validation scores are inflated")
    assert manifest.overlap(train_rows, val_rows[1:2]).clip_rows == []
    assert manifest.check_overlap(train_rows, [], strict=True).endswith("none (no shared speaker id, no shared clip)")
    with pytest.raises(manifest.OverlapError, match="--strict-overlap refuses it"):
        manifest.check_overlap(train_rows, val_rows, strict=True)


def test_a_prepared_row_s_cache_key_compares_with_a_raw_row_s_file_by_content(tmp_path):
    write_tone(tmp_path / "a.wav", 300)
    key = manifest.cache_key(tmp_path / "a.wav", "f" * 64)
    assert manifest.content_of_cache_key(key) == manifest.clip_content(tmp_path / "a.wav")
    prepared = [row("t1", str(tmp_path / "moved-since.wav"), speaker="alice", audio_key=key)]
    assert manifest.overlap(prepared, [row("v1", str(tmp_path / "a.wav"), speaker="carol")]).clip_rows == ["v1"]
