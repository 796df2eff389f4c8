"""Judging clones (evaluate.py): `infer.py --eval` on a manifest or a Seed-TTS-eval list, and how one row's clone is
made and scored."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import evaluate
import generation
import infer
import manifest
import metrics
import model_utils
import prepare
from codes import EncodedClips
from conftest import DEMO_DIR, ROOT, write_jsonl


@pytest.fixture(scope="module")
def judge() -> metrics.Judge:
    return metrics.build_judge()


# --------------------------------------------------------------------------
# python infer.py --eval
# --------------------------------------------------------------------------


def _rows(out) -> dict[str, dict]:
    with (out / "rows.csv").open(encoding="utf-8") as file:
        return {row["id"]: row for row in csv.DictReader(file)}


def test_eval_writes_wavs_rows_and_summary_and_counts_the_bad_row(demo_clips, tmp_path, capsys, monkeypatch):
    demo = demo_clips
    arabic = {"id": "ar_pair", "ref_audio": demo["ar_male_0"]["audio"], "ref_text": demo["ar_male_0"]["text"],
              "audio": demo["ar_male_1"]["audio"], "text": demo["ar_male_1"]["text"], "language": "ar"}
    missing = {"id": "gone", "audio": str(tmp_path / "nowhere.wav"), "text": "Not here.", "speaker": "en_female", "language": "en"}
    manifest_path = write_jsonl(tmp_path / "eval.jsonl", [demo["en_female_0"], missing, demo["en_female_1"], arabic])
    encoded = []
    encode = data.encode_clip
    monkeypatch.setattr(data, "encode_clip", lambda tokenizer, waveform: encoded.append(len(waveform)) or encode(tokenizer, waveform))
    out = tmp_path / "eval"
    assert infer.main(["--eval", str(manifest_path), "--out", str(out), "--model", "tiny", "--max-seconds", "0.5", "--greedy",
                       "--batch-size", "2", "--score-cache", str(tmp_path / "scores"), "--ref-codes-cache", str(tmp_path / "codes")]) == 0

    rows = _rows(out)
    assert sorted(rows) == ["ar_pair", "en_female_0", "en_female_1"]
    assert len(encoded) == 3, "each of the three references encoded once, no target encoded"
    english, arabic_row = rows["en_female_0"], rows["ar_pair"]
    assert english["metric"] == "wer" and float(english["error_rate"]) >= 0 and float(english["target_error_rate"]) >= 0
    assert 0 < float(english["duration_ratio"]) and english["stopped"] in ("True", "False")
    assert -1 <= float(english["sim"]) <= 1 and -1 <= float(english["target_sim"]) <= 1
    assert float(english["wer_seedtts"]) >= 0
    # no ASR for Arabic offline: unavailable, never 0
    assert arabic_row["error_rate"] == "n/a" and arabic_row["target_error_rate"] == "n/a" and arabic_row["transcript"] == "n/a"

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["rows_read"], summary["kept"], summary["rejected"], summary["evaluated"]) == (4, 3, 1, 3)
    assert summary["rejected_by_reason"] == {"missing_audio": 1}
    assert summary["metrics"]["sim"]["n"] == 3 and summary["metrics"]["error_rate"]["n"] == 2
    assert summary["corpus"]["error_rate"]["n"] == 2 and summary["seedtts"]["sim"]["n"] == 3
    assert summary["target_score_cache"] == {"folder": str(tmp_path / "scores"), "hits": 0, "misses": 3}
    low, high = summary["metrics"]["duration_ratio"]["ci95"]
    assert low <= summary["metrics"]["duration_ratio"]["mean"] <= high
    assert len(list((out / "wavs").glob("*.wav"))) == 3
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # its layout: tests/test_plots.py
    rejections = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    assert [(r["row"], r["id"], r["reason"]) for r in rejections] == [(2, "gone", "missing_audio")]
    captured = capsys.readouterr()
    assert "rows read 4 = kept 3 + rejected 1 (missing_audio 1)" in captured.out and "Seed-TTS-eval" in captured.out
    assert "1 rows in ar: pocketsphinx-en-us cannot transcribe them" in captured.err


def test_eval_refuses_a_used_output_directory_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("refused before the model loads"))
    assert infer.main(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--out", str(tmp_path / "x.wav")]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    (tmp_path / "used" / "wavs").mkdir(parents=True)
    (tmp_path / "used" / "wavs" / "0000_old.wav").write_bytes(b"RIFF")
    assert infer.main(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--out", str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "is not empty (wavs/): add --resume" in err and "\n" not in err


def test_eval_refuses_an_out_that_is_a_file_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """Issue 25 item 13: an existing file as --out was `[Errno 17] File exists`."""
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("refused before the model loads"))
    existing = tmp_path / "results.txt"
    existing.write_text("kept")
    assert infer.main(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--out", str(existing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {existing} is a file: --eval writes a directory of results: give --out DIR"
    assert existing.read_text() == "kept"


def test_eval_refuses_an_unknown_language_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """Issue 25 item 5: `--language xx` was taken, and every row's WER was n/a, exit 0."""
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("refused before the model loads"))
    assert infer.main(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--out", str(tmp_path / "eval"), "--language", "xx"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --language 'xx' is not a known language "
                                               "(a BCP 47 tag such as en, en-US, ar, zh-Hans)")
    assert not (tmp_path / "eval").exists()


