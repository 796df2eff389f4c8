"""Tests of importers.py: each format written by the test itself from the shared voice prompts (lhotse and
datasets through their own APIs), its good rows kept with speaker and language, every unusable entry counted
by reason and listed, audio that is no file of its own written out once and equal to its source."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import importers
import manifest
from conftest import ROOT, VOICE_PROMPTS

PROMPTS = ("en_woman", "en_man", "vex")


def text_of(name: str) -> str:
    return (VOICE_PROMPTS / f"{name}.txt").read_text(encoding="utf-8").strip()


def imported(fmt, source, out, **options):
    result = importers.run_import(fmt, source, out, importers.Options(**options))
    report = [json.loads(line) for line in importers.report_path(out).read_text(encoding="utf-8").splitlines()]
    assert [(item["id"], item["reason"]) for item in report] == [(item.id, item.reason) for item in result.unusable]
    # The manifest is one that validation reads: every row passes the checks that need no audio, its clip is there.
    assert [row["id"] for row in manifest.rows_before_audio(out)] == [row["id"] for row in result.rows]
    for row in result.rows:
        assert sf.info(str(out.parent / row["audio"])).frames > 0
    return result


def test_ljspeech(tmp_path):
    corpus = tmp_path / "LJSpeech-1.1"
    (corpus / "wavs").mkdir(parents=True)
    for name in PROMPTS:
        shutil.copy(VOICE_PROMPTS / f"{name}.wav", corpus / "wavs" / f"{name}.wav")
    lines = [f"{name}|RAW {name}|{text_of(name)}".encode() for name in PROMPTS]
    lines += [b"vex|again|A second row with the id vex.", b"only-one-field", b"gone|raw|No such wav.",
              b"en_man|raw|   ", b"bad\xff|raw|Not UTF-8.", b"two|Two fields work too: id and text."]
    (corpus / "wavs" / "two.wav").write_bytes((VOICE_PROMPTS / "vex.wav").read_bytes())
    (corpus / "metadata.csv").write_bytes(b"\n".join(lines) + b"\n")

    result = imported("ljspeech", corpus, tmp_path / "out" / "lj.jsonl", language="EN")
    assert [(row["id"], row["speaker"], row["language"]) for row in result.rows] == [
        ("en_woman", "LJSpeech-1.1", "en"), ("en_man", "LJSpeech-1.1", "en"), ("vex", "LJSpeech-1.1", "en"),
        ("two", "LJSpeech-1.1", "en")]
    assert result.rows[0]["text"] == text_of("en_woman") and result.rows[0]["audio"] == "../LJSpeech-1.1/wavs/en_woman.wav"
    assert result.summary() == ("rows read 9 = kept 4 + rejected 5 (duplicate_id 1, bad_line 1, missing_audio 1, "
                                "empty_text 1, non_utf8 1)")
    assert result.unusable[1].where == f"{corpus / 'metadata.csv'}:5"


def test_speaker_folders(tmp_path):
    corpus = tmp_path / "voices"
    for speaker, names in (("alice", ("en_woman", "vex")), ("bob", ("en_man",))):
        (corpus / speaker / "session1").mkdir(parents=True)
        for index, name in enumerate(names):
            audio = corpus / speaker / ("session1" if index else "") / f"{name}.wav"
            shutil.copy(VOICE_PROMPTS / f"{name}.wav", audio)
            audio.with_suffix(".lab" if index else ".txt").write_text(text_of(name) + "\n", encoding="utf-8")
    sf.write(corpus / "bob" / "flac-clip.flac", sf.read(VOICE_PROMPTS / "vex.wav")[0], 44100)
    (corpus / "bob" / "flac-clip.txt").write_text("A flac clip.", encoding="utf-8")
    shutil.copy(VOICE_PROMPTS / "vex.wav", corpus / "bob" / "untranscribed.wav")
    (corpus / "bob" / "orphan.txt").write_text("A transcript without its clip.", encoding="utf-8")
    shutil.copy(VOICE_PROMPTS / "vex.wav", corpus / "bob" / "blank.wav")
    (corpus / "bob" / "blank.txt").write_text("  \n", encoding="utf-8")
    shutil.copy(VOICE_PROMPTS / "vex.wav", corpus / "bob" / "latin1.wav")
    (corpus / "bob" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    result = imported("folders", corpus, tmp_path / "voices.jsonl", language="en-us")
    assert [(row["id"], row["speaker"], row["language"]) for row in result.rows] == [
        ("alice/en_woman", "alice", "en-US"), ("alice/session1/vex", "alice", "en-US"),
        ("bob/en_man", "bob", "en-US"), ("bob/flac-clip", "bob", "en-US")]
    assert {item.id: item.reason for item in result.unusable} == {
        "bob/blank": "empty_text", "bob/latin1": "non_utf8", "bob/orphan": "missing_audio",
        "bob/untranscribed": "missing_transcript"}


def test_kaldi_segments_become_clips_equal_to_their_part_of_the_recording(tmp_path):
    data_dir = tmp_path / "data" / "train"
    data_dir.mkdir(parents=True)
    (data_dir / "wav.scp").write_text(f"rec1 {VOICE_PROMPTS / 'en_man.wav'}\nrec2 {VOICE_PROMPTS / 'en_woman.wav'}\n"
                                      "rec3 sph2pipe -f wav rec3.sph |\nrec4 missing.wav\n")
    (data_dir / "segments").write_text("u1 rec1 0.50 2.25\nu2 rec1 3.00 5.00\nu3 rec2 1.00 2.00\nu4 rec3 0 1\n"
                                       "u5 rec4 0 1\nu6 rec9 0 1\nu7 rec2 100.0 101.0\n")
    (data_dir / "text").write_text("u1 maintaining your ability\nu2 to learn\nu3 the device\nu4 x\nu5 y\nu6 z\nu7 w\n"
                                   "u8 text with no segment\n")
    (data_dir / "utt2spk").write_text("u1 man\nu2 man\nu4 s\nu5 s\nu6 s\nu7 woman\n")  # u3 has no speaker
    (data_dir / "utt2lang").write_text("u1 en\nu2 en-gb\n")

    out = tmp_path / "kaldi.jsonl"
    result = imported("kaldi", data_dir, out, language="en")
    assert [(row["id"], row["speaker"], row["language"]) for row in result.rows] == [("u1", "man", "en"), ("u2", "man", "en-GB")]
    assert {item.id: item.reason for item in result.unusable} == {
        "u3": "missing_speaker", "u4": "pipe_command", "u5": "missing_audio", "u6": "missing_audio",
        "u7": "bad_segment", "u8": "missing_audio"}
    whole, rate = sf.read(VOICE_PROMPTS / "en_man.wav", dtype="float32")
    clip, clip_rate = sf.read(out.parent / result.rows[0]["audio"], dtype="float32")
    assert clip_rate == rate and np.array_equal(clip, whole[round(0.5 * rate): round(2.25 * rate)])
    again = importers.run_import("kaldi", data_dir, out, importers.Options(language="en"))
    assert (result.clips.written, again.clips.written, again.clips.reused) == (2, 0, 2), "segments are written once"


@pytest.fixture(scope="module")
def hf_table():
    """Columns of a small speech dataset: audio stored as the files' bytes, one row with no text, one with no audio."""
    names = list(PROMPTS) + ["en_man"]
    audio = [{"bytes": (VOICE_PROMPTS / f"{name}.wav").read_bytes(), "path": f"{name}.wav"} for name in names]
    audio[3] = None
    texts = [text_of(name) for name in names[:3]] + ["Gone."]
    texts[2] = None
    return {"id": ["a", "b", "c", "d"], "audio": audio, "text": texts, "speaker_id": ["w", "m", "w", "m"],
            "locale": ["en_us", "en", "en", "EN"], "gender": ["f", "m", "f", "m"]}


