"""Two `--eval` directories compared row by row: is B better than A on the same list (`python infer.py --compare A B`)?

The two runs scored the same rows, so the comparison is paired: rows are
matched by id (those in one run only are counted and named), and for each
per-row metric (`metrics.ROW_METRICS`) the mean of B - A gets a bootstrap
95% interval over the matched rows (`metrics.paired_difference`), the
shares of rows B improved and worsened, and a verdict (better, worse) only
where the interval excludes 0, in the metric's own direction
(`metrics.BETTER`). The Seed-TTS-eval aggregates of both over the matched
rows are shown side by side.

Two runs are comparable when everything in their run.json but the model
under test and how it ran (`MODEL_FIELDS`) is the same: the list's content,
the sampling, the language and the judge's models. Any other pair is
refused, naming each difference. Nothing here loads a model.

Writes OUT/compare.json (the table, the unmatched ids, each row's
difference) and OUT/differences.png; OUT defaults to `A_vs_B` beside B.
"""

from __future__ import annotations

import json
from pathlib import Path

import eval_dir
import files
import metrics
import plots
import seedtts

# What a comparison compares: the model and how it ran. Every other field of run.json must be equal in both.
MODEL_FIELDS = ("list", "model", "checkpoint", "audio_tokenizer", "dtype", "device", "scene", "ref_in_system")
# The fields that choose the judge; a difference in any other is one of protocol.
JUDGE_FIELDS = ("asr_model", "speaker_model", "mos_model")
SHOWN_IDS = 10


class CompareError(ValueError):
    """Two directories that cannot be compared; the message says why."""


def read_eval(path: Path) -> tuple[dict, list[dict]]:
    """An --eval directory's run.json and its scored rows."""
    run_file = path / eval_dir.RUN_FILE
    if not run_file.is_file():
        raise CompareError(f"{path} is not an --eval directory (no {eval_dir.RUN_FILE})")
    try:
        rows = eval_dir.read_rows(path / eval_dir.ROWS_FILE)
    except eval_dir.EvalDirError:  # its advice (another --out) is --eval's; it lists every column
        raise CompareError(f"{path} was written by another version of this code (its {eval_dir.ROWS_FILE} has other "
                           "columns): run --eval into a new directory to compare it") from None
    if not rows:
        raise CompareError(f"{path} holds no scored row (no {eval_dir.ROWS_FILE}, or an empty one)")
    return json.loads(run_file.read_text(encoding="utf-8")), rows


def protocol_differences(run_a: dict, run_b: dict) -> tuple[list[str], list[str]]:
    """The differences of judge and of protocol between two run.json records (each `field a -> b`)."""
    def part(run: dict, judge: bool) -> dict:
        return {key: value for key, value in run.items() if key not in MODEL_FIELDS and (key in JUDGE_FIELDS) == judge}

    return (eval_dir.differences(part(run_a, True), part(run_b, True)),
            eval_dir.differences(part(run_a, False), part(run_b, False)))


def check_comparable(a: Path, run_a: dict, b: Path, run_b: dict) -> None:
    judge, protocol = protocol_differences(run_a, run_b)
    reasons = ([f"different judges ({'; '.join(judge)})"] if judge else []) + \
              ([f"different protocols ({'; '.join(protocol)})"] if protocol else [])
    if reasons:
        raise CompareError(f"cannot compare {a} and {b}: {' and '.join(reasons)}; run --eval on both with the same list, "
                           "sampling, --language and judge (--asr-model, --speaker-model)")


def compare(a: Path, b: Path, seed: int = 0) -> dict:
    """The comparison of B against A (see the module's docstring) as compare.json holds it."""
    (run_a, rows_a), (run_b, rows_b) = read_eval(a), read_eval(b)
    check_comparable(a, run_a, b, run_b)
    by_id_b = {row["id"]: row for row in rows_b}
    ids_a = {row["id"] for row in rows_a}
    matched = [(row, by_id_b[row["id"]]) for row in rows_a if row["id"] in by_id_b]
    if not matched:
        raise CompareError(f"{a} and {b} share no row id: they were not made from the same list")
    report = {"a": str(a), "b": str(b), "model_differences": eval_dir.differences(_model(run_a), _model(run_b)),
              "matched": len(matched), "only_in_a": [row["id"] for row in rows_a if row["id"] not in by_id_b],
              "only_in_b": [row["id"] for row in rows_b if row["id"] not in ids_a],
              "without_audio": {"a": sum(bool(x["error"]) for x, _ in matched), "b": sum(bool(y["error"]) for _, y in matched)},
              "metrics": {}, "per_row": {}}
    for name in (column for column in metrics.ROW_METRICS if column in rows_a[0] and column in rows_b[0]):
        values_a, values_b = [x[name] for x, _ in matched], [y[name] for _, y in matched]
        report["metrics"][name] = metrics.paired_difference(values_a, values_b, metrics.BETTER.get(name), seed)
        report["per_row"][name] = _row_differences(matched, name, metrics.BETTER.get(name))
    report["seedtts"] = {"a": seedtts.aggregates([x for x, _ in matched]), "b": seedtts.aggregates([y for _, y in matched])}
    return report


