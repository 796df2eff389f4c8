"""The training loop: fine-tune Higgs Audio v2 for zero-shot voice cloning.

    python train.py                                        # tiny preset on the committed demo data (CPU, ~1 min)
    python train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --scope audio
    torchrun --nproc-per-node 8 train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --parallel fsdp

Read top to bottom: configuration, distributed setup, data, model (what is
trained, LoRA, activation checkpointing, compile, DDP or FSDP2), optimizer and
schedule, export, evaluation, and the loop itself. Samples come from
`data.build_sample` (the one builder inference uses too), batches from
`collate.build_collator`, the loss from `model_utils.compute_loss`;
checkpoints, resume checks and whole-or-nothing files from `checkpoints.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


INTERRUPTED_AT_START = "error: interrupted during start-up: nothing was trained"


def _interrupted_while_importing(_signum, _frame):
    print(INTERRUPTED_AT_START, file=sys.stderr)
    raise SystemExit(128 + signal.SIGINT)


if __name__ == "__main__":  # a Ctrl-C while torch loads is one line, not a traceback
    signal.signal(signal.SIGINT, _interrupted_while_importing)

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import checkpoints
import collate
import data
import evaluate
import generation
import metrics
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
    verify_cache: bool = True
    val_manifest: str = str(DEMO_MANIFEST)
    ref_in_system: bool = False
    prefetch: int = 2
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
    asr_model: str = ""
    speaker_model: str = ""
    eval_language: str = ""
    best_by: str = "val_loss"
    patience: int = 0
    save_every: int = 30
    keep_last: int = 2
    max_bad_steps: int = 5


HELP = {
    "train_manifest": "JSONL manifest, speaker-grouped or paired rows (validated, encoded on the fly)",
    "cache": "a prepared code cache (python data.py prepare) to train from instead of --train-manifest",
    "verify_cache": "check every shard of --cache against its checksum at start (--no-verify-cache skips it)",
    "val_manifest": "JSONL manifest for validation loss and generated samples ('' = none)",
    "prefetch": "micro-batches built and collated ahead of the step by a background thread (0 = off)",
    "ref_in_system": "put the reference in the system message instead of an assistant turn",
    "model": "model directory or preset (tiny, tiny-whisper)",
    "audio_tokenizer": "audio tokenizer directory; required with a model directory",
    "scope": "what is trained: full, audio (audio FFNs, codebook embeddings, audio head) or lora",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
    "out_dir": "where runs are written", "run_name": "run folder name (default: a timestamp)",
    "resume": "continue --run-name from its newest intact checkpoint (flags that change the run are refused)",
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
    "eval_max_seconds": "longest generated validation clip",
    "asr_model": "local Whisper directory for the validation clips' WER/CER ('' = pocketsphinx en-us: English rows only)",
    "speaker_model": "local WavLMForXVector directory for SIM ('' = resemblyzer GE2E)",
    "eval_language": "language of validation rows without a language field ('' = none: their WER is n/a)",
    "best_by": "what best.pt and --patience track: val_loss, sim (higher is better), wer (lower), or sim_wer (lower WER - SIM)",
    "patience": "stop, with a checkpoint, after this many evaluations without a new best (0 = never)",
    "save_every": "steps between checkpoints",
    "keep_last": "newest step checkpoints kept (best.pt is kept too)", "max_bad_steps": "consecutive non-finite losses that stop the run",
}
SCOPES = ("full", "audio", "lora")


class ConfigError(ValueError):
    """A bad flag or `--config` file: reported as one line, exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda value: value >= low), f"at least {low}"


def _positive() -> tuple[Callable[[float], bool], str]:
    return (lambda value: value > 0), "positive"


def _within(low: float, high: float, *, open_high: bool = False) -> tuple[Callable[[float], bool], str]:
    if open_high:
        return (lambda value: low <= value < high), f"in [{low}, {high})"
    return (lambda value: low <= value <= high), f"in [{low}, {high}]"


