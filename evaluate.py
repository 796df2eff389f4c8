"""Judging a model: clones of held-out rows measured (`python infer.py --eval`), and the training loop's evaluation.

`--eval` (`evaluate_list`) reads a JSONL manifest or a Seed-TTS-eval list
(`read_eval_rows`), validating every clip without encoding any; encodes
each distinct reference once, or reads its codes from a prepared cache
(`reference_codes`); clones the rows `--batch-size` at a time
(`batched_generation.clone_many`), writing each clip as it comes, while a
scoring thread (`ScoringWorker`) scores each clip and its real target
(`score_row`, the target's scores cached on disk) and appends the row to
rows.csv (`eval_dir.EvalDir`, which also refuses a used directory and
resumes a half-done one). The summary gives ours (means, corpus WER, the
real targets') and the Seed-TTS-eval aggregates (`seedtts.py`).

In the training loop, `evaluate_in_loop` computes each validation set's
losses and, for its first `--eval-prompts` pairs, judges greedy clones
(`clones_of`, `--eval-batch-size` per decoding step, then `score_row`),
logging both under the set's name; `selection_score` and `Best` decide
which evaluation's weights `best.pt` keeps and when `--patience` stops the
run, and `Guards` which evaluations the `--guard` bounds veto or stop at.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import batched_generation
import collate
import data
import eval_dir
import files
import generation
import loader
import manifest
import metrics
import model_utils
import parallel
import prepare
import seedtts
import training
from config import CLIP_METRICS, GuardRule, TrainConfig, guard_rules, selection, validation_sets
from parallel import World


@dataclass
class CloneSettings:
    """How the clips of an evaluation are made."""

    sampling: generation.Sampling
    layout: data.PromptLayout
    force_audio: bool = True
    batch_size: int = 1
    kv_cache: generation.StaticCacheBuckets | None = None


# --------------------------------------------------------------------------
# One row: its clone and its scores
# --------------------------------------------------------------------------


def score_row(judge: metrics.Judge, pair: manifest.Pair, language: str | None, clone: generation.Clone, rate: int) -> dict:
    """The row's record: the clone's scores and the real target's (none for a list line without one). A clone
    that failed is a record with its error and no generated values, never a dropped row."""
    embedding = judge.reference_embedding(pair.ref_audio, lambda: data.load_audio(pair.ref_audio, rate), rate)
    language = judge.language(language)
    target = None
    if pair.audio:
        target = judge.score_target(pair.audio, lambda: data.load_audio(pair.audio, rate), rate, pair.ref_audio,
                                    embedding, pair.text, language)
    if clone.error is not None:
        return metrics.row_record(pair.id, language, pair.text, None, None, target, clone.error)
    scores = judge.score_clip(clone.waveform, rate, embedding, pair.text, language)
    return metrics.row_record(pair.id, language, pair.text, scores, clone.stopped, target)


def clones_of(bundle: model_utils.Bundle, pairs: list[manifest.Pair], codes: Callable[[str], torch.Tensor],
              settings: CloneSettings) -> Iterator[tuple[manifest.Pair, generation.Clone]]:
    """Each pair with its clone (a failed one carries its error), `settings.batch_size` per decoding step; each
    reference's codes from `codes` (which encodes a file once, or reads a cache)."""
    rate = bundle.audio_tokenizer.sampling_rate
    needs_waveform = settings.layout.ref_in_system and collate.uses_whisper(bundle.model.config)
    for start in range(0, len(pairs), settings.batch_size):
        chunk = pairs[start : start + settings.batch_size]
        jobs = [batched_generation.Job(generation.Reference(pair.ref_text, codes(pair.ref_audio),
                                                            data.load_audio(pair.ref_audio, rate) if needs_waveform else None, rate),
                                       pair.text, pair.scene) for pair in chunk]
        clips = batched_generation.clone_many(bundle, jobs, settings.sampling, settings.layout, settings.force_audio,
                                              settings.batch_size, settings.kv_cache)
        yield from zip(chunk, clips)


