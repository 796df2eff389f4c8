"""The training loop: fine-tune Higgs Audio v2 for zero-shot voice cloning.

    python train.py                                   # tiny preset on the committed demo data (CPU, ~1 min)
    python train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --scope audio

Read top to bottom: configuration, data, model, optimizer and schedule, the
step, logging, checkpointing. Samples come from `data.build_sample` (the one
builder inference uses too), batches from `collate.build_collator`, the loss
from `model_utils.compute_loss`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import collate
import data
import model_utils

ROOT = Path(__file__).resolve().parent
DEMO_MANIFEST = ROOT / "demo" / "data" / "manifest.jsonl"


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass
class TrainConfig:
    # data
    train_manifest: str = str(DEMO_MANIFEST)
    ref_in_system: bool = False
    # model
    model: str = model_utils.TINY_PRESET
    audio_tokenizer: str | None = None
    scope: str = "full"  # full | audio
    # run
    out_dir: str = "runs"
    run_name: str | None = None
    resume: bool = False
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    precision: str = "bf16" if torch.cuda.is_available() else "fp32"  # bf16 autocast on CUDA, or fp32
    compile: bool = False
    grad_checkpoint: bool = False
    # optimisation
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int = 60
    stop_after: int = 0  # 0 = run to max_steps
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # logging and checkpoints
    log_every: int = 1
    save_every: int = 20
    keep_last: int = 2
    max_bad_steps: int = 5


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags override an optional JSON/YAML `--config` file, which overrides the defaults."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file of TrainConfig fields; flags override it")
    helps = {
        "train_manifest": "JSONL manifest (speaker-grouped or paired rows) [the demo]",
        "ref_in_system": "put the reference in the system message instead of an assistant turn",
        "model": "model directory or preset (tiny, tiny-whisper)",
        "audio_tokenizer": "audio tokenizer directory; required with a model directory",
        "scope": "what is trained: full (every parameter) or audio (audio FFNs, codebook embeddings, audio head)",
        "out_dir": "where runs are written", "run_name": "run folder name [timestamp]",
        "resume": "continue the newest checkpoint of --run-name", "seed": "seed of everything",
        "device": "torch device", "precision": "bf16 (autocast on CUDA, fp32 master weights) or fp32",
        "compile": "torch.compile the decoder layers", "grad_checkpoint": "recompute decoder layers in backward",
        "batch_size": "samples per micro-batch", "grad_accum": "micro-batches per optimizer step",
        "max_steps": "optimizer steps (the schedule's length)",
        "stop_after": "stop (with a checkpoint) after this many steps of the schedule, 0 = never", "lr": "peak learning rate", "min_lr_ratio": "cosine floor as a fraction of lr",
        "warmup_steps": "linear warmup steps", "weight_decay": "AdamW decay (matrices only)",
        "grad_clip": "max gradient norm (0 = off)", "log_every": "steps between log lines",
        "save_every": "steps between checkpoints", "keep_last": "checkpoints kept",
        "max_bad_steps": "consecutive non-finite losses that stop the run",
    }
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps[name])
        else:
            kind = type(value) if value is not None else str
            parser.add_argument(flag, type=kind, default=None, help=f"{helps[name]} [{value}]")
    args = parser.parse_args(argv)
    values = asdict(defaults)
    if args.config:
        values.update(_read_config_file(args.config))
    values.update({key: value for key, value in vars(args).items() if key != "config" and value is not None})
    config = TrainConfig(**values)
    if config.scope not in ("full", "audio"):
        parser.error(f"--scope must be full or audio, not {config.scope}")
    if config.precision not in ("bf16", "fp32"):
        parser.error(f"--precision must be bf16 or fp32, not {config.precision}")
    return config


def _read_config_file(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    unknown = set(values) - set(asdict(TrainConfig()))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
    return values


# --------------------------------------------------------------------------
# Model pieces: what is trained, activation checkpointing, compile
# --------------------------------------------------------------------------

AUDIO_PARAMETER_MARKERS = ("audio_mlp", "audio_post_attention_layernorm", "audio_input_layernorm",
                           "audio_codebook_embeddings", "audio_decoder_proj.audio_lm_head")


def select_trainable(model: torch.nn.Module, scope: str) -> list[str]:
    """Freeze what `scope` leaves alone; returns the names of the trained parameters."""
    trained = []
    for name, parameter in model.named_parameters():
        train = scope == "full" or any(marker in name for marker in AUDIO_PARAMETER_MARKERS)
        parameter.requires_grad_(train)
        if train:
            trained.append(name)
    if not trained:
        raise ValueError(f"scope {scope!r} selects no parameter")
    return trained


class CheckpointedLayer(torch.nn.Module):
    """A decoder layer whose activations are recomputed in backward (the package has no such option)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        if not self.training:
            return self.layer(*args, **kwargs)
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def wrap_decoder_layers(model, grad_checkpoint: bool, compile_layers: bool) -> None:
    for index, layer in enumerate(model.layers):
        if grad_checkpoint:
            layer = CheckpointedLayer(layer)
        if compile_layers:
            layer = torch.compile(layer, dynamic=True)
        model.layers[index] = layer


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (no decay on norms, biases or embeddings' 1-D params)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=config.device.startswith("cuda"))


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------
# Data order: deterministic by (seed, epoch), resumable mid-epoch
# --------------------------------------------------------------------------


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # micro-batches already consumed in this epoch


def epoch_batches(rows: list[dict], config: TrainConfig, epoch: int) -> tuple[list[list[data.Pair]], list[str]]:
    pairs, lonely = data.training_pairs(rows, config.seed, epoch)
    order = list(range(len(pairs)))
    random.Random(config.seed * 7919 + epoch).shuffle(order)
    batches = [[pairs[i] for i in order[start : start + config.batch_size]] for start in range(0, len(order), config.batch_size)]
    return batches, lonely


def micro_batches(rows: list[dict], config: TrainConfig, position: DataPosition):
    """Yields (position after this batch, batch of pairs) forever, epoch after epoch."""
    while True:
        batches, _ = epoch_batches(rows, config, position.epoch)
        if not batches:
            raise ValueError("no training pair: every speaker has a single utterance")
        while position.index < len(batches):
            batch = batches[position.index]
            position = DataPosition(position.epoch, position.index + 1)
            yield position, batch
        position = DataPosition(position.epoch + 1, 0)


# --------------------------------------------------------------------------
# Checkpoints: atomic, last K kept, loadable with weights_only=True
# --------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": list(random.getstate()[1]), "numpy": np.random.get_state()[1].tolist(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, position: DataPosition, config: TrainConfig) -> Path:
    """Write `checkpoints/step_N.pt` via a temporary file and rename; keep the last `keep_last`."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "model": {name: tensor for name, tensor in model.state_dict().items() if name in trained},
        "optimizer": optimizer.state_dict(),
        "position": asdict(position),
        "rng": rng_state(),
        "config": asdict(config),
    }
    path = folder / f"step_{step:08d}.pt"
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    for old in sorted(folder.glob("step_*.pt"))[: -config.keep_last]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, DataPosition]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trained parameters, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"], DataPosition(**state["position"])


def export_model(bundle: model_utils.Bundle, model, config: TrainConfig, out: Path) -> Path:
    """The final model in `HiggsAudioModel.from_pretrained` format with its text tokenizer, and the
    audio tokenizer beside it (`audio_tokenizer/`, `load_higgs_audio_tokenizer` format), so the export
    is self-contained for `infer.py` and `HiggsAudioServeEngine`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    bundle.tokenizer.save_pretrained(out)
    if config.model in model_utils.PRESETS and config.audio_tokenizer is None:
        model_utils.save_tiny_audio_tokenizer(out / "audio_tokenizer", seed=config.seed)
    else:
        (out / "audio_tokenizer.json").write_text(json.dumps({"audio_tokenizer": config.audio_tokenizer}))
    return out


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


class StopRequested:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request)

    def _request(self, signum, _frame):
        self.requested = True


