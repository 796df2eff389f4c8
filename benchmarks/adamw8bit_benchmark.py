"""train.py's losses with torchao's 8-bit AdamW moments against fp32 ones, step by step.

    python benchmarks/adamw8bit_benchmark.py [--steps 200]

Runs `train.train` on the tiny preset and the committed demo data for
`--steps` steps (no validation, fp32, CPU), once with `--optimizer adamw`
and once with `--optimizer adamw8bit`, reads each run's logged total losses
back from its TensorBoard events, and prints the largest absolute and
relative gap, the step of the largest, and the mean of the last tenth of
each run's losses. The memory the 8-bit moments save is planned by
`python memory_plan.py plan-optimizer`.

Prints what it measured, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from config import TrainConfig  # noqa: E402
from memory_plan import report  # noqa: E402


def optimizer_losses(steps: int = 200) -> list[dict]:
    """`train.py` on the tiny preset and the demo data for `steps` steps (no validation), once with fp32 AdamW
    and once with torchao's AdamW8bit: the logged total losses, step by step, and their gap."""
    logged = {}
    with tempfile.TemporaryDirectory() as out:
        for optimizer in ("adamw", "adamw8bit"):
            settings = TrainConfig(max_steps=steps, optimizer=optimizer, val_manifest="", eval_every=0, save_every=steps,
                                   out_dir=out, run_name=optimizer, device="cpu", precision="fp32")
            events = EventAccumulator(str(train.train(settings) / "tensorboard"))
            events.Reload()
            logged[optimizer] = [event.value for event in events.Scalars("loss/total")]
    gaps = [abs(a - b) for a, b in zip(logged["adamw"], logged["adamw8bit"])]
    relative = [gap / abs(a) for gap, a in zip(gaps, logged["adamw"])]
    tail = max(1, steps // 10)
    return [{"steps": len(gaps), "max_abs_gap": max(gaps), "max_rel_gap": max(relative),
             "step_of_max_gap": 1 + gaps.index(max(gaps)), "first_loss": logged["adamw"][0],
             f"adamw_mean_last_{tail}": sum(logged["adamw"][-tail:]) / tail,
             f"adamw8bit_mean_last_{tail}": sum(logged["adamw8bit"][-tail:]) / tail,
             "adamw_losses": logged["adamw"], "adamw8bit_losses": logged["adamw8bit"]}]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamw8bit_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run [200]")
    parser.add_argument("--json", help="also write the rows (with every loss) to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(optimizer_losses(args.steps), args.json)


if __name__ == "__main__":
    sys.exit(main())