# --------------------------------------------------------------------------
# python infer.py --eval
# --------------------------------------------------------------------------


class CheckedClips:
    """`--eval`'s clip source for validation: each clip loaded and checked as training checks it, never encoded
    (a target is only scored; a reference is encoded later, once, or read from a cache). Its `frames` is an
    estimate, seconds x 25 rounded (the tokenizer's own count differs by a frame at some lengths): `--eval` applies
    no token filter and reads no frame count."""

    def __init__(self, sampling_rate: int, num_codebooks: int):
        self.sampling_rate, self.num_codebooks = sampling_rate, num_codebooks

    def clip(self, path: str) -> manifest.Clip:
        seconds = len(data.load_clip(path, self.sampling_rate)) / self.sampling_rate
        return manifest.Clip(seconds, round(seconds * generation.FRAMES_PER_SECOND))


def read_eval_rows(path: str, clips: CheckedClips, seed: int) -> tuple[manifest.ValidationResult, list[manifest.Pair], dict]:
    """A JSONL manifest (speaker rows paired as in training, fixed by `seed`) or a Seed-TTS-eval list, validated:
    the validation, the pairs and each row's language."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such manifest or list: {path}")
    if seedtts.is_seedtts_list(path):
        validated = seedtts.read_list(path, clips)
        pairs = [manifest.Pair(row["id"], row["ref_audio"], row["ref_text"], row.get("audio"), row["text"]) for row in validated.kept]
    else:
        validated = manifest.validate_manifest(path, clips, progress=True)
        pairs = manifest.training_pairs(validated.kept, seed, 0)[0]
    return validated, pairs, {row["id"]: row.get("language") for row in validated.kept}


def reference_codes(bundle: model_utils.Bundle, cache_dir: str | None, paths: list[str]) -> Callable[[str], torch.Tensor]:
    """Codes of each reference by path: read from the prepared cache `cache_dir` when it holds the clip, else
    encoded once per distinct file; the split is printed."""
    encoded = prepare.EncodedClips(bundle.audio_tokenizer)
    if not cache_dir:
        return encoded
    prepared = prepare.read_prepared(cache_dir, prepare.audio_tokenizer_id(bundle.audio_tokenizer))
    distinct = set(paths)
    missing = distinct - set(prepared.codes.keys)
    print(f"references: {len(distinct) - len(missing)} read from {cache_dir}, {len(missing)} not in it (encoded)")
    return lambda path: encoded(path) if path in missing else prepared.codes(path)


def warn_about_languages(judge: metrics.Judge, pairs: list[manifest.Pair], languages: dict[str, str | None]) -> None:
    """One line for the rows whose WER will be n/a, saying which flag fixes it."""
    unscored = [judge.language(languages[pair.id]) for pair in pairs if not judge.intelligibility_available(languages[pair.id])]
    if not unscored:
        return
    asr = judge.asr.name if judge.asr else "no ASR"
    missing = sum(language is None for language in unscored)
    if missing:
        print(f"warning: {missing} rows have no language and {asr} needs one, so their WER is n/a: give --language "
              "(e.g. --language en), or --asr-model DIR with a Whisper, which detects it", file=sys.stderr)
    others = sorted({language for language in unscored if language is not None})
    if others:
        print(f"warning: {len(unscored) - missing} rows in {', '.join(others)}: {asr} cannot transcribe them, so their WER "
              "is n/a; give --asr-model DIR (a Whisper that knows the language)", file=sys.stderr)


class ScoringWorker:
    """Scores rows in a thread beside generation; each row is on disk in rows.csv as soon as it is scored.

    Generation waits when `limit` clips are waiting to be scored, so memory
    stays bounded; a scoring error is raised in the generating thread at its
    next submission, or at `finish`.
    """

    def __init__(self, judge: metrics.Judge, out: eval_dir.EvalDir, rate: int, progress: tqdm, limit: int):
        self.judge, self.out, self.rate, self.progress, self.limit = judge, out, rate, progress, limit
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self.pending: list[Future] = []
        self.busy_seconds = 0.0

    def submit(self, pair: manifest.Pair, language: str | None, clone) -> None:
        self.pending = [future for future in self.pending if not self._settled(future)]
        while len(self.pending) >= self.limit:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._score, pair, language, clone))

    def finish(self) -> None:
        for future in self.pending:
            future.result()
        self.pool.shutdown()

    def abandon(self) -> None:
        """Stop after the row being scored (it is kept); rows still waiting are dropped, made again on --resume."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _score(self, pair, language, clone) -> None:
        started = time.perf_counter()
        self.out.append(score_row(self.judge, pair, language, clone, self.rate))
        self.busy_seconds += time.perf_counter() - started
        self.progress.update(1)

    @staticmethod
    def _settled(future: Future) -> bool:
        if future.done():
            future.result()  # raises a scoring error here, in the generating thread
            return True
        return False