# The valid range of every numeric field, checked at parse time: a new numeric field adds one row.
LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "lora_rank": _at_least(1), "lora_alpha": _positive(), "lora_dropout": _within(0, 1, open_high=True),
    "seed": _within(0, 2**32 - 1),  # numpy's seed range
    "batch_size": _at_least(1), "batch_tokens": _at_least(0), "grad_accum": _at_least(1),
    "max_steps": _at_least(1), "epochs": _at_least(0), "stop_after": _at_least(0),
    "lr": _positive(), "min_lr_ratio": _within(0, 1), "warmup_steps": _at_least(0),
    "weight_decay": _at_least(0), "grad_clip": _at_least(0),
    "log_every": _at_least(1), "eval_every": _at_least(0), "eval_prompts": _at_least(0),
    "eval_max_seconds": _positive(), "save_every": _at_least(1), "keep_last": _at_least(1),
    "max_bad_steps": _at_least(1), "patience": _at_least(0), "prefetch": _at_least(0),
}


def check_limits(config: TrainConfig) -> None:
    """Every numeric field within its range (and finite), or a one-line ConfigError naming the flag."""
    for name, (valid, rule) in LIMITS.items():
        value = getattr(config, name)
        if not (math.isfinite(value) and valid(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, not {value}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags override an optional JSON/YAML `--config` file, which overrides the defaults.

    Any problem (an unknown flag or key, a wrong type, a value out of range,
    an unreadable file) is a ConfigError with a one-line message."""
    parser = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                          ("text_logits", ("labelled", "all")), ("best_by", BEST_BY)):
        if getattr(config, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {getattr(config, name)}")
    check_limits(config)
    problem = selection_problem(config)
    if problem:
        parser.error(problem)
    return config


def _read_config_file(path: str) -> dict:
    """The fields of a JSON or YAML file, each of its field's type; any problem is a one-line ConfigError."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        values = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--config {path}: invalid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field names to values, not {type(values).__name__}")
    defaults = asdict(TrainConfig())
    unknown = set(values) - set(defaults)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(unknown)} (fields are the flags' names with _ for -)")
    for name, value in values.items():
        if not _has_type(value, defaults[name]):
            expected = "a string or null" if defaults[name] is None else type(defaults[name]).__name__
            raise ConfigError(f"--config {path}: {name} must be {expected}, not {value!r}")
    return values


def _has_type(value, default) -> bool:
    """The type of the field's default; a bool is not a number here, an int is a float, a field whose
    default is None takes a string or null."""
    if default is None:
        return value is None or isinstance(value, str)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default)) and not isinstance(value, bool)


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
        batches = collate.token_budget_batches(maker.lengths(pairs, rows), config.batch_tokens, config.seed, epoch)
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
    prepare step's: rows read = kept + rejected, by reason. A cache's shards
    are checked against their checksums unless --no-verify-cache. With
    --batch-tokens the rows carry their text token counts, for planning
    batches: the prepare step's when it used this text tokenizer, else counted now.
    """
    say = print if env.main else (lambda *args, **kwargs: None)
    counted = None
    if config.cache:
        prepared = data.read_prepared(config.cache, data.audio_tokenizer_id(bundle.audio_tokenizer), config.verify_cache)
        rows, codes, counted = prepared.rows, prepared.codes, prepared.text_token_counts
        say(f"data: {config.cache}: {prepared.summary}")
        say(f"data: {codes.verified_shards} shards ({codes.verified_bytes / 1e6:.1f} MB) match their checksums, "
            f"checked in {codes.verify_seconds:.2f} s (--no-verify-cache skips this)" if config.verify_cache
            else "data: shard checksums not checked (--no-verify-cache); a shard is still checked for its shape when opened")
    else:
        codes = data.CodeCache(bundle.audio_tokenizer)
        rows = validated_rows(config.train_manifest, codes, env, run_dir / "rejections.jsonl")
    if config.batch_tokens and counted != data.text_counting_id(bundle.tokenizer):
        if counted is not None:
            say("data: the cache's text token counts are of another text tokenizer or normalisation: counting again")
        data.add_text_token_counts(rows, bundle.tokenizer)
    return rows, codes


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

    def lengths(self, pairs: list[data.Pair], rows: list[dict]) -> list[int]:
        """Each pair's `collate.sample_tokens`, from the numbers its rows carry (no sample is built);
        rows without text token counts are given them first."""
        model_config = self.bundle.model.config
        if self.whisper is not None and self.config.ref_in_system:
            raise ValueError("--batch-tokens cannot count the Whisper features of a system-message reference")
        if rows and "text_tokens" not in rows[0]:
            data.add_text_token_counts(rows, self.bundle.tokenizer)
        return data.sample_lengths(pairs, rows, self.bundle.tokenizer, model_config.audio_num_codebooks,
                                   self.config.ref_in_system, model_config.use_delay_pattern)

    def samples(self, pairs: list[data.Pair]) -> list:
        return [
            data.pair_to_sample(pair, self.bundle.tokenizer, self.codes, self.config.ref_in_system, self.whisper is not None)
            for pair in pairs
        ]

    def batch(self, pairs: list[data.Pair]):
        codebook_size = self.bundle.model.config.audio_codebook_size
        return collate.collate(self.collator, self.samples(pairs), codebook_size, [pair.id for pair in pairs])


class BatchError(ValueError):
    """A micro-batch that could not be built; the message names its samples."""


class Prefetcher:
    """(position, pairs, collated batch) of each micro-batch of `micro_batches`, built ahead of the step.

    A background thread builds and collates up to `depth` micro-batches while
    the step runs; they come out in the order they went in, each with its
    position, so the data order and --resume are those of `depth` 0, which
    builds each batch when it is taken. An error building a batch is raised
    in the loop, naming the batch's samples. `take_wait()` gives the seconds
    the loop has waited for data since the last call.
    """

    def __init__(self, source, maker: SampleMaker, depth: int):
        self.source, self.maker, self.depth, self.waited = source, maker, depth, 0.0
        if depth:
            self.ready: queue.Queue = queue.Queue(depth)
            self.stop = threading.Event()
            threading.Thread(target=_prefetch, args=(source, maker, self.ready, self.stop), daemon=True, name="prefetch").start()
            weakref.finalize(self, self.stop.set)  # a loop left by an exception stops the thread too

    def __next__(self):
        started = time.perf_counter()
        item = self.ready.get() if self.depth else _build_micro_batch(self.source, self.maker)
        self.waited += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def take_wait(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def close(self) -> None:
        if self.depth:
            self.stop.set()


def _build_micro_batch(source, maker: SampleMaker):
    position, pairs = next(source)
    try:
        return position, pairs, maker.batch(pairs)
    except Exception as error:
        raise BatchError(f"micro-batch of {', '.join(pair.id for pair in pairs)}: {error}") from error


def _prefetch(source, maker: SampleMaker, ready: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: builds micro-batches in order until stopped or an error, which it hands on."""
    while not stop.is_set():
        try:
            item = _build_micro_batch(source, maker)
        except Exception as error:
            item = error
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return


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
    return model_utils.higgs_model(model).layers


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
    FSDP2 (`shard_model`)."""
    if not env.enabled:
        return model
    if config.parallel == "fsdp":
        return shard_model(model, config)
    device_ids = [env.local_rank] if config.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_model(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """FSDP2 under `fsdp_mixed_precision`: each decoder layer, then the rest, sharded over the processes."""
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_mixed_precision(config)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def fsdp_mixed_precision(config: TrainConfig):
    """FSDP2's policy: under bf16, parameters all-gathered and computed in bf16, gradients reduced in fp32.

    The sharded parameters, their gradients and the optimizer state stay fp32
    (the master copy); only the unsharded copy that each layer gathers for its
    forward and backward is bf16. That halves each all-gather's bytes and the
    unsharded copies' memory: a released dual-FFN layer (176.2M parameters) is
    705 MB gathered in fp32, 352 MB in bf16; the root group (embeddings and
    heads, 838.4M) 3.35 GB and 1.68 GB; a micro-batch's 57 all-gathers (28
    layers in forward and again in backward, the root once) 42.8 GB and 21.4 GB
    per process. Gradients are reduced over processes in fp32, so summing many
    bf16 contributions does not round away small updates. Under fp32 nothing is cast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if config.precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


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
# Export: the final model, one from_pretrained directory
# --------------------------------------------------------------------------

