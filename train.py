"""The training loop: fine-tune Higgs Audio v2 for zero-shot voice cloning.

    python train.py                                        # tiny preset on the committed demo data (CPU, ~1 min)
    python train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --scope audio
    torchrun --nproc-per-node 8 train.py --model DIR --audio-tokenizer DIR --train-manifest M.jsonl --parallel fsdp

Read top to bottom: set-up (run directory, data, model, schedule, resume),
the loop, the finish. Each capability it calls is a module of its own:
settings in `config.py`, the data mixture, its order and prefetch in
`loader.py`, the model preparation and the one training step (with its
forgetting guard) in `trainable.py`, processes and DDP/FSDP2 in `parallel.py`,
checkpoints and the export in `checkpoints.py`, the held-out sets' losses
and judged clones, guards and best-checkpoint selection in `heldout.py`.
Samples come from `data.build_sample` (the one builder inference uses too),
batches from `collate.build_collator`, the loss from
`model_utils.compute_loss`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import commands  # light: it must catch a Ctrl-C while the rest loads

if __name__ == "__main__":  # a Ctrl-C while torch loads is one line, not a traceback
    commands.quiet_ctrl_c_while_loading()
    if {"-h", "--help"} & set(sys.argv[1:]):  # the help needs config.py alone, which imports no torch: no wait for it
        import config

        config.build_parser(__doc__).parse_args(["--help"])

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import checkpoints
import collate
import files
import heldout
import loader
import model_utils
import objectives
import parallel
import trainable
from config import TrainConfig, as_flags, guard_rules, parse_config, selection, settle_auto
from parallel import World


# --------------------------------------------------------------------------
# What a run derives when it starts, and what the loop carries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """What a run derives when it starts; the config stays as the user gave it, `auto` settled (`settle_auto`)."""

    precision: str  # what --precision (`auto` by default) became on this machine
    world: World  # this process's place, and its device (`cuda:LOCAL_RANK` under torchrun)
    max_steps: int  # the schedule's length: --max-steps, or --epochs of the first epoch's steps
    last_step: int  # where this invocation stops: the schedule's end, or --stop-after

    @classmethod
    def derive(cls, config: TrainConfig, world: World, epoch_micro_batches: int) -> RunPlan:
        max_steps = config.max_steps
        if config.epochs:
            steps_per_epoch = max(1, epoch_micro_batches // world.size // config.grad_accum)
            max_steps = math.ceil(config.epochs * steps_per_epoch)
        return cls(config.precision, world, max_steps, min(max_steps, config.stop_after or max_steps))

    def record(self, run_dir: Path) -> None:
        """`plan.json`: the derived values beside `config.json`, which holds the flags as given (`auto` settled)."""
        values = dict(device=self.world.device, precision=self.precision, world_size=self.world.size, max_steps=self.max_steps,
                      last_step=self.last_step)
        files.write_text(run_dir / "plan.json", json.dumps(values, indent=2))


@dataclass
class LoopState:
    """Where the loop stands: saved in each checkpoint's record (`Run.record`), restored from it on a resume."""

    step: int = 0
    position: loader.DataPosition = field(default_factory=loader.DataPosition)
    best: heldout.Best = field(default_factory=heldout.Best)

    @classmethod
    def restored(cls, record: checkpoints.CheckpointRecord) -> LoopState:
        return cls(record.step, record.position, heldout.Best(record.best_score, record.stale_evals))


