"""Where `python infer.py --eval` spends its time: wall time and a breakdown, on a 3-row manifest of real speech.

    python benchmarks/eval_benchmark.py                       # this checkout
    python benchmarks/eval_benchmark.py --repo /tmp/start     # another checkout (e.g. `git archive START`)
    python benchmarks/eval_benchmark.py -- --batch-size 3     # extra infer.py flags after --
    python benchmarks/eval_benchmark.py --codes-cache         # references read from a prepared cache
    python benchmarks/eval_benchmark.py --voice-prompts DIR   # the shared voice prompts elsewhere

The manifest pairs three English recordings of the shared voice prompts
(../shared/data/voice_prompts; each row clones one speaker's text from
another's voice) and is scored with the offline default judge (resemblyzer, pocketsphinx). The breakdown wraps
the functions that do the work, in whichever thread calls them, and adds up
their wall time; a function that runs inside another (encoding inside
validation) is counted in both, and work in the scoring thread overlaps
generation, so the lines may add up to more than the wall time. It runs the
eval twice into fresh directories: the second run shows what the on-disk
score cache and reference-code cache save (a checkout without them redoes everything).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import importlib
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import voice_prompts

# (reference, target): each row speaks the target's text in the reference's voice.
ROWS = (("en_woman", "en_man"), ("chadwick", "belinda"), ("en_man", "vex"))
# (label, module, attribute path): what the breakdown times, where it exists in the checkout.
TIMED = (
    ("load model and tokenizers", "model_utils", "load_bundle"),
    ("load the judge's models", "metrics", "build_judge"),
    ("validate the manifest", "manifest", "check_manifest"),
    ("encode clips (audio tokenizer)", "data", "encode_clip"),
    ("speaker embeddings", "metrics", "ResemblyzerEncoder.embed"),
    ("ASR (pocketsphinx)", "metrics", "PocketsphinxTranscriber.transcribe"),
    ("generation, batch of 1 (package generate)", "generation", "generate"),
    ("generation, batched (our loop)", "batched_generation", "generate_batch"),
    ("decoding (audio tokenizer)", "generation", "decode_codes"),
    ("the whole --eval", "evaluate", "evaluate_manifest"),
    ("the whole --eval", "evaluate", "evaluate_list"),
)


def write_manifest(folder: Path, prompts: Path) -> Path:
    lines = []
    for reference, target in ROWS:
        lines.append(json.dumps({
            "id": f"{target}_as_{reference}", "ref_audio": str(prompts / f"{reference}.wav"),
            "ref_text": (prompts / f"{reference}.txt").read_text(encoding="utf-8").strip(),
            "audio": str(prompts / f"{target}.wav"),
            "text": (prompts / f"{target}.txt").read_text(encoding="utf-8").strip(), "language": "en",
        }))
    path = folder / "three.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare_references(folder: Path, prompts: Path) -> str:
    """A code cache of the manifest's references (`python prepare.py` on them), as a user prepares a held-out set once."""
    import prepare

    lines = [json.dumps({"id": reference, "audio": str(prompts / f"{reference}.wav"), "speaker": "all",
                         "text": (prompts / f"{reference}.txt").read_text(encoding="utf-8").strip()})
             for reference in sorted({reference for reference, _ in ROWS})]
    (folder / "references.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    started = time.perf_counter()
    assert prepare.main(["--manifest", str(folder / "references.jsonl"), "--out", str(folder / "codes")]) == 0
    print(f"prepared the references' codes in {time.perf_counter() - started:.1f} s (once, before the runs)")
    return str(folder / "codes")


def wrap_timed(totals: dict[str, float], counts: dict[str, int]) -> list[str]:
    """Wrap each TIMED function that exists; returns the labels wrapped."""
    lock, wrapped = threading.Lock(), []
    for label, module_name, attribute in TIMED:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            continue
        original = getattr(owner, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                with lock:
                    totals[_label] += time.perf_counter() - started
                    counts[_label] += 1

        setattr(owner, name, functools.wraps(original)(timed))
        wrapped.append(label)
    decode_label = "decoding (audio tokenizer)"
    if decode_label not in wrapped:  # a checkout without generation.decode_codes decodes inside clone
        from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

        original = HiggsAudioTokenizer.decode

        def timed_decode(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                with lock:
                    totals[decode_label] += time.perf_counter() - started
                    counts[decode_label] += 1

        HiggsAudioTokenizer.decode = timed_decode
        wrapped.append(decode_label)
    return wrapped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure [this one]")
    parser.add_argument("--runs", type=int, default=2, help="eval runs, each into a fresh directory [2]")
    parser.add_argument("--codes-cache", action="store_true",
                        help="prepare the references' codes first (timed apart) and pass --codes-cache")
    parser.add_argument("extra", nargs="*", help="more infer.py flags (after --)")
    voice_prompts.add_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = voice_prompts.folder(args)
    sys.path.insert(0, args.repo)
    import infer

    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    wrapped = wrap_timed(totals, counts)
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_manifest(Path(folder), prompts)
        cache = Path(folder) / "score-cache"
        extra = list(args.extra)
        if args.codes_cache:
            extra += ["--codes-cache", prepare_references(Path(folder), prompts)]
        for run in range(1, args.runs + 1):
            totals.clear()
            counts.clear()
            flags = ["--eval", str(manifest), "--out", str(Path(folder) / f"eval{run}"), "--model", "tiny", "--seed", "0"]
            if _has_flag(infer, "--score-cache"):
                flags += ["--score-cache", str(cache)]
            if _has_flag(infer, "--ref-codes-cache"):  # the references' codes, kept for the second run
                flags += ["--ref-codes-cache", str(Path(folder) / "reference-codes")]
            started = time.perf_counter()
            status = infer.main(flags + extra)
            wall = time.perf_counter() - started
            print(f"\nrun {run} of {args.repo}: exit status {status}, wall {wall:.1f} s")
            for label in wrapped:
                print(f"  {label:<44}{totals[label]:>8.1f} s  ({counts[label]} calls)")
    return 0


def _has_flag(infer, flag: str) -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            infer.parse_args([flag, "x"])
    except SystemExit:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
