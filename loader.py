"""The data a run trains on, in the order the step takes it.

* `training_sets`: each training set of the mixture (one, or several by
  weight) with its kept rows and where their codes come from (a prepared
  cache, or the manifest checked and encoded now), counted as `prepare` counts;
* `report_overlap`: the speakers and clips the validation set shares with them
  (refused with --strict-overlap);
* `epoch_batches`: each epoch's pairs (references drawn anew from (seed,
  epoch)) cut into micro-batches, of `--batch-size` samples or length-bucketed
  within `--batch-tokens`;
* `micro_batches`: micro-batches drawn from the sets by weight, each set
  through its own epochs, dealt round-robin to the processes, with the
  position a resumed run continues from;
* `BatchBuilder`: pairs to collated batches, through the one sample builder
  and the one collator, pinned for a CUDA run;
* `Prefetcher`: a background thread that builds the next micro-batches while
  the step runs, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioBatchInput

import collate
import manifest
import model_utils
from codes import EncodedClips, PreparedCodes, audio_tokenizer_id, read_prepared
from config import ONE_TRAINING_SET, SetSpec, TrainConfig, training_specs
from parallel import World


# --------------------------------------------------------------------------
# Rows and their codes
# --------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """One set of the training mixture: its name, its share of the draws, its rows and their batch builder."""

    name: str
    weight: float  # the weights of a mixture sum to 1
    source: str  # the manifest or cache it was read from
    rows: list[dict]
    builder: BatchBuilder


def training_sets(config: TrainConfig, bundle: model_utils.Bundle, world: World, run_dir: Path) -> list[TrainingSet]:
    """Each training set (`--train-manifest` or `--cache`, one or a mixture) with its kept rows and their
    batch builder; a set with no usable row is a one-line error after its counts. Manifests share one
    in-memory encoder, so a clip in two sets is encoded once."""
    specs = training_specs(config)
    clips = EncodedClips(bundle.audio_tokenizer)
    sets = []
    for spec in specs:
        report = run_dir / ("rejections.jsonl" if len(specs) == 1 else f"rejections-{spec.name}.jsonl")
        rows, codes = training_rows(spec, config, bundle, world, clips, report)
        if not rows:
            raise ValueError(f"{spec.path}: no usable row to train on (counts above)")
        sets.append(TrainingSet(spec.name, spec.weight, spec.path, rows, BatchBuilder(bundle, config, codes)))
    return sets


def training_rows(spec: SetSpec, config: TrainConfig, bundle: model_utils.Bundle, world: World,
                  clips: EncodedClips, report: Path) -> tuple[list[dict], EncodedClips | PreparedCodes]:
    """Kept rows of one training set and their code source: a prepared cache, or the manifest checked and
    its clips encoded into `clips` now (rejected rows listed in `report`).

    Either way the counts are printed so that they reconcile with the
    prepare step's: rows read = kept + rejected, by reason. A cache's shards
    are checked against their checksums unless --no-verify-cache. With
    --batch-tokens the rows carry their text token counts, for planning
    batches: the prepare step's when it used this text tokenizer, else counted now.
    """
    say = print if world.main else (lambda *args, **kwargs: None)
    counted = None
    if config.cache:
        prepared = read_prepared(spec.path, audio_tokenizer_id(bundle.audio_tokenizer), config.verify_cache)
        rows, codes, counted = prepared.rows, prepared.codes, prepared.text_token_counts
        say(f"data: {spec.path}: {prepared.summary}")
        say(f"data: {codes.verified_shards} shards ({codes.verified_bytes / 1e6:.1f} MB) match their checksums, "
            f"checked in {codes.verify_seconds:.2f} s (--no-verify-cache skips this)" if config.verify_cache
            else "data: shard checksums not checked (--no-verify-cache); a shard is still checked for its shape when opened")
    else:
        codes = clips
        rows = checked_rows(spec.path, codes, world, report)
    if config.batch_tokens and counted != manifest.text_counting_id(bundle.tokenizer):
        if counted is not None:
            say("data: the cache's text token counts are of another text tokenizer or normalisation: counting again")
        manifest.add_text_token_counts(rows, bundle.tokenizer)
    return rows, codes


def report_overlap(rows: list[dict], val_rows: list[dict], config: TrainConfig, world: World) -> None:
    """Print the speakers and clips the validation set shares with the training set; --strict-overlap refuses any."""
    if config.val_manifest:
        line = manifest.check_overlap(rows, val_rows, config.strict_overlap)
        if world.main:
            print(f"data: {line}")


def checked_rows(path: str, codes: EncodedClips, world: World, report: Path) -> list[dict]:
    """The kept rows of the manifest at `path`, their clips encoded into `codes`; the counts are printed and the
    rejected rows, with row numbers and reasons, listed in `report`."""
    checked = manifest.check_manifest(path, codes, progress=world.main)
    if world.main:
        print(f"data: {path}: {checked.summary()}")
        if checked.rejections:
            checked.write_report(report)
            print(f"rejected rows, with row numbers and reasons: {report}")
    return checked.kept


def data_fingerprint(rows: list[dict], codes) -> str:
    """A digest of what a run trains on, for --resume to compare: each kept row's texts, speaker, scene and
    language, and the content of its clips (a prepared cache's keys, the SHA-256 of a file's bytes and the
    audio tokenizer; or the codes encoded now). Paths do not enter it, so moved data is the same data."""
    digest = hashlib.sha256()
    for row in rows:
        fields = [row.get(name) for name in ("id", "text", "ref_text", "speaker", "scene", "language")]
        clips = [row.get(f"{key}_key") or hashlib.sha256(codes(row[key]).numpy().tobytes()).hexdigest()
                 for key in ("ref_audio", "audio") if key in row]
        digest.update(json.dumps([fields, clips], ensure_ascii=False).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Pairs to batches
# --------------------------------------------------------------------------


class BatchBuilder:
    """Pairs to collated batches, through the shared builder and collator."""

    def __init__(self, bundle: model_utils.Bundle, config: TrainConfig, codes):
        self.bundle, self.config, self.codes = bundle, config, codes
        model_config = bundle.model.config
        self.whisper = collate.whisper_features(model_config)
        self.collator = collate.build_collator(model_config, self.whisper)

    def lengths(self, pairs: list[manifest.Pair], rows: list[dict]) -> list[int]:
        """Each pair's `collate.sample_tokens`, from the numbers its rows carry (no sample is built);
        rows without text token counts are given them first."""
        model_config = self.bundle.model.config
        if self.whisper is not None and self.config.ref_in_system:
            raise ValueError("--batch-tokens cannot count the Whisper features of a system-message reference")
        if rows and "text_tokens" not in rows[0]:
            manifest.add_text_token_counts(rows, self.bundle.tokenizer)
        return manifest.sample_lengths(pairs, rows, self.bundle.tokenizer, model_config.audio_num_codebooks,
                                       self.config.ref_in_system, model_config.use_delay_pattern)

    def samples(self, pairs: list[manifest.Pair]) -> list:
        return [
            manifest.pair_to_sample(pair, self.bundle.tokenizer, self.codes, self.config.ref_in_system, self.whisper is not None)
            for pair in pairs
        ]

    def batch(self, pairs: list[manifest.Pair]) -> HiggsAudioBatchInput:
        """The collated batch; for a CUDA run in pinned memory, so that the step copies it without waiting."""
        codebook_size = self.bundle.model.config.audio_codebook_size
        batch = collate.collate(self.collator, self.samples(pairs), codebook_size, [pair.id for pair in pairs])
        return collate.pinned(batch) if self.config.device.startswith("cuda") else batch


# --------------------------------------------------------------------------
# Data order: deterministic by (seed, epoch), dealt to processes, resumable
# --------------------------------------------------------------------------


@dataclass
class SetPosition:
    """Where one training set stands: its epoch, the micro-batches taken from that epoch (over all processes),
    and the micro-batches and samples drawn from it since the run began."""

    epoch: int = 0
    index: int = 0
    drawn: int = 0
    samples: int = 0


@dataclass
class DataPosition:
    """Where the data order stands, set by set (a set not listed has not started)."""

    sets: dict[str, SetPosition] = field(default_factory=dict)

    @classmethod
    def restored(cls, saved: dict) -> DataPosition:
        """From a checkpoint; one written before mixtures holds one set's {"epoch", "index"}, which resumes as
        the lone training set's (its draw counts, which only a mixture reads, start at 0)."""
        if "sets" not in saved:
            return cls({ONE_TRAINING_SET: SetPosition(saved["epoch"], saved["index"])})
        return cls({name: SetPosition(**values) for name, values in saved["sets"].items()})