@dataclass
class Run:
    """What the loop needs besides the model and the data: settings, plan, where it writes, what it watches."""

    config: TrainConfig  # as given, `auto` settled: what the run computes with, records and resumes against
    given: TrainConfig  # as given, `auto` kept: the flags of the printed resume command, alike on every machine
    plan: RunPlan
    dir: Path
    bundle: model_utils.Bundle
    validations: list[heldout.Validation]
    fingerprints: dict[str, str]  # the data's content (`loader.data_fingerprint`), which a resume must match
    eval_settings: dict  # what a best score is measured with (`heldout.eval_settings`)
    guards: heldout.Guards
    objective: objectives.DPO | objectives.GRPO | None = None  # --objective dpo|grpo: the step's (None: supervised)
    writer: SummaryWriter | None = None
    stop: StopRequested | None = None

    @property
    def sharded(self) -> bool:
        """FSDP runs write sharded checkpoints (`*.dcp/`), the others one file."""
        return self.plan.world.distributed and self.config.parallel == "fsdp"

    def record(self, state: LoopState) -> checkpoints.CheckpointRecord:
        """What a checkpoint of this run at `state` holds besides tensors."""
        return checkpoints.CheckpointRecord(
            step=state.step, position=state.position, best_score=state.best.score, stale_evals=state.best.stale,
            config=asdict(self.config), data=self.fingerprints, eval_settings=self.eval_settings,
            guard_first=dict(self.guards.first))

    def save(self, model, optimizer, state: LoopState, name: str | None = None) -> Path:
        try:
            return checkpoints.save_checkpoint(self.dir, model, optimizer, self.record(state), self.plan.world,
                                               self.config.keep_last, self.sharded, name)
        except checkpoints.SaveFailed as failure:
            raise RuntimeError(f"{failure}; once there is room, continue with: {self.resume_command()}") from None

    def resume_command(self) -> str:
        """The command that continues this run: its flags as given (less --stop-after), its name, --resume."""
        flags = as_flags(self.given, leave_out=("stop_after", "resume", "run_name", "inspect"))
        flags += ["--run-name", self.dir.name, "--resume"]
        launch = f"the same torchrun launch of {self.plan.world.size} processes with train.py" if self.plan.world.distributed \
            else "python train.py"
        return f"{launch} {shlex.join(flags)}"

    def say(self, *args, **kwargs) -> None:
        if self.plan.world.main:
            print(*args, **kwargs)


# --------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Run training (or, with --export-from, export a checkpoint); returns the run directory."""
    if config.export_from:
        return export_checkpoint(config.export_from)
    settled = settle_auto(config, torch.cuda.is_available())
    world = parallel.start_processes(settled.device)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with contextlib.ExitStack() as on_exit:
            return _train(settled, config, world, on_exit)
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        parallel.stop_processes(world)


def _train(config: TrainConfig, given: TrainConfig, world: World, on_exit: contextlib.ExitStack) -> Path:
    say = print if world.main else (lambda *args, **kwargs: None)
    if config.inspect:  # claims no name and touches no run: reports of rejected rows go to a temporary folder
        run_dir, resume_from, saved = Path(tempfile.mkdtemp(prefix="inspect-")), None, None
    else:
        run_dir = Path(config.out_dir) / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
        resume_from, saved = checkpoints.open_run(run_dir, config, world, say)
    seed_everything(config.seed)

    # model pieces and data: rows whose every problem was counted and reported
    bundle = model_utils.load_bundle(config.model, config.audio_tokenizer, seed=config.seed, device=world.device)
    sets = loader.training_sets(config, bundle, world, run_dir)
    objective = objectives.build(config, bundle, sets, world)  # DPO keeps the rows that have a pair
    builder = sets[0].builder
    validations = heldout.load_validation(config, bundle, builder.codes, world, run_dir)
    if len(validations) > 1 and "@" not in config.best_by:
        say(f"--best-by {config.best_by} is the first validation set's, {validations[0].name} (METRIC@SET names another)")
    loader.report_overlap([row for each in sets for row in each.rows], [row for each in validations for row in each.rows],
                          config, world)

    # the model as trained, the schedule, the first batch
    model = trainable.prepare_model(bundle.model, config, world)
    say(describe_model(model, config, world))
    first_epoch = loader.epoch_batches(sets[0].rows, config, 0, builder)
    plan = RunPlan.derive(config, world, len(first_epoch))
    if config.epochs:
        say(f"{config.epochs:g} epochs: a schedule of {plan.max_steps} steps")
    if world.main and not config.inspect:
        checkpoints.record_config(run_dir, config, resume_from, saved)
        plan.record(run_dir)
    say(collate.describe_batch(builder.batch(first_epoch[0]), bundle.tokenizer, bundle.model.config))
    if config.inspect:
        return run_dir

    optimizer = trainable.build_optimizer(model, config, world.device)
    fingerprints = data_fingerprints(sets, validations) | (objective.fingerprints(config) if objective else {})
    run = Run(config, given, plan, run_dir, bundle, validations, fingerprints,
              heldout.eval_settings(config, validations), heldout.Guards(guard_rules(config), config.guard_action), objective)
    state = resume(model, optimizer, run, resume_from, saved) if resume_from is not None else LoopState()
    if state.step >= plan.max_steps:
        return already_finished(model, state, run)
    # events logged after the checkpoint by an interrupted attempt are dropped (purge_step); the writer's thread and
    # the prefetch thread end on any exit, since a thread left running as Python exits can abort it (status 134)
    if world.main:
        run.writer = on_exit.enter_context(SummaryWriter(str(run_dir / "tensorboard"), purge_step=state.step + 1 if resume_from else None))
    heldout.log_set_layout(run.writer, [validation.name for validation in validations], [each.name for each in sets])
    if validations and config.eval_every and run.guards.needs_first():
        evaluate_first(model, state, run)
    run.stop = StopRequested()
    batches = on_exit.enter_context(loader.Prefetcher(loader.micro_batches(sets, config, state.position, world), config.prefetch))
    # closed on any exit, so that an error message starts its own line
    progress = on_exit.enter_context(tqdm(total=plan.last_step, initial=state.step, desc="train", dynamic_ncols=True,
                                          disable=not world.main))
    train_loss = loop(model, optimizer, batches, state, run, progress)
    progress.close()
    batches.close()
    return finish(model, optimizer, state, run, train_loss)


