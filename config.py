"""Training settings: each one declared once, with its default, help, limits or choices, and resume rule.

    config = parse_config(["--scope", "lora", "--lr", "1e-4"])   # or --config FILE.json|yaml, flags override it

`TrainConfig` is the declaration: every field is a `setting(...)` that
carries its default, its `--help` text, its valid range or choices, and
whether `--resume` may change it. The command line, the `--config` reader,
the range checks and the resume comparison are all generated from it, so a
new setting is one line here. A parsed config is frozen: what a run derives
when it starts (the device each process binds, the schedule's length from
`--epochs`, the world size) lives in `train.RunPlan`, never in the config, so
the config saved in a checkpoint is exactly what the user asked for. The one
exception is `auto`, the default of `--device` and `--precision`: it names
the machine's choice rather than making it here, so this module needs no
torch (`--help` is quick) and flags print alike on every machine; a run
settles it when it starts (`settle_auto`), and computes, records and resumes
with what it became.

A setting whose default is a tuple is repeatable (`--train-manifest`,
`--cache`, `--val-manifest`, `--guard`). The spellings these flags take are
read here too, so a misspelt one is a one-line error at parse time: a data
set `PATH`, `NAME=PATH` or `NAME:WEIGHT=PATH` (`parse_set`), `--best-by
METRIC@SET` (`selection`) and `--guard METRIC@SET<=+X` (`parse_guard`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEMO_MANIFEST = ROOT / "demo" / "data" / "manifest.jsonl"
# model_utils.TINY_PRESET, spelt out so that the settings import no model code (tests/test_config.py checks they agree)
TINY_PRESET = "tiny"
AUTO = "auto"  # --device and --precision: the machine's choice, made when a run starts (`settle_auto`)

SCOPES = ("full", "audio", "lora")
BEST_BY = ("val_loss", "sim", "wer", "sim_wer", "mos")
# fail_*: the share of generated clips that failed that way (metrics.failure_flags)
FAILURE_RATES = ("fail_runaway", "fail_silent", "fail_short", "fail_clamped", "fail_any")
GUARDED = BEST_BY + ("kl",) + FAILURE_RATES  # kl: KL(base || adapted) on a validation set, LoRA runs only
CLIP_METRICS = ("sim", "wer", "sim_wer", "mos") + FAILURE_RATES  # measured on generated clips
ONE_TRAINING_SET = "train"  # the name of a lone unnamed training set (its data position and fingerprint)


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
    computes, which changes rounding at most, and for what it observes and keeps), or a rule of the config.
    A tuple default makes a repeatable flag, whose values a config file gives as a list (or one string)."""
    return field(default=default, metadata={"help": help, "limit": limit, "choices": choices, "resume": resume})


