"""The data a run trains on, in the order the step takes it.

* `training_rows`: the kept rows and where their codes come from (a prepared
  cache, or the manifest validated and encoded now), counted as `prepare` counts;
* `report_overlap`: the speakers and clips the validation set shares with them
  (refused with --strict-overlap);
* `epoch_batches`: each epoch's pairs (references drawn anew from (seed,
  epoch)) cut into micro-batches, of `--batch-size` samples or length-bucketed
  within `--batch-tokens`;
* `micro_batches`: the epochs one after another, micro-batches dealt
  round-robin to the processes, with the position a resumed run continues from;
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
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioBatchInput

import collate
import manifest
import model_utils
import prepare
from config import TrainConfig
from parallel import World


# --------------------------------------------------------------------------
# Rows and their codes
# --------------------------------------------------------------------------


def training_rows(config: TrainConfig, bundle: model_utils.Bundle, world: World,
                  run_dir: Path) -> tuple[list[dict], prepare.EncodedClips | prepare.PreparedCodes]:
    """Kept rows and their code source: a prepared cache, or the manifest validated and encoded now.

    Either way the counts are printed so that they reconcile with the
    prepare step's: rows read = kept + rejected, by reason. A cache's shards
    are checked against their checksums unless --no-verify-cache. With
    --batch-tokens the rows carry their text token counts, for planning
    batches: the prepare step's when it used this text tokenizer, else counted now.
    """
    say = print if world.main else (lambda *args, **kwargs: None)
    counted = None
    if config.cache:
        prepared = prepare.read_prepared(config.cache, prepare.audio_tokenizer_id(bundle.audio_tokenizer), config.verify_cache)
        rows, codes, counted = prepared.rows, prepared.codes, prepared.text_token_counts
        say(f"data: {config.cache}: {prepared.summary}")
        say(f"data: {codes.verified_shards} shards ({codes.verified_bytes / 1e6:.1f} MB) match their checksums, "
            f"checked in {codes.verify_seconds:.2f} s (--no-verify-cache skips this)" if config.verify_cache
            else "data: shard checksums not checked (--no-verify-cache); a shard is still checked for its shape when opened")
    else:
        codes = prepare.EncodedClips(bundle.audio_tokenizer)
        rows = validated_rows(config.train_manifest, codes, world, run_dir / "rejections.jsonl")
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


def validated_rows(path: str, codes: prepare.EncodedClips, world: World, report: Path) -> list[dict]:
    """The kept rows of the manifest at `path`, their clips encoded into `codes`; the counts are printed and the
    rejected rows, with row numbers and reasons, listed in `report`."""
    validated = manifest.validate_manifest(path, codes, progress=world.main)
    if world.main:
        print(f"data: {path}: {validated.summary()}")
        if validated.rejections:
            validated.write_report(report)
            print(f"rejected rows, with row numbers and reasons: {report}")
    return validated.kept


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
class DataPosition:
    epoch: int = 0
    index: int = 0  # micro-batches consumed in this epoch, over all processes


def epoch_batches(rows: list[dict], config: TrainConfig, epoch: int, builder: BatchBuilder) -> list[list[manifest.Pair]]:
    """All micro-batches of an epoch: `batch_size` pairs each, or length-bucketed within `batch_tokens`."""
    pairs, _ = manifest.training_pairs(rows, config.seed, epoch)
    if config.batch_tokens:
        batches = collate.token_budget_batches(builder.lengths(pairs, rows), config.batch_tokens, config.seed, epoch)
        return [[pairs[i] for i in batch] for batch in batches]
    order = list(range(len(pairs)))
    random.Random(config.seed * 7919 + epoch).shuffle(order)
    return [[pairs[i] for i in order[start : start + config.batch_size]] for start in range(0, len(order), config.batch_size)]


def micro_batches(rows: list[dict], config: TrainConfig, position: DataPosition, world: World,
                  builder: BatchBuilder) -> Iterator[tuple[DataPosition, list[manifest.Pair]]]:
    """Yields (position after this micro-batch, this process's pairs) forever.

    The epoch's micro-batches are dealt round-robin: process r takes
    micro-batches r, r + W, ...; a tail shorter than W is dropped so every
    process takes as many steps. One process with accumulation A sees exactly
    the micro-batches that A processes see in one step.
    """
    while True:
        batches = epoch_batches(rows, config, position.epoch, builder)
        usable = len(batches) - len(batches) % world.size
        if usable == 0:
            raise ValueError(f"{len(batches)} micro-batches per epoch cannot feed {world.size} processes")
        while position.index < usable:
            batch = batches[position.index + world.rank]
            position = DataPosition(position.epoch, position.index + world.size)
            yield position, batch
        position = DataPosition(position.epoch + 1, 0)


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


class Prefetcher:
    """Each `MicroBatch` of `micro_batches`, built ahead of the step.

    A background thread builds and collates up to `depth` micro-batches while
    the step runs; they come out in the order they went in, each with its
    position, so the data order and --resume are those of `depth` 0, which
    builds each batch when it is taken. An error building a batch is raised
    in the loop, naming the batch's samples. `take_wait()` gives the seconds
    the loop has waited for data since the last call.
    """

    def __init__(self, source, builder: BatchBuilder, depth: int):
        self.source, self.builder, self.depth, self.waited = source, builder, depth, 0.0
        if depth:
            self.ready: queue.Queue = queue.Queue(depth)
            self.stop = threading.Event()
            threading.Thread(target=_prefetch, args=(source, builder, self.ready, self.stop), daemon=True, name="prefetch").start()
            weakref.finalize(self, self.stop.set)  # a loop left by an exception stops the thread too

    def __next__(self) -> MicroBatch:
        started = time.perf_counter()
        item = self.ready.get() if self.depth else _build_micro_batch(self.source, self.builder)
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
        if self.depth:
            self.stop.set()


def _build_micro_batch(source, builder: BatchBuilder) -> MicroBatch:
    position, pairs = next(source)
    try:
        return MicroBatch(position, pairs, builder.batch(pairs))
    except Exception as error:
        raise BatchError(f"micro-batch of {', '.join(pair.id for pair in pairs)}: {error}") from error


def _prefetch(source, builder: BatchBuilder, ready: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: builds micro-batches in order until stopped or an error, which it hands on."""
    while not stop.is_set():
        try:
            item = _build_micro_batch(source, builder)
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
