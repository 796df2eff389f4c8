"""The training loop: fine-tune Higgs Audio v2 for zero-shot voice cloning.

    python train.py                                        # tiny preset on the committed demo data (CPU, ~1 min)
    python train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --scope audio
    torchrun --nproc-per-node 8 train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --parallel fsdp

Read top to bottom: configuration, distributed setup, data, model (what is
trained, LoRA, activation checkpointing, compile, DDP or FSDP2), optimizer and
schedule, checkpoints and export, evaluation, and the loop itself. Samples
come from `data.build_sample` (the one builder inference uses too), batches
from `collate.build_collator`, the loss from `model_utils.compute_loss`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import collate
import data
import infer
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
    cache: str = ""
    val_manifest: str = str(DEMO_MANIFEST)
    ref_in_system: bool = False
    # model
    model: str = model_utils.TINY_PRESET
    audio_tokenizer: str | None = None
    scope: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # run
    out_dir: str = "runs"
    run_name: str | None = None
    resume: bool = False
    inspect: bool = False
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    precision: str = "bf16" if torch.cuda.is_available() else "fp32"
    compile: bool = False
    grad_checkpoint: bool = False
    frozen_bf16: bool = True
    text_logits: str = "labelled"
    parallel: str = "ddp"
    # optimisation
    batch_size: int = 2
    batch_tokens: int = 0
    grad_accum: int = 1
    max_steps: int = 60
    epochs: float = 0.0
    stop_after: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # logging, evaluation and checkpoints
    log_every: int = 1
    eval_every: int = 30
    eval_prompts: int = 2
    eval_max_seconds: float = 4.0
    save_every: int = 30
    keep_last: int = 2
    max_bad_steps: int = 5


HELP = {
    "train_manifest": "JSONL manifest, speaker-grouped or paired rows (validated, encoded on the fly)",
    "cache": "a prepared code cache (python data.py prepare) to train from instead of --train-manifest",
    "val_manifest": "JSONL manifest for validation loss and generated samples ('' = none)",
    "ref_in_system": "put the reference in the system message instead of an assistant turn",
    "model": "model directory or preset (tiny, tiny-whisper)",
    "audio_tokenizer": "audio tokenizer directory; required with a model directory",
    "scope": "what is trained: full, audio (audio FFNs, codebook embeddings, audio head) or lora",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
    "out_dir": "where runs are written", "run_name": "run folder name (default: a timestamp)",
    "resume": "continue from the newest checkpoint of --run-name",
    "inspect": "print the first batch readably and exit",
    "seed": "seed of everything", "device": "torch device",
    "precision": "bf16 (autocast on CUDA, fp32 master weights) or fp32",
    "compile": "torch.compile the decoder layers", "grad_checkpoint": "recompute decoder layers in backward",
    "frozen_bf16": "with --precision bf16, hold frozen linear weights in bf16 (bit-identical under autocast; trained ones stay fp32)",
    "text_logits": "labelled (text logits only where a text label is; generation unchanged) or all (the package's head)",
    "parallel": "under torchrun: ddp (replicated model) or fsdp (FSDP2: parameters, gradients and optimizer state sharded)",
    "batch_size": "samples per micro-batch (per process), unless --batch-tokens is set",
    "batch_tokens": "token budget per micro-batch (padded positions), length-bucketed; 0 = --batch-size samples", "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps (the schedule's length)",
    "epochs": "train this many epochs instead: sets --max-steps from the first epoch's size (0 = use --max-steps)",
    "stop_after": "stop with a checkpoint after this many steps of the schedule (0 = never)",
    "lr": "peak learning rate", "min_lr_ratio": "cosine floor as a fraction of lr",
    "warmup_steps": "linear warmup steps", "weight_decay": "AdamW decay (matrices only)",
    "grad_clip": "max gradient norm (0 = off)", "log_every": "steps between logged scalars",
    "eval_every": "steps between evaluations (0 = never)", "eval_prompts": "validation prompts generated as audio",
    "eval_max_seconds": "longest generated validation clip", "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept (best.pt is kept too)", "max_bad_steps": "consecutive non-finite losses that stop the run",
}
SCOPES = ("full", "audio", "lora")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags override an optional JSON/YAML `--config` file, which overrides the defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file of the fields below; flags override it")
    for name, value in asdict(TrainConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[name])
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=None, help=f"{HELP[name]} [{value}]")
    args = parser.parse_args(argv)
    values = asdict(TrainConfig())
    if args.config:
        values.update(_read_config_file(args.config))
    values.update({key: value for key, value in vars(args).items() if key != "config" and value is not None})
    config = TrainConfig(**values)
    for name, allowed in (("scope", SCOPES), ("precision", ("bf16", "fp32")), ("parallel", ("ddp", "fsdp")),
                          ("text_logits", ("labelled", "all"))):
        if getattr(config, name) not in allowed:
            parser.error(f"--{name} must be one of {', '.join(allowed)}, not {getattr(config, name)}")
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
# Distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
# --------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(config: TrainConfig) -> Dist:
    """One process per device under torchrun (NCCL on GPU, gloo on CPU); a plain run is world size 1."""
    if "RANK" not in os.environ:
        return Dist()
    env = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    cuda = config.device.startswith("cuda")
    if cuda:
        config.device = f"cuda:{env.local_rank}"
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return env


def all_mean(values: list[float], env: Dist, device: str) -> list[float]:
    """Mean of each value over processes (identity in a plain run)."""
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / env.world_size).tolist()


def any_process(flag: bool, env: Dist, device: str) -> bool:
    """True when the flag is set on any process, so that all take the same branch."""
    if not env.enabled:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# --------------------------------------------------------------------------
# Data order: deterministic by (seed, epoch), sharded over processes, resumable
# --------------------------------------------------------------------------


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # micro-batches consumed in this epoch, over all processes


def epoch_batches(rows: list[dict], config: TrainConfig, epoch: int, maker: SampleMaker) -> list[list[data.Pair]]:
    """All micro-batches of an epoch: `batch_size` pairs each, or length-bucketed within `batch_tokens`."""
    pairs, _ = data.training_pairs(rows, config.seed, epoch)
    if config.batch_tokens:
        num_codebooks = maker.bundle.model.config.audio_num_codebooks
        lengths = [collate.sample_tokens(sample, num_codebooks) for sample in maker.samples(pairs)]
        batches = collate.token_budget_batches(lengths, config.batch_tokens, config.seed, epoch)
        return [[pairs[i] for i in batch] for batch in batches]
    order = list(range(len(pairs)))
    random.Random(config.seed * 7919 + epoch).shuffle(order)
    return [[pairs[i] for i in order[start : start + config.batch_size]] for start in range(0, len(order), config.batch_size)]


def micro_batches(rows: list[dict], config: TrainConfig, position: DataPosition, env: Dist, maker: SampleMaker):
    """Yields (position after this micro-batch, this process's pairs) forever.

    The epoch's micro-batches are dealt round-robin: process r takes
    micro-batches r, r + W, ...; a tail shorter than W is dropped so every
    process takes as many steps. One process with accumulation A sees exactly
    the micro-batches that A processes see in one step.
    """
    while True:
        batches = epoch_batches(rows, config, position.epoch, maker)
        usable = len(batches) - len(batches) % env.world_size
        if usable == 0:
            raise ValueError(f"{len(batches)} micro-batches per epoch cannot feed {env.world_size} processes")
        while position.index < usable:
            batch = batches[position.index + env.rank]
            position = DataPosition(position.epoch, position.index + env.world_size)
            yield position, batch
        position = DataPosition(position.epoch + 1, 0)


def training_rows(config: TrainConfig, bundle: model_utils.Bundle, env: Dist, run_dir: Path) -> tuple[list[dict], object]:
    """Kept rows and their code source: a prepared cache, or the manifest validated and encoded now.

    Either way the counts are printed so that they reconcile with the
    prepare step's: rows read = kept + rejected, by reason.
    """
    if config.cache:
        prepared = data.read_prepared(config.cache, data.audio_tokenizer_id(bundle.audio_tokenizer))
        if env.main:
            print(f"data: {config.cache}: {prepared.summary}")
        return prepared.rows, prepared.codes
    codes = data.CodeCache(bundle.audio_tokenizer)
    return validated_rows(config.train_manifest, codes, env, run_dir / "rejections.jsonl"), codes


def validated_rows(manifest: str, codes: data.CodeCache, env: Dist, report: Path) -> list[dict]:
    """The kept rows of `manifest`, their clips encoded into `codes`; the counts are printed and the
    rejected rows, with row numbers and reasons, listed in `report`."""
    validated = data.validate_manifest(manifest, codes, progress=env.main)
    if env.main:
        print(f"data: {manifest}: {validated.summary()}")
        if validated.rejections:
            validated.write_report(report)
            print(f"rejected rows, with row numbers and reasons: {report}")
    return validated.kept


class SampleMaker:
    """Pairs to collated batches, through the shared builder and collator."""

    def __init__(self, bundle: model_utils.Bundle, config: TrainConfig, codes):
        self.bundle, self.config, self.codes = bundle, config, codes
        model_config = bundle.model.config
        self.whisper = collate.whisper_features(model_config)
        self.collator = collate.build_collator(model_config, self.whisper)

    def samples(self, pairs: list[data.Pair]) -> list:
        return [
            data.pair_to_sample(pair, self.bundle.tokenizer, self.codes, self.config.ref_in_system, self.whisper is not None)
            for pair in pairs
        ]

    def batch(self, pairs: list[data.Pair]):
        codebook_size = self.bundle.model.config.audio_codebook_size
        return collate.collate(self.collator, self.samples(pairs), codebook_size, [pair.id for pair in pairs])


# --------------------------------------------------------------------------
# Model: what is trained, LoRA, activation checkpointing, compile, DDP / FSDP2
# --------------------------------------------------------------------------

AUDIO_PARAMETER_MARKERS = ("audio_mlp", "audio_post_attention_layernorm", "audio_input_layernorm",
                           "audio_codebook_embeddings", "audio_decoder_proj.audio_lm_head")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def select_trainable(model: torch.nn.Module, scope: str) -> None:
    """`full` trains everything, `audio` the audio side of the dual-FFN layers, codebook embeddings and audio head."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(scope == "full" or any(marker in name for marker in AUDIO_PARAMETER_MARKERS))


def add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """peft LoRA on attention and on both FFNs of every layer, the text MLP and the audio MLP alike.

    The wrapper is peft's base `PeftModel`, whose forward passes the batch
    through unchanged (no injected `labels`), so DDP wraps it like any module.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, lora)


def reduce_memory(model: torch.nn.Module, config: TrainConfig) -> None:
    """Text logits only at labelled positions (`--text-logits labelled`) and, under bf16, frozen
    linear weights in bf16 (`--frozen-bf16`); both leave the losses unchanged (tests/test_memory.py)."""
    if config.text_logits == "labelled":
        model_utils.text_logits_at_labels(model)
    if config.frozen_bf16 and config.precision == "bf16":
        model_utils.frozen_linear_weights_to_bf16(model)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_base_model().layers if hasattr(model, "get_base_model") else model.layers


def wrap_decoder_layers(model: torch.nn.Module, config: TrainConfig) -> None:
    """Activation checkpointing (the package has none) and/or compile, one decoder layer at a time.

    Each layer keeps its class and its parameter names: the package's decoder
    calls a layer with the audio mask only `if isinstance(layer,
    HiggsAudioDualFFNDecoderLayer)`, so a wrapper module (`checkpoint_wrapper`,
    the `OptimizedModule` of `torch.compile(layer)`) would silently route
    every token through the text FFN. Hence the layer's own `forward` is
    checkpointed and `Module.compile` compiles in place.
    """
    for layer in decoder_layers(model):
        if config.grad_checkpoint:
            checkpoint_forward(layer)
        if config.compile:
            layer.compile(dynamic=True)


def checkpoint_forward(layer: torch.nn.Module) -> None:
    """Recompute `layer`'s activations in backward instead of keeping them (training only)."""
    forward = layer.forward

    def checkpointed(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    layer.forward = checkpointed


def parallelize(model: torch.nn.Module, config: TrainConfig, env: Dist) -> torch.nn.Module:
    """DDP (gradients all-reduced in backward, so the forward always goes through the wrapper), or
    FSDP2: each decoder layer, then the rest, sharded over the processes."""
    if not env.enabled:
        return model
    if config.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [env.local_rank] if config.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (no decay on norms and biases)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=config.device.startswith("cuda"))


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------
# Checkpoints (atomic, last K and best kept, weights_only-loadable) and export
# --------------------------------------------------------------------------

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def trained_names(model: torch.nn.Module) -> set[str]:
    """Names of the trained parameters as torch's state-dict utilities spell them (DDP's `module.` dropped)."""
    return {name.removeprefix("module.") for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, position: DataPosition, config: TrainConfig,
                    env: Dist, best_loss: float, name: str | None = None) -> Path:
    """`checkpoints/step_N.pt` (or `name`), written to a temporary file and renamed.

    Every process takes part in gathering the (possibly sharded) state and
    sends its RNG state; process 0 writes. Only trained parameters are kept.
    """
    folder = run_dir / "checkpoints"
    keep = trained_names(model)
    model_state = {k: v for k, v in get_model_state_dict(model, options=FULL_STATE).items() if k in keep}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    rngs = [None] * env.world_size
    if env.enabled:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    path = folder / (name or f"step_{step:08d}.pt")
    if env.main:
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "model": model_state, "optimizer": optimizer_state, "position": asdict(position),
                 "rng": rngs, "best_loss": best_loss, "config": asdict(config)}
        temporary = path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)
        for old in sorted(folder.glob("step_*.pt"))[: -config.keep_last]:
            old.unlink()
    if env.enabled:
        dist.barrier()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, env: Dist) -> tuple[int, DataPosition, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = trained_names(model) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trained parameters, e.g. {sorted(missing)[:3]}")
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if len(state["rng"]) != env.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with as many (now {env.world_size})")
    set_rng_state(state["rng"][env.rank])
    return state["step"], DataPosition(**state["position"]), state["best_loss"]


def export_model(model, config: TrainConfig, bundle: model_utils.Bundle, env: Dist, out: Path) -> Path:
    """The final model in `HiggsAudioModel.from_pretrained` format (LoRA merged), with its text tokenizer
    and its audio tokenizer (`audio_tokenizer/`, or a pointer to it), so `infer.py` and the package's
    `HiggsAudioServeEngine` load it as it is."""
    full = get_model_state_dict(model, options=FULL_STATE)
    if env.main:
        fresh = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed).model
        if config.scope == "lora":
            fresh = add_lora(fresh, config)
        fresh.load_state_dict(full)
        if config.scope == "lora":
            fresh = fresh.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(out)
        bundle.tokenizer.save_pretrained(out)
        if config.model in model_utils.PRESETS and config.audio_tokenizer is None:
            model_utils.save_tiny_audio_tokenizer(out / "audio_tokenizer", seed=config.seed)
        else:
            (out / "audio_tokenizer.json").write_text(json.dumps({"audio_tokenizer": config.audio_tokenizer}))
    if env.enabled:
        dist.barrier()
    return out


