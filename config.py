"""Training settings: each one declared once, with its default, help, limits or choices, and resume rule.

    config = parse_config(["--scope", "lora", "--lr", "1e-4"])   # or --config FILE.json|yaml, flags override it

`TrainConfig` is the declaration: every field is a `setting(...)` that
carries its default, its `--help` text, its valid range or choices, and
whether `--resume` may change it. The command line, the `--config` reader,
the range checks and the resume comparison are all generated from it, so a
new setting is one line here. A parsed config is frozen: what a run derives
when it starts (the device each process binds, the schedule's length from
`--epochs`, the world size) lives in `train.RunPlan`, never in the config, so
the config saved in a checkpoint is exactly what the user asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import model_utils

ROOT = Path(__file__).resolve().parent
DEMO_MANIFEST = ROOT / "demo" / "data" / "manifest.jsonl"
CUDA = torch.cuda.is_available()

SCOPES = ("full", "audio", "lora")
BEST_BY = ("val_loss", "sim", "wer", "sim_wer")


class ConfigError(ValueError):
    """A bad flag or `--config` file: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Limit:
    """A numeric setting's valid range: `valid(value)`, described as `rule` in errors."""

    valid: Callable[[float], bool]
    rule: str


def at_least(low: float) -> Limit:
    return Limit(lambda value: value >= low, f"at least {low}")


def positive() -> Limit:
    return Limit(lambda value: value > 0, "positive")


def within(low: float, high: float, *, open_high: bool = False) -> Limit:
    if open_high:
        return Limit(lambda value: low <= value < high, f"in [{low}, {high})")
    return Limit(lambda value: low <= value <= high, f"in [{low}, {high}]")


def _length_from_epochs(config: TrainConfig) -> bool:
    """--epochs sets the schedule's length, so a resume with --epochs ignores --max-steps (checkpoints written
    before the config was frozen hold the length --epochs gave)."""
    return config.epochs > 0


def setting(default, help: str, *, limit: Limit | None = None, choices: tuple[str, ...] = (),
            resume: bool | Callable[[TrainConfig], bool] = False):
    """One training setting. `resume`: whether `--resume` may change it (True for where and how fast the run
    computes, which changes rounding at most, and for what it observes and keeps), or a rule of the config."""
    return field(default=default, metadata={"help": help, "limit": limit, "choices": choices, "resume": resume})


