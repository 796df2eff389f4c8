"""An --eval output directory (eval_dir.py): results are never mixed, rows are on disk one by one and read back as
they were, a resumed run must be the same run."""

from __future__ import annotations

import pytest

import eval_dir
import metrics

RUN = {"list": "/data/list.lst", "sampling": {"seed": 0}}


def _record(row_id: str, sim: float | None) -> dict:
    scores = None if sim is None else metrics.ClipScores(1.5, sim, 0.25, "said this", 0.0, 0.1)
    return metrics.row_record(row_id, "en", "Said this, yes.", scores, True if scores else None, None,
                              None if scores else "no audio")


def test_rows_are_appended_and_read_back_as_written(tmp_path):
    out = eval_dir.EvalDir(tmp_path / "eval", RUN, resume=False)
    out.append(_record("a", 0.8125))
    out.append(_record("b,with a comma", None))
    done = out.done()
    assert [row["id"] for row in done] == ["a", "b,with a comma"]
    for read, written in zip(done, (_record("a", 0.8125), _record("b,with a comma", None))):
        assert read == {key: pytest.approx(value, abs=1e-6) if isinstance(value, float) else value  # 6 decimals kept
                        for key, value in written.items()}
    assert done[0]["stopped"] is True and done[1]["sim"] is None and done[1]["error"] == "no audio"


def test_a_directory_with_results_is_refused_without_resume(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "old.wav").write_bytes(b"RIFF")
    with pytest.raises(eval_dir.EvalDirError, match=r"is not empty \(old.wav\): add --resume"):
        eval_dir.EvalDir(tmp_path / "eval", RUN, resume=False)
    with pytest.raises(eval_dir.EvalDirError, match="holds no --eval run"):
        eval_dir.EvalDir(tmp_path / "eval", RUN, resume=True)
    with pytest.raises(eval_dir.EvalDirError, match="give --out DIR"):
        eval_dir.EvalDir(tmp_path / "x.wav", RUN, resume=False)


def test_a_run_that_made_nothing_is_taken_over_and_another_run_is_not_resumed(tmp_path):
    eval_dir.EvalDir(tmp_path / "eval", RUN, resume=False)  # a start that failed before any clip
    out = eval_dir.EvalDir(tmp_path / "eval", {**RUN, "model": "other"}, resume=False)
    out.append(_record("a", 0.5))
    with pytest.raises(eval_dir.EvalDirError, match='holds a run with other model "other" -> null'):
        eval_dir.EvalDir(tmp_path / "eval", RUN, resume=True)
    assert [row["id"] for row in eval_dir.EvalDir(tmp_path / "eval", {**RUN, "model": "other"}, resume=True).done()] == ["a"]


def test_a_line_cut_short_by_a_crash_is_left_out_with_a_note(tmp_path, capsys):
    out = eval_dir.EvalDir(tmp_path / "eval", RUN, resume=False)
    out.append(_record("a", 0.5))
    out.append(_record("b", 0.6))
    rows = tmp_path / "eval" / eval_dir.ROWS_FILE
    rows.write_text(rows.read_text()[:-20])
    assert [row["id"] for row in out.done()] == ["a"]
    assert "cut short" in capsys.readouterr().err


def test_a_resume_with_other_sampling_names_each_differing_field_of_the_group(tmp_path):
    out = eval_dir.EvalDir(tmp_path / "eval", {**RUN, "sampling": {"seed": 0, "temperature": 1.0}}, resume=False)
    out.append(_record("a", 0.5))
    with pytest.raises(eval_dir.EvalDirError, match=r"other sampling\.seed 0 -> 1 \(see "):
        eval_dir.EvalDir(tmp_path / "eval", {**RUN, "sampling": {"seed": 1, "temperature": 1.0}}, resume=True)