# --------------------------------------------------------------------------
# Evaluation: validation losses, generated audio and mel spectrograms
# --------------------------------------------------------------------------


def validation_loss(model, maker: SampleMaker, pairs: list[data.Pair], config: TrainConfig, env: Dist) -> dict[str, float]:
    """Mean losses over the validation pairs, each process taking every W-th chunk.

    Every process runs as many forwards (FSDP gathers parameters in each, so
    all must take part); a process short of chunks repeats one at weight 0.
    """
    chunks = [pairs[i : i + config.batch_size] for i in range(0, len(pairs), config.batch_size)]
    sums: dict[str, float] = {}
    weight = 0.0
    with torch.no_grad(), autocast(config):
        for round_ in range(math.ceil(len(chunks) / env.world_size)):
            index = round_ * env.world_size + env.rank
            batch = maker.batch(chunks[index % len(chunks)])
            loss = model_utils.compute_loss(model(**collate.batch_to_model_inputs(batch, config.device)), batch.label_audio_ids)
            real = float(index < len(chunks))
            _accumulate(sums, loss, real)
            weight += real
    names = sorted(sums)
    totals = [sums[name] for name in names] + [weight]
    if env.enabled:
        reduced = torch.tensor(totals, dtype=torch.float64, device=config.device)
        dist.all_reduce(reduced)
        totals = reduced.tolist()
    return {name: value / totals[-1] for name, value in zip(names, totals)}