def _model(run: dict) -> dict:
    return {key: run.get(key) for key in MODEL_FIELDS}


def _row_differences(matched: list[tuple[dict, dict]], name: str, better: str | None) -> dict[str, float]:
    """Each matched row's B - A (of the distance from 1 for a `near 1` metric), by id, where both have a value."""
    distance = (lambda value: abs(float(value) - 1)) if better == "near 1" else float
    return {x["id"]: distance(y[name]) - distance(x[name]) for x, y in matched if x[name] is not None and y[name] is not None}


def format_comparison(report: dict) -> str:
    """The printed comparison: what differs between the runs, the matching, one line per metric, Seed-TTS-eval."""
    lines = [f"A = {report['a']}, B = {report['b']}; B differs from A in: {'; '.join(report['model_differences']) or 'nothing'}",
             f"rows: {report['matched']} matched; {_named('only in A', report['only_in_a'])}; {_named('only in B', report['only_in_b'])}"
             f"; without audio among them: A {report['without_audio']['a']}, B {report['without_audio']['b']}"]
    width = max([len("metric")] + [len(_label(name, stats)) for name, stats in report["metrics"].items()]) + 2
    lines.append(f"{'metric':<{width}}{'better':>8}{'n':>5}{'A':>9}{'B':>9}{'B - A':>9}   {'95% CI of B - A':<20}"
                 f"{'B better':>9}{'B worse':>9}   verdict")
    for name, stats in report["metrics"].items():
        low, high = stats["ci95"]
        interval = f"[{_signed(low)}, {_signed(high)}]" if stats["n"] else "n/a"
        lines.append(f"{_label(name, stats):<{width}}{stats['better'] or '?':>8}{stats['n']:>5}{metrics.fmt(stats['a_mean']):>9}"
                     f"{metrics.fmt(stats['b_mean']):>9}{_signed(stats['mean']):>9}   {interval:<20}"
                     f"{_share(stats['improved']):>9}{_share(stats['worsened']):>9}   {stats['verdict']}")
    a, b = report["seedtts"]["a"], report["seedtts"]["b"]  # MOS shown as --eval's Seed-TTS-eval line shows it
    lines.append(f"Seed-TTS-eval over the matched rows: A {seedtts.format_figures(a, bool(a['mos']['n']))}; "
                 f"B {seedtts.format_figures(b, bool(b['mos']['n']))}")
    return "\n".join(lines)


def _label(name: str, stats: dict) -> str:
    return f"|{name} - 1|" if stats["better"] == "near 1" else name


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _named(what: str, ids: list[str]) -> str:
    if not ids:
        return f"{what} 0"
    return f"{what} {len(ids)} ({', '.join(ids[:SHOWN_IDS])}{', ...' if len(ids) > SHOWN_IDS else ''})"


def default_out(a: Path, b: Path) -> Path:
    """Where a comparison is written when --out is not given: `A_vs_B` beside B."""
    return b.parent / f"{a.resolve().name}_vs_{b.resolve().name}"


def run_cli(a: str, b: str, out: str | None) -> int:
    """`--compare A B [--out DIR]`: the printed comparison, DIR/compare.json and DIR/differences.png."""
    a_dir, b_dir = Path(a), Path(b)
    report = compare(a_dir, b_dir)
    folder = Path(out) if out else default_out(a_dir, b_dir)
    if folder.exists() and not folder.is_dir():
        raise CompareError(f"--out {folder} is a file: --compare writes a directory (compare.json, differences.png)")
    folder.mkdir(parents=True, exist_ok=True)
    print(format_comparison(report))
    files.write_text(folder / "compare.json", json.dumps(report, indent=2, ensure_ascii=False))
    heading = f"B - A per matched row (green: B better, red: B worse): A = {a}, B = {b}"
    plots.write_png(plots.differences_figure(report, heading), folder / "differences.png")
    print(f"wrote {folder / 'compare.json'}, {folder / 'differences.png'}")
    return 0