class _Timed:
    """A function that adds up the seconds spent in it (the summary's breakdown)."""

    def __init__(self, function: Callable):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args):
        started = time.perf_counter()
        try:
            return self.function(*args)
        finally:
            self.seconds += time.perf_counter() - started


class EvalInterrupted(Exception):
    """Ctrl-C during `--eval`: what was kept, for the one line that says how to continue."""

    def __init__(self, scored: int, total: int, out: Path):
        super().__init__(f"{scored} of {total} rows scored")
        self.scored, self.total, self.out = scored, total, out


def evaluate_list(bundle: model_utils.Bundle, judge: metrics.Judge, list_path: str, out: eval_dir.EvalDir,
                  settings: CloneSettings, codes_cache: str | None = None) -> dict:
    """Clone and measure every row of a manifest or Seed-TTS-eval list into `out`; returns summary.json's content.

    Rows already in `out`'s rows.csv (a resumed run) are skipped. Every row
    rejected is an error after rejections.jsonl is written; Ctrl-C is an
    `EvalInterrupted` after the row being scored is kept.
    """
    timings, started = {}, time.perf_counter()
    rate = bundle.audio_tokenizer.sampling_rate
    validated, pairs, languages = read_eval_rows(list_path, CheckedClips(rate, bundle.model.config.audio_num_codebooks),
                                                 settings.sampling.seed or 0)
    validated.write_report(out.path / "rejections.jsonl")
    print(f"data: {list_path}: {validated.summary()}" + (f"; rejected rows: {out.path / 'rejections.jsonl'}" if validated.rejections else ""))
    if not pairs:
        raise ValueError(f"no row of {list_path} can be evaluated ({validated.summary()}); see {out.path / 'rejections.jsonl'}")
    warn_about_languages(judge, pairs, languages)
    done = {record["id"] for record in out.done()}
    todo = [(index, pair) for index, pair in enumerate(pairs) if pair.id not in done]
    if done:
        print(f"resuming: {len(done)} rows already scored in {out.path / eval_dir.ROWS_FILE}, {len(todo)} to go")
    timings["validation"] = time.perf_counter() - started
    codes = _Timed(reference_codes(bundle, codes_cache, [pair.ref_audio for _, pair in todo]))
    try:
        timings.update(_generate_and_score(bundle, judge, todo, languages, codes, out, settings))
    except KeyboardInterrupt:
        raise EvalInterrupted(len(out.done()), len(pairs), out.path) from None
    timings["reference_codes"] = codes.seconds
    timings["wall"] = time.perf_counter() - started
    return _summary(out, list_path, validated, judge, settings, timings, len(todo))