@dataclass(frozen=True)
class TrainConfig:
    # data
    train_manifest: tuple[str, ...] = setting((str(DEMO_MANIFEST),), "JSONL manifest, speaker-grouped or paired rows "
                                              "(validated, encoded on the fly); repeat as NAME:WEIGHT=PATH for a mixture "
                                              "drawn by weight")
    cache: tuple[str, ...] = setting((), "a prepared code cache (python prepare.py) to train from instead of "
                                         "--train-manifest; repeat as NAME:WEIGHT=DIR for a mixture")
    verify_cache: bool = setting(True, "check every shard of --cache against its checksum at start (--no-verify-cache skips it)",
                                 resume=True)
    val_manifest: tuple[str, ...] = setting((str(DEMO_MANIFEST),), "JSONL manifest for validation loss and generated "
                                            "samples, logged as val/* and quality/*; repeat as NAME=PATH for named sets, "
                                            "logged as val/NAME/* and quality/NAME/* ('' = none)")
    strict_overlap: bool = setting(False, "refuse to train when the validation set shares a speaker id or a clip (same file "
                                          "content) with the training set; without it the overlap is reported", resume=True)
    ref_in_system: bool = setting(False, "put the reference in the system message instead of an assistant turn")
    prefetch: int = setting(2, "micro-batches built and collated ahead of the step by a background thread (0 = off)",
                            limit=at_least(0), resume=True)
    # model
    model: str = setting(TINY_PRESET, "model directory or preset (tiny, tiny-whisper)")
    audio_tokenizer: str | None = setting(None, "audio tokenizer directory; required with a model directory")
    scope: str = setting("full", "what is trained: full, audio (audio FFNs, codebook embeddings, audio head) or lora",
                         choices=SCOPES)
    lora_rank: int = setting(16, "LoRA rank", limit=at_least(1))
    lora_alpha: int = setting(32, "LoRA alpha", limit=positive())
    lora_dropout: float = setting(0.0, "LoRA dropout", limit=within(0, 1, open_high=True))
    kl_weight: float = setting(0.0, "forgetting guard (LoRA): add this times KL(base || adapted) of the audio-token "
                                    "distributions at the target positions to the loss; the base is the model with its "
                                    "adapters disabled (0 = off)", limit=at_least(0))
    kl_replay: str = setting("", "the training set (NAME of a mixture) whose micro-batches take the --kl-weight term "
                                 "('' = every micro-batch)")
    # preference tuning (docs/preference-tuning.md)
    objective: str = setting("sft", "what the step optimises: sft (the supervised loss), dpo (chosen over rejected clips of "
                                    "--pairs) or grpo (--group clips sampled per prompt of the training set in each step, "
                                    "scored by --reward)", choices=("sft", "dpo", "grpo"))
    pairs: str = setting("", "with --objective dpo: a folder written by python infer.py --candidates (its pairs, their codes "
                             "and the sampling model's log-probabilities, the reference)")
    dpo_beta: float = setting(0.1, "with --objective dpo: beta, how far the log-probability ratios may move from the reference",
                              limit=positive())
    group: int = setting(4, "with --objective grpo: clips sampled per prompt, whose rewards are normalised within the group",
                         limit=at_least(2))
    reward: str = setting("wer:1,sim:1", "with --objective grpo: NAME:WEIGHT,... over the judge's metrics (wer, cer, silences and "
                                         "fail_* negated; sim, mos, stop; any numeric column of the judge's rows but the target's and "
                                         "duration_ratio, which need the target clip) and frames / low_codes, code-only checks for tests")
    sample_max_seconds: float = setting(4.0, "with --objective grpo: longest clip sampled", limit=positive())
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
    device: str = setting(AUTO, "torch device; auto: cuda where a GPU is visible, else cpu", resume=True)
    precision: str = setting(AUTO, "bf16 (autocast, fp32 master weights) or fp32; auto: bf16 where a GPU is visible, "
                                   "else fp32", choices=(AUTO, "bf16", "fp32"))
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
    eval_batch_size: int = setting(1, "validation prompts generated together per decoding step (batched generation; "
                                      "1 = the package's generate)", limit=at_least(1), resume=True)
    asr_model: str = setting("", "local Whisper directory for the validation clips' WER/CER "
                                 "('' = pocketsphinx en-us: English rows only)", resume=True)
    speaker_model: str = setting("", "local WavLMForXVector directory for SIM ('' = resemblyzer GE2E)", resume=True)
    eval_language: str = setting("", "language of validation rows without a language field ('' = none: their WER is n/a)",
                                 resume=True)
    best_by: str = setting("val_loss", "what best.pt and --patience track: val_loss, sim (higher is better), wer (lower), "
                                       "sim_wer (lower WER - SIM) or mos (higher); METRIC@SET names a validation set")
    guard: tuple[str, ...] = setting((), "a bound on a validation set's metric, repeatable: METRIC@SET<=+X (may not rise "
                                         "more than X above its first evaluation, made before training), METRIC@SET>=-X "
                                         "(may not fall more than X), or <=X / >=X (absolute); METRIC is val_loss, sim, "
                                         "wer, sim_wer, mos, kl, or a failure rate: fail_runaway, fail_silent, fail_short, "
                                         "fail_clamped, fail_any", resume=True)
    guard_action: str = setting("veto", "what a breached --guard does: veto (that evaluation cannot be best) or stop (also "
                                        "stops the run with a checkpoint and exports the best)", choices=("veto", "stop"),
                                resume=True)
    patience: int = setting(0, "stop, with a checkpoint, after this many evaluations without a new best (0 = never)",
                            limit=at_least(0), resume=True)
    save_every: int = setting(30, "steps between checkpoints", limit=at_least(1), resume=True)
    keep_last: int = setting(2, "newest step checkpoints kept (best.pt is kept too)", limit=at_least(1), resume=True)
    max_bad_steps: int = setting(5, "consecutive non-finite losses that stop the run", limit=at_least(1), resume=True)

    def __post_init__(self):
        # A repeatable setting given one string (the single-value spelling, an older config.json) is a list of one.
        for spec in fields(self):
            if isinstance(spec.default, tuple):
                object.__setattr__(self, spec.name, as_list(getattr(self, spec.name)))


