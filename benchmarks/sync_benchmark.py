"""Host syncs of one training step of the released layout, ours and the package's, per decoder layer: no GPU.

    python benchmarks/sync_benchmark.py [--layers 2] [--tokens 4096]

One step of one micro-batch (`--tokens` merged positions of synthetic
voice-cloning samples) of the released layout cut to `--layers` layers, for
scopes lora and audio, activation checkpointing off and on, runs as the
memory plan runs it (`memory_plan.FakeStep`: fake weights and activations,
the batch's index data real, the CUDA step's fused AdamW) under
`syncs.SyncCounter`: every data-dependent operator the GPU step would run,
attributed to ours or the package's and placed in its decoder layer. The
package's count per layer is the same in every layer, so it is extrapolated
to the released 28 layers. Copies between host and device are not seen on
the CPU; `python benchmarks/step_benchmark.py gpu` counts them on a GPU.

Prints what it counted, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from boson_multimodal.model.higgs_audio import HiggsAudioConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import syncs  # noqa: E402
from config import TrainConfig  # noqa: E402
from memory_plan import FakeStep, print_table, released_config, report, step_settings  # noqa: E402

RELEASED_LAYERS = 28


def planned_syncs(config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> dict:
    """`syncs.SyncCounter`'s summary of one fake step of one micro-batch of `config`."""
    step = FakeStep.build(config, settings, tokens, sample_tokens)
    counter = syncs.SyncCounter(step.model)
    step.run(counter)
    return counter.summary()


def sync_rows(layers: int, tokens: int) -> list[dict]:
    """`planned_syncs` of the released layout at `layers` layers: lora and audio, checkpointing off and on,
    with the package's count per layer and extrapolated to the released 28 layers."""
    rows = []
    for scope in ("lora", "audio"):
        for checkpoint in (False, True):
            summary = planned_syncs(released_config(layers), step_settings(scope=scope, grad_checkpoint=checkpoint), tokens)
            per_layer = summary["by_layer"].get("layer 0", {}).get(syncs.PACKAGE, 0)
            outside = summary["by_layer"].get("outside layers", {}).get(syncs.PACKAGE, 0)
            rows.append({"scope": scope, "grad_checkpoint": checkpoint, "layers": layers, "ours": summary[syncs.OURS],
                         "package": summary[syncs.PACKAGE], "package_per_layer": per_layer,
                         "package_outside_layers": outside, "package_at_28_layers": outside + RELEASED_LAYERS * per_layer,
                         "ours_sites": [site for site in summary["by_site"] if site.startswith(syncs.OURS)]})
            print_table(rows[-1:], list(rows[-1])[:-1])
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the released layout [2]")
    parser.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(sync_rows(args.layers, args.tokens), args.json)


if __name__ == "__main__":
    sys.exit(main())