def epoch_batches(rows: list[dict], config: TrainConfig, epoch: int, builder: BatchBuilder) -> list[list[manifest.Pair]]:
    """All micro-batches of an epoch: `batch_size` pairs each, or length-bucketed within `batch_tokens`."""
    pairs, _ = manifest.training_pairs(rows, config.seed, epoch)
    if config.batch_tokens:
        batches = collate.token_budget_batches(builder.lengths(pairs, rows), config.batch_tokens, config.seed, epoch)
        return [[pairs[i] for i in batch] for batch in batches]
    order = list(range(len(pairs)))
    random.Random(config.seed * 7919 + epoch).shuffle(order)
    return [[pairs[i] for i in order[start : start + config.batch_size]] for start in range(0, len(order), config.batch_size)]


def next_set(weights: list[float], drawn: list[int]) -> int:
    """The set the next micro-batch of a mixture is drawn from, by weight and deterministically.

    Tijdeman's rule for the chairman assignment problem: among the sets at
    least 1/(2k - 2) micro-batches behind their share (k sets), the one whose
    next turn falls due first. It keeps every set's count within
    1 - 1/(2k - 2) of weight x draws after any number of draws, so the shares
    hold over every stretch and a resumed run draws as the uninterrupted one.
    """
    if len(weights) == 1:
        return 0
    margin = 1 / (2 * len(weights) - 2)
    due = sum(drawn) + 1
    behind = [index for index, (weight, count) in enumerate(zip(weights, drawn)) if weight * due - count >= margin - 1e-9]
    return min(behind, key=lambda index: ((drawn[index] + 1 - margin) / weights[index], index))


