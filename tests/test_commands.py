"""Every command line ends alike (`commands.py`): a Ctrl-C, while the modules load or once the command works, is
one `interrupted:` line (train.py's stop after a step says how to resume) and status 130; a full disk is one
`error:` line saying so, status 2; neither prints a traceback. Each command runs as a process of its own, on
inputs small enough to reach its first write within seconds."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK_FLAGS, ROOT, fill


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, short_manifest) -> dict[str, Path]:
    """The short manifest (four 1.05 s clips), one of its clips, and a `folders` source of that clip."""
    row = json.loads(short_manifest.read_text(encoding="utf-8").splitlines()[0])
    source = tmp_path_factory.mktemp("folders") / "source"
    (source / "speaker").mkdir(parents=True)
    shutil.copy(row["audio"], source / "speaker" / "clip.wav")
    (source / "speaker" / "clip.txt").write_text(row["text"], encoding="utf-8")
    return {"manifest": short_manifest, "clip": Path(row["audio"]), "source": source}


def command(name: str, inputs: dict[str, Path], out: Path) -> tuple[list[str], Path | None]:
    """The command line, and the file whose appearance shows that it works (None: it has no such file early)."""
    manifest = str(inputs["manifest"])
    flags, working = {
        "train.py": (["--train-manifest", manifest, "--out-dir", str(out / "runs"), "--run-name", "run", "--max-steps", "50",
                      *QUICK_FLAGS], out / "runs" / "run" / "config.json"),
        "infer.py": (["--eval", manifest, "--out", str(out / "eval"), "--model", "tiny", "--score-cache", ""],
                     out / "eval" / "run.json"),
        "prepare.py": (["--manifest", manifest, "--out", str(out / "cache")], out / "cache"),
        "importers.py": (["folders", str(inputs["source"]), "--out", str(out / "imported.jsonl")], None),
        "segment.py": ([str(inputs["clip"]), "--out", str(out / "segmented"), "--language", "en"],
                       out / "segmented" / "settings.json"),
    }[name]
    return [sys.executable, str(ROOT / name), *flags], working


COMMANDS = ["train.py", "infer.py", "prepare.py", "importers.py", "segment.py"]
# importers.py imports a `folders` source in an instant: its Ctrl-C while it writes clips is test_importers.py's
WORKING = [name for name in COMMANDS if name != "importers.py"]


@pytest.mark.parametrize("name, moment", [(name, "loading") for name in COMMANDS] + [(name, "working") for name in WORKING])
def test_ctrl_c_is_one_line_and_status_130(name, moment, inputs, tmp_path):
    """Ctrl-C 1 s after the start, while the modules load, or once the command has written its first file."""
    line, working = command(name, inputs, tmp_path)
    process, launched = subprocess.Popen(line, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.time()
    started = (lambda: time.time() > launched + 1.0) if moment == "loading" else working.exists
    while not started() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    if moment == "loading":
        assert last == "interrupted: while loading, before reading any input: nothing was written", err[-2000:]
    else:  # train.py, once its steps have started, stops after the step with a checkpoint and says how to resume
        assert last.startswith("interrupted: ") or (name == "train.py" and "continue with: " in out), err[-2000:]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_full_disk_is_one_line_saying_so_and_status_2(name, inputs, small_disk, tmp_path):
    out = small_disk(1)
    fill(out)
    line, _ = command(name, inputs, out)
    result = subprocess.run(line, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, result.stderr[-2000:]
    [error] = [each for each in result.stderr.splitlines() if each.startswith("error:")]
    assert error.startswith(f"error: cannot write {out}") and "No space left on device" in error, error