def _generate_and_score(bundle, judge, todo, languages, codes, out: eval_dir.EvalDir, settings: CloneSettings) -> dict:
    rate = bundle.audio_tokenizer.sampling_rate
    progress = tqdm(total=len(todo), desc="eval", unit="clip", dynamic_ncols=True)
    worker = ScoringWorker(judge, out, rate, progress, limit=2 * settings.batch_size + 2)
    index_of = {pair.id: index for index, pair in todo}
    generating, started = 0.0, time.perf_counter()
    try:
        for pair, clone in clones_of(bundle, [pair for _, pair in todo], codes, settings):
            if clone.error is None:
                out.write_wav(out.wav(index_of[pair.id], pair.id), clone.waveform, rate)
            generating += time.perf_counter() - started
            worker.submit(pair, languages[pair.id], clone)
            started = time.perf_counter()
        waiting = time.perf_counter()
        worker.finish()
    except BaseException:  # Ctrl-C or an error: keep the row being scored, drop the waiting ones
        worker.abandon()
        raise
    finally:
        progress.close()
    return {"references_generation_and_decoding": generating, "scoring_in_worker": worker.busy_seconds,
            "waiting_for_scoring_at_end": time.perf_counter() - waiting}


def _summary(out: eval_dir.EvalDir, list_path: str, validated, judge: metrics.Judge, settings: CloneSettings,
             timings: dict, made: int) -> dict:
    """summary.json and the printed summary, from every row in rows.csv (this run's and a resumed run's)."""
    records = out.done()
    seed = settings.sampling.seed or 0
    summary = metrics.summarize_records(records, seed)
    corpus = {"error_rate": metrics.corpus_error_rate(records), "target_error_rate": metrics.corpus_error_rate(records, "target_")}
    protocol = seedtts.aggregates(records)
    failed = sum(bool(record["error"]) for record in records)
    report = {
        "list": str(list_path), "rows_read": validated.rows_read, "kept": len(validated.kept), "rejected": len(validated.rejections),
        "rejected_by_reason": validated.counts(), "evaluated": len(records), "generation_failed": failed,
        "speaker_encoder": judge.encoder.name, "asr": judge.asr.name if judge.asr else None,
        "sampling": vars(settings.sampling), "scene": settings.layout.scene, "ref_in_system": settings.layout.ref_in_system,
        "batch_size": settings.batch_size, "seconds": timings, "clips_made_this_run": made,
        "metrics": summary, "corpus": corpus, "seedtts": protocol,
    }
    if judge.target_cache:
        report["target_score_cache"] = {"folder": str(judge.target_cache.folder), "hits": judge.target_cache.hits,
                                        "misses": judge.target_cache.misses}
    files.write_text(out.path / "summary.json", json.dumps(report, indent=2, ensure_ascii=False))
    print(metrics.format_summary(summary))
    print(f"corpus WER/CER {metrics.fmt(corpus['error_rate']['rate'])} over {corpus['error_rate']['words']} words "
          f"of {corpus['error_rate']['n']} rows; real targets' {metrics.fmt(corpus['target_error_rate']['rate'])}")
    print(seedtts.format_aggregates(protocol, report["asr"] or "none", judge.encoder.name))
    print(f"{len(records)} rows evaluated ({failed} without audio), {validated.summary()}; {made} clips made in "
          f"{timings['wall']:.1f} s; wrote {out.path / eval_dir.ROWS_FILE}, {out.path / 'summary.json'}, {out.path / 'wavs'}")
    return report


# --------------------------------------------------------------------------
# In the training loop: validation losses, generated clips, the best checkpoint
# --------------------------------------------------------------------------


@dataclass
class CloneJudge:
    """What in-loop evaluation measures generated clips with: the judge and each validation row's language."""

    judge: metrics.Judge
    languages: dict[str, str | None]


@dataclass
class Validation:
    """One validation set: its name (None for a lone unnamed set, logged as val/* and quality/*), its rows (for
    the data fingerprint and the train/val overlap report) and their pairs, the pairs' batch builder and, on
    process 0 where clips are generated, their judge."""

    name: str | None
    rows: list[dict]
    pairs: list[manifest.Pair]
    builder: loader.BatchBuilder
    clones: CloneJudge | None = None


