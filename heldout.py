"""The training loop's held-out sets: their losses and judged clones, the best checkpoint, the guards.

`load_validation` reads each `--val-manifest` set (`Validation`) and gives
it, on process 0 where clips are generated, the judge of its clones
(`attach_judges`). `evaluate_in_loop` computes each set's losses and, for its
first `--eval-prompts` pairs, judges greedy clones (`evaluate.clones_of`,
`--eval-batch-size` per decoding step, then `evaluate.score_row`), logging
both under the set's name (`SetWriter`); `selection_score` and `Best` decide
which evaluation's weights `best.pt` keeps and when `--patience` stops the
run, and `Guards` which evaluations the `--guard` bounds veto or stop at.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import collate
import data
import evaluate
import files
import generation
import loader
import manifest
import metrics
import model_utils
import parallel
import plots
import trainable
from codes import EncodedClips
from config import (CLIP_METRICS, FAILURE_RATES, GuardRule, TrainConfig, guard_rules, selection,
                    validation_specs)
from parallel import World


@dataclass
class Validation:
    """One validation set: its name (None for a lone unnamed set, logged as val/* and quality/*), its rows (for
    the data fingerprint and the train/val overlap report) and their pairs, the pairs' batch builder and, on
    process 0 where clips are generated, the judge of their clones."""

    name: str | None
    rows: list[dict]
    pairs: list[manifest.Pair]
    builder: loader.BatchBuilder
    judge: metrics.Judge | None = None

    @property
    def languages(self) -> dict[str, str | None]:
        """Each row's language by id (None where the row names none), which its clone is judged in."""
        return {row["id"]: row.get("language") for row in self.rows}


def load_validation(config: TrainConfig, bundle: model_utils.Bundle, codes, world: World, run_dir: Path) -> list[Validation]:
    """Each --val-manifest set's rows validated (rejections in `val_rejections.jsonl`, or
    `val_rejections-NAME.jsonl`), paired once with the seed; none without --val-manifest. A set with no pair
    to validate on is a one-line error after its counts. Clips shared with the training manifests (the demo
    validates on its own data) are encoded once."""
    val_codes = codes if isinstance(codes, EncodedClips) else EncodedClips(bundle.audio_tokenizer)
    validations = []
    for spec in validation_specs(config):
        report = run_dir / ("val_rejections.jsonl" if spec.name is None else f"val_rejections-{spec.name}.jsonl")
        rows = loader.checked_rows(spec.path, val_codes, world, report)
        pairs = manifest.training_pairs(rows, config.seed, 0)[0]
        if not pairs:
            raise ValueError(f"{spec.path}: no usable validation pair (counts above)")
        validations.append(Validation(spec.name, rows, pairs, loader.BatchBuilder(bundle, config, val_codes)))
    attach_judges(validations, config, world)
    return validations


def attach_judges(validations: list[Validation], config: TrainConfig, world: World) -> None:
    """Give each validation set the judge of its generated clips, on process 0; none where no clip is generated.

    Under FSDP no clip is generated (each generation step would need every
    process), so --best-by or --guard on a clip metric is refused there; a
    WER-based one needs an ASR for a language of its set's first --eval-prompts rows.
    """
    generates = bool(validations and config.eval_every and config.eval_prompts)
    generates &= not (world.distributed and config.parallel == "fsdp")
    watchers = clip_watchers(config)
    if watchers and not generates:
        raise ValueError(f"{watchers[0][0]} needs generated validation clips, which FSDP does not make; use val_loss")
    judge = None
    if generates and world.main:
        judge = metrics.build_judge(config.speaker_model or None, config.asr_model or None, config.eval_language or None,
                                     world.device)
    for validation in validations:
        validation.judge = judge
    by_name = {validation.name: validation for validation in validations}
    for label, metric, name in watchers:
        watched = by_name[name]
        languages, prompts = watched.languages, watched.pairs[: config.eval_prompts]
        no_asr = watched.judge is not None and metric in ("wer", "sim_wer") and not any(
            watched.judge.intelligibility_available(languages[pair.id]) for pair in prompts)
        if parallel.any_process(no_asr, world):
            raise ValueError(f"{label}: no ASR for the languages of the first --eval-prompts rows of its validation set; "
                             "give --asr-model (Whisper) or --eval-language")


def clip_watchers(config: TrainConfig) -> list[tuple[str, str, str | None]]:
    """(flag as given, metric, validation set) of --best-by and each --guard that measure generated clips."""
    metric, name = selection(config)
    watched = [(f"--best-by {config.best_by}", metric, name)]
    watched += [(f"--guard {rule.text}", rule.metric, rule.set_name) for rule in guard_rules(config)]
    return [watcher for watcher in watched if watcher[1] in CLIP_METRICS]


class Scores(NamedTuple):
    """One validation set's evaluation: its losses (`val`) and its clips' quality means (`quality`)."""

    val: dict[str, float]
    quality: dict[str, float]


def evaluate_in_loop(model, validations: list[Validation], config: TrainConfig, world: World, writer,
                     step: int) -> dict[str | None, Scores]:
    """Each validation set's `Scores`, logged under its name (`SetWriter`), by set name; the same on every process."""
    return {validation.name: evaluate_set(model, validation, config, world, SetWriter.of(writer, validation.name), step)
            for validation in validations}


def evaluate_set(model, validation: Validation, config: TrainConfig, world: World, writer, step: int) -> Scores:
    """Validation losses (`val/*`) and, where clips are generated, their quality (`quality/*`), logged;
    returns both, the same on every process."""
    val = validation_loss(model, validation, config, world)
    if writer:
        for name, value in val.items():
            writer.add_scalar(f"val/{name}", value, step)
    quality = {}
    if validation.judge is not None:
        try:
            quality = log_generations(writer, step, parallel.unwrap(model), validation, config, world.device)
        except Exception as error:  # a clip that cannot be generated or scored must not cost the training
            report_failure(writer, step, "the validation clips could not be generated or scored", error)
    return Scores(val, parallel.from_main_process(quality, world))


class SetWriter:
    """A SummaryWriter whose tags carry a validation set's name after their first part (`val/NAME/total`,
    `quality/NAME/sim`, `generated/NAME/ID`), so that each set's panels are its own while the code that logs
    them is that of one set."""

    def __init__(self, writer, name: str):
        self.writer, self.name = writer, name

    @classmethod
    def of(cls, writer, name: str | None):
        return cls(writer, name) if writer is not None and name is not None else writer

    def __getattr__(self, method: str):
        if not method.startswith("add_"):
            raise AttributeError(method)
        write = getattr(self.writer, method)

        def named(tag: str, *args, **kwargs):
            first, _, rest = tag.partition("/")
            return write(f"{first}/{self.name}/{rest}", *args, **kwargs)

        return named


def log_set_layout(writer, validation_names: list[str | None], training_names: list[str]) -> None:
    """TensorBoard's Custom Scalars tab: for several named validation sets, one chart per metric with a line
    per set, and for a mixture, each set's share and epoch, so that sets are read side by side."""
    charts = {}
    named = "|".join(name for name in validation_names if name)
    if len([name for name in validation_names if name]) > 1:
        charts["validation sets"] = {f"{prefix}/{metric}": ["Multiline", [f"^{prefix}/({named})/{metric}$"]]
                                     for prefix, metric in (("val", "total"), ("val", "audio"), ("val", "kl"),
                                                            ("quality", "sim"), ("quality", "error_rate"),
                                                            ("quality", "mos"), ("quality", "fail_any"))}
    if len(training_names) > 1:
        charts["training mixture"] = {f"mixture/{panel}": ["Multiline", [f"^mixture/[^/]+/{panel}$"]]
                                      for panel in ("share", "sample_share", "epoch")}
    if writer is not None and charts:
        writer.add_custom_scalars(charts)


def report_failure(writer, step: int, what: str, error: Exception) -> None:
    """An evaluation that failed, in one line on stderr and in TensorBoard (`eval/failures`, `eval/failure`);
    the run goes on, and a selection score that could not be measured never makes a new best."""
    line = f"step {step}: {what} ({type(error).__name__}: {files.first_line(error)}); training goes on"
    print(f"warning: {line}", file=sys.stderr)
    if writer:
        writer.add_scalar("eval/failures", 1, step)
        writer.add_text("eval/failure", line, step)


EVAL_SETTINGS = ("best_by", "eval_prompts", "eval_max_seconds", "asr_model", "speaker_model", "eval_language")


def eval_settings(config: TrainConfig, validations: list[Validation]) -> dict:
    """What a best score was measured with: the selection and evaluation settings, the guards, and the
    validation data's content (one fingerprint for a lone unnamed set, one per name otherwise), so that a
    resumed run compares scores only with scores measured alike."""
    settings = {name: getattr(config, name) for name in EVAL_SETTINGS}
    fingerprints = {validation.name: loader.data_fingerprint(validation.rows, validation.builder.codes)
                    for validation in validations}
    settings["val_data"] = fingerprints.get(None) if list(fingerprints) in ([], [None]) else fingerprints
    if config.guard:  # absent otherwise, so that checkpoints written before guards compare equal
        settings |= {"guard": list(config.guard), "guard_action": config.guard_action}
    return settings


def validation_loss(model, validation: Validation, config: TrainConfig, world: World) -> dict[str, float]:
    """Mean losses over the validation pairs, each process taking every W-th chunk.

    Every process runs as many forwards (FSDP gathers parameters in each, so
    all must take part); a process short of chunks repeats one at weight 0.
    """
    pairs = validation.pairs
    chunks = [pairs[i : i + config.batch_size] for i in range(0, len(pairs), config.batch_size)]
    sums, weight = None, 0.0
    with torch.no_grad(), trainable.autocast(config.precision, world.device):
        for round_ in range(math.ceil(len(chunks) / world.size)):
            index = round_ * world.size + world.rank
            batch = validation.builder.batch(chunks[index % len(chunks)])
            inputs = collate.batch_to_model_inputs(batch, world.device)
            outputs = model(**inputs)
            loss = model_utils.compute_loss(outputs, batch.label_audio_ids)
            parts = [loss.total, loss.text, loss.audio, *loss.per_codebook]
            if config.scope == "lora":  # how far the adapted model has moved from its base on this set
                parts.append(trainable.forgetting_kl(model, inputs, outputs.audio_logits, batch.label_audio_ids))
            real = float(index < len(chunks))
            values = [float(value) * real for value in parts]
            sums = values if sums is None else [total + value for total, value in zip(sums, values)]
            weight += real
    totals = parallel.sum_over_processes(torch.tensor(sums + [weight], dtype=torch.float64, device=world.device), world).tolist()
    names = trainable.loss_names(len(loss.per_codebook)) + ["kl"] * (config.scope == "lora")
    return {name: value / totals[-1] for name, value in zip(names, totals)}


def log_generations(writer, step: int, model, validation: Validation, config: TrainConfig, device: str) -> dict[str, float]:
    """Greedy clones of the first validation prompts: audio, mel spectrograms (generated, target and reference
    stacked, `plots.mel_figure`), and their SIM, WER/CER, MOS, timing and failure rates as scalars and a table with
    the transcripts; returns the metrics' means."""
    builder, judge, languages = validation.builder, validation.judge, validation.languages
    bundle = model_utils.Bundle(model, builder.bundle.tokenizer, builder.bundle.audio_tokenizer)
    rate = bundle.audio_tokenizer.sampling_rate
    settings = evaluate.CloneSettings(generation.Sampling(greedy=True, seed=config.seed, max_seconds=config.eval_max_seconds),
                             data.PromptLayout(config.ref_in_system), batch_size=config.eval_batch_size)
    with trainable.autocast(config.precision, device):  # frozen weights may be held in bf16 (--frozen-bf16)
        made = list(evaluate.clones_of(bundle, validation.pairs[: config.eval_prompts], builder.codes, settings))
    records = []
    for pair, clone in made:
        records.append(evaluate.score_row(judge, pair, languages[pair.id], clone, rate))
        if clone.error is not None:
            continue
        writer.add_audio(f"generated/{pair.id}", torch.from_numpy(clone.waveform)[None], step, sample_rate=rate)
        panels = plots.clip_panels(records[-1], pair.ref_text, clone.waveform, data.load_audio(pair.audio, rate),
                                   data.load_audio(pair.ref_audio, rate))
        writer.add_image(f"mel/{pair.id}", plots.render(plots.mel_figure(panels, rate, f"{pair.id}, step {step}")), step,
                         dataformats="HWC")
    means = {name: stats["mean"] for name, stats in metrics.summarize_records(records, config.seed).items() if stats["n"]}
    log_values(writer, "quality", means, step)
    writer.add_text("quality/table", f"{metrics.markdown_table(records)}\n\n{judge.judged_by()}", step)
    return means


def log_values(writer, prefix: str, values: dict[str, float], step: int) -> None:
    """Scalars `prefix/name`; an unavailable (NaN) value is not written, never written as 0."""
    for name, value in values.items():
        if value is not None and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{name}", value, step)


def metric_value(metric: str, val: dict[str, float], quality: dict[str, float]) -> float:
    """A metric of one validation set's evaluation, in its own sign; NaN when it is unavailable."""
    if metric in ("mos",) + FAILURE_RATES:
        return quality.get(metric, math.nan)
    sim, error = quality.get("sim", math.nan), quality.get("error_rate", math.nan)
    return {"val_loss": val["total"], "sim": sim, "wer": error, "sim_wer": error - sim, "kl": val.get("kl", math.nan)}[metric]


def selection_score(best_by: str, val: dict[str, float], quality: dict[str, float]) -> float:
    """What best.pt minimises (`best_by` is the metric): validation loss, -SIM, WER/CER, WER/CER - SIM, or -MOS;
    inf when it is unavailable."""
    value = metric_value(best_by, val, quality)
    score = -value if metrics.BETTER.get(best_by) == "higher" else value
    return score if math.isfinite(score) else math.inf


@dataclass
class Best:
    """The best selection score so far (lower is better) and the evaluations since it, for --patience."""

    score: float = math.inf
    stale: int = 0

    def update(self, score: float) -> bool:
        """Whether `score` is a new best."""
        if score < self.score:
            self.score, self.stale = score, 0
            return True
        self.stale += 1
        return False

    def out_of_patience(self, patience: int) -> bool:
        return patience > 0 and self.stale >= patience

    def value(self, best_by: str) -> float:
        """The best score in its metric's own sign (SIM and MOS are minimised negated)."""
        return -self.score if metrics.BETTER.get(best_by) == "higher" else self.score


@dataclass
class Guards:
    """The --guard bounds on validation metrics, and each relative bound's first value.

    A relative bound (`wer@en<=+0.05`) is measured from its metric's first
    evaluation, made before the first step, and kept in checkpoints
    (`first`, by the rule's text). `breaches` gives the lines of an evaluation
    that breaks a bound, or cannot be measured for one: such an evaluation
    never becomes best.pt, and a breach with --guard-action stop sets `stop`.
    """

    rules: list[GuardRule]
    action: str = "veto"
    first: dict[str, float] = field(default_factory=dict)
    stop: bool = False

    def needs_first(self) -> bool:
        return any(rule.relative and rule.text not in self.first for rule in self.rules)

    def record_first(self, scores: dict[str | None, Scores]) -> None:
        for rule in self.rules:
            value = metric_value(rule.metric, *scores[rule.set_name])
            if rule.relative and rule.text not in self.first and math.isfinite(value):
                self.first[rule.text] = value

    def breaches(self, scores: dict[str | None, Scores]) -> list[str]:
        """The lines of the bounds this evaluation breaks or cannot measure."""
        self.record_first(scores)  # a first evaluation that could not measure a metric leaves its first value to the next
        lines = []
        for rule in self.rules:
            value = metric_value(rule.metric, *scores[rule.set_name])
            first = self.first.get(rule.text)
            if not math.isfinite(value) or (rule.relative and first is None):
                lines.append(f"--guard {rule.text}: {rule.metric} could not be measured, so this evaluation cannot be best")
            elif rule.breached(value, first):
                since = f" (first evaluation {first:.4f})" if rule.relative else ""
                lines.append(f"--guard {rule.text} breached: {rule.metric} {value:.4f} "
                             f"{'>' if rule.upper else '<'} {rule.limit(first):.4f}{since}")
                self.stop |= self.action == "stop"
        return lines
