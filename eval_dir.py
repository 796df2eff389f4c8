"""An `--eval` output directory: written row by row, refused when it holds another run, resumed with `--resume`.

    DIR/run.json          what the run clones and scores with (list and its digest, model, sampling, judge...),
                          written first; `--resume` refuses a directory whose run.json differs
    DIR/wavs/             one clip per row, each written whole as soon as it is generated
    DIR/rows.csv          one line per scored row, appended and flushed to disk as each row is scored
    DIR/rejections.jsonl  the rows the list's validation rejected
    DIR/summary.json      written at the end, from rows.csv
    DIR/summary.png       written with it: each per-row metric's distribution, the real targets' overlaid

A row is done when its line is in rows.csv: an interrupted run (Ctrl-C, a
crash, a killed job) keeps every scored row, and `--resume` skips them and
generates the rest (a clip written but not yet scored is made again). A
directory holding results without `--resume` is refused, so the clips of two
runs never mix; one where a run made nothing (it failed to start) is taken
over.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import files
import metrics

RUN_FILE, ROWS_FILE = "run.json", "rows.csv"
TEXT_COLUMNS = ("id", "language", "metric", "text", "error")  # read back as written; every other column is a value


class EvalDirError(ValueError):
    """An output directory that cannot take this run; the message says what to do."""


class EvalDir:
    """The output directory of one `--eval` run."""

    def __init__(self, path: str | Path, run: dict, resume: bool):
        self.path = Path(path)
        if self.path.suffix.lower() == ".wav":
            raise EvalDirError("--eval writes a directory of results: give --out DIR")
        if self.path.exists() and not self.path.is_dir():
            raise EvalDirError(f"--out {self.path} is a file: --eval writes a directory of results: give --out DIR")
        self.path.mkdir(parents=True, exist_ok=True)
        existing = _results(self.path)
        if existing and not resume:
            raise EvalDirError(f"--out {self.path} is not empty ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}): "
                               "add --resume to continue the run in it, or give another --out")
        if existing:
            _check_same_run(self.path / RUN_FILE, run)
        else:
            files.write_text(self.path / RUN_FILE, json.dumps(run, indent=2, ensure_ascii=False))
        (self.path / "wavs").mkdir(exist_ok=True)

    def done(self) -> list[dict]:
        """The rows already scored (none in a new directory), in the order they were written."""
        return read_rows(self.path / ROWS_FILE)

    def wav(self, index: int, row_id: str) -> Path:
        return self.path / "wavs" / f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', row_id)}.wav"

    def write_wav(self, path: Path, waveform, rate: int) -> None:
        import soundfile as sf

        with files.atomic_file(path) as handle:
            sf.write(handle, waveform, rate, format="WAV")

    def append(self, record: dict) -> None:
        """One scored row onto rows.csv (its header first in a new file), on disk before this returns."""
        rows = self.path / ROWS_FILE
        line = io.StringIO()
        writer = csv.DictWriter(line, fieldnames=metrics.RECORD_COLUMNS, lineterminator="\n")
        if not rows.exists():
            writer.writeheader()
        writer.writerow({key: value if isinstance(value, str) else metrics.fmt(value, 6) for key, value in record.items()})
        files.append_text(rows, line.getvalue())


def _results(path: Path) -> list[str]:
    """What a directory holds besides what a run that made nothing leaves (its run.json, rejections.jsonl and an
    empty wavs/), which a new run may take over: a failed start never forces --resume."""
    names = [entry.name for entry in sorted(path.iterdir()) if entry.name not in (RUN_FILE, "rejections.jsonl", "wavs")]
    wavs = path / "wavs"
    if wavs.exists() and (not wavs.is_dir() or any(wavs.iterdir())):
        names.append("wavs/")
    return names


def _check_same_run(path: Path, run: dict) -> None:
    if not path.is_file():
        raise EvalDirError(f"--resume: {path.parent} holds no --eval run (no {RUN_FILE}); give another --out")
    changed = differences(json.loads(path.read_text(encoding="utf-8")), run)
    if changed:
        raise EvalDirError(f"--resume: {path.parent} holds a run with other {'; '.join(changed)} (see {path}); "
                           "resume it with the same flags, or give another --out")


def differences(recorded: dict, run: dict, prefix: str = "") -> list[str]:
    """Each field that differs, named down to the leaf of a group (`sampling.seed 0 -> 1`), sorted."""
    changed = []
    for key in sorted(set(recorded) | set(run)):
        old, new = recorded.get(key), run.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key} {json.dumps(old, ensure_ascii=False)} -> {json.dumps(new, ensure_ascii=False)}")
    return changed


def read_rows(path: Path) -> list[dict]:
    """The records of a rows.csv, values typed back (`n/a` is None); a last line cut short by a crash is left out
    with a note, so its row is scored again."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        print(f"note: {path}: its last line was cut short; that row is made again", file=sys.stderr)
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames and tuple(reader.fieldnames) != metrics.RECORD_COLUMNS:
        raise EvalDirError(f"{path} has columns {', '.join(reader.fieldnames)}, not this code's; give another --out")
    return [{key: value if key in TEXT_COLUMNS else _value(key, value) for key, value in row.items()} for row in reader]


def _value(column: str, value: str):
    """A value as `metrics.fmt` wrote it: `n/a` is None, booleans and numbers typed back, transcripts kept."""
    if value == "n/a":
        return None
    if column.endswith("transcript"):
        return value
    if value in ("True", "False"):
        return value == "True"
    return float(value)
