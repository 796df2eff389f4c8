"""What a run writes so that it never loses work: its directory, checkpoints and the export.

A run directory belongs to one run; `--resume` continues it unchanged (the
flags are checked against the checkpoint's config, `config.check_resume`)
from the newest intact checkpoint. A checkpoint holds the trained
parameters, the optimizer state, every process's RNG state and the loop's
plain state (step, data position, best score, config): one file for
one-process and DDP runs, a `torch.distributed.checkpoint` directory written
by every process for FSDP runs. That plain state is one versioned record,
`CheckpointRecord`, which this module alone writes and reads; a checkpoint
written before the record had a version still resumes. Every file is written
whole or not at all (`files.py`), and a failure to write is one line naming
the path. The export is the final model as one `from_pretrained` directory
(read by `model_utils.load_bundle`; `model_utils.newest_export` finds the
newest whole one).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import data
import files
import loader
import model_utils
import parallel
import trainable
from config import DEFAULTS, TrainConfig, check_resume, config_changes
from parallel import World

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
TENSOR_KEYS = ("model", "optimizer", "rng")  # beside the record in a one-file checkpoint; "rng" alone in train_state.pt

# --------------------------------------------------------------------------
# The record: what a checkpoint holds besides tensors, written and read whole
# --------------------------------------------------------------------------


@dataclass
class CheckpointRecord:
    """Where a run stood when a checkpoint was written, and what a resume must match.

    `to_dict` writes it, with its `VERSION`, beside the tensors; `from_dict`
    reads any version, and the unversioned layout train.py wrote before (whose
    score was named `best_loss`, and which may lack the fields added later).
    """

    VERSION: ClassVar[int] = 1

    step: int
    position: loader.DataPosition
    # The --best-by selection score of the best evaluation so far, lower is better: a validation loss, -SIM for
    # `sim`, a WER, or WER - SIM; inf before any evaluation.
    best_score: float
    config: dict  # asdict(TrainConfig) of the run; a dict, since an older checkpoint's may hold older spellings
    stale_evals: int = 0  # evaluations since the best, for --patience
    data: dict[str, str] | None = None  # the data's content fingerprints (`train.data_fingerprints`); None: not kept then
    eval_settings: dict | None = None  # what best_score was measured with (`heldout.eval_settings`); None: not kept then
    guard_first: dict[str, float] = field(default_factory=dict)  # each relative --guard's first value, by its text

    def to_dict(self) -> dict:
        return {"version": self.VERSION, "step": self.step, "position": asdict(self.position), "best_score": self.best_score,
                "stale_evals": self.stale_evals, "config": self.config, "data": self.data,
                "eval_settings": self.eval_settings, "guard_first": self.guard_first}

    @classmethod
    def from_dict(cls, saved: dict) -> CheckpointRecord:
        """The record in a checkpoint's state, or a ValueError saying why it holds none."""
        if not isinstance(saved, dict):
            raise ValueError(f"not a train.py checkpoint (a {type(saved).__name__}, not a dict)")
        version = saved.get("version", 0)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(f"written by a newer train.py (record version {version}; this one reads up to {cls.VERSION})")
        score = "best_score" if version else "best_loss"  # unversioned: the name the score had then
        required = ("step", "position", score, "config")
        if not all(key in saved for key in required) or not isinstance(saved["config"], dict):
            raise ValueError(f"not a train.py checkpoint (a dict without {sorted(required)})")
        return cls(step=saved["step"], position=loader.DataPosition.restored(saved["position"]), best_score=saved[score],
                   config=saved["config"], stale_evals=saved.get("stale_evals", 0), data=saved.get("data"),
                   eval_settings=saved.get("eval_settings"), guard_first=dict(saved.get("guard_first", {})))

# --------------------------------------------------------------------------
# Checkpoints (atomic, last K and best kept, weights_only-loadable)
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


