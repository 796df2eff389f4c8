"""The forgetting guard's effect and cost, and a mixture's draw shares.

    python benchmarks/forgetting_benchmark.py [--parts shares effect time memory] [--steps 30]
                                              [--weights 0 1 10 100] [--time-steps 8] [--plan-tokens 4096] [--draws 10000]

Effect: the tiny preset adapted with LoRA (rank 4, lr 0.05, no warm-up) to
the demo's Arabic speakers (6 clips, 6 pairs, 3 per micro-batch) for
--steps steps, once per --kl-weight, with English (6 clips, 6 pairs) held
back. At the end it prints, on each language, the loss and KL(base ||
adapted) of the audio-token distributions (`trainable.forgetting_kl`, the
term the guard adds), evaluated without dropout.

Cost: the step time of `trainable.train_step` with and without the guard's
base pass on this CPU (the tiny preset on the demo's Arabic micro-batch, and
the 164M-parameter mid-size model of `memory_plan.mid_config` at 2048 tokens;
LoRA, fp32; the median of --time-steps steps after one untimed, the two
models taking turns step by step so that a drifting load slows both), and the
planned peak memory of a step of the released layout (LoRA, bf16, fused
AdamW, --plan-tokens tokens, with and without activation checkpointing;
`memory_plan.plan_step`, fake tensors, no GPU).

Shares: --draws draws of `loader.next_set` for a three-set mixture, each
set's share against its weight, and the largest gap between a set's count
and weight x draws over every prefix; the same gap over 200 random
mixtures of 2-6 sets.

Prints what it measured, asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import collate  # noqa: E402
import loader  # noqa: E402
import manifest  # noqa: E402
import memory_plan  # noqa: E402
import model_utils  # noqa: E402
import trainable  # noqa: E402
from codes import EncodedClips  # noqa: E402
from config import TrainConfig  # noqa: E402
from parallel import World  # noqa: E402

DEMO = ROOT / "demo" / "data"
PARTS = ("shares", "effect", "time", "memory")


def language_batches(bundle: model_utils.Bundle, folder: Path) -> dict[str, list]:
    """The demo's pairs of each language in micro-batches of 3."""
    rows = [json.loads(line) for line in (DEMO / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    codes = EncodedClips(bundle.audio_tokenizer)
    builder = loader.BatchBuilder(bundle, TrainConfig(device="cpu"), codes)
    batches = {}
    for language in ("ar", "en"):
        path = folder / f"{language}.jsonl"
        path.write_text("".join(json.dumps(dict(row, audio=str(DEMO / row["audio"])), ensure_ascii=False) + "\n"
                                for row in rows if row["language"] == language), encoding="utf-8")
        pairs = manifest.training_pairs(manifest.check_manifest(path, codes).kept, 0, 0)[0]
        batches[language] = [builder.batch(pairs[start : start + 3]) for start in range(0, len(pairs), 3)]
    return batches


def loss_and_kl(model, batches: list) -> tuple[float, float]:
    """Mean loss and KL(base || adapted) over `batches`, in eval mode."""
    model.eval()
    losses, divergences = [], []
    with torch.no_grad():
        for batch in batches:
            inputs = collate.batch_to_model_inputs(batch, "cpu")
            outputs = model(**inputs)
            losses.append(float(model_utils.compute_loss(outputs, batch.label_audio_ids).total))
            divergences.append(float(trainable.forgetting_kl(model, inputs, outputs.audio_logits, batch.label_audio_ids)))
    model.train()
    return statistics.mean(losses), statistics.mean(divergences)


def lora_model(base: torch.nn.Module, settings: TrainConfig) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return trainable.prepare_model(copy.deepcopy(base), settings, World()).train()


def effect(bundle: model_utils.Bundle, batches: dict[str, list], weights: list[float], steps: int) -> None:
    print(f"\n== effect: LoRA on Arabic for {steps} steps, English held back (tiny preset) ==")
    print(f"{'kl_weight':>9}  {'ar loss':>8}  {'ar KL':>8}  {'en loss':>8}  {'en KL':>8}  {'s/step':>7}")
    untrained = lora_model(bundle.model, TrainConfig(device="cpu", scope="lora", lora_rank=4))
    (ar_loss, ar_kl), (en_loss, en_kl) = loss_and_kl(untrained, batches["ar"]), loss_and_kl(untrained, batches["en"])
    print(f"{'(start)':>9}  {ar_loss:8.4f}  {ar_kl:8.5f}  {en_loss:8.4f}  {en_kl:8.5f}")
    for weight in weights:
        settings = TrainConfig(device="cpu", precision="fp32", scope="lora", lora_rank=4, lr=0.05, warmup_steps=0,
                               kl_weight=weight, max_steps=steps)
        model = lora_model(bundle.model, settings)
        optimizer = trainable.build_optimizer(model, settings, "cpu")
        started = time.perf_counter()
        for step in range(steps):
            lr = trainable.lr_at(step, settings, steps)
            trainable.train_step(model, optimizer, [batches["ar"][step % len(batches["ar"])]], settings, World(), lr)
        seconds = (time.perf_counter() - started) / steps
        (ar_loss, ar_kl), (en_loss, en_kl) = loss_and_kl(model, batches["ar"]), loss_and_kl(model, batches["en"])
        print(f"{weight:9g}  {ar_loss:8.4f}  {ar_kl:8.5f}  {en_loss:8.4f}  {en_kl:8.5f}  {seconds:7.3f}")


def alternating_step_seconds(models: dict[float, torch.nn.Module], batch, settings: dict[float, TrainConfig],
                             count: int) -> dict[float, float]:
    """Median seconds of a training step of each model on `batch`, the models taking turns step by step (after
    one untimed step each), so that a machine whose load drifts slows both alike."""
    optimizers = {weight: trainable.build_optimizer(model, settings[weight], "cpu") for weight, model in models.items()}
    times = {weight: [] for weight in models}
    for round_ in range(count + 1):
        for weight, model in models.items():
            started = time.perf_counter()
            trainable.train_step(model, optimizers[weight], [batch], settings[weight], World(), settings[weight].lr)
            if round_:
                times[weight].append(time.perf_counter() - started)
    return {weight: statistics.median(seconds) for weight, seconds in times.items()}


def step_time(bundle: model_utils.Bundle, batches: dict[str, list], count: int) -> None:
    print(f"\n== cost: step time on this CPU (LoRA, fp32; median of {count} steps, with and without taking turns) ==")
    settings = {weight: memory_plan.step_settings(scope="lora", precision="fp32", kl_weight=weight, warmup_steps=0)
                for weight in (0.0, 1.0)}
    tiny = {weight: lora_model(bundle.model, settings[weight]) for weight in settings}
    mid_config = memory_plan.mid_config()
    mid = {weight: memory_plan.build_training_model(mid_config, settings[weight]) for weight in settings}
    for name, models, batch in (("tiny preset, 3 Arabic pairs", tiny, batches["ar"][0]),
                                ("mid 164M, 2048 tokens", mid, memory_plan.synthetic_batch(mid_config, 2048)[0])):
        seconds = alternating_step_seconds(models, batch, settings, count)
        print(f"{name}: {seconds[0.0]:.3f} s without the guard, {seconds[1.0]:.3f} s with it "
              f"(x{seconds[1.0] / seconds[0.0]:.2f})")


def planned_memory(tokens: int) -> None:
    print(f"\n== cost: planned peak memory, released layout, LoRA, bf16, {tokens} tokens (GiB) ==")
    for checkpointing in (False, True):
        plain = memory_plan.step_settings(scope="lora", grad_checkpoint=checkpointing)
        peaks = {weight: memory_plan.plan_step(memory_plan.released_config(), replace(plain, kl_weight=weight), tokens).peak_gib
                 for weight in (0.0, 1.0)}
        print(f"grad_checkpoint {'on ' if checkpointing else 'off'}: {peaks[0.0]:.2f} without the guard, {peaks[1.0]:.2f} "
              f"with it (+{peaks[1.0] - peaks[0.0]:.2f}, +{100 * (peaks[1.0] / peaks[0.0] - 1):.1f}%)")


def draw(weights: list[float], draws: int) -> tuple[list[int], float]:
    """Counts of `draws` draws, and the largest |count - weight x draws| of any set over every prefix."""
    drawn, worst = [0] * len(weights), 0.0
    for count in range(1, draws + 1):
        drawn[loader.next_set(weights, drawn)] += 1
        worst = max(worst, max(abs(n - count * weight) for n, weight in zip(drawn, weights)))
    return drawn, worst


def draw_shares(draws: int) -> None:
    weights = {"vi": 0.7, "en": 0.2, "zh": 0.1}
    print(f"\n== draw shares: {draws} draws, weights {weights} ==")
    drawn, worst = draw(list(weights.values()), draws)
    print(", ".join(f"{name} {n / draws:.4f}" for name, n in zip(weights, drawn))
          + f"; largest |count - weight x draws| over every prefix: {worst:.3f} micro-batches")
    generator = random.Random(0)
    mixtures = [[generator.random() + 0.01 for _ in range(generator.randint(2, 6))] for _ in range(200)]
    worst = max(draw([weight / sum(mixture) for weight in mixture], 2000)[1] for mixture in mixtures)
    print(f"200 random mixtures of 2-6 sets, 2000 draws each: largest gap over every prefix {worst:.3f} micro-batches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetting_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help=f"what to measure [{' '.join(PARTS)}]")
    parser.add_argument("--steps", type=int, default=30, help="adaptation steps per --kl-weight [30]")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 10.0, 100.0], help="[0 1 10 100]")
    parser.add_argument("--time-steps", type=int, default=8, help="timed steps per case [8]")
    parser.add_argument("--plan-tokens", type=int, default=4096, help="micro-batch of the memory plan [4096]")
    parser.add_argument("--draws", type=int, default=10000, help="[10000]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "shares" in args.parts:
        draw_shares(args.draws)
    if {"effect", "time"} & set(args.parts):
        bundle = model_utils.load_bundle(model_utils.TINY_PRESET)
        with tempfile.TemporaryDirectory() as folder:
            batches = language_batches(bundle, Path(folder))
        if "effect" in args.parts:
            effect(bundle, batches, args.weights, args.steps)
        if "time" in args.parts:
            step_time(bundle, batches, args.time_steps)
    if "memory" in args.parts:
        planned_memory(args.plan_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