class Drawn(NamedTuple):
    position: DataPosition  # where the data order stands after this micro-batch
    pairs: list[manifest.Pair]
    set: TrainingSet


def micro_batches(sets: list[TrainingSet], config: TrainConfig, position: DataPosition, world: World) -> Iterator[Drawn]:
    """Yields this process's micro-batches, each with its set and the position after it, forever.

    Every process makes the same draws; each round of W draws (W processes)
    gives process r the r-th, so one process with accumulation A sees exactly
    the micro-batches that A processes see in one step. Each draw takes the
    next micro-batch of the set `next_set` picks; a set at the end of its
    epoch starts its next, so a small set repeats and a large one does not.
    """
    unknown = set(position.sets) - {training_set.name for training_set in sets}
    if unknown:
        raise ValueError(f"the data position is of sets {sorted(position.sets)}, this run trains on "
                         f"{[training_set.name for training_set in sets]}")
    at = {training_set.name: replace(position.sets.get(training_set.name, SetPosition())) for training_set in sets}
    epochs: dict[str, tuple[int, list]] = {}
    while True:
        draws = [_draw(sets, at, epochs, config) for _ in range(world.size)]
        yield Drawn(DataPosition({name: replace(value) for name, value in at.items()}), *draws[world.rank])


def _draw(sets: list[TrainingSet], at: dict[str, SetPosition], epochs: dict, config: TrainConfig):
    """One draw of the mixture: the set `next_set` picks and its next micro-batch's pairs."""
    chosen = sets[next_set([training_set.weight for training_set in sets], [at[training_set.name].drawn for training_set in sets])]
    return _take(chosen, at[chosen.name], epochs, config), chosen