def trained_names(model: torch.nn.Module) -> set[str]:
    """Names of the trained parameters as torch's state-dict utilities spell them (DDP's `module.` dropped)."""
    return {name.removeprefix("module.") for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_checkpoint(run_dir: Path, model, optimizer, record: CheckpointRecord, world: World, keep_last: int,
                    sharded: bool = False, name: str | None = None) -> Path:
    """`checkpoints/step_N.pt` (or `name`) holding the model's trained parameters, the optimizer state, every
    process's RNG state and `record`, written to a temporary file and renamed.

    Every process takes part in gathering the (possibly sharded) state and
    sends its RNG state; process 0 writes. `sharded` (FSDP runs) writes a
    directory of every process's shards instead (`save_sharded_checkpoint`).
    """
    if sharded:
        return save_sharded_checkpoint(run_dir, model, optimizer, record, world, keep_last, name)
    folder = run_dir / "checkpoints"
    keep = trained_names(model)
    model_state = {k: v for k, v in get_model_state_dict(model, options=FULL_STATE).items() if k in keep}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    rngs = parallel.gather_objects(rng_state(), world)
    path = folder / (name or f"step_{record.step:08d}.pt")
    failure = None
    if world.main:
        state = {**record.to_dict(), "model": model_state, "optimizer": optimizer_state, "rng": rngs}
        failure = _write_twice(lambda: _write_checkpoint_file(path, state))
        if failure is None:
            prune_checkpoints(folder, keep_last, path)
    failure = parallel.from_main_process(failure, world)  # every process stops together, or none
    if failure:
        latest = latest_checkpoint(run_dir)
        raise SaveFailed(f"{failure} (tried twice); the last good checkpoint is {latest or 'none: nothing is saved'}")
    return path


class SaveFailed(RuntimeError):
    """A checkpoint that could not be written twice in a row: the message names it and the last good one."""


RETRY_AFTER_SECONDS = 3.0


def _write_twice(write) -> str | None:
    """Run `write` again after a pause if it fails (a full disk may have been freed, a network filesystem may
    have come back); None once it succeeds, else the second failure's one line."""
    for attempt in range(2):
        try:
            write()
            return None
        except files.WriteError as error:
            failure = str(error)
            if attempt == 0:
                time.sleep(RETRY_AFTER_SECONDS)
    return failure


def _write_checkpoint_file(path: Path, state: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise files.WriteError(path.parent, error) from error
    with files.atomic_file(path) as handle:
        torch.save(state, handle)
    files.write_sidecar_digest(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir / "checkpoints")
    return found[-1] if found else None


def step_checkpoints(folder: Path) -> list[Path]:
    """`step_N.pt` files and `step_N.dcp` directories (FSDP), oldest to newest by step number (not by name)."""
    return sorted((path for path in folder.glob("step_*") if STEP_CHECKPOINT.fullmatch(path.name)), key=_step_of)


def prune_checkpoints(folder: Path, keep_last: int, written: Path) -> None:
    """Keep the `keep_last` newest step checkpoints, and always the one just written."""
    found = step_checkpoints(folder)
    keep = set(found[-keep_last:]) | {written}
    for old in found:
        if old not in keep:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
            files.sidecar_of(old).unlink(missing_ok=True)


def load_checkpoint(path: Path, model, optimizer, world: World) -> CheckpointRecord:
    """Restore model, optimizer and this process's RNG state; returns the checkpoint's record."""
    with trainable.update_stance(optimizer, next(model.parameters()).device):
        return _load_checkpoint(path, model, optimizer, world)


def _load_checkpoint(path: Path, model, optimizer, world: World) -> CheckpointRecord:
    if path.is_dir():
        return load_sharded_checkpoint(path, model, optimizer, world)
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = trained_names(model) - set(state["model"])
    if missing:
        raise ValueError(f"{path} lacks trained parameters, e.g. {sorted(missing)[:3]}")
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    _restore_rng(state, path, world)
    return CheckpointRecord.from_dict(state)


def _restore_rng(state: dict, path: Path, world: World) -> None:
    if len(state["rng"]) != world.size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with as many (now {world.size})")
    set_rng_state(state["rng"][world.rank])


SHARDED_SUFFIX = ".dcp"
TRAIN_STATE = "train_state.pt"
STEP_CHECKPOINT = re.compile(rf"step_(\d+)(?:\.pt|{re.escape(SHARDED_SUFFIX)})")


def sharded_tensors(model, optimizer) -> dict:
    """This process's shards of the trained parameters and of the optimizer state, as DCP saves and loads them."""
    keep = trained_names(model)
    return {"model": {k: v for k, v in get_model_state_dict(model).items() if k in keep},
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded_checkpoint(run_dir: Path, model, optimizer, record: CheckpointRecord, world: World, keep_last: int,
                            name: str | None = None) -> Path:
    """`checkpoints/step_N.dcp/` (`best.dcp/` for `name="best.pt"`): a torch.distributed.checkpoint directory.

    Each process writes its own shards of the trained parameters and optimizer
    state (`__RANK_0.distcp`), so nothing is gathered: for full fine-tuning of
    the released model that is ~69 GB of fp32 weights and AdamW state that no
    longer passes through process 0's memory at every save. Process 0 adds
    `train_state.pt` (the record and every process's RNG state). All of
    it is written into `NAME.dcp.tmp/` and renamed once complete, so a
    directory named `*.dcp` is always whole. Across machines, `--out-dir` must
    be a filesystem every node sees.
    """
    folder = run_dir / "checkpoints"
    path = folder / ((Path(name).stem if name else f"step_{record.step:08d}") + SHARDED_SUFFIX)
    temporary = path.with_name(path.name + ".tmp")
    if world.main:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
        temporary.mkdir(parents=True)
    parallel.wait_for_all(world)
    # DCP writes each process's files (fsynced), then the metadata on process 0 after all have reported.
    dcp.save(sharded_tensors(model, optimizer), checkpoint_id=temporary)
    rngs = parallel.gather_objects(rng_state(), world)
    digests = parallel.gather_objects(_own_shard_digests(temporary, world), world)
    if world.main:
        with files.atomic_file(temporary / TRAIN_STATE) as handle:
            torch.save({**record.to_dict(), "rng": rngs}, handle)
        written = {name: digest for shards in digests for name, digest in shards.items()}
        written.update({name: files.sha256(temporary / name) for name in (TRAIN_STATE, ".metadata")})
        files.write_folder_digests(temporary, written)
        _replace_directory(temporary, path)
        prune_checkpoints(folder, keep_last, path)
    parallel.wait_for_all(world)
    return path


def _own_shard_digests(folder: Path, world: World) -> dict[str, str]:
    """The SHA-256 of the shard files this process wrote (DCP names them `__RANK_N.distcp`): each process reads
    back only its own, so no process reads the whole checkpoint."""
    return {shard.name: files.sha256(shard) for shard in sorted(folder.glob(f"__{world.rank}_*.distcp"))}


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


def load_sharded_checkpoint(path: Path, model, optimizer, world: World) -> CheckpointRecord:
    """Restore a `save_sharded_checkpoint` directory: each process reads the shards it holds."""
    state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    if len(state["rng"]) != world.size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with as many (now {world.size})")
    tensors = sharded_tensors(model, optimizer)
    try:
        dcp.load(tensors, checkpoint_id=path)
    except dcp.api.CheckpointException as error:  # a BaseException: it would escape every `except Exception`
        raise ValueError(f"{path}: its shards cannot be read ({files.first_line(error)})") from None
    set_model_state_dict(model, tensors["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    _restore_rng(state, path, world)
    return CheckpointRecord.from_dict(state)


# --------------------------------------------------------------------------
# Runs: a run directory belongs to one run; --resume continues it unchanged
# --------------------------------------------------------------------------


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds work to keep: a checkpoint (intact, damaged or set aside) or an export. An attempt
    stopped before its first checkpoint holds none, so its name can be started again."""
    saved = [path for path in (run_dir / "checkpoints").glob("*") if ".tmp" not in path.name]
    return bool(saved) or (run_dir / "export").exists()


def open_run(run_dir: Path, config: TrainConfig, world: World, say) -> tuple[Path | None, CheckpointRecord | None]:
    """A new run claims a name no run holds; a --resume gets the newest intact checkpoint, after stray
    temporaries are cleaned, and its record, whose config must match the flags. An attempt stopped before its
    first checkpoint is started afresh, with or without --resume, saying so."""
    if holds_a_run(run_dir) and not config.resume:
        raise ValueError(f"{run_dir} already holds a run: continue it with --resume, or pick another --run-name")
    if world.main:
        stray = clean_temporaries(run_dir)
        if stray:
            say(f"removed what an interrupted write left: {', '.join(str(path) for path in stray)}")
    if holds_a_run(run_dir):
        path, record = newest_intact_checkpoint(run_dir, world, say)
        check_resume(record.config, config, path)
        return path, record
    if (run_dir / "config.json").exists():
        say(f"note: {run_dir} holds an attempt stopped before its first checkpoint: starting it afresh "
            "(its TensorBoard events are replaced)")
        if world.main:
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    elif config.resume:
        raise FileNotFoundError(f"--resume: no run in {run_dir}: nothing to resume (check --out-dir and --run-name)")
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return None, None


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


def read_checkpoint(path: Path, verify: bool = True) -> tuple[CheckpointRecord, dict]:
    """A checkpoint's record and its whole state, tensors memory-mapped (read when used), or a ValueError saying
    what is wrong with the file (bytes changed since written, empty, truncated, not a checkpoint, another
    program's). `verify` checks the content against the SHA-256 written with it first (about 1.4 GB/s here)."""
    tensors, state_file = TENSOR_KEYS, path
    if path.is_dir():  # a sharded checkpoint: its tensors are in the DCP files, the rest in train_state.pt
        tensors, state_file = ("rng",), path / TRAIN_STATE
    try:
        if state_file.stat().st_size == 0:
            raise ValueError("empty file")
        problem = files.digest_problem(path) if verify else None
        if problem:
            raise ValueError(problem)
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    except ValueError:
        raise
    except Exception as error:  # torch reports a damaged file as RuntimeError, UnpicklingError, EOFError, OSError...
        raise ValueError(f"damaged or truncated, not a loadable checkpoint ({files.first_line(error)})") from None
    record = CheckpointRecord.from_dict(state)
    missing = [key for key in tensors if key not in state]
    if missing:
        raise ValueError(f"not a train.py checkpoint (a dict without {missing})")
    return record, state


def newest_intact_checkpoint(run_dir: Path, world: World, say) -> tuple[Path, CheckpointRecord]:
    """The newest intact checkpoint, a `step_N` one or best.pt, and its record; damaged ones are named and set
    aside as `*.corrupt`. Process 0 checks the candidates (their content against its SHA-256, then their state)
    and the other processes take its choice, so that no process but one reads a damaged checkpoint whole."""
    chosen = _choose_intact(run_dir, say) if world.main else None
    chosen = parallel.from_main_process(chosen, world)
    if isinstance(chosen, Exception):
        raise chosen
    return chosen, read_checkpoint(chosen, verify=False)[0]


def _choose_intact(run_dir: Path, say) -> Path | Exception:
    folder = run_dir / "checkpoints"
    candidates = _newest_first(folder)
    if not candidates:
        aside = sorted(path.name for path in folder.glob("*.corrupt"))
        if aside:
            return ValueError(f"--resume: no intact checkpoint in {folder}: the damaged ones were set aside ({', '.join(aside)})")
        return FileNotFoundError(f"--resume: no checkpoint in {folder}: nothing to resume (pick another --run-name)")
    damaged: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            step = read_checkpoint(path)[0].step
        except ValueError as error:
            damaged.append((path, str(error)))
            set_aside(path)
            continue
        _say_choice(path, step, damaged, say)
        return path
    listed = "; ".join(f"{bad.name} ({reason})" for bad, reason in damaged)
    return ValueError(f"--resume: no intact checkpoint in {folder}: {listed}; each set aside as *.corrupt")


def _newest_first(folder: Path) -> list[Path]:
    """The step checkpoints, newest first, with best.pt (best.dcp) among them by the step it holds: saved when an
    evaluation gave a new best, it is a whole state to resume from too. A best.pt whose record cannot be read
    comes first, to be checked, named and set aside."""
    found = list(reversed(step_checkpoints(folder)))
    best = next((path for path in (folder / "best.pt", folder / f"best{SHARDED_SUFFIX}") if path.exists()), None)
    if best is None:
        return found
    try:
        best_step = read_checkpoint(best, verify=False)[0].step
    except ValueError:
        return [best, *found]
    later = [path for path in found if _step_of(path) >= best_step]
    return [*later, best, *found[len(later):]]


def _step_of(path: Path) -> int:
    return int(STEP_CHECKPOINT.fullmatch(path.name).group(1))


def _say_choice(path: Path, step: int, damaged: list[tuple[Path, str]], say) -> None:
    """Name what a resume passes over: the damaged checkpoints, or the step checkpoints older than best.pt."""
    if damaged:
        listed = "; ".join(f"{bad} ({reason})" for bad, reason in damaged)
        say(f"warning: unreadable checkpoint {listed}: resuming from {path} instead; the unreadable kept as *.corrupt")
    elif not STEP_CHECKPOINT.fullmatch(path.name):
        say(f"note: {path.name} holds step {step}, later than any step checkpoint: resuming from it")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint (and its digest) to `*.corrupt`, kept for a look, out of the listing."""
    return files.move_with_digest(path, path.with_name(path.name + ".corrupt"))


def record_config(run_dir: Path, config: TrainConfig, resumed: Path | None, saved: CheckpointRecord | None) -> None:
    """`config.json` holds the configuration in force; a resume appends the fields it changed (old and new
    values) to `resumes.jsonl`, so the earlier configuration is never lost."""
    if resumed is not None:
        changed = {name: list(change) for name, change in config_changes(saved.config, config).items() if name != "resume"}
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(resumed), "step": saved.step, "changed": changed}
        with open(run_dir / "resumes.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    files.write_text(run_dir / "config.json", json.dumps(asdict(config), indent=2))


# --------------------------------------------------------------------------
# Export: the final model, one from_pretrained directory
# --------------------------------------------------------------------------


def export_model(model, config: TrainConfig, bundle: model_utils.Bundle, world: World, out: Path) -> Path:
    """The final model in `HiggsAudioModel.from_pretrained` format (LoRA merged), with its text tokenizer
    and a pointer to its audio tokenizer (`audio_tokenizer.json`), so `infer.py` and the package's
    `HiggsAudioServeEngine` load it (the engine prompts in the trained layout through `generation.align_serve_engine`),
    and `prompt_layout.json`. Every process takes part in gathering the weights; process 0 writes."""
    full = get_model_state_dict(model, options=FULL_STATE)
    if world.main:
        fresh = _trained_layout(config)
        fresh.load_state_dict(full)
        write_export(_merged(fresh, config), bundle.tokenizer, config, out)
    parallel.wait_for_all(world)
    return out


def write_export(model, tokenizer, config: TrainConfig, out: Path) -> Path:
    """Write a model (LoRA merged) as an export: written whole into a temporary folder, with the SHA-256 of
    every file, then renamed."""
    with files.atomic_directory(out) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        data.write_prompt_layout(folder, data.PromptLayout(ref_in_system=config.ref_in_system))
        model_utils.write_audio_tokenizer_pointer(folder, config.audio_tokenizer, config.model, config.seed)
    return out


def _trained_layout(config: TrainConfig, device: str = "cpu") -> torch.nn.Module:
    """The model `config` trains, freshly loaded, with LoRA adapters where it trains them."""
    fresh = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed, device=device).model
    return trainable.add_lora(fresh, config) if config.scope == "lora" else fresh


def _merged(model, config: TrainConfig):
    return model.merge_and_unload() if config.scope == "lora" else model


# --------------------------------------------------------------------------
# A checkpoint as a model: for infer.py --checkpoint and train.py --export-from
# --------------------------------------------------------------------------


def model_from_checkpoint(path: Path, device: str = "cpu") -> tuple[model_utils.Bundle, TrainConfig]:
    """The model a checkpoint holds (its trained parameters on the model its own config names, LoRA merged),
    with its tokenizers, and that config. The checkpoint's content is checked against its SHA-256 first."""
    path = Path(path)
    record, state = _read_named(path)
    trained = _config_of(record)
    bundle = model_utils.load_bundle(trained.model, trained.audio_tokenizer, seed=trained.seed, device=device)
    model = trainable.add_lora(bundle.model, trained) if trained.scope == "lora" else bundle.model
    weights = _sharded_weights(path, model) if path.is_dir() else state["model"]
    missing = trained_names(model) - set(weights)
    if missing:
        raise ValueError(f"{path} lacks trained parameters of {trained.model} ({trained.scope}), e.g. {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model_utils.Bundle(_merged(model, trained).eval(), bundle.tokenizer, bundle.audio_tokenizer), trained


def trained_config(path: Path) -> TrainConfig:
    """The settings a checkpoint was trained with, read without its weights or its SHA-256 check (cheap)."""
    return _config_of(_read_named(Path(path), verify=False)[0])


def _read_named(path: Path, verify: bool = True) -> tuple[CheckpointRecord, dict]:
    """`read_checkpoint` of a checkpoint named on the command line: what is wrong is one line naming it and the
    checkpoints beside it, one of which may serve instead."""
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        return read_checkpoint(path, verify)
    except ValueError as error:
        others = sorted(other.name for other in path.parent.iterdir() if other != path and (
            STEP_CHECKPOINT.fullmatch(other.name) or other.name in ("best.pt", f"best{SHARDED_SUFFIX}")))
        raise ValueError(f"{path}: {error}" + (f"; beside it: {', '.join(others)}" if others else "")) from None


def _config_of(record: CheckpointRecord) -> TrainConfig:
    return TrainConfig(**{name: value for name, value in record.config.items() if name in DEFAULTS})


def _sharded_weights(path: Path, model) -> dict:
    """The trained parameters of a sharded (FSDP) checkpoint, read whole in this one process."""
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    try:
        dcp.load({"model": weights}, checkpoint_id=path)
    except dcp.api.CheckpointException as error:
        raise ValueError(f"{path}: its shards cannot be read ({files.first_line(error)})") from None
    return weights


def export_checkpoint(path: Path) -> Path:
    """`train.py --export-from`: `RUN/checkpoints/NAME.pt` (or `NAME.dcp`) exported to `RUN/export-NAME/`."""
    bundle, trained = model_from_checkpoint(path)
    return write_export(bundle.model, bundle.tokenizer, trained, Path(path).parent.parent / f"export-{Path(path).stem}")


# --------------------------------------------------------------------------
# What a resumed run must match: its data, and the settings its best score was measured with
# --------------------------------------------------------------------------


def check_data(saved: CheckpointRecord, fingerprints: dict[str, str], allow_change: bool, checkpoint: Path, say) -> None:
    """Refuse, in one line, a --resume whose training or validation data changed in content since the
    checkpoint (`loader.data_fingerprint`); with --allow-data-change, say so and go on. A checkpoint written
    before fingerprints were kept cannot be checked, and that is said too."""
    if saved.data is None:
        say(f"note: {checkpoint} predates data fingerprints: the data it was trained on cannot be compared")
        return
    changed = [name for name, fingerprint in fingerprints.items() if saved.data.get(name) != fingerprint]
    if not changed:
        return
    what = " and ".join(_data_label(name) for name in changed)
    if not allow_change:
        raise ValueError(f"--resume: the {what} changed since {checkpoint} was written (its content fingerprint differs): "
                         "resume with the data it was trained on, or add --allow-data-change to go on knowingly")
    say(f"warning: the {what} changed since {checkpoint} was written; going on (--allow-data-change)")


def _data_label(key: str) -> str:
    """A fingerprint's key in words: `train`/`val` (a lone set), `train:NAME`/`val:NAME` (a named one)."""
    kind, _, name = key.partition(":")
    words = {"train": "training", "val": "validation"}[kind]
    return f"{words} set {name}" if name else f"{words} data"


def retire_best(run_dir: Path, step: int) -> Path | None:
    """Move best.pt (or best.dcp) aside as `best-until-step-N`, so that a new best can start without losing it."""
    for best in (run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / f"best{SHARDED_SUFFIX}"):
        if best.exists():
            return files.move_with_digest(best, best.with_name(f"best-until-step-{step}{best.suffix}"))
    return None