def train(config: TrainConfig) -> Path:
    """Run training; returns the run directory."""
    run_dir = Path(config.out_dir) / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # data
    rows = data.read_manifest(config.train_manifest)
    _, lonely = data.training_pairs(rows, config.seed, 0)
    print(f"data: {len(rows)} rows from {config.train_manifest}; {len(lonely)} left out (speaker with one utterance)"
          + (f": {', '.join(lonely[:5])}" if lonely else ""))

    # model
    bundle = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed, device=config.device)
    model = bundle.model
    trained = select_trainable(model, config.scope)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f"model: {config.model}, training {config.scope}: {n_trained:,} of {n_total:,} parameters ({len(trained)} tensors)")
    whisper = collate.whisper_features(model.config)
    collator = collate.build_collator(model.config, whisper)
    codes = data.CodeCache(bundle.audio_tokenizer)
    wrap_decoder_layers(model, config.grad_checkpoint, config.compile)
    optimizer = build_optimizer(model, config)

    step, position = 0, DataPosition()
    if config.resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        step, position = load_checkpoint(path, model, optimizer)
        print(f"resumed from {path} at step {step}")

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    autocast = torch.autocast(device_type=torch.device(config.device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    stop = StopRequested()
    batches = micro_batches(rows, config, position)
    bad_steps: list[str] = []
    model.train()
    progress = tqdm(total=config.max_steps, initial=step, desc="train", dynamic_ncols=True)
    last_step = min(config.max_steps, config.stop_after or config.max_steps)
    while step < last_step and not stop.requested:
        started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        totals: dict[str, float] = {}
        tokens = padded = 0
        ids: list[str] = []
        finite = True
        for _ in range(config.grad_accum):
            position, pairs = next(batches)
            ids += [pair.id for pair in pairs]
            samples = [data.pair_to_sample(p, bundle.tokenizer, codes, config.ref_in_system, whisper is not None) for p in pairs]
            batch = collate.collate(collator, samples, model.config.audio_codebook_size, [p.id for p in pairs])
            with autocast:
                outputs = model(**collate.batch_to_model_inputs(batch, config.device))
            loss = model_utils.compute_loss(outputs, batch.label_audio_ids)
            finite &= bool(torch.isfinite(loss.total))
            (loss.total / config.grad_accum).backward()
            _accumulate(totals, loss, config.grad_accum)
            tokens += int(batch.attention_mask.sum())
            padded += int(batch.attention_mask.numel() - batch.attention_mask.sum())

        if not finite:
            optimizer.zero_grad(set_to_none=True)
            bad_steps.append(",".join(ids))
            writer.add_scalar("train/nonfinite_steps", len(bad_steps), step)
            print(f"step {step}: non-finite loss, step skipped (samples {ids})", file=sys.stderr)
            if len(bad_steps) >= config.max_bad_steps:
                raise RuntimeError(f"{len(bad_steps)} non-finite losses in a row; samples: {'; '.join(bad_steps)}")
            continue
        bad_steps.clear()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], config.grad_clip if config.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.time() - started
        if step % config.log_every == 0:
            _log(writer, step, totals, optimizer, grad_norm, tokens / elapsed, len(ids) / elapsed, padded / max(1, tokens + padded))
        progress.set_postfix(loss=f"{totals['total']:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        progress.update(1)
        if step % config.save_every == 0 or step == config.max_steps:
            save_checkpoint(run_dir, step, model, optimizer, position, config)
    progress.close()

    if step < config.max_steps:
        path = save_checkpoint(run_dir, step, model, optimizer, position, config)
        print(f"stopped at step {step}; checkpoint {path}; continue with --run-name {run_dir.name} --resume")
    else:
        export = export_model(bundle, _unwrapped(model), config, run_dir / "export")
        print(f"done: {step} steps. TensorBoard: tensorboard --logdir {config.out_dir}\n"
              f"next: python infer.py --model {export} --audio-tokenizer {export / 'audio_tokenizer'}"
              + (" (or just: python infer.py, which takes the newest export)" if config.out_dir == "runs" else ""))
    writer.close()
    return run_dir


def _accumulate(totals: dict, loss: model_utils.LossBreakdown, parts: int) -> None:
    values = {"total": loss.total, "text": loss.text, "audio": loss.audio}
    values.update({f"codebook_{k}": value for k, value in enumerate(loss.per_codebook)})
    for name, value in values.items():
        totals[name] = totals.get(name, 0.0) + float(value) / parts


def _log(writer, step, totals, optimizer, grad_norm, tokens_per_s, samples_per_s, padding) -> None:
    for name, value in totals.items():
        writer.add_scalar(f"loss/{name}", value, step)
    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
    writer.add_scalar("train/grad_norm", float(grad_norm), step)
    writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
    writer.add_scalar("train/samples_per_s", samples_per_s, step)
    writer.add_scalar("train/padding_fraction", padding, step)
    if torch.cuda.is_available():
        writer.add_scalar("train/gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30, step)


def _unwrapped(model):
    """The model with compile/checkpoint wrappers taken off its decoder layers, for export."""
    for index, layer in enumerate(model.layers):
        layer = getattr(layer, "_orig_mod", layer)
        model.layers[index] = getattr(layer, "layer", layer)
    return model


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        train(config)
    except (data.AudioError, data.ManifestError, collate.SampleError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