def log_generations(writer, step: int, model, maker: SampleMaker, pairs: list[data.Pair], config: TrainConfig) -> None:
    """Greedy clones of the first validation prompts as audio, and mel spectrograms: generated | target | reference."""
    bundle = model_utils.Bundle(model, maker.bundle.tokenizer, maker.bundle.audio_tokenizer)
    rate = bundle.audio_tokenizer.sampling_rate
    sampling = infer.Sampling(greedy=True, seed=config.seed, max_seconds=config.eval_max_seconds)
    for pair in pairs[: config.eval_prompts]:
        waveform = data.load_audio(pair.ref_audio, rate) if maker.whisper is not None and config.ref_in_system else None
        reference = infer.Reference(pair.ref_text, maker.codes(pair.ref_audio), waveform, rate)
        try:
            with autocast(config):  # frozen weights may be held in bf16 (--frozen-bf16)
                generated = infer.clone(bundle, reference, pair.text, sampling, pair.scene, config.ref_in_system)
        except RuntimeError as error:
            writer.add_text(f"eval/{pair.id}", f"no audio at step {step}: {error}", step)
            continue
        writer.add_audio(f"generated/{pair.id}", torch.from_numpy(generated)[None], step, sample_rate=rate)
        panels = [generated, data.load_audio(pair.audio, rate), data.load_audio(pair.ref_audio, rate)]
        writer.add_image(f"mel/{pair.id} (generated | target | reference)", mel_panels(panels, rate), step, dataformats="HW")


