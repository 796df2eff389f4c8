"""Checkpoints and runs: what `train.py` writes so that a run never loses work.

A run directory belongs to one run; `--resume` continues it unchanged (the
flags are checked against the checkpoint's config) from the newest intact
checkpoint. Checkpoints hold the trained parameters, optimizer state, data
position, every process's RNG state and the config: one file for one-process
and DDP runs, a `torch.distributed.checkpoint` directory written by every
process for FSDP runs. Every file is written whole or not at all (temporary
name, fsync, rename: `files.py`), and a failure to write is one line naming
the path.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import files

if TYPE_CHECKING:
    from train import DataPosition, Dist, TrainConfig

# --------------------------------------------------------------------------
# Checkpoints (atomic, last K and best kept, weights_only-loadable)
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
    FSDP runs write a sharded directory instead (`save_sharded_checkpoint`).
    """
    if sharded_checkpoints(config, env):
        return save_sharded_checkpoint(run_dir, step, model, optimizer, position, config, env, best_loss, name)
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
        with files.atomic_file(path) as handle:
            torch.save(state, handle)
        prune_checkpoints(folder, config.keep_last, path)
    if env.enabled:
        dist.barrier()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir / "checkpoints")
    return found[-1] if found else None


def step_checkpoints(folder: Path) -> list[Path]:
    """`step_N.pt` files and `step_N.dcp` directories (FSDP), oldest to newest by step number (not by name)."""
    found = [path for path in folder.glob("step_*") if STEP_CHECKPOINT.fullmatch(path.name)]
    return sorted(found, key=lambda path: int(STEP_CHECKPOINT.fullmatch(path.name).group(1)))


def prune_checkpoints(folder: Path, keep_last: int, written: Path) -> None:
    """Keep the `keep_last` newest step checkpoints, and always the one just written."""
    found = step_checkpoints(folder)
    keep = set(found[-keep_last:]) | {written}
    for old in found:
        if old not in keep:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def load_checkpoint(path: Path, model, optimizer, env: Dist) -> tuple[int, dict, float]:
    """Restore model, optimizer and this process's RNG state; returns the step, the data position (the
    fields of `train.DataPosition`) and the best score."""
    if path.is_dir():
        return load_sharded_checkpoint(path, model, optimizer, env)
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = trained_names(model) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trained parameters, e.g. {sorted(missing)[:3]}")
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if len(state["rng"]) != env.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with as many (now {env.world_size})")
    set_rng_state(state["rng"][env.rank])
    return state["step"], state["position"], state["best_loss"]


SHARDED_SUFFIX = ".dcp"
TRAIN_STATE = "train_state.pt"
STEP_CHECKPOINT = re.compile(rf"step_(\d+)(?:\.pt|{re.escape(SHARDED_SUFFIX)})")


def sharded_checkpoints(config: TrainConfig, env: Dist) -> bool:
    """FSDP runs save sharded checkpoints; one-process and DDP runs a single file."""
    return env.enabled and config.parallel == "fsdp"