def export_model(model, config: TrainConfig, bundle: model_utils.Bundle, env: Dist, out: Path) -> Path:
    """The final model in `HiggsAudioModel.from_pretrained` format (LoRA merged), with its text tokenizer
    and its audio tokenizer (`audio_tokenizer/`, or a pointer to it), so `infer.py` and the package's
    `HiggsAudioServeEngine` load it (the engine prompts in the trained layout through `infer.align_serve_engine`),
    and `prompt_layout.json`. Written whole into a temporary folder, then renamed."""
    full = get_model_state_dict(model, options=checkpoints.FULL_STATE)
    if env.main:
        fresh = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed).model
        if config.scope == "lora":
            fresh = add_lora(fresh, config)
        fresh.load_state_dict(full)
        if config.scope == "lora":
            fresh = fresh.merge_and_unload()
        with checkpoints.atomic_directory(out) as folder:
            fresh.save_pretrained(folder)
            bundle.tokenizer.save_pretrained(folder)
            data.write_prompt_layout(folder, data.PromptLayout(ref_in_system=config.ref_in_system))
            if config.model in model_utils.PRESETS and config.audio_tokenizer is None:
                model_utils.save_tiny_audio_tokenizer(folder / "audio_tokenizer", seed=config.seed)
            else:
                (folder / "audio_tokenizer.json").write_text(json.dumps({"audio_tokenizer": config.audio_tokenizer}))
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