def _take(training_set: TrainingSet, at: SetPosition, epochs: dict, config: TrainConfig) -> list[manifest.Pair]:
    """The next micro-batch of `training_set`, moving `at` past it, into the next epoch after an epoch's last
    (so `at.epoch` counts the epochs done)."""
    batches = _epoch(training_set, at.epoch, epochs, config)
    if at.index >= len(batches):  # a position saved at an epoch's end before epochs rolled over at once
        at.epoch, at.index = at.epoch + 1, 0
        batches = _epoch(training_set, at.epoch, epochs, config)
    pairs = batches[at.index]
    at.index, at.drawn, at.samples = at.index + 1, at.drawn + 1, at.samples + len(pairs)
    if at.index == len(batches):
        at.epoch, at.index = at.epoch + 1, 0
    return pairs


def _epoch(training_set: TrainingSet, epoch: int, epochs: dict, config: TrainConfig) -> list[list[manifest.Pair]]:
    """`epoch_batches` of a set, kept while the set is in that epoch."""
    if epochs.get(training_set.name, (None,))[0] != epoch:
        batches = epoch_batches(training_set.rows, config, epoch, training_set.builder)
        if not batches:
            raise ValueError(f"{training_set.source}: epoch {epoch} has no micro-batch")
        epochs[training_set.name] = (epoch, batches)
    return epochs[training_set.name][1]


def mixture_panels(position: DataPosition) -> dict[str, float]:
    """What a mixture has actually drawn so far, per set: its share of the micro-batches and of the samples,
    and the epochs it has completed (`mixture/NAME/*`); nothing for a lone set."""
    if len(position.sets) < 2:
        return {}
    batches = sum(at.drawn for at in position.sets.values()) or 1
    samples = sum(at.samples for at in position.sets.values()) or 1
    panels = {}
    for name, at in position.sets.items():
        panels |= {f"mixture/{name}/share": at.drawn / batches, f"mixture/{name}/sample_share": at.samples / samples,
                   f"mixture/{name}/epoch": at.epoch}
    return panels


# --------------------------------------------------------------------------
# Prefetch: the next micro-batches built while the step runs
# --------------------------------------------------------------------------


class BatchError(ValueError):
    """A micro-batch that could not be built; the message names its samples."""


@dataclass
class MicroBatch:
    position: DataPosition  # where the data order stands after this micro-batch
    pairs: list[manifest.Pair]
    batch: HiggsAudioBatchInput
    set_name: str


class Prefetcher:
    """Each `MicroBatch` of `micro_batches`, built ahead of the step.

    A background thread builds and collates up to `depth` micro-batches while
    the step runs; they come out in the order they went in, each with its
    position, so the data order and --resume are those of `depth` 0, which
    builds each batch when it is taken. An error building a batch is raised
    in the loop, naming the batch's samples. `take_wait()` gives the seconds
    the loop has waited for data since the last call. Used as a context
    manager, so that the thread ends on every way out of the loop.
    """

    def __init__(self, source: Iterator[Drawn], depth: int):
        self.source, self.depth, self.waited = source, depth, 0.0
        if depth:
            self.ready: queue.Queue = queue.Queue(depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=_prefetch, args=(source, self.ready, self.stop), daemon=True, name="prefetch")
            self.thread.start()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def __next__(self) -> MicroBatch:
        started = time.perf_counter()
        item = self.ready.get() if self.depth else _build_micro_batch(self.source)
        self.waited += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def take(self, count: int) -> list[MicroBatch]:
        """The next `count` micro-batches: one optimizer step's."""
        return [next(self) for _ in range(count)]

    def take_wait(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def close(self) -> None:
        """Stop the thread and wait for the batch it is building: a thread left inside a torch operation as Python
        exits aborts the process (`terminate called without an active exception`, status 134)."""
        if self.depth:
            self.stop.set()
            self.thread.join()


def _build_micro_batch(source: Iterator[Drawn]) -> MicroBatch:
    position, pairs, training_set = next(source)
    try:
        return MicroBatch(position, pairs, training_set.builder.batch(pairs), training_set.name)
    except Exception as error:
        raise BatchError(f"micro-batch of {', '.join(pair.id for pair in pairs)}: {error}") from error


def _prefetch(source: Iterator[Drawn], ready: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: builds micro-batches in order until stopped or an error, which it hands on."""
    while not stop.is_set():
        try:
            item = _build_micro_batch(source)
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
