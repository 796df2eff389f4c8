"""Speed of the training step train.py runs: tokens/s, step time, peak memory and MFU, against a
transformers.Trainer loop over the same model and batches; and the GPU check.

    python benchmarks/step_benchmark.py run [--device cuda] [--no-trainer]   # every case of the device
    python benchmarks/step_benchmark.py run --device cpu --cases "tiny eager fp32"
    python benchmarks/step_benchmark.py gpu                                   # the GPU check: one call, <= 8 min on one H100/H200
    python benchmarks/step_benchmark.py gpu --device cpu --model tiny --tokens 256 --steps 1 --warmup 0 --compile-backend eager

`run` times `trainable.train_step` (`our_loop`) on a synthetic voice-cloning
batch (`memory_plan.synthetic_batch`) of randomly initialised models
(`memory_plan.build_training_model`): on the CPU the tiny preset, eager and
compiled, fp32 and bf16, and the released width and vocabulary cut to 2
layers; on a GPU the released layout, scopes x checkpointing x 2k/4k/8k
tokens. Each case is timed again as a `transformers.Trainer` loop with a
`compute_loss` override (how the public scripts for this model train). Step
time is the median after warm-up; MFU counts the real layout's FLOPs
(`step_flops`) against the card's bf16 dense data-sheet peak, or on the CPU
a measured 1024^3 matmul.

`gpu` is the GPU check: the released layout, bf16, checkpointing, 4,096
tokens, scopes lora and audio, compile off and on; per case the step time,
tokens/s, MFU, peak `max_memory_allocated` beside the memory plan of the
same step (`memory_plan.plan_step`), and, compile off, the host syncs of one
step (ours and the package's) and the Trainer loop's step time. It writes
gpu_check.json.

Prints what it measured, asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import collate  # noqa: E402
import model_utils  # noqa: E402
import syncs  # noqa: E402
import trainable  # noqa: E402
from config import TrainConfig  # noqa: E402
from memory_plan import (GIB, build_training_model, model_config, plan_step, print_table, report, step_once,  # noqa: E402
                         step_settings, synthetic_batch)
from parallel import World  # noqa: E402

# --------------------------------------------------------------------------
# FLOPs of the real layout
# --------------------------------------------------------------------------


def step_flops(config, batch, lengths: list[int], settings: TrainConfig, trained_fraction: float) -> float:
    """Model FLOPs of one training step, counted for the real layout on real (unpadded) positions.

    Per layer: q/k/v/o projections for every position; causal attention
    (2 L^2 d per sample); the text MLP on every position that is not an
    audio-out column and the audio MLP on the audio-out columns (the dual
    FFN routes each position to one of them). Heads: the text head at every
    position (`--text-logits all`) or at the labelled ones, the audio head on
    the audio-out columns. Backward: twice the forward for input gradients,
    plus the weight gradients of the trained fraction of the weights.
    Activation recomputation is not counted (the usual MFU convention).
    """
    text = config.text_config
    hidden, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    positions = sum(lengths)
    audio = batch.audio_out_ids.shape[1]
    projections = 2 * hidden * (2 * heads * head_dim + 2 * kv * head_dim) * positions
    attention = sum(2 * length * length * heads * head_dim for length in lengths)
    mlps = 2 * 3 * hidden * (text.intermediate_size * (positions - audio) + config.audio_ffn_intermediate_size * audio)
    text_rows = collate.text_label_count(batch, config) if settings.text_logits == "labelled" else positions
    heads_flops = 2 * hidden * (text.vocab_size * text_rows + config.audio_num_codebooks * (config.audio_codebook_size + 2) * audio)
    matmuls = text.num_hidden_layers * (projections + mlps) + heads_flops
    forward = matmuls + text.num_hidden_layers * attention
    return forward + 2 * forward + trained_fraction * matmuls


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """Dense peak of the device: a data-sheet figure on CUDA, a measured large matmul on the CPU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 dense data sheet"
        raise ValueError(f"no peak FLOPs known for {name}; add it to PEAK_TFLOPS")
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a
    started = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - started), f"measured 1024^3 {dtype} matmul on this CPU"


# --------------------------------------------------------------------------
# Our loop and a transformers.Trainer loop
# --------------------------------------------------------------------------


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def our_loop(model, steps: list[list], settings: TrainConfig, device: str, warmup: int) -> tuple[list[float], list[float]]:
    """Step times of `trainable.train_step` over `steps`, each a step's micro-batches, at train.py's learning
    rate schedule (the first `warmup` not timed); and each step's total loss, read once the last step is
    timed so that reading waits for nothing inside the times."""
    optimizer = trainable.build_optimizer(model, settings, device)
    times, stats = [], []
    for index, micro_batches in enumerate(steps):
        _synchronize(device)
        started = time.perf_counter()
        lr = trainable.lr_at(index, settings, settings.max_steps)
        stats.append(trainable.train_step(model, optimizer, micro_batches, settings, World(device=device), lr))
        _synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times, [step_stats.read(World()).losses["total"] for step_stats in stats]