@dataclass
class CloneEvaluation:
    """What in-loop evaluation measures generated clips with: the judge and each validation row's language."""

    judge: metrics.Judge
    languages: dict[str, str | None]


BEST_BY = ("val_loss", "sim", "wer", "sim_wer")


def selection_problem(config: TrainConfig) -> str | None:
    """Why --best-by / --patience cannot work as given, in one line; None when they can."""
    uses = [f"--best-by {config.best_by}"] * (config.best_by != "val_loss") + ["--patience"] * (config.patience > 0)
    if uses and not (config.val_manifest and config.eval_every > 0):
        return f"{' and '.join(uses)} need{'s' if len(uses) == 1 else ''} evaluations: set --val-manifest and --eval-every"
    if config.best_by != "val_loss" and config.eval_prompts < 1:
        return f"--best-by {config.best_by} measures generated clips: set --eval-prompts to 1 or more"
    return None


def clone_evaluation(config: TrainConfig, val_rows: list[dict], val_pairs: list[data.Pair], env: Dist) -> CloneEvaluation | None:
    """The judge of generated validation clips, on process 0; None where no clip is generated.

    Under FSDP no clip is generated (each generation step would need every
    process), so --best-by on a clip metric is refused there.
    """
    generates = bool(val_pairs and config.eval_every and config.eval_prompts)
    generates &= not (env.enabled and config.parallel == "fsdp")
    if config.best_by != "val_loss" and not generates:
        raise ValueError(f"--best-by {config.best_by} needs generated validation clips, which FSDP does not make; use val_loss")
    evaluation = None
    if generates and env.main:
        judge = metrics.build_judge(config.speaker_model or None, config.asr_model or None, config.eval_language or None, config.device)
        evaluation = CloneEvaluation(judge, {row["id"]: row.get("language") for row in val_rows})
    prompts = val_pairs[: config.eval_prompts]
    no_asr = evaluation is not None and config.best_by in ("wer", "sim_wer") and not any(
        evaluation.judge.intelligibility_available(evaluation.languages[pair.id]) for pair in prompts)
    if any_process(no_asr, env, config.device):
        raise ValueError(f"--best-by {config.best_by}: no ASR for the languages of the first --eval-prompts validation rows; "
                         "give --asr-model (Whisper) or --eval-language")
    return evaluation