def sharded_tensors(model, optimizer) -> dict:
    """This process's shards of the trained parameters and of the optimizer state, as DCP saves and loads them."""
    keep = trained_names(model)
    return {"model": {k: v for k, v in get_model_state_dict(model).items() if k in keep},
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded_checkpoint(run_dir: Path, step: int, model, optimizer, position: DataPosition, config: TrainConfig,
                            env: Dist, best_loss: float, name: str | None = None) -> Path:
    """`checkpoints/step_N.dcp/` (`best.dcp/` for `name="best.pt"`): a torch.distributed.checkpoint directory.

    Each process writes its own shards of the trained parameters and optimizer
    state (`__RANK_0.distcp`), so nothing is gathered: for full fine-tuning of
    the released model that is ~69 GB of fp32 weights and AdamW state that no
    longer passes through process 0's memory at every save. Process 0 adds
    `train_state.pt` (step, data position, every process's RNG state, best
    loss, config). All of it is written into `NAME.dcp.tmp/` and renamed once
    complete, so a directory named `*.dcp` is always whole. Across machines,
    `--out-dir` must be a filesystem every node sees.
    """
    folder = run_dir / "checkpoints"
    path = folder / ((Path(name).stem if name else f"step_{step:08d}") + SHARDED_SUFFIX)
    temporary = path.with_name(path.name + ".tmp")
    if env.main:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
        temporary.mkdir(parents=True)
    dist.barrier()
    # DCP writes each process's files (fsynced), then the metadata on process 0 after all have reported.
    dcp.save(sharded_tensors(model, optimizer), checkpoint_id=temporary)
    rngs = [None] * env.world_size
    dist.all_gather_object(rngs, rng_state())
    if env.main:
        state = {"step": step, "position": asdict(position), "rng": rngs, "best_loss": best_loss, "config": asdict(config)}
        with open(temporary / TRAIN_STATE, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        _replace_directory(temporary, path)
        prune_checkpoints(folder, config.keep_last, path)
    dist.barrier()
    return path


def _replace_directory(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing `path` (best.dcp) is first moved aside to `PATH.old`, then deleted."""
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    else:
        os.replace(new, path)
    files.fsync_directory(path.parent)


def load_sharded_checkpoint(path: Path, model, optimizer, env: Dist) -> tuple[int, dict, float]:
    """Restore a `save_sharded_checkpoint` directory: each process reads the shards it holds."""
    state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    if len(state["rng"]) != env.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with as many (now {env.world_size})")
    tensors = sharded_tensors(model, optimizer)
    dcp.load(tensors, checkpoint_id=path)
    set_model_state_dict(model, tensors["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    set_rng_state(state["rng"][env.rank])
    return state["step"], state["position"], state["best_loss"]


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Delete what an interrupted write left in a run (`checkpoints/*.tmp-*`, `export.tmp-*`, `export.old-*`);
    an `export.old-*` whose replacement never arrived is moved back to `export` instead."""
    for old in run_dir.glob("export.old-*"):
        if not (run_dir / "export").exists():
            os.replace(old, run_dir / "export")
    stray = sorted([*(run_dir / "checkpoints").glob("*.tmp*"), *run_dir.glob("export.tmp-*"), *run_dir.glob("export.old-*")])
    for path in stray:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stray


# --------------------------------------------------------------------------
# Runs: a run directory belongs to one run; --resume continues it unchanged
# --------------------------------------------------------------------------

# What --resume may change: where and how fast the run computes (the device, compile and activation
# checkpointing change floating-point rounding at most), and what it observes and keeps. Anything else
# (data, model, scope, LoRA, seed, batch, accumulation, placement, precision, parallelism, optimizer and
# the schedule, --max-steps included since it sets the cosine's length) would make another run.
RESUME_SAFE = {"out_dir", "run_name", "resume", "inspect", "device", "compile", "grad_checkpoint", "stop_after",
               "log_every", "eval_every", "eval_prompts", "eval_max_seconds", "save_every", "keep_last", "max_bad_steps",
               "patience", "asr_model", "speaker_model", "eval_language", "prefetch", "verify_cache",
               "frozen_bf16", "text_logits"}
CHECKPOINT_KEYS = {"step", "model", "optimizer", "position", "rng", "best_loss", "config"}


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("config.json", "checkpoints", "tensorboard", "export"))


def open_run(run_dir: Path, config: TrainConfig, env: Dist, say) -> tuple[Path | None, dict | None]:
    """A new run claims a name no run holds; a --resume gets the newest intact checkpoint, after stray
    temporaries are cleaned, and its state (tensors memory-mapped), whose config must match the flags."""
    if not config.resume:
        if holds_a_run(run_dir):
            raise ValueError(f"{run_dir} already holds a run: continue it with --resume, or pick another --run-name")
        if env.main:
            run_dir.mkdir(parents=True, exist_ok=True)
        return None, None
    if env.main:
        stray = clean_temporaries(run_dir)
        if stray:
            say(f"removed what an interrupted write left: {', '.join(str(path) for path in stray)}")
    path, state = newest_intact_checkpoint(run_dir, env, say)
    check_resume_config(state["config"], config, path, ignore=("max_steps",) if config.epochs else ())
    return path, state


def read_checkpoint_state(path: Path) -> dict:
    """A checkpoint's state with its tensors memory-mapped (read when used), or a ValueError saying what is
    wrong with the file (empty, truncated, not a checkpoint, another program's)."""
    required = CHECKPOINT_KEYS
    if path.is_dir():  # a sharded checkpoint: its tensors are in the DCP files, the rest in train_state.pt
        path, required = path / TRAIN_STATE, CHECKPOINT_KEYS - {"model", "optimizer"}
    try:
        if path.stat().st_size == 0:
            raise ValueError("empty file")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except ValueError:
        raise
    except Exception as error:  # torch reports a damaged file as RuntimeError, UnpicklingError, EOFError...
        raise ValueError(files.first_line(error)) from None
    if not isinstance(state, dict) or not required <= set(state) or not isinstance(state["config"], dict):
        raise ValueError(f"not a train.py checkpoint (a {type(state).__name__} without {sorted(required)})")
    return state


def newest_intact_checkpoint(run_dir: Path, env: Dist, say) -> tuple[Path, dict]:
    """The newest readable `step_N.pt` and its state; damaged newer ones are named and set aside as `*.corrupt`."""
    folder = run_dir / "checkpoints"
    found = step_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}: nothing to resume (pick another --run-name)")
    damaged: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = read_checkpoint_state(path)
        except ValueError as error:
            damaged.append((path, str(error)))
            continue
        if damaged:
            listed = "; ".join(f"{bad} ({reason})" for bad, reason in damaged)
            say(f"warning: unreadable checkpoint {listed}: resuming from {path} instead; the unreadable kept as *.corrupt")
            if env.main:
                for bad, _ in damaged:
                    os.replace(bad, bad.with_name(bad.name + ".corrupt"))
        return path, state
    listed = "; ".join(f"{bad.name} ({reason})" for bad, reason in damaged)
    raise ValueError(f"--resume: no intact checkpoint in {folder}: {listed}")


def config_changes(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """Fields whose value differs from the checkpoint's config (old, new); a path naming the same file is the same."""
    defaults = asdict(type(config)())
    changes = {}
    for name, value in asdict(config).items():
        old = saved.get(name, defaults[name])
        same_file = (isinstance(old, str) and isinstance(value, str) and old and value
                     and os.path.exists(old) and os.path.exists(value) and os.path.samefile(old, value))
        if old != value and not same_file:
            changes[name] = (old, value)
    return changes


def check_resume_config(saved: dict, config: TrainConfig, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming each field, a --resume whose flags would change the run (see RESUME_SAFE)."""
    refused = {name: change for name, change in config_changes(saved, config).items()
               if name not in RESUME_SAFE and name not in ignore}
    if not refused:
        return
    listed = ", ".join(f"--{name.replace('_', '-')} {old!r} (now {new!r})" for name, (old, new) in refused.items())
    hint = "; to train longer, start a new run from this one's export" if "max_steps" in refused else ""
    raise ValueError(f"--resume: {path} was trained with {listed}; resume with its values or start another --run-name{hint}")


def record_config(run_dir: Path, config: TrainConfig, resumed: Path | None, saved: dict | None) -> None:
    """`config.json` holds the configuration in force; a resume appends the fields it changed (old and new
    values) to `resumes.jsonl`, so the earlier configuration is never lost."""
    if resumed is not None:
        changed = {name: list(change) for name, change in config_changes(saved["config"], config).items() if name != "resume"}
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(resumed), "step": saved["step"], "changed": changed}
        with open(run_dir / "resumes.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    with files.atomic_file(run_dir / "config.json") as handle:
        handle.write(json.dumps(asdict(config), indent=2).encode())