def resume(model, optimizer, run: Run, checkpoint: Path, saved: checkpoints.CheckpointRecord) -> LoopState:
    """The loop's state from `checkpoint`, once the data matches the checkpoint's. A best score measured with
    other evaluation settings cannot be compared: best.pt is kept as best-until-step-N and a new best starts
    (a checkpoint that predates the record of them counts as measured alike)."""
    checkpoints.check_data(saved, run.fingerprints, run.config.allow_data_change, checkpoint, run.say)
    record = checkpoints.load_checkpoint(checkpoint, model, optimizer, run.plan.world)
    state = LoopState.restored(record)
    measured_with = run.eval_settings if record.eval_settings is None else record.eval_settings
    if measured_with != run.eval_settings:
        changed = ", ".join(name for name in run.eval_settings if measured_with.get(name) != run.eval_settings[name])
        kept = checkpoints.retire_best(run.dir, state.step) if run.plan.world.main else None
        state.best = heldout.Best()
        run.say(f"--resume: the evaluation changed ({changed}), so earlier scores are not comparable: a new best starts"
                + (f"; the old one is kept as {kept}" if kept else "")
                + ("; relative --guard bounds are measured from this resume's first evaluation" if run.guards.needs_first() else ""))
    else:
        run.guards.first = dict(record.guard_first)
    run.say(f"resumed from {checkpoint} at step {state.step}")
    return state


def already_finished(model, state: LoopState, run: Run) -> Path:
    """A resume of a run that took all its steps trains nothing; its export is written again if it is not whole
    (a full disk may have stopped it)."""
    export = run.dir / "export"
    problem = model_utils.export_problem(export)
    if problem:
        run.say(f"note: {export} is not whole ({problem}): writing it again")
        checkpoints.export_model(model, run.config, run.bundle, run.plan.world, export)
    run.say(f"{run.dir} is already finished ({state.step} of {run.plan.max_steps} steps): nothing to train\n"
            f"next: python infer.py --model {export}")
    return run.dir


def data_fingerprints(sets: list[loader.TrainingSet], validations: list[heldout.Validation]) -> dict[str, str]:
    """Each training and validation set's content fingerprint, which a resume must match: `train` and `val` for
    a lone (unnamed) set, as before mixtures, else `train:NAME` and `val:NAME`."""
    fingerprints = {"train" if len(sets) == 1 else f"train:{each.name}": loader.data_fingerprint(each.rows, each.builder.codes)
                    for each in sets}
    for validation in validations:
        key = "val" if validation.name is None else f"val:{validation.name}"
        fingerprints[key] = loader.data_fingerprint(validation.rows, validation.builder.codes)
    return fingerprints