@dataclass(frozen=True)
class TrainConfig:
    # data
    train_manifest: str = setting(str(DEMO_MANIFEST), "JSONL manifest, speaker-grouped or paired rows (validated, encoded on the fly)")
    cache: str = setting("", "a prepared code cache (python prepare.py) to train from instead of --train-manifest")
    verify_cache: bool = setting(True, "check every shard of --cache against its checksum at start (--no-verify-cache skips it)",
                                 resume=True)
    val_manifest: str = setting(str(DEMO_MANIFEST), "JSONL manifest for validation loss and generated samples ('' = none)")
    strict_overlap: bool = setting(False, "refuse to train when the validation set shares a speaker id or a clip (same file "
                                          "content) with the training set; without it the overlap is reported", resume=True)
    ref_in_system: bool = setting(False, "put the reference in the system message instead of an assistant turn")
    prefetch: int = setting(2, "micro-batches built and collated ahead of the step by a background thread (0 = off)",
                            limit=at_least(0), resume=True)
    # model
    model: str = setting(model_utils.TINY_PRESET, "model directory or preset (tiny, tiny-whisper)")
    audio_tokenizer: str | None = setting(None, "audio tokenizer directory; required with a model directory")
    scope: str = setting("full", "what is trained: full, audio (audio FFNs, codebook embeddings, audio head) or lora",
                         choices=SCOPES)
    lora_rank: int = setting(16, "LoRA rank", limit=at_least(1))
    lora_alpha: int = setting(32, "LoRA alpha", limit=positive())
    lora_dropout: float = setting(0.0, "LoRA dropout", limit=within(0, 1, open_high=True))
    # run
    out_dir: str = setting("runs", "where runs are written", resume=True)
    run_name: str | None = setting(None, "run folder name (default: a timestamp)", resume=True)
    resume: bool = setting(False, "continue --run-name from its newest intact checkpoint (flags that change the run are refused)",
                           resume=True)
    inspect: bool = setting(False, "print the first batch readably and exit", resume=True)
    allow_data_change: bool = setting(False, "let --resume go on although the training or validation data changed since the "
                                             "checkpoint (their content fingerprint differs)", resume=True)
    export_from: str = setting("", "write the export of this checkpoint and exit: runs/NAME/checkpoints/best.pt becomes "
                                   "runs/NAME/export-best/, built with the checkpoint's own settings", resume=True)
    seed: int = setting(0, "seed of everything", limit=within(0, 2**32 - 1))  # numpy's seed range
    device: str = setting("cuda" if CUDA else "cpu", "torch device", resume=True)
    precision: str = setting("bf16" if CUDA else "fp32", "bf16 (autocast on CUDA, fp32 master weights) or fp32",
                             choices=("bf16", "fp32"))
    compile: bool = setting(False, "torch.compile the model (inductor, dynamic shapes; see --compile-scope)", resume=True)
    compile_scope: str = setting("layers", "with --compile: layers (each decoder layer, one graph each) or model (the whole "
                                           "forward: merge, layers and heads, in more graphs)", choices=("layers", "model"),
                                 resume=True)
    grad_checkpoint: bool = setting(False, "recompute decoder layers in backward", resume=True)
    frozen_bf16: bool = setting(True, "with --precision bf16, hold frozen linear weights in bf16 (bit-identical under autocast; "
                                      "trained ones stay fp32)", resume=True)
    text_logits: str = setting("labelled", "labelled (text logits only where a text label is; generation unchanged) "
                                           "or all (the package's head)", choices=("labelled", "all"), resume=True)
    debug_checks: bool = setting(False, "check every forward's labelled text positions against a second merge of the "
                                        "package's (host syncs: for debugging)", resume=True)
    parallel: str = setting("ddp", "under torchrun: ddp (replicated model) or fsdp (FSDP2: parameters, gradients and "
                                   "optimizer state sharded)", choices=("ddp", "fsdp"))
    # optimisation
    batch_size: int = setting(2, "samples per micro-batch (per process), unless --batch-tokens is set", limit=at_least(1))
    batch_tokens: int = setting(0, "token budget per micro-batch (padded positions), length-bucketed; 0 = --batch-size samples",
                                limit=at_least(0))
    grad_accum: int = setting(1, "micro-batches per optimizer step", limit=at_least(1))
    max_steps: int = setting(60, "optimizer steps (the schedule's length)", limit=at_least(1), resume=_length_from_epochs)
    epochs: float = setting(0.0, "train this many epochs instead: sets the schedule's length from the first epoch's size "
                                 "(0 = use --max-steps)", limit=at_least(0))
    stop_after: int = setting(0, "stop with a checkpoint after this many steps of the schedule (0 = never)",
                              limit=at_least(0), resume=True)
    optimizer: str = setting("adamw", "adamw (torch's, fp32 moments, fused on CUDA) or adamw8bit (torchao's AdamW8bit: "
                                      "8-bit block-quantized moments, a quarter of the memory)", choices=("adamw", "adamw8bit"))
    lr: float = setting(3e-3, "peak learning rate", limit=positive())
    min_lr_ratio: float = setting(0.1, "cosine floor as a fraction of lr", limit=within(0, 1))
    warmup_steps: int = setting(5, "linear warmup steps", limit=at_least(0))
    weight_decay: float = setting(0.01, "AdamW decay (matrices only)", limit=at_least(0))
    grad_clip: float = setting(1.0, "max gradient norm (0 = off)", limit=at_least(0))
    # logging, evaluation and checkpoints
    log_every: int = setting(1, "steps between logged scalars", limit=at_least(1), resume=True)
    eval_every: int = setting(30, "steps between evaluations (0 = never)", limit=at_least(0), resume=True)
    eval_prompts: int = setting(2, "validation prompts generated as audio", limit=at_least(0), resume=True)
    eval_max_seconds: float = setting(4.0, "longest generated validation clip", limit=positive(), resume=True)
    asr_model: str = setting("", "local Whisper directory for the validation clips' WER/CER "
                                 "('' = pocketsphinx en-us: English rows only)", resume=True)
    speaker_model: str = setting("", "local WavLMForXVector directory for SIM ('' = resemblyzer GE2E)", resume=True)
    eval_language: str = setting("", "language of validation rows without a language field ('' = none: their WER is n/a)",
                                 resume=True)
    best_by: str = setting("val_loss", "what best.pt and --patience track: val_loss, sim (higher is better), wer (lower), "
                                       "or sim_wer (lower WER - SIM)", choices=BEST_BY)
    patience: int = setting(0, "stop, with a checkpoint, after this many evaluations without a new best (0 = never)",
                            limit=at_least(0), resume=True)
    save_every: int = setting(30, "steps between checkpoints", limit=at_least(1), resume=True)
    keep_last: int = setting(2, "newest step checkpoints kept (best.pt is kept too)", limit=at_least(1), resume=True)
    max_bad_steps: int = setting(5, "consecutive non-finite losses that stop the run", limit=at_least(1), resume=True)