def load_validation(config: TrainConfig, bundle: model_utils.Bundle, codes, world: World, device: str,
                    run_dir: Path) -> list[Validation]:
    """Each --val-manifest set's rows validated (rejections in `val_rejections.jsonl`, or
    `val_rejections-NAME.jsonl`), paired once with the seed; none without --val-manifest. A set with no pair
    to validate on is a one-line error after its counts. Clips shared with the training manifests (the demo
    validates on its own data) are encoded once."""
    val_codes = codes if isinstance(codes, prepare.EncodedClips) else prepare.EncodedClips(bundle.audio_tokenizer)
    validations = []
    for spec in validation_sets(config):
        report = run_dir / ("val_rejections.jsonl" if spec.name is None else f"val_rejections-{spec.name}.jsonl")
        rows = loader.validated_rows(spec.path, val_codes, world, report)
        pairs = manifest.training_pairs(rows, config.seed, 0)[0]
        if not pairs:
            raise ValueError(f"{spec.path}: no usable validation pair (counts above)")
        validations.append(Validation(spec.name, rows, pairs, loader.BatchBuilder(bundle, config, val_codes)))
    attach_judges(validations, config, world, device)
    return validations


def attach_judges(validations: list[Validation], config: TrainConfig, world: World, device: str) -> None:
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
        judge = metrics.build_judge(config.speaker_model or None, config.asr_model or None, config.eval_language or None, device)
    for validation in validations:
        validation.clones = CloneJudge(judge, {row["id"]: row.get("language") for row in validation.rows}) if judge else None
    by_name = {validation.name: validation for validation in validations}
    for label, metric, name in watchers:
        clones, prompts = by_name[name].clones, by_name[name].pairs[: config.eval_prompts]
        no_asr = clones is not None and metric in ("wer", "sim_wer") and not any(
            clones.judge.intelligibility_available(clones.languages[pair.id]) for pair in prompts)
        if parallel.any_process(no_asr, world, device):
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


def evaluate_in_loop(model, validations: list[Validation], config: TrainConfig, world: World, device: str, writer,
                     step: int) -> dict[str | None, Scores]:
    """Each validation set's `Scores`, logged under its name (`SetWriter`), by set name; the same on every process."""
    return {validation.name: evaluate_set(model, validation, config, world, device, SetWriter.of(writer, validation.name), step)
            for validation in validations}


def evaluate_set(model, validation: Validation, config: TrainConfig, world: World, device: str, writer,
                 step: int) -> Scores:
    """Validation losses (`val/*`) and, where clips are generated, their quality (`quality/*`), logged;
    returns both, the same on every process."""
    val = validation_loss(model, validation, config, world, device)
    if writer:
        for name, value in val.items():
            writer.add_scalar(f"val/{name}", value, step)
    quality = {}
    if validation.clones:
        try:
            quality = log_generations(writer, step, parallel.unwrap(model), validation, config, device)
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
                                                            ("quality", "sim"), ("quality", "error_rate"))}
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


def validation_loss(model, validation: Validation, config: TrainConfig, world: World, device: str) -> dict[str, float]:
    """Mean losses over the validation pairs, each process taking every W-th chunk.

    Every process runs as many forwards (FSDP gathers parameters in each, so
    all must take part); a process short of chunks repeats one at weight 0.
    """
    pairs = validation.pairs
    chunks = [pairs[i : i + config.batch_size] for i in range(0, len(pairs), config.batch_size)]
    sums, weight = None, 0.0
    with torch.no_grad(), training.autocast(config.precision, device):
        for round_ in range(math.ceil(len(chunks) / world.size)):
            index = round_ * world.size + world.rank
            batch = validation.builder.batch(chunks[index % len(chunks)])
            inputs = collate.batch_to_model_inputs(batch, device)
            outputs = model(**inputs)
            loss = model_utils.compute_loss(outputs, batch.label_audio_ids)
            parts = [loss.total, loss.text, loss.audio, *loss.per_codebook]
            if config.scope == "lora":  # how far the adapted model has moved from its base on this set
                parts.append(training.forgetting_kl(model, inputs, outputs.audio_logits, batch.label_audio_ids))
            real = float(index < len(chunks))
            values = [float(value) * real for value in parts]
            sums = values if sums is None else [total + value for total, value in zip(sums, values)]
            weight += real
    totals = parallel.sum_over_processes(torch.tensor(sums + [weight], dtype=torch.float64, device=device), world).tolist()
    names = training.loss_names(len(loss.per_codebook)) + ["kl"] * (config.scope == "lora")
    return {name: value / totals[-1] for name, value in zip(names, totals)}