def export_checkpoint(checkpoint: str) -> Path:
    """--export-from: a checkpoint (best.pt, step_N.pt, a sharded *.dcp) as an export beside its run's."""
    export = checkpoints.export_checkpoint(Path(checkpoint))
    print(f"exported {checkpoint} to {export}\nnext: python infer.py --model {export}")
    return export.parent


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_model(model: torch.nn.Module, config: TrainConfig, world: World) -> str:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"model: {config.model}, training {config.scope}: {trained:,} of {total:,} parameters; "
            f"{world.size} process(es){', ' + config.parallel if world.distributed else ''}")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def loop(model, optimizer, batches: loader.Prefetcher, state: LoopState, run: Run, progress: tqdm) -> float:
    """Optimizer steps until the schedule's end, --stop-after, --patience or a signal; returns the last
    logged training loss.

    The step's statistics stay on the device (`trainable.StepStats`) and are
    read only on a step that logs, so other steps never wait for the device;
    under torchrun a stop signal is agreed on at those reads too (`StopRequested.agreed`).
    """
    config, plan = run.config, run.plan
    model.train()
    skipped = SkippedSteps(config.max_bad_steps)
    interval = Interval(batches)
    train_loss = math.nan
    stopping = run.stop.agreed(None, plan.world)
    while state.step < plan.last_step and not state.best.out_of_patience(config.patience) and not run.guards.stop and not stopping:
        interval.begin_step()
        micro = batches.take(config.grad_accum)
        lr = trainable.lr_at(state.step, config, plan.max_steps)
        inputs = [m.batch for m in micro] if run.objective is None else run.objective.inputs(micro, state.step)
        stats = trainable.train_step(model, optimizer, inputs, config, plan.world, lr, [m.set_name for m in micro], run.objective)
        skipped.add(state.step, stats.skipped, [pair.id for m in micro for pair in m.pairs])
        state.step, state.position = state.step + 1, micro[-1].position
        logs = state.step % config.log_every == 0 or state.step == plan.last_step
        values = stats.read(plan.world, run.stop.requested) if logs else None  # the only place the step waits for the device
        interval.end_step(stats)
        stopping = run.stop.agreed(values, plan.world)

        if logs:
            skipped.check(run.writer)
            train_loss = values.losses["total"]
            log_step(run, state, values, lr, interval.take(plan.world))
            progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{interval.tokens_per_s:.0f}")
        progress.update(1)

        if run.validations and config.eval_every and (state.step % config.eval_every == 0 or state.step == plan.max_steps):
            evaluate_and_select(model, optimizer, state, run)
        if state.step % config.save_every == 0 or state.step == plan.max_steps:
            run.save(model, optimizer, state)
    return train_loss


def evaluate_and_select(model, optimizer, state: LoopState, run: Run) -> None:
    """Validation losses and clone quality, logged; a new best score is saved as best.pt. An evaluation that
    fails is reported and the training goes on (under torchrun only a failure of the generated clips, which
    process 0 alone makes, can be survived: one process's failure elsewhere leaves the others in a collective)."""
    model.eval()
    try:
        scores = heldout.evaluate_in_loop(model, run.validations, run.config, run.plan.world, run.writer, state.step)
    except Exception as error:
        if run.plan.world.distributed:
            raise
        heldout.report_failure(run.writer, state.step, "the evaluation failed", error)
        scores = None
    if scores is not None and state.best.update(guarded_score(scores, state.step, run)):
        run.save(model, optimizer, state, name="best.pt")
    model.train()


def guarded_score(scores: dict, step: int, run: Run) -> float:
    """The --best-by score of an evaluation, or inf (never a new best) when it breaks a --guard, which is said."""
    breaches = run.guards.breaches(scores)
    for line in breaches:
        run.say(f"step {step}: {line}")
    if run.writer and run.guards.rules:
        run.writer.add_scalar("guard/breaches", len(breaches), step)
    metric, name = selection(run.config)
    return math.inf if breaches else heldout.selection_score(metric, *scores[name])