def test_eval_where_every_row_is_rejected_fails_in_one_line(tmp_path, capsys):
    rows = [{"id": f"r{i}", "ref_audio": str(tmp_path / "none.wav"), "ref_text": "x", "audio": str(tmp_path / "none.wav"),
             "text": "Words."} for i in range(2)]
    listed = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert infer.main(["--eval", str(listed), "--out", str(tmp_path / "eval"), "--model", "tiny", "--score-cache", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no row of") and "rejected 2 (missing_audio 2)" in err[-1]
    assert len((tmp_path / "eval" / "rejections.jsonl").read_text().splitlines()) == 2


def test_rows_without_a_language_say_which_flag_gives_them_a_wer(judge, capsys):
    pairs = [manifest.Pair(f"r{i}", "ref.wav", "ref", "target.wav", "text") for i in range(3)]
    evaluate.warn_about_languages(judge, pairs, {"r0": None, "r1": None, "r2": "en"})
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: 2 rows have no language") and "--language" in err and "\n" not in err
    evaluate.warn_about_languages(metrics.Judge(judge.encoder, judge.asr, default_language="en"), pairs, {"r0": None, "r1": None, "r2": "en"})
    assert capsys.readouterr().err == ""


def test_ctrl_c_mid_eval_keeps_the_scored_rows_and_the_printed_command_finishes_the_run(demo_clips, tmp_path):
    total = 8  # enough that a Ctrl-C sent once the first row is scored finds rows still to make
    reference, target = demo_clips["en_female_0"], demo_clips["en_female_1"]
    rows = [{"id": f"row{i}", "ref_audio": reference["audio"], "ref_text": reference["text"],
             "audio": target["audio"], "text": target["text"], "language": "en"} for i in range(total)]
    listed, out = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "eval"
    args = ["--eval", str(listed), "--out", str(out), "--model", "tiny", "--max-seconds", "0.2", "--greedy",
            "--score-cache", str(tmp_path / "scores")]
    process = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (out / "rows.csv").is_file() and len((out / "rows.csv").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert process.returncode == 130 and "Traceback" not in err, err
    scored = len(_rows(out))
    assert 1 <= scored < total and last.startswith(f"interrupted: {scored} of {total} rows scored, kept in {out / 'rows.csv'}")
    command = last.split("continue with: ")[1]
    assert command.endswith("--resume")
    kept = _rows(out)
    assert infer.main(shlex.split(command)[2:]) == 0
    finished = _rows(out)
    assert sorted(finished) == [f"row{i}" for i in range(total)]
    assert all(finished[row_id] == kept[row_id] for row_id in kept)  # the rows scored before Ctrl-C are kept as they were
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == total and summary["clips_made_this_run"] == total - scored
    assert summary["target_score_cache"]["misses"] == 0, "the real target was scored once, in the first run"


def test_eval_reads_a_seedtts_list_and_references_from_a_prepared_cache(demo_clips, tmp_path, monkeypatch, capsys):
    first, second = demo_clips["en_female_0"], demo_clips["en_female_1"]
    manifest_path = write_jsonl(tmp_path / "refs.jsonl", [first, second])
    prepare.prepare(str(manifest_path), tmp_path / "cache", model_utils.build_tiny_audio_tokenizer(), None)
    folder = tmp_path / "list"
    folder.mkdir()
    (folder / "meta.lst").write_text(
        f"u1|{first['text']}|{first['audio']}|{second['text']}|{second['audio']}\n"
        f"u2|{second['text']}|{second['audio']}|Something else to say.\n", encoding="utf-8")
    monkeypatch.setattr(data, "encode_clip", lambda *_: pytest.fail("every reference is in the cache"))
    out = tmp_path / "eval"
    assert infer.main(["--eval", str(folder / "meta.lst"), "--out", str(out), "--model", "tiny", "--max-seconds", "0.2",
                       "--greedy", "--language", "en", "--codes-cache", str(tmp_path / "cache"), "--score-cache", ""]) == 0
    rows = _rows(out)
    assert rows["u1"]["target_sim"] != "n/a" and rows["u2"]["target_sim"] == "n/a"  # u2's line names no real recording
    assert rows["u2"]["wer_seedtts"] != "n/a"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seedtts"]["wer"]["n"] == 2 and summary["seedtts"]["target_wer"]["n"] == 1
    assert "references: 2 read from" in capsys.readouterr().out


def test_speaker_rows_are_paired_as_in_training_by_the_seed():
    clips = evaluate.CheckedClips(24000, 8)
    validated, by_zero, _ = evaluate.read_eval_rows(str(DEMO_DIR / "manifest.jsonl"), clips, seed=0)
    _, by_one, _ = evaluate.read_eval_rows(str(DEMO_DIR / "manifest.jsonl"), clips, seed=1)
    assert by_one == manifest.training_pairs(validated.kept, 1, 0)[0]
    assert [pair.ref_audio for pair in by_zero] != [pair.ref_audio for pair in by_one]


def test_clones_are_deterministic_with_a_seed(demo_clips, tiny, judge):
    pair = manifest.Pair("en_female_1", demo_clips["en_female_0"]["audio"], "ref", demo_clips["en_female_1"]["audio"],
                         "Please bring me a cup of tea.")
    codes = EncodedClips(tiny.audio_tokenizer)
    settings = evaluate.CloneSettings(generation.Sampling(seed=3, max_seconds=0.3), data.PromptLayout())  # sampled, not greedy
    first, second = (list(evaluate.clones_of(tiny, [pair], codes, settings))[0][1] for _ in range(2))
    assert np.array_equal(first.waveform, second.waveform)
    assert evaluate.score_row(judge, pair, "en", first, 24000) == evaluate.score_row(judge, pair, "en", second, 24000)


def test_a_clone_that_yields_no_clip_is_a_row_with_its_error_and_no_values(demo_clips, tiny, judge):
    pair = manifest.Pair("en_female_1", demo_clips["en_female_0"]["audio"], "ref", demo_clips["en_female_1"]["audio"], "Hello.")
    settings = evaluate.CloneSettings(generation.Sampling(greedy=True, max_seconds=0.01), data.PromptLayout())  # no frame fits
    [(_, clone)] = evaluate.clones_of(tiny, [pair], EncodedClips(tiny.audio_tokenizer), settings)
    record = evaluate.score_row(judge, pair, "en", clone, 24000)
    assert record["error"] == "the model ended the clip before producing any frame"
    assert record["sim"] is None and record["stopped"] is None and record["target_sim"] is not None