def log_generations(writer, step: int, model, maker: SampleMaker, pairs: list[data.Pair], config: TrainConfig,
                    evaluation: CloneEvaluation) -> dict[str, float]:
    """Greedy clones of the first validation prompts: audio, mel spectrograms (generated | target | reference),
    and their SIM, WER/CER and timing as scalars and a table with the transcripts; returns the metrics' means."""
    bundle = model_utils.Bundle(model, maker.bundle.tokenizer, maker.bundle.audio_tokenizer)
    rate = bundle.audio_tokenizer.sampling_rate
    sampling = generation.Sampling(greedy=True, seed=config.seed, max_seconds=config.eval_max_seconds)
    records = []
    for pair in pairs[: config.eval_prompts]:
        with autocast(config):  # frozen weights may be held in bf16 (--frozen-bf16)
            record, generated = evaluate.evaluate_pair(bundle, evaluation.judge, pair, evaluation.languages[pair.id], sampling,
                                                       maker.codes, ref_in_system=config.ref_in_system)
        records.append(record)
        if generated is None:
            continue
        writer.add_audio(f"generated/{pair.id}", torch.from_numpy(generated)[None], step, sample_rate=rate)
        panels = [generated, data.load_audio(pair.audio, rate), data.load_audio(pair.ref_audio, rate)]
        writer.add_image(f"mel/{pair.id} (generated | target | reference)", mel_panels(panels, rate), step, dataformats="HW")
    means = {name: stats["mean"] for name, stats in metrics.summarize_records(records, config.seed).items() if stats["n"]}
    _log_values(writer, "quality", means, step)
    writer.add_text("quality/table", metrics.markdown_table(records), step)
    return means


def evaluate_clones(writer, step: int, model, maker: SampleMaker, pairs: list[data.Pair], config: TrainConfig, env: Dist,
                    evaluation: CloneEvaluation | None) -> dict[str, float]:
    """`log_generations` where clips are generated (process 0), its means shared with every process."""
    quality = log_generations(writer, step, _unwrap_ddp(model), maker, pairs, config, evaluation) if evaluation else {}
    if env.enabled:
        shared = [quality]
        dist.broadcast_object_list(shared, src=0)
        quality = shared[0]
    return quality


def selection_score(best_by: str, val: dict[str, float], quality: dict[str, float]) -> float:
    """What best.pt minimises: validation loss, -SIM, WER/CER, or WER/CER - SIM; inf when it is unavailable."""
    sim, error = quality.get("sim", math.nan), quality.get("error_rate", math.nan)
    score = {"val_loss": val["total"], "sim": -sim, "wer": error, "sim_wer": error - sim}[best_by]
    return score if math.isfinite(score) else math.inf


def best_value(best_by: str, score: float) -> float:
    """A selection score in its metric's own sign (SIM is minimised as -SIM)."""
    return -score if best_by == "sim" else score


def out_of_patience(stale_evals: int, config: TrainConfig) -> bool:
    return config.patience > 0 and stale_evals >= config.patience


def teacher_forced_accuracy(hits: np.ndarray, env: Dist, device: str) -> dict[str, float]:
    """Top-1 accuracy per codebook, overall and on stream-EOS labels, from every process's counts."""
    summed = np.array(all_mean(hits.ravel().tolist(), env, device)).reshape(hits.shape)
    return metrics.accuracy_from_hits(summed)


