"""torch.compile on the training step: graphs and graph breaks of one compiled step, and recompiles over steps
of distinct lengths.

    python benchmarks/compile_benchmark.py graphs [--backend eager]   # per layer and whole model, settings off/on
    python benchmarks/compile_benchmark.py recompiles [--scope model] # 50 steps of distinct lengths, per dynamic setting

Both compile the tiny preset's layout (`memory_plan.build_training_model`,
`trainable.compile_model`), full scope, fp32, on the CPU, and train it with
`trainable.train_step` on synthetic voice-cloning batches
(`memory_plan.synthetic_batch`).

`graphs`: for `--compile-scope layers` and `model`, with and without
dynamo's data-dependent-shape settings, dynamo's frames, graphs and breaks
(with their reasons) of one step, and its loss and gradient norm against the
same step uncompiled, or the backend's error in one line.

`recompiles`: 50 steps whose lengths all differ, once per `dynamic` setting
(False, None, True); frames and graphs compiled and hits of dynamo's
recompile limit. The count is decided by dynamo's guards before any backend
runs, so it uses the `eager` backend, which skips inductor's code generation.

Prints what it measured, asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainable  # noqa: E402
from memory_plan import build_training_model, model_config, report, step_once, step_settings, synthetic_batch  # noqa: E402
from parallel import World  # noqa: E402


def compile_graphs(scope: str, data_dependent_shapes: bool, backend: str = "eager", tokens: int = 1024) -> dict:
    """Graphs and graph breaks of one training step of the tiny model compiled at `scope`
    (`trainable.compile_model`), with or without dynamo's data-dependent-shape settings (`--compile` sets
    them for `layers` only; without them is how the package compiled before); the loss and gradient norm
    against the same step uncompiled, or the backend's error in one line.

    The layers share their code, so dynamo compiles a layer's graphs once and every layer runs them:
    `graphs` is per layer for `layers`. Breaks are decided by dynamo before any backend runs, so `eager`
    counts what `inductor` compiles, without the code generation."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = model_config("tiny")
    settings = step_settings(scope="full", precision="fp32")
    batch, _ = synthetic_batch(config, tokens, tokens // 2)
    values = {}
    for compiled in (True, False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_training_model(config, replace(settings, compile=compiled, compile_scope=scope), "cpu", backend)
        started = time.perf_counter()
        try:
            with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=data_dependent_shapes,
                                            capture_scalar_outputs=data_dependent_shapes):
                stats = step_once(model, trainable.build_optimizer(model, settings, "cpu"), batch, settings)
        except Exception as error:  # a backend that cannot compile the graph: the row says so, the table goes on
            return {"scope": scope, "data_dependent_shapes": data_dependent_shapes, "backend": str(backend),
                    "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        values[compiled] = (stats.read(World()), time.perf_counter() - started)
    counters = torch._dynamo.utils.counters
    (compiled_values, compiled_seconds), (eager_values, eager_seconds) = values[True], values[False]
    return {"scope": scope, "data_dependent_shapes": data_dependent_shapes, "backend": str(backend),
            "frames": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": {reason.splitlines()[0][:120]: count for reason, count in counters["graph_break"].items()},
            "loss_difference": abs(compiled_values.losses["total"] - eager_values.losses["total"]),
            "grad_norm_difference": abs(compiled_values.grad_norm - eager_values.grad_norm),
            "first_step_s": compiled_seconds, "eager_step_s": eager_seconds}


def count_recompiles(dynamic: bool | None, steps: int = 50, seed: int = 0, backend: str = "eager",
                     scope: str = "layers") -> dict:
    """Compiles of the tiny model (`trainable.compile_model` at `scope`) over `steps` training steps whose lengths
    all differ.

    Whether a new length recompiles is decided by dynamo's guards, before any
    backend runs, so the count is the same for every backend; `eager` skips
    inductor's code generation, which takes minutes per graph on this CPU.
    """
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limit_hits = LimitHits()  # dynamo logs a hit of its recompile limit but keeps no counter of it
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    dynamo_log.addHandler(limit_hits)
    config = model_config("tiny")
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randperm(700, generator=generator)[:steps] + 100).tolist()
    settings = step_settings(scope="full", precision="fp32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_training_model(config, settings)
    trainable.compile_model(model, scope, backend, dynamic)
    optimizer = trainable.build_optimizer(model, settings, "cpu")
    started = time.perf_counter()
    for length in lengths:
        batch, _ = synthetic_batch(config, 2 * length, length)
        step_once(model, optimizer, batch, settings)
    dynamo_log.removeHandler(limit_hits)
    counters = torch._dynamo.utils.counters
    return {"scope": scope, "dynamic": str(dynamic), "steps": steps, "distinct_lengths": len(set(lengths)),
            "frames_compiled": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "recompile_limit_hits": limit_hits.count, "seconds": time.perf_counter() - started}


class LimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past it, that code runs uncompiled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "recompile_limit" in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compile_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    graphs = commands.add_parser("graphs", help="graphs and breaks of a compiled step: layers and whole model, before/after")
    graphs.add_argument("--backend", default="inductor", help="dynamo backend: inductor (what --compile uses) or eager [inductor]")
    recompiles = commands.add_parser("recompiles", help="torch.compile recompiles over 50 steps of distinct lengths, per dynamic setting")
    recompiles.add_argument("--scope", default="layers", choices=("layers", "model"), help="what is compiled [layers]")
    for sub in (graphs, recompiles):
        sub.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "graphs":
        rows = [compile_graphs(scope, shapes, args.backend) for scope in ("layers", "model") for shapes in (False, True)]
    else:
        rows = [count_recompiles(dynamic, scope=args.scope) for dynamic in (False, None, True)]
    return report(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