@pytest.mark.parametrize("stored", ["save_to_disk", "parquet"])
def test_hugging_face_datasets_have_their_audio_written_out_once(hf_table, tmp_path, stored, capsys):
    import datasets

    dataset = datasets.Dataset.from_dict(hf_table).cast_column("audio", datasets.Audio())
    if stored == "save_to_disk":
        datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "ds"))
        source, split = tmp_path / "ds", "train"
    else:
        (tmp_path / "ds").mkdir()
        dataset.to_parquet(str(tmp_path / "ds" / "train-00000.parquet"))
        source, split = tmp_path / "ds" / "train-00000.parquet", None

    out = tmp_path / "out" / "hf.jsonl"
    result = imported("hf", source, out, split=split)
    assert "not kept: gender" in capsys.readouterr().out
    assert [(row["id"], row["speaker"], row["language"]) for row in result.rows] == [("a", "w", "en-US"), ("b", "m", "en")]
    assert {item.id: item.reason for item in result.unusable} == {"c": "missing_transcript", "d": "missing_audio"}
    assert (out.parent / result.rows[0]["audio"]).read_bytes() == (VOICE_PROMPTS / "en_woman.wav").read_bytes()
    again = importers.run_import("hf", source, out, importers.Options(split=split))
    assert (result.clips.written, again.clips.written) == (2, 0), "stored audio is written once, for the kept rows"