def log_generations(writer, step: int, model, validation: Validation, config: TrainConfig, device: str) -> dict[str, float]:
    """Greedy clones of the first validation prompts: audio, mel spectrograms (generated | target | reference),
    and their SIM, WER/CER and timing as scalars and a table with the transcripts; returns the metrics' means."""
    builder, clones = validation.builder, validation.clones
    bundle = model_utils.Bundle(model, builder.bundle.tokenizer, builder.bundle.audio_tokenizer)
    rate = bundle.audio_tokenizer.sampling_rate
    settings = CloneSettings(generation.Sampling(greedy=True, seed=config.seed, max_seconds=config.eval_max_seconds),
                             data.PromptLayout(config.ref_in_system), batch_size=config.eval_batch_size)
    with training.autocast(config.precision, device):  # frozen weights may be held in bf16 (--frozen-bf16)
        made = list(clones_of(bundle, validation.pairs[: config.eval_prompts], builder.codes, settings))
    records = []
    for pair, clone in made:
        records.append(score_row(clones.judge, pair, clones.languages[pair.id], clone, rate))
        if clone.error is not None:
            continue
        generated = clone.waveform
        writer.add_audio(f"generated/{pair.id}", torch.from_numpy(generated)[None], step, sample_rate=rate)
        panels = [generated, data.load_audio(pair.audio, rate), data.load_audio(pair.ref_audio, rate)]
        writer.add_image(f"mel/{pair.id} (generated | target | reference)", mel_panels(panels, rate), step, dataformats="HW")
    means = {name: stats["mean"] for name, stats in metrics.summarize_records(records, config.seed).items() if stats["n"]}
    log_values(writer, "quality", means, step)
    writer.add_text("quality/table", metrics.markdown_table(records), step)
    return means


def log_values(writer, prefix: str, values: dict[str, float], step: int) -> None:
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


def metric_value(metric: str, val: dict[str, float], quality: dict[str, float]) -> float:
    """A metric of one validation set's evaluation, in its own sign; NaN when it is unavailable."""
    sim, error = quality.get("sim", math.nan), quality.get("error_rate", math.nan)
    return {"val_loss": val["total"], "sim": sim, "wer": error, "sim_wer": error - sim, "kl": val.get("kl", math.nan)}[metric]


def selection_score(best_by: str, val: dict[str, float], quality: dict[str, float]) -> float:
    """What best.pt minimises (`best_by` is the metric): validation loss, -SIM, WER/CER, or WER/CER - SIM;
    inf when it is unavailable."""
    value = metric_value(best_by, val, quality)
    score = -value if best_by == "sim" else value
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
        """The best score in its metric's own sign (SIM is minimised as -SIM)."""
        return -self.score if best_by == "sim" else self.score


@dataclass
class Guards:
    """The --guard bounds on validation metrics, and each relative bound's first value.

    A relative bound (`wer@en<=+0.05`) is measured from its metric's first
    evaluation, made before the first step, and kept in checkpoints
    (`first`, by the rule's text). `judge` gives the lines of an evaluation
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

    def judge(self, scores: dict[str | None, Scores]) -> list[str]:
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