def settle_auto(config: TrainConfig, cuda: bool) -> TrainConfig:
    """`config` with an `auto` --device and --precision made what they stand for on a machine where `cuda`
    (torch.cuda.is_available()) says whether a GPU is visible: cuda and bf16 there, else cpu and fp32 (the
    defaults these settings had before `auto`, so checkpoints from then compare alike)."""
    settled = {"device": "cuda" if cuda else "cpu", "precision": "bf16" if cuda else "fp32"}
    return replace(config, **{name: value for name, value in settled.items() if getattr(config, name) == AUTO})


def as_list(value: str | list | tuple) -> tuple[str, ...]:
    """A repeatable setting's values: one string is one value, '' alone (or only '') is none."""
    values = (value,) if isinstance(value, str) else tuple(value)
    return () if all(item == "" for item in values) else values


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
        elif isinstance(default, tuple):
            parser.add_argument(flag(name), action="append", default=None,
                                help=f"{declared['help']} [{' '.join(shown) or 'none'}]")
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
    problem = sets_problem(config) or selection_problem(config) or forgetting_problem(config) or objective_problem(config)
    if problem:
        raise ConfigError(f"{problem} (see --help)")


def selection_problem(config: TrainConfig) -> str | None:
    """Why --best-by / --patience / --guard cannot work as given, in one line; None when they can."""
    try:
        watched = watched_metrics(config)
    except ConfigError as error:
        return str(error)
    uses = ([f"--best-by {config.best_by}"] * (config.best_by != "val_loss") + ["--patience"] * (config.patience > 0)
            + [f"--guard {text}" for text in config.guard])
    if uses and not (config.val_manifest and config.eval_every > 0):
        return f"{' and '.join(uses)} need{'s' if len(uses) == 1 else ''} evaluations: set --val-manifest and --eval-every"
    clips = [f"{metric}@{name}" if name else metric for metric, name in watched if metric in CLIP_METRICS]
    if clips and config.eval_prompts < 1:
        return f"--best-by or --guard {clips[0]} measures generated clips: set --eval-prompts to 1 or more"
    if any(metric == "kl" for metric, _ in watched) and config.scope != "lora":
        return "--guard kl measures KL to the base, which only LoRA has (its adapters disabled): use --scope lora"
    return None


def _read_config_file(path: str) -> dict:
    """The fields of a JSON or YAML file, each of its field's type (a repeatable one a list, or one string);
    any problem is a one-line ConfigError."""
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
            expected = {type(None): "a string or null", tuple: "a string or a list of strings"}.get(
                type(DEFAULTS[name]), type(DEFAULTS[name]).__name__)
            raise ConfigError(f"--config {path}: {name} must be {expected}, not {value!r}")
    return values


def _has_type(value, default) -> bool:
    """The type of the field's default; a bool is not a number here, an int is a float, a field whose
    default is None takes a string or null, a repeatable one a string or a list of strings."""
    if default is None:
        return value is None or isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))
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
        elif isinstance(value, tuple):
            flags += [item for text in value or ("",) for item in (flag(name), text)]
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
    a field the saved config lacks (a setting added since) counts as its default, and a repeatable setting saved
    as one string (before it was repeatable) is a list of that one."""
    changes = {}
    for name, value in asdict(config).items():
        old = saved.get(name, DEFAULTS[name])
        if isinstance(value, tuple):
            old = as_list(old)
            same = len(old) == len(value) and all(map(_same_set, old, value))
        else:
            same = old == value or _same_file(old, value)
        if not same:
            changes[name] = (old, value)
    return changes


def _same_file(old, new) -> bool:
    return (isinstance(old, str) and isinstance(new, str) and bool(old) and bool(new)
            and os.path.exists(old) and os.path.exists(new) and os.path.samefile(old, new))


def _same_set(old: str, new: str) -> bool:
    """The same name and weight, and the same file (a set's spelling, or a guard's text, compared alike)."""
    if old == new:
        return True
    first, second = SET_SPEC.fullmatch(old), SET_SPEC.fullmatch(new)
    if bool(first) != bool(second):
        return False
    if first:
        weights = [None if match["weight"] is None else float(match["weight"]) for match in (first, second)]
        return first["name"] == second["name"] and weights[0] == weights[1] and _same_file(first["path"], second["path"])
    return _same_file(old, new)


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


def forgetting_problem(config: TrainConfig) -> str | None:
    """Why --kl-weight / --kl-replay cannot work as given, in one line; None when they can."""
    if config.kl_weight > 0 and config.scope != "lora":
        return (f"--kl-weight needs --scope lora: its base is the model with the adapters disabled, and --scope "
                f"{config.scope} has no such base; mix the old kind of data back in instead, e.g. --train-manifest "
                "new:0.8=new.jsonl --train-manifest old:0.2=old.jsonl (docs/new-language.md)")
    if config.kl_replay:
        names = [spec.name for spec in training_specs(config)]
        if config.kl_weight == 0:
            return "--kl-replay names where the --kl-weight term is taken: set --kl-weight"
        if config.kl_replay not in names:
            return f"--kl-replay {config.kl_replay}: no training set of that name (sets: {', '.join(names)})"
        if config.parallel == "fsdp":
            return ("--kl-replay with --parallel fsdp: the base pass would run on some processes only, and FSDP needs "
                    "every process in each pass; use --kl-weight on every micro-batch")
    return None


def objective_problem(config: TrainConfig) -> str | None:
    """Why --objective and its settings cannot work as given, in one line; None when they can."""
    if (config.objective == "dpo") != bool(config.pairs):
        return "--objective dpo trains on --pairs DIR (python infer.py --candidates M --out DIR), and --pairs needs it"
    if config.objective == "dpo" and config.kl_weight:
        return "--kl-weight with --objective dpo: DPO's reference log-probabilities already hold it to the sampling model"
    for flag, objective in (("dpo_beta", "dpo"), ("group", "grpo"), ("reward", "grpo"), ("sample_max_seconds", "grpo")):
        if config.objective != objective and getattr(config, flag) != DEFAULTS[flag]:
            return f"--{flag.replace('_', '-')} is a setting of --objective {objective}, and this run's is {config.objective}"
    return None


# --------------------------------------------------------------------------
# Data sets: PATH, or NAME=PATH, or NAME:WEIGHT=PATH
# --------------------------------------------------------------------------

# A name starts with a letter and holds no '/', so a path such as data/a=b.jsonl is a path; a file in the
# working directory whose name reads as NAME=PATH is written ./NAME=PATH (and refused if not).
SET_SPEC = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_-]*)(?::(?P<weight>[^=]*))?=(?P<path>.+)")


@dataclass(frozen=True)
class SetSpec:
    """One training or validation set as the flags give it; a weight is relative to the mixture's others."""

    name: str | None
    weight: float | None
    path: str