def test_a_dataset_with_several_splits_needs_split(hf_table, tmp_path, capsys):
    import datasets

    dataset = datasets.Dataset.from_dict(hf_table).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()
    assert importers.main(["hf", str(tmp_path / "ds"), "--out", str(tmp_path / "hf.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'ds'} has splits train, test: choose one with --split"


def test_lhotse_cuts_that_are_parts_of_recordings_become_clips(tmp_path):
    from lhotse import CutSet, Recording, SupervisionSegment

    man, woman = (Recording.from_file(str(VOICE_PROMPTS / f"{name}.wav"), recording_id=name) for name in ("en_man", "en_woman"))
    whole = man.to_cut().with_id("whole")
    whole.supervisions = [SupervisionSegment("s1", "en_man", 0, man.duration, text=text_of("en_man"), speaker="m", language="en")]
    part = woman.to_cut().truncate(offset=1.0, duration=2.5).with_id("part")
    part.supervisions = [SupervisionSegment("s2", "en_woman", 1.0, 1.2, text="The device", speaker="w"),
                         SupervisionSegment("s3", "en_woman", 2.3, 1.0, text="would work", speaker="w")]
    two = woman.to_cut().truncate(offset=0.0, duration=2.0).with_id("two-speakers")
    two.supervisions = [SupervisionSegment("s4", "en_woman", 0, 1, text="a", speaker="w"),
                        SupervisionSegment("s5", "en_woman", 1, 1, text="b", speaker="x")]
    silent = woman.to_cut().truncate(offset=3.0, duration=1.0).with_id("no-supervision")
    silent.supervisions = []
    CutSet.from_cuts([whole, part, two, silent]).to_file(str(tmp_path / "cuts.jsonl.gz"))

    out = tmp_path / "out" / "cuts.jsonl"
    result = imported("lhotse", tmp_path / "cuts.jsonl.gz", out, language="en")
    assert [(row["id"], row["text"], row["speaker"], row["language"]) for row in result.rows] == [
        ("whole", text_of("en_man"), "m", "en"), ("part", "The device would work", "w", "en")]
    assert (out.parent / result.rows[0]["audio"]).resolve() == (VOICE_PROMPTS / "en_man.wav").resolve()
    samples, rate = sf.read(VOICE_PROMPTS / "en_woman.wav", dtype="float32")
    clip, clip_rate = sf.read(out.parent / result.rows[1]["audio"], dtype="float32")
    assert clip_rate == rate and np.abs(clip - samples[rate: rate + round(2.5 * rate)]).max() < 1e-6
    assert {item.id: item.reason for item in result.unusable} == {
        "two-speakers": "several_speakers", "no-supervision": "missing_transcript"}


def test_the_command_prints_the_counts_and_what_the_format_drops(tmp_path, capsys):
    corpus = tmp_path / "LJ"
    (corpus / "wavs").mkdir(parents=True)
    shutil.copy(VOICE_PROMPTS / "vex.wav", corpus / "wavs" / "vex.wav")
    (corpus / "metadata.csv").write_text(f"vex|raw|{text_of('vex')}\nmissing|raw|Gone.\n", encoding="utf-8")
    assert importers.main(["ljspeech", str(corpus), "--out", str(tmp_path / "lj.jsonl"), "--speaker", "vex"]) == 0
    out = capsys.readouterr().out
    assert "dropped by this format: the raw transcript" in out
    assert "rows read 2 = kept 1 + rejected 1 (missing_audio 1); " in out
    assert f"next: python prepare.py --manifest {tmp_path / 'lj.jsonl'}" in out
    assert importers.main(["kaldi", str(tmp_path / "nowhere"), "--out", str(tmp_path / "k.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such source: {tmp_path / 'nowhere'}"


def lj_corpus(folder, rows=("vex",)):
    """An LJSpeech folder of the given voice prompts."""
    (folder / "wavs").mkdir(parents=True)
    for name in rows:
        shutil.copy(VOICE_PROMPTS / f"{name}.wav", folder / "wavs" / f"{name}.wav")
    (folder / "metadata.csv").write_text("".join(f"{name}|raw|{text_of(name)}\n" for name in rows), encoding="utf-8")
    return folder


def test_an_out_that_is_a_file_the_import_reads_is_refused_before_anything_is_written(tmp_path, capsys):
    corpus = lj_corpus(tmp_path / "LJ")
    (tmp_path / "link.csv").symlink_to(corpus / "metadata.csv")
    voices = tmp_path / "voices" / "alice"
    voices.mkdir(parents=True)
    shutil.copy(VOICE_PROMPTS / "vex.wav", voices / "a.wav")
    (voices / "a.txt").write_text("A transcript.", encoding="utf-8")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for fmt, source, out in (("ljspeech", corpus, corpus / "metadata.csv"), ("ljspeech", corpus / "metadata.csv", tmp_path / "link.csv"),
                             ("ljspeech", corpus, corpus / "wavs" / ".." / "wavs" / "vex.wav"),
                             ("folders", tmp_path / "voices", voices / "a.txt")):
        assert importers.main([fmt, str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is ") and err.count("\n") == 1, err
        assert "a file this import reads" in err or "named as audio (.wav)" in err, err
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before, "nothing was written"


def test_clips_at_the_top_of_a_speaker_folder_source_are_counted_or_take_speaker(tmp_path):
    corpus = tmp_path / "voices"
    (corpus / "alice").mkdir(parents=True)
    for audio, name in ((corpus / "alice" / "a.wav", "vex"), (corpus / "top.wav", "en_man")):
        shutil.copy(VOICE_PROMPTS / f"{name}.wav", audio)
        audio.with_suffix(".txt").write_text(text_of(name), encoding="utf-8")
    (corpus / "lonely.txt").write_text("A transcript without its clip.", encoding="utf-8")
    (corpus / "notes.md").write_text("Not audio, not a transcript.", encoding="utf-8")

    result = imported("folders", corpus, tmp_path / "out" / "voices.jsonl")
    assert [row["id"] for row in result.rows] == ["alice/a"]
    assert [(item.where, item.reason) for item in result.unusable] == [
        (str(corpus / "lonely.txt"), "missing_audio"), (str(corpus / "top.wav"), "no_speaker_folder")]
    assert "--speaker" in result.unusable[1].detail
    assert result.summary() == "rows read 3 = kept 1 + rejected 2 (missing_audio 1, no_speaker_folder 1)"
    named = imported("folders", corpus, tmp_path / "out" / "named.jsonl", speaker="narrator")
    assert [(row["id"], row["speaker"]) for row in named.rows] == [("alice/a", "alice"), ("top", "narrator")]


def test_a_damaged_cut_set_is_one_line_naming_it(tmp_path, capsys):
    from lhotse import CutSet, Recording, SupervisionSegment

    recording = Recording.from_file(str(VOICE_PROMPTS / "en_man.wav"), recording_id="en_man")
    cuts = []
    for index in range(200):
        cut = recording.to_cut().truncate(offset=index * 0.01, duration=1.0).with_id(f"cut-{index:03d}")
        cut.supervisions = [SupervisionSegment(f"s{index}", "en_man", index * 0.01, 1.0, text=f"words {index}", speaker="m")]
        cuts.append(cut)
    CutSet.from_cuts(cuts).to_file(str(tmp_path / "cuts.jsonl.gz"))
    whole = (tmp_path / "cuts.jsonl.gz").read_bytes()
    damaged = {"truncated": whole[: len(whole) // 2], "not gzip": b"not a gzip file\n",
               "bad JSON": gzip.compress(b'{"id": "a", \n')}
    for name, payload in damaged.items():
        source = tmp_path / f"{name.replace(' ', '-')}.jsonl.gz"
        source.write_bytes(payload)
        assert importers.main(["lhotse", str(source), "--out", str(tmp_path / "out.jsonl")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {source}: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)


def test_clips_are_written_only_for_rows_that_are_kept(hf_table, tmp_path):
    import datasets
    from lhotse import CutSet, Recording, SupervisionSegment

    table = {column: values + values[:1] for column, values in hf_table.items()}  # a fifth row: a again, its id taken
    table["audio"][4] = {"bytes": (VOICE_PROMPTS / "vex.wav").read_bytes(), "path": "vex.wav"}
    datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio()).to_parquet(str(tmp_path / "train.parquet"))
    result = imported("hf", tmp_path / "train.parquet", tmp_path / "hf" / "hf.jsonl")
    assert {item.id: item.reason for item in result.unusable} == {"c": "missing_transcript", "d": "missing_audio", "a": "duplicate_id"}
    assert sorted(path.name for path in (tmp_path / "hf" / "clips").iterdir()) == sorted(Path(row["audio"]).name for row in result.rows)
    assert result.clips.written == len(result.rows) == 2

    woman = Recording.from_file(str(VOICE_PROMPTS / "en_woman.wav"), recording_id="en_woman")
    cuts = []
    for index, (text, language) in enumerate((("The device", "en"), (None, "en"), ("A tongue unheard of", "xx"))):
        cut = woman.to_cut().truncate(offset=index, duration=1.0).with_id(f"cut{index}")
        cut.supervisions = [SupervisionSegment(f"s{index}", "en_woman", index, 1.0, text=text, speaker="w", language=language)]
        cuts.append(cut)
    CutSet.from_cuts(cuts).to_file(str(tmp_path / "cuts.jsonl.gz"))
    result = imported("lhotse", tmp_path / "cuts.jsonl.gz", tmp_path / "lhotse" / "cuts.jsonl")
    assert {item.id: item.reason for item in result.unusable} == {"cut1": "empty_text", "cut2": "bad_language"}
    assert [path.name for path in (tmp_path / "lhotse" / "clips").iterdir()] == [Path(result.rows[0]["audio"]).name]


def test_a_source_with_no_usable_row_is_an_error_and_prints_no_next_command(tmp_path, capsys):
    corpus, out = lj_corpus(tmp_path / "LJ", rows=()), tmp_path / "lj.jsonl"
    for metadata, counts in (("", "rows read 0 = kept 0 + rejected 0"),
                             ("gone|raw|No such wav.\n", "rows read 1 = kept 0 + rejected 1 (missing_audio 1)")):
        (corpus / "metadata.csv").write_text(metadata, encoding="utf-8")
        assert importers.main(["ljspeech", str(corpus), "--out", str(out)]) == 2
        printed = capsys.readouterr()
        assert counts in printed.out and "next:" not in printed.out
        assert printed.err == f"error: nothing usable found in {corpus}: no row kept; report: {importers.report_path(out)}\n"


def test_ctrl_c_is_one_line_and_status_130_and_writes_no_manifest(tmp_path):
    data_dir, out = tmp_path / "kaldi", tmp_path / "out" / "kaldi.jsonl"
    data_dir.mkdir()
    utterances = [f"u{index:04d}" for index in range(2000)]  # minutes of clips to write: Ctrl-C comes mid-way
    (data_dir / "wav.scp").write_text(f"rec {VOICE_PROMPTS / 'en_man.wav'}\n")
    (data_dir / "segments").write_text("".join(f"{u} rec {i % 600 / 100:.2f} {i % 600 / 100 + 1:.2f}\n" for i, u in enumerate(utterances)))
    (data_dir / "text").write_text("".join(f"{u} some words\n" for u in utterances))
    (data_dir / "utt2spk").write_text("".join(f"{u} man\n" for u in utterances))
    command = [sys.executable, str(ROOT / "importers.py"), "kaldi", str(data_dir), "--out", str(out)]
    for started in (lambda: out.with_name("clips").is_dir() and any(out.with_name("clips").iterdir()),  # writing clips
                    lambda: time.time() > launched + 1.5):  # while the modules load (torch: several seconds)
        process, launched = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.time()
        while not started() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130 and "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("interrupted: ") and not out.exists(), err
    assert not list(out.parent.rglob("*.tmp-*")), "no half-written clip is left"
