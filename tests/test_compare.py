"""Two --eval directories compared row by row (compare.py, `infer.py --compare`): a known shift is found inside its
paired interval, a run compared with itself shows no difference, runs judged otherwise are refused, unmatched rows
are counted and named."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

import compare
import data
import eval_dir
import infer
from conftest import DEMO_DIR, scored_records

SHIFT = {"sim": 0.05, "error_rate": -0.1}  # B = A + SHIFT + noise, row by row


def _run_record(*flags: str) -> dict:
    """run.json as `infer.py --eval` writes it for the demo manifest on the tiny preset, with `flags` added."""
    args = infer.parse_args(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--model", "tiny", "--greedy", *flags])
    return infer.eval_run_record(args, data.PromptLayout(False))


def _eval_dir(path, records: list[dict], run: dict):
    out = eval_dir.EvalDir(path, run, resume=False)
    for record in records:
        out.append(record)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A: 40 scored rows; B: A's rows with SHIFT plus noise (sd 0.02) and every duration ratio brought to 1."""
    folder = tmp_path_factory.mktemp("compare")
    rows_a = scored_records(40)
    rows_b, rng = copy.deepcopy(rows_a), np.random.default_rng(1)
    for row in rows_b:
        for name, shift in SHIFT.items():
            row[name] += shift + float(rng.normal(0, 0.02))
        row["duration_ratio"] = 1.0
    run = _run_record()
    return {"a": _eval_dir(folder / "base", rows_a, run), "b": _eval_dir(folder / "tuned", rows_b, run), "rows": rows_a,
            "run": run, "folder": folder}


def test_a_known_shift_lies_inside_its_paired_interval_and_is_judged_in_the_metrics_direction(runs):
    report = compare.compare(runs["a"], runs["b"])
    for name, shift in SHIFT.items():
        stats = report["metrics"][name]
        low, high = stats["ci95"]
        assert low < shift < high and not low <= 0 <= high, (name, stats)
        assert stats["verdict"] == "better" and stats["n"] == 40
    assert report["metrics"]["duration_ratio"]["verdict"] == "better"  # |ratio - 1| fell from about 0.3 to 0
    assert report["metrics"]["duration_ratio"]["improved"] == 1.0
    stopped = report["metrics"]["stopped"]
    assert (stopped["mean"], stopped["ci95"], stopped["verdict"]) == (0.0, [0.0, 0.0], "no clear difference")
    assert len(report["per_row"]["sim"]) == 40 and report["seedtts"]["a"]["sim"]["n"] == 40


def test_a_run_compared_with_itself_shows_no_difference(runs):
    same = runs["folder"] / "same"
    shutil.copytree(runs["a"], same)
    report = compare.compare(runs["a"], same)
    for name, stats in report["metrics"].items():
        assert (stats["mean"], stats["ci95"], stats["verdict"]) == (0.0, [0.0, 0.0], "no clear difference"), name
        assert stats["improved"] == stats["worsened"] == 0.0
    assert report["model_differences"] == [] and report["only_in_a"] == report["only_in_b"] == []


def test_runs_judged_or_sampled_otherwise_are_refused_naming_the_difference(runs, capsys):
    folder = runs["folder"]
    other_judge = _eval_dir(folder / "wavlm", runs["rows"], _run_record("--speaker-model", "/models/wavlm-sv"))
    assert infer.main(["--compare", str(runs["a"]), str(other_judge)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot compare {runs['a']} and {other_judge}: different judges "
                          '(speaker_model null -> "/models/wavlm-sv")') and "\n" not in err
    other_mos = _eval_dir(folder / "mos", runs["rows"], runs["run"] | {"mos_model": "distillmos-0.9.0-filled"})
    with pytest.raises(compare.CompareError, match=r"different judges \(mos_model .*distillmos-0.9.1-filled.* -> .*0.9.0"):
        compare.compare(runs["a"], other_mos)
    other_seed = _eval_dir(folder / "seed1", runs["rows"], _run_record("--seed", "1"))
    with pytest.raises(compare.CompareError, match=r"different protocols \(sampling.seed 0 -> 1\)"):
        compare.compare(runs["a"], other_seed)
    assert not (folder / "base_vs_wavlm").exists()


def test_compare_as_a_user_runs_it_prints_a_table_and_writes_beside_b(runs, capsys):
    """Defaults: the comparison goes to A_vs_B beside B; rows in one run only are counted and named."""
    partial = runs["folder"] / "partial"
    rows = scored_records(40)[2:] + [{**scored_records(1)[0], "id": "extra"}]
    _eval_dir(partial, rows, {**runs["run"], "model": "runs/demo/export"})
    assert infer.main(["--compare", str(runs["a"]), str(partial)]) == 0
    out = capsys.readouterr().out
    assert 'B differs from A in: model "tiny" -> "runs/demo/export"' in out
    assert "rows: 38 matched; only in A 2 (row0, row1); only in B 1 (extra)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert lines["sim"].split()[1:3] == ["higher", "38"] and lines["sim"].endswith("no clear difference")
    seedtts_line = next(line for line in out.splitlines() if line.startswith("Seed-TTS-eval over the matched rows"))
    assert seedtts_line.count("MOS ") == 2, seedtts_line  # both runs' mean MOS, as --eval prints it
    written = runs["folder"] / "base_vs_partial"
    report = json.loads((written / "compare.json").read_text(encoding="utf-8"))
    assert report["only_in_a"] == ["row0", "row1"] and report["matched"] == 38
    assert (written / "differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_directory_from_another_version_is_refused_in_one_short_line(runs, capsys):
    old = runs["folder"] / "old"
    shutil.copytree(runs["a"], old)
    rows = (old / eval_dir.ROWS_FILE).read_text(encoding="utf-8").splitlines()
    (old / eval_dir.ROWS_FILE).write_text("\n".join([rows[0].replace(",mos,", ",")] + rows[1:]) + "\n", encoding="utf-8")
    assert infer.main(["--compare", str(old), str(runs["b"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {old} was written by another version of this code (its rows.csv has other columns): "
                   "run --eval into a new directory to compare it"), err