def parse_set(text: str, option: str) -> SetSpec:
    """`PATH`, `NAME=PATH` or `NAME:WEIGHT=PATH`; a ConfigError in one line for a bad weight or an ambiguous file."""
    match = SET_SPEC.fullmatch(text)
    if not match:
        return SetSpec(None, None, text)
    if os.path.exists(text):
        raise ConfigError(f"{option} {text}: a file of that name exists, and the text reads as NAME=PATH; "
                          f"write ./{text} for the file")
    weight = None
    if match["weight"] is not None:
        try:
            weight = float(match["weight"])
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{option} {text}: the weight after ':' must be a positive number, not {match['weight']!r}")
    return SetSpec(match["name"], weight, match["path"])


def _training_flag(config: TrainConfig) -> tuple[str, tuple[str, ...]]:
    """The flag the training sets come from and its values: --cache if given, else --train-manifest."""
    return ("--cache", config.cache) if config.cache else ("--train-manifest", config.train_manifest)


def training_specs(config: TrainConfig) -> list[SetSpec]:
    """The training sets, named, with weights summing to 1: the --cache ones if any, else the --train-manifest ones
    (a lone unnamed set is `ONE_TRAINING_SET`)."""
    option, texts = _training_flag(config)
    sets = [parse_set(text, option) for text in texts]
    if len(sets) == 1:
        return [SetSpec(sets[0].name or ONE_TRAINING_SET, 1.0, sets[0].path)]
    total = sum(spec.weight for spec in sets)
    return [SetSpec(spec.name, spec.weight / total, spec.path) for spec in sets]


def _weights_problem(option: str, sets: list[SetSpec]) -> str | None:
    """Why a mixture's weights, each a positive finite number, cannot be normalised to shares: a sum beyond a
    float's range, or a share that rounds to 0 (a set never drawn)."""
    total = sum(spec.weight for spec in sets)
    if not math.isfinite(total):
        return (f"{option}: the weights {', '.join(f'{spec.weight:g}' for spec in sets)} add up to more than a float holds: "
                f"give them smaller, e.g. {sets[0].name}:0.8=PATH")
    for spec in sets:
        if spec.weight / total == 0:
            return f"{option}: the weight of {spec.name}, {spec.weight:g}, is lost beside the others' (its share rounds to 0)"
    return None


def validation_specs(config: TrainConfig) -> list[SetSpec]:
    """The validation sets; a lone unnamed one has the name None (logged as val/*, quality/*)."""
    return [parse_set(text, "--val-manifest") for text in config.val_manifest]