def mel_panels(waveforms: list[np.ndarray], rate: int) -> np.ndarray:
    """Log-mel spectrograms side by side, low frequencies at the bottom, scaled to [0, 1]."""
    import librosa

    panels = []
    for waveform in waveforms:
        mel = librosa.power_to_db(librosa.feature.melspectrogram(y=waveform, sr=rate, n_mels=80, hop_length=240), ref=np.max)
        panels.append((mel[::-1] - mel.min()) / max(1e-6, float(mel.max() - mel.min())))
        panels.append(np.ones((mel.shape[0], 4)))
    return np.concatenate(panels[:-1], axis=1).astype(np.float32)


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


class StopRequested:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request)

    def _request(self, _signum, _frame):
        self.requested = True


def autocast(config: TrainConfig):
    return torch.autocast(device_type=torch.device(config.device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def train(config: TrainConfig) -> Path:
    """Run training; returns the run directory."""
    env = init_distributed(config)
    try:
        return _train(config, env)
    finally:
        if env.enabled:
            dist.destroy_process_group()


def _train(config: TrainConfig, env: Dist) -> Path:
    say = print if env.main else (lambda *args, **kwargs: None)
    run_dir = Path(config.out_dir) / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # model pieces and data: rows whose every problem was counted and reported
    bundle = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed, device=config.device)
    rows, codes = training_rows(config, bundle, env, run_dir)
    maker = SampleMaker(bundle, config, codes)
    val_pairs, val_maker = [], None
    if config.val_manifest:
        # Clips shared with the training manifest (the demo validates on its own data) are encoded once.
        val_codes = codes if isinstance(codes, data.CodeCache) else data.CodeCache(bundle.audio_tokenizer)
        val_rows = validated_rows(config.val_manifest, val_codes, env, run_dir / "val_rejections.jsonl")
        val_pairs = data.training_pairs(val_rows, config.seed, 0)[0]
        val_maker = SampleMaker(bundle, config, val_codes)

    model = bundle.model
    if config.scope == "lora":
        model = add_lora(model, config)
    else:
        select_trainable(model, config.scope)
    reduce_memory(model, config)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    say(f"model: {config.model}, training {config.scope}: {n_trained:,} of {n_total:,} parameters; "
        f"{env.world_size} process(es){', ' + config.parallel if env.enabled else ''}")
    first_epoch = epoch_batches(rows, config, 0, maker)
    if config.epochs:
        steps_per_epoch = max(1, len(first_epoch) // env.world_size // config.grad_accum)
        config.max_steps = math.ceil(config.epochs * steps_per_epoch)
        say(f"{config.epochs:g} epochs of {steps_per_epoch} steps: --max-steps {config.max_steps}")
    if env.main:
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    first_batch = maker.batch(first_epoch[0])
    say(collate.describe_batch(first_batch, bundle.tokenizer, bundle.model.config))
    if config.inspect:
        return run_dir
    wrap_decoder_layers(model, config)
    model = parallelize(model, config, env)
    optimizer = build_optimizer(model, config)

    step, position, best_loss = 0, DataPosition(), float("inf")
    if config.resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        step, position, best_loss = load_checkpoint(path, model, optimizer, env)
        say(f"resumed from {path} at step {step}")

    writer = SummaryWriter(str(run_dir / "tensorboard")) if env.main else None
    stop = StopRequested()
    batches = micro_batches(rows, config, position, env, maker)
    last_step = min(config.max_steps, config.stop_after or config.max_steps)
    bad_steps: list[str] = []
    train_loss = float("nan")
    model.train()
    progress = tqdm(total=last_step, initial=step, desc="train", dynamic_ncols=True, disable=not env.main)
    while step < last_step and not any_process(stop.requested, env, config.device):
        started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)

        # the step: accumulate gradients over micro-batches, all-reduced on the last one
        totals: dict[str, float] = {}
        counts = np.zeros(3)  # real tokens, padded positions, samples
        ids: list[str] = []
        finite = True
        for micro in range(config.grad_accum):
            position, pairs = next(batches)
            ids += [pair.id for pair in pairs]
            batch = maker.batch(pairs)
            sync = micro == config.grad_accum - 1 or not isinstance(model, DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(config):
                outputs = model(**collate.batch_to_model_inputs(batch, config.device))
                loss = model_utils.compute_loss(outputs, batch.label_audio_ids)
                (loss.total / config.grad_accum).backward()
            finite &= bool(torch.isfinite(loss.total))
            _accumulate(totals, loss, 1 / config.grad_accum)
            mask = outputs.attention_mask  # the merged text-and-audio sequence the model ran on
            counts += (int(mask.sum()), int(mask.numel() - mask.sum()), len(pairs))

        if any_process(not finite, env, config.device):
            optimizer.zero_grad(set_to_none=True)
            bad_steps.append(",".join(ids))
            if writer:
                writer.add_scalar("train/nonfinite_steps", len(bad_steps), step)
            print(f"step {step}: non-finite loss, step skipped (samples {', '.join(ids)})", file=sys.stderr)
            if len(bad_steps) >= config.max_bad_steps:
                raise RuntimeError(f"{len(bad_steps)} non-finite losses in a row; samples: {' | '.join(bad_steps)}")
            continue
        bad_steps.clear()
        trained = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, config.grad_clip if config.grad_clip > 0 else float("inf"))
        # Under FSDP the norm is a DTensor; making it whole is a collective, so every process does it.
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # logging (values averaged over processes; process 0 writes)
        names = sorted(totals)
        means = dict(zip(names, all_mean([totals[name] for name in names], env, config.device)))
        tokens, padded, samples = (value * env.world_size for value in all_mean(counts.tolist(), env, config.device))
        elapsed = time.time() - started
        train_loss = means["total"]
        if writer and step % config.log_every == 0:
            _log(writer, step, means, optimizer, grad_norm, tokens / elapsed, samples / elapsed,
                 padded / max(1.0, tokens + padded))
        progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        progress.update(1)

        # evaluation and checkpoints
        if val_pairs and config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
            model.eval()
            val = validation_loss(model, val_maker, val_pairs, config, env)
            if writer:
                for name, value in val.items():
                    writer.add_scalar(f"val/{name}", value, step)
                if config.parallel == "ddp" or not env.enabled:
                    log_generations(writer, step, _unwrap_ddp(model), val_maker, val_pairs, config)
            if val["total"] < best_loss:
                best_loss = val["total"]
                save_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss, name="best.pt")
            model.train()
        if step % config.save_every == 0 or step == config.max_steps:
            save_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss)
    progress.close()

    if step < config.max_steps:
        path = save_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss)
        say(f"stopped at step {step}; checkpoint {path}; continue with --run-name {run_dir.name} --resume")
    else:
        export = export_model(model, config, bundle, env, run_dir / "export")
        say(f"done: {step} steps, final train loss {train_loss:.3f}"
            + (f", best validation loss {best_loss:.3f}" if math.isfinite(best_loss) else "")
            + f"\nTensorBoard: tensorboard --logdir {config.out_dir}\n"
            f"next: python infer.py --model {export}" + (" (or just python infer.py: it takes the newest export)" if config.out_dir == "runs" else ""))
    if writer:
        hparams = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/train_loss": train_loss, "hparam/best_val_loss": best_loss}, run_name="hparams")
        writer.close()
    return run_dir


def _unwrap_ddp(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _accumulate(totals: dict, loss: model_utils.LossBreakdown, scale: float) -> None:
    """Add `scale` times each loss value (total, text, audio, per codebook) to `totals`."""
    values = {"total": loss.total, "text": loss.text, "audio": loss.audio}
    values.update({f"codebook_{k}": value for k, value in enumerate(loss.per_codebook)})
    for name, value in values.items():
        totals[name] = totals.get(name, 0.0) + float(value.detach()) * scale


def _log(writer, step, means, optimizer, grad_norm, tokens_per_s, samples_per_s, padding) -> None:
    for name, value in means.items():
        writer.add_scalar(f"loss/{name}", value, step)
    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
    writer.add_scalar("train/grad_norm", grad_norm, step)
    writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
    writer.add_scalar("train/samples_per_s", samples_per_s, step)
    writer.add_scalar("train/padding_fraction", padding, step)
    if torch.cuda.is_available():
        writer.add_scalar("train/gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30, step)


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