DEFAULTS = asdict(TrainConfig())
DECLARED = {spec.name: spec.metadata for spec in fields(TrainConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------
# Parsing and checks
# --------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """`--config` and one flag per setting; a bool gets `--name`/`--no-name`. Every default is None, so that
    only the flags given override the file and the declared defaults."""
    parser = _OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file of the fields below; flags override it")
    add_setting_flags(parser, DECLARED)
    return parser


def add_setting_flags(parser: argparse.ArgumentParser, names, shown_defaults: dict | None = None) -> None:
    """A flag for each named setting, with its declared help, defaulting to None (not given: `check_config`
    checks choices and limits once the values are merged); the help shows `shown_defaults[name]` where a
    tool has its own default, else the declared one."""
    for name in names:
        declared, default = DECLARED[name], DEFAULTS[name]
        shown = (shown_defaults or {}).get(name, default)
        if isinstance(default, bool):
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None,
                                help=f"{declared['help']} [{'on' if shown else 'off'}]")
        else:
            parser.add_argument(flag(name), type=type(default) if default is not None else str, default=None,
                                help=f"{declared['help']} [{shown}]")


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Flags override an optional JSON/YAML `--config` file, which overrides the defaults.

    Any problem (an unknown flag or key, a wrong type, a value out of range or
    not among the choices, an unreadable file) is a ConfigError with a one-line message."""
    args = build_parser(description).parse_args(argv)
    values = dict(DEFAULTS)
    if args.config:
        values.update(_read_config_file(args.config))
    values.update({key: value for key, value in vars(args).items() if key != "config" and value is not None})
    config = TrainConfig(**values)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Every choice among its declared choices, every number finite and within its declared limit, and the
    evaluation settings consistent; else a one-line ConfigError naming the flag."""
    for name, declared in DECLARED.items():
        value = getattr(config, name)
        if declared["choices"] and value not in declared["choices"]:
            raise ConfigError(f"{flag(name)} must be one of {', '.join(declared['choices'])}, not {value} (see --help)")
    for name, declared in DECLARED.items():
        value, limit = getattr(config, name), declared["limit"]
        if limit is not None and not (math.isfinite(value) and limit.valid(value)):
            raise ConfigError(f"{flag(name)} must be {limit.rule}, not {value}")
    problem = selection_problem(config)
    if problem:
        raise ConfigError(f"{problem} (see --help)")


def selection_problem(config: TrainConfig) -> str | None:
    """Why --best-by / --patience cannot work as given, in one line; None when they can."""
    uses = [f"--best-by {config.best_by}"] * (config.best_by != "val_loss") + ["--patience"] * (config.patience > 0)
    if uses and not (config.val_manifest and config.eval_every > 0):
        return f"{' and '.join(uses)} need{'s' if len(uses) == 1 else ''} evaluations: set --val-manifest and --eval-every"
    if config.best_by != "val_loss" and config.eval_prompts < 1:
        return f"--best-by {config.best_by} measures generated clips: set --eval-prompts to 1 or more"
    return None


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
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(unknown)} (fields are the flags' names with _ for -)")
    for name, value in values.items():
        if not _has_type(value, DEFAULTS[name]):
            expected = "a string or null" if DEFAULTS[name] is None else type(DEFAULTS[name]).__name__
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


def as_flags(config: TrainConfig, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The flags that give `config` from the defaults (those of its settings that differ from them)."""
    flags = []
    for name, value in asdict(config).items():
        if name in leave_out or value == DEFAULTS[name]:
            continue
        if isinstance(value, bool):
            flags.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            flags += [flag(name), "" if value is None else str(value)]
    return flags


# --------------------------------------------------------------------------
# Resume: which differences from a checkpoint's config make another run
# --------------------------------------------------------------------------


def may_change_on_resume(name: str, config: TrainConfig) -> bool:
    rule = DECLARED[name]["resume"]
    return rule(config) if callable(rule) else rule


def config_changes(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """Fields whose value differs from a saved config's (old, new); a path naming the same file is the same,
    and a field the saved config lacks (a setting added since) counts as its default."""
    changes = {}
    for name, value in asdict(config).items():
        old = saved.get(name, DEFAULTS[name])
        same_file = (isinstance(old, str) and isinstance(value, str) and old and value
                     and os.path.exists(old) and os.path.exists(value) and os.path.samefile(old, value))
        if old != value and not same_file:
            changes[name] = (old, value)
    return changes


def check_resume(saved: dict, config: TrainConfig, checkpoint: Path) -> None:
    """Refuse, in one line naming each field, a --resume whose flags would change the run (see each setting's
    `resume` rule): data, model, scope, LoRA, seed, batch, accumulation, placement, precision, parallelism,
    optimizer and the schedule, --max-steps included since it sets the cosine's length."""
    refused = {name: change for name, change in config_changes(saved, config).items() if not may_change_on_resume(name, config)}
    if not refused:
        return
    listed = ", ".join(f"{flag(name)} {old!r} (now {new!r})" for name, (old, new) in refused.items())
    hint = "; to train longer, start a new run from this one's export" if "max_steps" in refused else ""
    raise ValueError(f"--resume: {checkpoint} was trained with {listed}; resume with its values or start another --run-name{hint}")
