"""Shared fixtures: the tiny preset is built once per session, real speech comes from ../shared; a tiny export,
its serve engine and clips beyond the reference limits serve the generation tests and the command line's, and
demo clips cut to one second the judging tests."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, for the commands they start too
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
import soundfile as sf
import torch
from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import HubertConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
import config  # noqa: E402
import collate  # noqa: E402
import data  # noqa: E402
import model_utils  # noqa: E402
import parity  # noqa: E402
import train  # noqa: E402
from parallel import World  # noqa: E402

VOICE_PROMPTS = ROOT.parent / "shared" / "data" / "voice_prompts"
DEMO_DIR = ROOT / "demo" / "data"
DEMO_CLIP = DEMO_DIR / "en_male_0.flac"


@pytest.fixture(scope="session")
def tiny() -> model_utils.Bundle:
    """The tiny preset: random model, BPE text tokenizer, random audio tokenizer (seed 0)."""
    return model_utils.load_bundle(model_utils.TINY_PRESET)


@pytest.fixture(scope="session")
def tiny_whisper(tiny) -> model_utils.Bundle:
    """The tiny preset with a Whisper tower, sharing the tiny audio tokenizer."""
    tokenizer = model_utils.build_tiny_text_tokenizer()
    model = model_utils.build_tiny_model(tokenizer, seed=0, whisper=True)
    return model_utils.Bundle(model, tokenizer, tiny.audio_tokenizer)


@pytest.fixture(scope="session")
def voice_prompt():
    """A real recorded clip (first 2 s, at the audio tokenizer's 24 kHz) and its transcript."""
    if not VOICE_PROMPTS.is_dir():
        pytest.fail(f"{VOICE_PROMPTS} is missing: the shared voice prompts must sit beside the checkout")
    waveform = data.load_audio(VOICE_PROMPTS / "en_woman.wav", 24000)[: 2 * 24000]
    return waveform, (VOICE_PROMPTS / "en_woman.txt").read_text(encoding="utf-8").strip()


@pytest.fixture(scope="session")
def parity_case(tiny) -> parity.ParityCase:
    return parity.demo_case(tiny)


@pytest.fixture(scope="session")
def parity_case_system(tiny_whisper) -> parity.ParityCase:
    return parity.demo_case(tiny_whisper, ref_in_system=True)


@pytest.fixture(scope="module")
def ref_audio(tmp_path_factory):
    """The first 1.2 s of a demo clip: a reference just over the minimum keeps the audio tokenizer's work small."""
    samples, rate = sf.read(DEMO_CLIP)
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    sf.write(path, samples[: int(1.2 * rate)], rate)
    return str(path)


@pytest.fixture(scope="session")  # read only, so one serves every module
def export(tmp_path_factory, tiny):
    """A tiny-preset export of a model trained with the reference in the system message (weights: the preset's)."""
    out = tmp_path_factory.mktemp("run") / "export"
    return checkpoints.export_model(tiny.model, config.TrainConfig(ref_in_system=True, device="cpu"), tiny, World(), out)


@pytest.fixture(scope="session")
def tiny_audio_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny audio tokenizer of seed 0 as a directory, for the package's serve engine, which loads one by path
    (an export of the tiny preset only points to it)."""
    folder = tmp_path_factory.mktemp("tiny_audio_tokenizer")
    model_utils.save_tiny_audio_tokenizer(folder, seed=0)
    return folder


def serve_engine(export, audio_tokenizer_dir) -> HiggsAudioServeEngine:
    """The package's serve engine on an export, offline (the teacher's configuration from the tokenizer's folder)."""
    teacher = HubertConfig.from_pretrained(audio_tokenizer_dir / "semantic_teacher")
    with model_utils._offline_semantic_teacher(teacher):
        return HiggsAudioServeEngine(str(export), str(audio_tokenizer_dir), device="cpu", torch_dtype=torch.float32,
                                     kv_cache_lengths=[512])


@pytest.fixture(scope="module")  # per module: align_serve_engine replaces its collator
def engine(export, tiny_audio_tokenizer_dir):
    return serve_engine(export, tiny_audio_tokenizer_dir)


@pytest.fixture(scope="module")
def limit_clips(tmp_path_factory):
    """Clips beyond the reference limits (one sample, 0.1 s, 31 s at 8 kHz) and a text file with an emoji-only line."""
    folder = tmp_path_factory.mktemp("clips")
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, 8000 * 31).astype(np.float32)
    for name, seconds in (("one-sample", 1 / 8000), ("tenth", 0.1), ("long", 31.0)):
        sf.write(folder / f"{name}.wav", noise[: max(1, int(seconds * 8000))], 8000)
    (folder / "lines.txt").write_text("Fine words.\n😀 🎉\n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.".encode("latin-1"))
    return folder


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory):
    """Two speakers (one English, one Arabic) with two utterances each, from the committed demo clips."""
    rows = [json.loads(line) for line in (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    keep = [row for row in rows if row["id"] in {"en_female_0", "en_female_1", "ar_male_0", "ar_male_2"}]
    for row in keep:
        row["audio"] = str(DEMO_DIR / row["audio"])
    path = tmp_path_factory.mktemp("manifest") / "small.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in keep), encoding="utf-8")
    return path


def train_config(tmp_path, manifest, **changes) -> config.TrainConfig:
    """A short fp32 CPU run on `manifest` without validation, writing `tmp_path/run`; `changes` override."""
    values = dict(train_manifest=str(manifest), val_manifest="", out_dir=str(tmp_path), run_name="run", device="cpu",
                  precision="fp32", batch_size=2, max_steps=4, save_every=100, warmup_steps=2)
    values.update(changes)
    return config.TrainConfig(**values)


def logged(run_dir, tag="loss/total") -> dict[int, float]:
    """A run's logged scalar `tag` by step."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


# Flags of a quick CPU run without validation, and train.main run in this process
QUICK_FLAGS = ["--val-manifest", "", "--device", "cpu", "--precision", "fp32", "--eval-every", "0", "--warmup-steps", "1"]


def run_main(*args: str) -> tuple[int, str, str]:
    """train.main in this process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train.main(list(args))
    return status, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """The `error:` lines and tracebacks of a command's stderr."""
    return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]


@pytest.fixture(scope="session")
def batches(tiny, parity_case):
    """The demo voice-cloning sample alone (left-padded by the model) and twice (right-padded)."""
    sample = lambda: data.build_sample(tiny.tokenizer, parity_case.ref_text, parity_case.ref_codes,  # noqa: E731
                                       parity_case.text, parity_case.target_codes)
    collator = collate.build_collator(tiny.model.config)
    return [collate.collate(collator, [sample() for _ in range(n)], 1024) for n in (1, 2)]


@pytest.fixture(scope="session")
def short_manifest(tmp_path_factory, small_manifest):
    """The small manifest with each clip cut to its first 1.05 s (a reference must last 1 s: data.LIMITS), for runs
    whose clips' encoding should cost little."""
    folder = tmp_path_factory.mktemp("short")
    rows = [json.loads(line) for line in small_manifest.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        waveform, rate = sf.read(row["audio"])
        row["audio"] = str(folder / f"{row['id']}.wav")
        sf.write(row["audio"], waveform[: int(1.05 * rate)], rate)
    path = folder / "short.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_clips(tmp_path_factory) -> dict[str, dict]:
    """Demo rows whose clips are cut to their first second (to keep encoding and ASR quick), by id."""
    folder = tmp_path_factory.mktemp("one_second")
    rows = {}
    for row in map(json.loads, (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()):
        waveform = data.load_audio(DEMO_DIR / row["audio"], 24000)[:24000]
        path = folder / f"{row['id']}.wav"
        sf.write(path, waveform, 24000)
        rows[row["id"]] = {**row, "audio": str(path)}
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def script_parser(script: str) -> Callable[[list[str]], object]:
    """The argument parsing of `script` (a path from the checkout's root), without running it: its
    `build_parser()`, else its `parse_args(argv)` (or `_parse_args`); train.py's flags are config's."""
    if script == "train.py":
        return config.build_parser().parse_args
    folder = str((ROOT / script).parent)  # a benchmark imports its neighbours, as when run from its folder
    sys.path[:0] = [] if folder in sys.path else [folder]
    module = importlib.import_module(Path(script).stem)
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args
    return getattr(module, "parse_args", None) or module._parse_args  # importers, prepare, segment: private


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(megabytes)`: a folder on a tmpfs of that size, a real disk that fills up (mounted as root,
    unmounted after the test); the test is skipped, saying why, where no tmpfs can be mounted."""
    mounted = []

    def mount(megabytes: float) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"a full disk needs a tmpfs, and mounting one failed (root only): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Fill the disk `folder` lies on, so that the next file written there fails with ENOSPC."""
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def scored_records(count: int, seed: int = 0) -> list[dict]:
    """`count` rows as `--eval` scores them (`metrics.row_record`: English, a real target), with values drawn at
    random: SIM 0.3-0.7, MOS 2.5-4.5, clips 1-3 s about 1.3 x their target's length, a transcript missing a word in
    one row of four, no failure but a run to the length limit in one row of eight."""
    import metrics

    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        seconds, transcript = float(rng.uniform(1, 3)), "said this" if index % 4 else "said"
        generated = metrics.ClipScores(seconds, float(rng.uniform(0.3, 0.7)), metrics.error_rate("Said this.", transcript, "en"),
                                       transcript, 0.05, float(rng.uniform(0, 0.3)), float(rng.uniform(2.5, 4.5)), -10.0)
        target = metrics.ClipScores(seconds / float(rng.uniform(1.1, 1.5)), float(rng.uniform(0.6, 0.9)), 0.0, "said this", 0.0, 0.1,
                                    4.0, -8.0)
        records.append(metrics.row_record(f"row{index}", "en", "Said this.", generated, index % 8 != 7, target, clamped=0))
    return records