def trainer_loop(model, steps: list[list], settings: TrainConfig, device: str, warmup: int) -> list[float]:
    """Step times of a `transformers.Trainer` over the same model and batches, the way the public scripts
    for this model train: `Trainer` with its own optimizer, loop, autocast and a `compute_loss` override."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(steps)

        def __getitem__(self, index):
            (batch,) = steps[index]
            return {**collate.batch_to_model_inputs(batch, device), "label_audio_ids": batch.label_audio_ids.to(device)}

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            label_audio_ids = inputs.pop("label_audio_ids")
            outputs = model(**inputs, label_audio_ids=label_audio_ids)
            loss = model_utils.compute_loss(outputs, label_audio_ids).total
            return (loss, outputs) if return_outputs else loss

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, max_steps=len(steps), per_device_train_batch_size=1, learning_rate=1e-5,
            bf16=settings.precision == "bf16", use_cpu=not device.startswith("cuda"), report_to=[], save_strategy="no",
            logging_strategy="no", dataloader_pin_memory=False, remove_unused_columns=False, max_grad_norm=0.0,
            optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch", disable_tqdm=True,
        )
        trainer = LossTrainer(model=model, args=arguments, train_dataset=Batches(), data_collator=lambda items: items[0],
                              callbacks=[timer])
        trainer.train()
    return timer.times[warmup:]


def step_syncs(model: torch.nn.Module, batch, settings: TrainConfig, device: str) -> dict:
    """Host syncs of one `trainable.train_step` of one micro-batch, counted on the device it runs on, with a
    fresh optimizer of the CUDA step (fused AdamW, which runs on the CPU too); compiled layers run eagerly
    under the counter."""
    optimizer = trainable.build_optimizer(model, settings, "cuda")
    with syncs.SyncCounter(model, device) as counter:
        step_once(model, optimizer, batch, settings, device)
    summary = counter.summary()
    return {"syncs_ours": summary[syncs.OURS], "syncs_package": summary[syncs.PACKAGE],
            "syncs_ours_sites": [site for site in summary["by_site"] if site.startswith(syncs.OURS)]}


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


@dataclass
class RunCase:
    name: str
    model: str
    layers: int | None
    settings: TrainConfig
    tokens: int
    steps: int = 6
    warmup: int = 2
    trainer: bool = True
    count_syncs: bool = False


def run_case(case: RunCase, device: str, trainer: bool, compile_backend: str = "inductor") -> dict:
    """Tokens/s, step time, peak memory and MFU of `case`, its host syncs if asked, and a `transformers.Trainer`
    loop's step time if asked."""
    config = model_config(case.model, case.layers)
    batch, lengths = synthetic_batch(config, case.tokens)
    if device.startswith("cuda"):
        batch = collate.pinned(batch)  # as the loader hands train.py its batches
    steps = [[batch]] * (case.warmup + case.steps)
    dtype = torch.bfloat16 if case.settings.precision == "bf16" else torch.float32
    peak, peak_source = peak_flops(device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_training_model(config, case.settings, device, compile_backend)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    matrix = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    flops = step_flops(config, batch, lengths, case.settings, min(1.0, trained / matrix))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, _ = our_loop(model, steps, case.settings, device, case.warmup)
    step_time = sorted(times)[len(times) // 2]
    row = {"case": case.name, "device": device if device == "cpu" else torch.cuda.get_device_name(), "scope": case.settings.scope,
           "precision": case.settings.precision, "compile": case.settings.compile,
           "grad_checkpoint": case.settings.grad_checkpoint, "tokens": sum(lengths), "step_s": step_time,
           "tokens_per_s": sum(lengths) / step_time, "peak_memory_gib": _peak_memory_gib(device),
           "peak_memory_kind": "max_memory_allocated" if device.startswith("cuda") else "process peak RSS",
           "mfu_pct": 100 * flops / step_time / peak, "peak_flops_source": peak_source, "step_tflop": flops / 1e12}
    if case.count_syncs:
        row.update(step_syncs(model, batch, case.settings, device))
    del model  # the Trainer's copy must not share the card with ours
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if trainer and case.trainer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reference = build_training_model(config, case.settings, device, compile_backend)
        trainer_time = sorted(trainer_loop(reference, steps, case.settings, device, case.warmup))
        row["trainer_step_s"] = trainer_time[len(trainer_time) // 2]
        row["speedup_vs_trainer"] = row["trainer_step_s"] / step_time
    return row


def cpu_cases() -> list[RunCase]:
    """(a) the tiny preset, eager and compiled, fp32 and bf16, each against a Trainer loop; (b) the released layout
    (full width and vocabulary) at 2 layers, fp32, LoRA with checkpointing, eager and compiled, one timed step
    each (minutes on 2 cores)."""
    released = step_settings(scope="lora", precision="fp32", grad_checkpoint=True)
    return [
        RunCase("tiny eager fp32", "tiny", None, step_settings(scope="full", precision="fp32"), 2048, steps=4),
        RunCase("tiny compile fp32", "tiny", None, step_settings(scope="full", precision="fp32", compile=True), 2048, steps=4),
        RunCase("tiny eager bf16", "tiny", None, step_settings(scope="full", precision="bf16"), 2048, steps=4),
        RunCase("released x2 layers lora fp32", "released", 2, released, 1024, steps=2, warmup=1, trainer=False),
        RunCase("released x2 layers lora fp32 compile", "released", 2, replace(released, compile=True), 1024, steps=2,
                warmup=1, trainer=False),
    ]


def gpu_cases() -> list[RunCase]:
    """(c) the released layout, random weights, bf16: scopes x checkpointing x 2k/4k/8k tokens."""
    return [RunCase(f"released {scope} ckpt={checkpoint} {tokens}", "released", None,
                    step_settings(scope=scope, grad_checkpoint=checkpoint), tokens, steps=5, warmup=2)
            for scope in ("lora", "audio", "full") for checkpoint in (True, False) for tokens in (2048, 4096, 8192)]


RUN_COLUMNS = ["case", "device", "tokens", "step_s", "tokens_per_s", "peak_memory_gib", "mfu_pct", "trainer_step_s",
               "speedup_vs_trainer"]
GPU_CHECK_COLUMNS = ["case", "device", "tokens", "step_s", "tokens_per_s", "mfu_pct", "peak_memory_gib", "planned_gib",
                     "syncs_ours", "syncs_package", "trainer_step_s", "speedup_vs_trainer", "seconds"]


def run_cases(device: str, names: set[str], trainer: bool) -> list[dict]:
    """Every case of `device` (or those named), each printed as it ends; one out of memory is a row, not the end."""
    rows = []
    for case in gpu_cases() if device.startswith("cuda") else cpu_cases():
        if not names or case.name in names:
            try:
                rows.append(run_case(case, device, trainer))
            except torch.OutOfMemoryError:  # e.g. full fine-tuning of 5.8B on one card
                rows.append({"case": case.name, "device": device, "step_s": "out of memory"})
                torch.cuda.empty_cache()
            print_table(rows[-1:], list(rows[-1]))
    return rows


def gpu_check(device: str, model: str = "released", tokens: int = 4096, steps: int = 5, warmup: int = 2,
              compile_backend: str = "inductor") -> list[dict]:
    """The released layout with random weights, bf16, checkpointing, `tokens` per micro-batch: scopes lora and
    audio, compile off and on. Per case: step time, tokens/s, MFU of the real layout's FLOPs, peak
    `max_memory_allocated` against the plan of the same step, and, compile off, the host syncs of one step
    (ours and the package's) and the `transformers.Trainer` loop's step time. On the CPU (`model="tiny"`,
    `compile_backend="eager"`) the same code runs in seconds (tests/test_benchmarks.py)."""
    import torch._dynamo

    rows = []
    for scope in ("lora", "audio"):
        settings = step_settings(scope=scope, precision="bf16", grad_checkpoint=True)
        planned = plan_step(model_config(model), settings, tokens).peak_gib
        for compiled in (False, True):
            started = time.perf_counter()
            case = RunCase(f"{model} {scope} {'compile' if compiled else 'eager'}", model, None,
                           replace(settings, compile=compiled), tokens, steps=steps, warmup=warmup,
                           trainer=not compiled, count_syncs=not compiled)
            row = run_case(case, device, trainer=True, compile_backend=compile_backend)
            rows.append({**row, "planned_gib": planned, "seconds": time.perf_counter() - started})
            print_table(rows[-1:], GPU_CHECK_COLUMNS)
            if compiled:
                torch._dynamo.reset()  # the next model's layers compile afresh
    return rows


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="step_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="tokens/s, step time, peak memory, MFU; our loop vs a transformers.Trainer loop")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="[cuda if present, else cpu]")
    run.add_argument("--cases", default="", help="comma-separated case names to run [all of the device's]")
    run.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                     help="also time a transformers.Trainer loop over the same model and batches [on]")
    run.add_argument("--json", help="also write the rows to this JSON file")
    gpu = commands.add_parser("gpu", help="the GPU check: released layout, lora/audio at 4k tokens, compile off/on (<= 8 min on an H100)")
    gpu.add_argument("--device", default="cuda", help="[cuda]; cpu with --model tiny runs the same code in seconds")
    gpu.add_argument("--model", default="released", help="released or tiny [released]")
    gpu.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    gpu.add_argument("--steps", type=int, default=5, help="timed steps per case [5]")
    gpu.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles) [2]")
    gpu.add_argument("--compile-backend", default="inductor", help="dynamo backend of the compiled cases [inductor]")
    gpu.add_argument("--json", default="gpu_check.json", help="also write the rows to this JSON file [gpu_check.json]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return report(run_cases(args.device, set(filter(None, args.cases.split(","))), args.trainer), args.json, RUN_COLUMNS)
    started = time.perf_counter()
    rows = gpu_check(args.device, args.model, args.tokens, args.steps, args.warmup, args.compile_backend)
    print(f"\nGPU check: {time.perf_counter() - started:.0f} s in all")
    return report(rows, args.json, GPU_CHECK_COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