def evaluate_first(model, state: LoopState, run: Run) -> None:
    """The evaluation before the first step, from which relative --guard bounds are measured (logged at step
    0; no candidate for best.pt)."""
    model.eval()
    run.guards.record_first(heldout.evaluate_in_loop(model, run.validations, run.config, run.plan.world, run.writer,
                                                      state.step))
    run.say("--guard bounds measured from: " + ", ".join(f"{text} {value:.4f}" for text, value in run.guards.first.items()))
    model.train()


class SkippedSteps:
    """Steps whose update was skipped for a non-finite loss, found without waiting on the device.

    Each step's flag stays on the device until the loop reads its statistics
    (`check`, on a step that logs): then each skipped step is reported with its
    samples, and `max_in_a_row` of them in a row stop the run, naming them.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.pending: list[tuple[int, torch.Tensor, list[str]]] = []
        self.in_a_row: list[str] = []
        self.total = 0

    def add(self, step: int, skipped: torch.Tensor, ids: list[str]) -> None:
        self.pending.append((step, skipped, ids))

    def check(self, writer: SummaryWriter | None) -> None:
        flags = torch.stack([flag for _, flag, _ in self.pending]).tolist() if self.pending else []
        for (step, _, ids), skipped in zip(self.pending, flags):
            if not skipped:
                self.in_a_row.clear()
                continue
            self.total += 1
            self.in_a_row.append(",".join(ids))
            if writer:
                writer.add_scalar("train/nonfinite_steps", self.total, step)
            print(f"step {step}: non-finite loss, step skipped (samples {', '.join(ids)})", file=sys.stderr)
            if len(self.in_a_row) >= self.max_in_a_row:
                raise RuntimeError(f"{len(self.in_a_row)} non-finite losses in a row; samples: {' | '.join(self.in_a_row)}")
        self.pending.clear()


class Interval:
    """The steps since the last logged one: their time (evaluation and checkpoints left out), data wait and
    sample counts (summed on the device)."""

    def __init__(self, batches: loader.Prefetcher):
        self.batches, self.seconds, self.counts, self.started = batches, 0.0, None, 0.0
        self.tokens_per_s = 0.0

    def begin_step(self) -> None:
        self.started = time.perf_counter()

    def end_step(self, stats: trainable.StepStats) -> None:
        self.seconds += time.perf_counter() - self.started
        self.counts = stats.counts if self.counts is None else self.counts + stats.counts

    def take(self, world: World) -> dict[str, float]:
        """Throughput and data wait over the interval, then a new interval; the counts are summed over processes."""
        tokens, padded, samples = (value * world.size for value in parallel.mean_over_processes(self.counts, world).tolist())
        self.tokens_per_s = tokens / self.seconds
        taken = {"tokens_per_s": self.tokens_per_s, "samples_per_s": samples / self.seconds,
                 "padding_fraction": padded / max(1.0, tokens + padded), "data_wait_fraction": self.batches.take_wait() / self.seconds}
        self.seconds, self.counts = 0.0, None
        return taken


def log_step(run: Run, state: LoopState, values: trainable.StepValues, lr: float, throughput: dict[str, float]) -> None:
    """Loss terms (the forgetting KL among them), learning rate, grad norm, throughput, accuracy, GPU memory
    and a mixture's shares drawn so far, of a logged step (process 0)."""
    writer, step = run.writer, state.step
    if writer is None:
        return
    for name, value in values.losses.items():
        writer.add_scalar(f"loss/{name}", value, step)
    if math.isfinite(values.kl):  # NaN on a step none of whose micro-batches took the forgetting term
        writer.add_scalar("loss/kl", values.kl, step)
    for tag, value in (loader.mixture_panels(state.position) | values.panels).items():  # panels: an objective's own
        writer.add_scalar(tag, value, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/grad_norm", values.grad_norm, step)
    for name, value in throughput.items():
        writer.add_scalar(f"train/{name}", value, step)
    heldout.log_values(writer, "accuracy", values.accuracy, step)
    if torch.cuda.is_available():
        writer.add_scalar("train/gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30, step)


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

    def agreed(self, logged: trainable.StepValues | None, world: World) -> bool:
        """Whether every process stops now, without a collective of its own: a single process reads its flag
        at every step; under torchrun the processes' flags travel with a logged step's statistics (`logged`,
        one all-reduce), so they stop together at the next step that logs (--log-every)."""
        if not world.distributed:
            return self.requested
        return logged is not None and logged.stop

    def _request(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.signum:
            raise Stopped(signum, f"second {name}: stopped at once, without a checkpoint; --resume continues from the last one")
        self.signum = signum
        print(f"\n{name}: stopping with a checkpoint after this step ({name} again to stop at once)", file=sys.stderr)


# --------------------------------------------------------------------------
# The finish: a checkpoint to resume from, or the export
# --------------------------------------------------------------------------


def finish(model, optimizer, state: LoopState, run: Run, train_loss: float) -> Path:
    config, plan = run.config, run.plan
    best = state.best.value(selection(config)[0])
    if state.step < plan.max_steps or run.guards.stop:  # a breach at the last step exports the best, not the last
        path = run.save(model, optimizer, state)
        if state.best.out_of_patience(config.patience):
            run.say(f"no new best {config.best_by} in {config.patience} evaluations (--patience): "
                    + export_best(model, optimizer, run))
        elif run.guards.stop:
            run.say(f"stopped at step {state.step}: a --guard was breached (--guard-action stop); "
                    + export_best(model, optimizer, run))
        else:
            run.say(f"stopped at step {state.step}; checkpoint {path}; continue with: {run.resume_command()}")
    else:
        export = checkpoints.export_model(model, config, run.bundle, plan.world, run.dir / "export")
        run.say(f"done: {state.step} steps, final train loss {train_loss:.3f}"
                + (f", best {config.best_by} {best:.3f}" if math.isfinite(best) else "")
                + ("; no evaluation gave a score to keep (no best.pt), so the export holds the last weights"
                   if run.validations and not math.isfinite(best) else "")
                + f"\nTensorBoard: tensorboard --logdir {config.out_dir}\n"
                f"next: python infer.py --model {export}"
                + (" (or just python infer.py: it takes the newest export)" if config.out_dir == "runs" else ""))
    if run.writer:
        hparams = {k: " ".join(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()
                   if isinstance(v, (int, float, str, bool, tuple))}
        run.writer.add_hparams(hparams, {"hparam/train_loss": train_loss, f"hparam/best_{config.best_by}": best},
                               run_name="hparams")
        run.writer.close()
    if run.stop.requested:
        raise Stopped(run.stop.signum)
    return run.dir


def export_best(model, optimizer, run: Run) -> str:
    """A run stopped by --patience ends with the export of its best weights, as a finished run ends with its last."""
    best = run.dir / "checkpoints" / ("best.dcp" if run.sharded else "best.pt")
    if not best.exists():
        return "no evaluation gave a score to keep, so there is no best.pt to export"
    best_step = checkpoints.load_checkpoint(best, model, optimizer, run.plan.world).step
    export = checkpoints.export_model(model, run.config, run.bundle, run.plan.world, run.dir / "export")
    return f"the best, {best.name} of step {best_step}, is exported to {export}\nnext: python infer.py --model {export}"


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or --stop-after reached), 2 an error (one line), 128 + N stopped by signal N
    (143 SIGTERM, 130 Ctrl-C: resumable from its checkpoint; also a Ctrl-C during start-up)."""
    def train_from_flags() -> int:
        train(parse_config(argv, description=__doc__))
        return 0

    return commands.run(train_from_flags, interrupted=stopped_status)


def stopped_status(interruption: KeyboardInterrupt) -> int:
    """128 + the signal the run stopped on (`Stopped`; its message, if any, said); a Ctrl-C before the run
    takes the signals over (`StopRequested`) interrupts its start-up, and says so."""
    if isinstance(interruption, Stopped):
        if interruption.message:
            print(f"error: {interruption.message}", file=sys.stderr)
        return 128 + interruption.signum
    return commands.interrupted("during start-up, before the first step: nothing was trained; run the same command again")


if __name__ == "__main__":
    commands.loaded()  # torch is loaded: Ctrl-C is main's to handle
    sys.exit(main())