def sets_problem(config: TrainConfig) -> str | None:
    """Why the training or validation sets cannot work as given, in one line; None when they can."""
    option, texts = _training_flag(config)
    for name, values in ((option, texts), ("--val-manifest", config.val_manifest)):
        if "" in values:
            return f"{name} '' (none) cannot be given with other sets"
    if not texts:
        return "--train-manifest: give a training set"
    try:
        train, val = [parse_set(text, option) for text in texts], validation_specs(config)
    except ConfigError as error:
        return str(error)
    if len(train) > 1 and any(spec.name is None or spec.weight is None for spec in train):
        return f"{option}: a mixture names each set and its weight, NAME:WEIGHT=PATH (e.g. vi:0.8=vi.jsonl)"
    if len(train) > 1 and (problem := _weights_problem(option, train)):
        return problem
    if any(spec.weight is not None for spec in val):
        return "--val-manifest: a validation set has no weight: NAME=PATH"
    if len(val) > 1 and any(spec.name is None for spec in val):
        return "--val-manifest: name each of several validation sets, NAME=PATH"
    for flag_name, specs in ((option, train), ("--val-manifest", val)):
        names = [spec.name for spec in specs if spec.name]
        if len(set(names)) < len(names):
            return f"{flag_name}: each set needs its own name, not {', '.join(sorted(names))}"
    if config.epochs and len(train) > 1:
        return "--epochs is ambiguous for a mixture (each set has its own epochs): give --max-steps"
    return None


# --------------------------------------------------------------------------
# What evaluations watch: --best-by METRIC[@SET] and --guard METRIC[@SET]<=|>=[+-]X
# --------------------------------------------------------------------------

GUARD = re.compile(r"(?P<metric>[a-z_]+)(?:@(?P<set>[^<>=]+))?(?P<op><=|>=)(?P<bound>[+-]?(?:\d+\.?\d*|\.\d+))")


@dataclass(frozen=True)
class GuardRule:
    """`metric` on validation set `set_name` stays `<=` or `>=` `bound`: relative to its first evaluation
    when the bound carries a sign, else absolute."""

    text: str
    metric: str
    set_name: str | None
    upper: bool
    bound: float
    relative: bool

    def breached(self, value: float, first: float | None) -> bool:
        limit = self.limit(first)
        return value > limit if self.upper else value < limit

    def limit(self, first: float | None) -> float:
        return (first + self.bound) if self.relative else self.bound


def parse_guard(text: str, val_names: list[str | None]) -> GuardRule:
    match = GUARD.fullmatch(text)
    if not match:
        raise ConfigError(f"--guard {text}: expected METRIC@SET<=+X, METRIC@SET>=-X or an absolute bound, e.g. wer@en<=+0.05")
    if match["metric"] not in GUARDED:
        raise ConfigError(f"--guard {text}: the metric must be one of {', '.join(GUARDED)}")
    metric = _metric(match["metric"], match["set"], val_names, "--guard", text, GUARDED)
    return GuardRule(text, metric[0], metric[1], match["op"] == "<=", float(match["bound"]),
                     match["bound"][0] in "+-")


def selection(config: TrainConfig) -> tuple[str, str | None]:
    """--best-by as (metric, validation set name): without @SET the first set; None for a lone unnamed one."""
    metric, _, name = config.best_by.partition("@")
    return _metric(metric, name or None, [spec.name for spec in validation_specs(config)], "--best-by",
                   config.best_by, BEST_BY)


def guard_rules(config: TrainConfig) -> list[GuardRule]:
    names = [spec.name for spec in validation_specs(config)]
    return [parse_guard(text, names) for text in config.guard]


def watched_metrics(config: TrainConfig) -> list[tuple[str, str | None]]:
    """(metric, set) of --best-by and of each --guard; a ConfigError names the first misspelt one."""
    return [selection(config)] + [(rule.metric, rule.set_name) for rule in guard_rules(config)]


def _metric(metric: str, name: str | None, val_names: list[str | None], option: str, text: str,
            known: tuple[str, ...]) -> tuple[str, str | None]:
    """(metric, set) of a METRIC[@SET] spelling; without @SET, the first validation set."""
    if metric not in known:
        raise ConfigError(f"{option} must be one of {', '.join(known)}, not {text}; METRIC@SET names a validation set")
    if name is None:
        return metric, val_names[0] if val_names else None
    if name not in val_names:
        named = ", ".join(n for n in val_names if n) or "none: name one with --val-manifest NAME=PATH"
        raise ConfigError(f"{option} {text}: no validation set named {name} (named sets: {named})")
    return metric, name