def _log_values(writer, prefix: str, values: dict[str, float], step: int) -> None:
    """Scalars `prefix/name`; an unavailable (NaN) value is not written, never written as 0."""
    for name, value in values.items():
        if value is not None and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{name}", value, step)


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal; `main` exits with 128 + its number (143 SIGTERM, 130 Ctrl-C)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message


class StopRequested:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary and exits.
    A second signal stops at once, without a checkpoint."""

    def __init__(self):
        self.signum = 0
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._request)

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def _request(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.signum:
            raise Stopped(signum, f"second {name}: stopped at once, without a checkpoint; --resume continues from the last one")
        self.signum = signum
        print(f"\n{name}: stopping with a checkpoint after this step ({name} again to stop at once)", file=sys.stderr)


def autocast(config: TrainConfig):
    return torch.autocast(device_type=torch.device(config.device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def train(config: TrainConfig) -> Path:
    """Run training; returns the run directory."""
    env = init_distributed(config)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with contextlib.ExitStack() as on_exit:
            return _train(config, env, on_exit)
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        if env.enabled:
            dist.destroy_process_group()


def _train(config: TrainConfig, env: Dist, on_exit: contextlib.ExitStack) -> Path:
    say = print if env.main else (lambda *args, **kwargs: None)
    run_dir = Path(config.out_dir) / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
    resume_from, saved = checkpoints.open_run(run_dir, config, env, say)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # model pieces and data: rows whose every problem was counted and reported
    bundle = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed, device=config.device)
    rows, codes = training_rows(config, bundle, env, run_dir)
    if not rows:
        raise ValueError(f"{config.cache or config.train_manifest}: no usable row to train on (counts above)")
    maker = SampleMaker(bundle, config, codes)
    val_pairs, val_maker = [], None
    if config.val_manifest:
        # Clips shared with the training manifest (the demo validates on its own data) are encoded once.
        val_codes = codes if isinstance(codes, data.CodeCache) else data.CodeCache(bundle.audio_tokenizer)
        val_rows = validated_rows(config.val_manifest, val_codes, env, run_dir / "val_rejections.jsonl")
        val_pairs = data.training_pairs(val_rows, config.seed, 0)[0]
        val_maker = SampleMaker(bundle, config, val_codes)
    evaluation = clone_evaluation(config, val_rows if config.val_manifest else [], val_pairs, env)

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
    if saved is not None:
        checkpoints.check_resume_config(saved["config"], config, resume_from)
    if env.main and not config.inspect:
        checkpoints.record_config(run_dir, config, resume_from, saved)
    first_batch = maker.batch(first_epoch[0])
    say(collate.describe_batch(first_batch, bundle.tokenizer, bundle.model.config))
    if config.inspect:
        return run_dir
    wrap_decoder_layers(model, config)
    model = parallelize(model, config, env)
    optimizer = build_optimizer(model, config)

    step, position, best_loss, stale_evals = 0, DataPosition(), float("inf"), 0
    if resume_from is not None:
        saved = None  # its memory-mapped tensors are not needed any more
        step, saved_position, best_loss = checkpoints.load_checkpoint(resume_from, model, optimizer, env)
        position = DataPosition(**saved_position)
        say(f"resumed from {resume_from} at step {step}")

    # events logged after the checkpoint by an interrupted attempt are dropped (purge_step)
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if resume_from else None) if env.main else None
    stop = StopRequested()
    batches = Prefetcher(micro_batches(rows, config, position, env, maker), maker, config.prefetch)
    last_step = min(config.max_steps, config.stop_after or config.max_steps)
    bad_steps: list[str] = []
    train_loss = float("nan")
    model.train()
    # closed on any exit, so that an error message starts its own line
    progress = on_exit.enter_context(tqdm(total=last_step, initial=step, desc="train", dynamic_ncols=True, disable=not env.main))
    while step < last_step and not out_of_patience(stale_evals, config) and not any_process(stop.requested, env, config.device):
        started = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)

        # the step: accumulate gradients over micro-batches, all-reduced on the last one
        totals: dict[str, float] = {}
        counts = np.zeros(3)  # real tokens, padded positions, samples
        hits = 0  # teacher-forced top-1 [correct, labelled] per codebook and on stream EOS
        ids: list[str] = []
        finite = True
        for micro in range(config.grad_accum):
            position, pairs, batch = next(batches)
            ids += [pair.id for pair in pairs]
            sync = micro == config.grad_accum - 1 or not isinstance(model, DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(config):
                outputs = model(**collate.batch_to_model_inputs(batch, config.device))
                loss = model_utils.compute_loss(outputs, batch.label_audio_ids)
                (loss.total / config.grad_accum).backward()
            finite &= bool(torch.isfinite(loss.total))
            hits = hits + metrics.teacher_forced_hits(outputs.audio_logits.detach(), batch.label_audio_ids,
                                                       bundle.model.config.audio_codebook_size + 1)
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
        accuracy = teacher_forced_accuracy(hits, env, config.device)
        data_wait = batches.take_wait()
        if writer and step % config.log_every == 0:
            _log(writer, step, means, optimizer, grad_norm, tokens / elapsed, samples / elapsed,
                 padded / max(1.0, tokens + padded))
            _log_values(writer, "accuracy", accuracy, step)
            writer.add_scalar("train/data_wait_fraction", data_wait / elapsed, step)
        progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        progress.update(1)

        # evaluation and checkpoints
        if val_pairs and config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
            model.eval()
            val = validation_loss(model, val_maker, val_pairs, config, env)
            if writer:
                for name, value in val.items():
                    writer.add_scalar(f"val/{name}", value, step)
            quality = evaluate_clones(writer, step, model, val_maker, val_pairs, config, env, evaluation)
            score = selection_score(config.best_by, val, quality)
            if score < best_loss:
                best_loss, stale_evals = score, 0
                checkpoints.save_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss, name="best.pt")
            else:
                stale_evals += 1
            model.train()
        if step % config.save_every == 0 or step == config.max_steps:
            checkpoints.save_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss)
    progress.close()
    batches.close()

    if step < config.max_steps:
        path = checkpoints.save_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss)
        if out_of_patience(stale_evals, config):
            say(f"no new best {config.best_by} in {config.patience} evaluations (--patience): best.pt holds the best")
        out_dir = f"--out-dir {config.out_dir} " if config.out_dir != TrainConfig.out_dir else ""
        say(f"stopped at step {step}; checkpoint {path}; continue with the same flags and {out_dir}--run-name {run_dir.name} --resume")
    else:
        export = export_model(model, config, bundle, env, run_dir / "export")
        say(f"done: {step} steps, final train loss {train_loss:.3f}"
            + (f", best {config.best_by} {best_value(config.best_by, best_loss):.3f}" if math.isfinite(best_loss) else "")
            + f"\nTensorBoard: tensorboard --logdir {config.out_dir}\n"
            f"next: python infer.py --model {export}" + (" (or just python infer.py: it takes the newest export)" if config.out_dir == "runs" else ""))
    if writer:
        hparams = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/train_loss": train_loss, f"hparam/best_{config.best_by}": best_value(config.best_by, best_loss)},
                           run_name="hparams")
        writer.close()
    if stop.requested:
        raise Stopped(stop.signum)
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
    """Exit status: 0 done (or --stop-after reached), 2 an error (one line), 128 + N stopped by signal N
    (143 SIGTERM, 130 Ctrl-C: resumable from its checkpoint; also a Ctrl-C during start-up)."""
    try:
        train(parse_config(argv))
    except Stopped as stopped:
        if stopped.message:
            print(f"error: {stopped.message}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(INTERRUPTED_AT_START, file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as error:
        print(f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error}", file=sys.stderr)
        return 2
    except (data.AudioError, data.ManifestError, collate.SampleError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # torch is loaded: Ctrl-C is main's to handle
    sys.exit(main())
