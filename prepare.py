"""The prepare command: check a manifest and write the audio codes of every kept clip into a cache on disk.

`prepare` stores the codes in the layout that codes.py describes and reads
(`codes.read_prepared`, `codes.PreparedCodes`: training without the audio
tokenizer); the cache's writer, its lock and the many-process encoding are
here. Its command line is

    python prepare.py --manifest M --out CACHE [--audio-tokenizer DIR] [--model DIR] [filters]
    torchrun --nproc-per-node 8 prepare.py --manifest M --out CACHE ...     # one process per GPU, or machines

Under torchrun each process encodes its share of the clips into shards of its
own, then process 0 checks the manifest as one process does, every clip
now in the cache, and writes the cache's manifest, report and summary: the
same cache as one process makes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import commands  # light: it must catch a Ctrl-C while the rest loads

if __name__ == "__main__":
    commands.quiet_ctrl_c_while_loading()

import numpy as np
import torch
from tqdm import tqdm

import data
import files
import manifest
import metrics
import model_utils
import parallel
from codes import REPAIR_HINT, CacheError, audio_tokenizer_id, read_index, verify_shard
from parallel import World

# --------------------------------------------------------------------------
# Writing the cache (its layout is in codes.py)
# --------------------------------------------------------------------------


class CacheLocked(RuntimeError):
    """Another prepare holds the cache's lock."""


class CacheWriter:
    """The prepare step's clip source: each new clip is loaded, checked and encoded once, then committed.

    A clip's key is the digest of its file's bytes and of the audio tokenizer,
    so a clip already cached (by an earlier or interrupted run, or at another
    path) is reused, and another tokenizer never gets its codes. Every
    `batch_size` new clips become one shard: the codes, then the entries (with
    the codes' checksum), each written to a temporary file and renamed, so an
    interrupted run leaves whole shards and at worst files that no entry file
    commits, which the next run deletes. A shard that fails verification is
    deleted, so its clips are encoded again (`repaired` counts them). The
    caller holds the cache's lock (`prepare_lock`). `clean`: do that clean-up;
    under torchrun only process 0 does, before the others start writing.
    """

    def __init__(self, cache_dir: str | Path, audio_tokenizer, batch_size: int = 64, clean: bool = True):
        self.shards = Path(cache_dir) / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.repaired = 0
        if clean:
            _remove_uncommitted(self.shards)
            self.repaired = _remove_corrupt(self.shards)
        self.index = read_index(cache_dir)
        self.audio_tokenizer, self.batch_size = audio_tokenizer, batch_size
        self.tokenizer_id = audio_tokenizer_id(audio_tokenizer)
        self.sampling_rate = audio_tokenizer.sampling_rate
        self.num_codebooks = audio_tokenizer.num_codebooks
        self.pending: dict[str, tuple[np.ndarray, dict]] = {}
        self.clips: dict[str, manifest.Clip] = {}
        self.encoded = self.reused = 0

    def clip(self, path: str) -> manifest.Clip:
        if path not in self.clips:
            key = manifest.cache_key(path, self.tokenizer_id)
            entry = self.index.get(key) or (self.pending[key][1] if key in self.pending else None)
            if entry is None:
                entry = self._encode(path, key)
            else:
                self.reused += 1
            self.clips[path] = manifest.Clip(entry["seconds"], entry["frames"], key)
        return self.clips[path]

    def _encode(self, path: str, key: str) -> dict:
        waveform = data.load_clip(path, self.sampling_rate)
        codes = data.encode_clip(self.audio_tokenizer, waveform).numpy()
        entry = {"frames": codes.shape[1], "seconds": len(waveform) / self.sampling_rate, "source": path}
        self.pending[key] = (codes, entry)
        self.encoded += 1
        if len(self.pending) >= self.batch_size:
            self.flush()
        return entry

    def flush(self) -> None:
        """Commit the pending clips as one shard."""
        if not self.pending:
            return
        keys = list(self.pending)
        codes = np.concatenate([self.pending[key][0] for key in keys], axis=1)
        if codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max:
            raise ValueError(f"audio codes span {codes.min()}..{codes.max()}, outside the cache's uint16")
        offsets = np.cumsum([0] + [self.pending[key][1]["frames"] for key in keys])
        entries = {key: dict(self.pending[key][1], offset=int(offset)) for key, offset in zip(keys, offsets)}
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        buffer = io.BytesIO()
        np.save(buffer, codes.astype(np.uint16))
        payload = buffer.getvalue()
        shard = {"codes_sha256": hashlib.sha256(payload).hexdigest(), "codes_shape": list(codes.shape), "entries": entries}
        with files.atomic_file(self.shards / f"{name}.npy") as file:
            file.write(payload)
        files.write_text(self.shards / f"{name}.json", json.dumps(shard))
        self.index.update({key: dict(entry, shard=name) for key, entry in entries.items()})
        self.pending.clear()


def _remove_uncommitted(shards: Path) -> None:
    """Delete what an interrupted run left: temporary files, and codes that no entry file commits."""
    # `files.atomic_file` names its temporaries NAME.tmp-PID; caches written before it used NAME.tmp.
    stray = [p for p in shards.iterdir() if p.suffix == ".tmp" or p.suffix.startswith(".tmp-")
             or (p.suffix == ".npy" and not p.with_suffix(".json").exists())]
    for path in stray:
        path.unlink()
    if stray:
        print(f"cache: removed {len(stray)} uncommitted file(s) of an interrupted run", file=sys.stderr)


def _remove_corrupt(shards: Path) -> int:
    """Delete every shard that fails verification, so that its clips are encoded again; returns how many."""
    removed = 0
    for entry_file in sorted(shards.glob("*.json")):
        try:
            verify_shard(entry_file)
        except CacheError as error:
            print(f"cache: {str(error).removesuffix(REPAIR_HINT)}: deleted, its clips are encoded again", file=sys.stderr)
            entry_file.with_suffix(".npy").unlink(missing_ok=True)
            entry_file.unlink()
            removed += 1
    return removed


PREPARE_LOCK = "prepare.lock"


@contextlib.contextmanager
def prepare_lock(cache_dir: Path):
    """Hold `CACHE/prepare.lock` (an exclusive `flock`) while a prepare writes the cache.

    The kernel releases the lock when its process ends, however it ends, so
    the lock of a killed prepare is simply taken over. The file holds the
    holder's pid and host, which a refused prepare names.
    """
    path = cache_dir / PREPARE_LOCK
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 200).decode(errors="replace").strip() or "a process that has not written its pid yet"
            os.close(descriptor)
            raise CacheLocked(f"{path} is held by {holder} (another prepare of this cache): wait for it to end") from None
        # The holder before us may have deleted the file in between: lock the file that is there.
        if path.exists() and path.stat().st_ino == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)
    previous = os.read(descriptor, 200).decode(errors="replace").strip()
    if previous:
        print(f"cache: took over {path} from {previous}, which ended without releasing it", file=sys.stderr)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError as error:  # a full disk: an error that names no file
        path.unlink(missing_ok=True)
        os.close(descriptor)
        raise files.WriteError(path, error) from error
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


class MosFilter:
    """A clip source that first rejects clips (targets and references) whose predicted MOS is under `min_mos`
    (`low_mos`, counted as the row check counts any reason), then hands the rest to `clips`. Each file is
    scored once."""

    def __init__(self, clips: manifest.ClipSource, min_mos: float, predictor: metrics.MosPredictor):
        self.clips, self.min_mos, self.predictor = clips, min_mos, predictor
        self.num_codebooks = clips.num_codebooks
        self.scores: dict[str, float] = {}

    def clip(self, path: str) -> manifest.Clip:
        if path not in self.scores:
            self.scores[path] = self.predictor.score(data.load_clip(path, metrics.MOS_RATE), metrics.MOS_RATE)
        if self.scores[path] < self.min_mos:
            raise manifest.RowRejected("low_mos", f"{path}: MOS {self.scores[path]:.2f} ({self.predictor.name}), "
                                                  f"under --min-mos {self.min_mos:g}")
        return self.clips.clip(path)


@dataclass(frozen=True)
class Options:
    """What the command line chooses for a prepare besides the manifest, the cache and the tokenizers."""

    filters: manifest.Filters = manifest.Filters()  # which rows are kept
    strict: bool = False  # stop at the first bad row
    batch_size: int = 64  # clips per committed shard
    progress: bool = False  # progress bars
    val_manifest: str | Path | None = None  # a validation manifest whose shared speakers and clips are reported
    strict_overlap: bool = False  # with `val_manifest`: refuse what it shares (`manifest.OverlapError`)
    min_mos: float = 0.0  # clips whose predicted MOS is under this are rejected as low_mos (0: no MOS filter)


@dataclass
class PrepareResult:
    checked: manifest.CheckedManifest  # the manifest's rows checked: kept and rejected
    encoded: int  # clips this run encoded (by every process)
    reused: int  # clips whose codes the cache (or this run, at another path) already held
    repaired: int = 0  # shards that failed verification, deleted and encoded again
    overlap: str | None = None  # the train/val overlap line, with a validation manifest


def prepare(manifest_path: str | Path, cache_dir: str | Path, audio_tokenizer, tokenizer=None,
            options: Options = Options(), world: World = World()) -> PrepareResult | None:
    """Check a manifest and cache the codes of every kept clip (the layout is in codes.py).

    What was encoded before an error, a `strict` stop or Ctrl-C is committed,
    so a re-run encodes only the rest. The manifest, report and summary are
    written at the end, the summary last: until then the cache holds the
    previous finished prepare, if any. With the text `tokenizer`, each kept
    row carries its text token counts (`add_text_token_counts`), so training
    plans token-budget batches without building samples. A second prepare of
    the same cache while one runs is a `CacheLocked` error. With a
    `val_manifest` in `options`, the speakers and clips it shares with the
    kept rows are reported (`manifest.check_overlap`), and refused with
    `strict_overlap` before the cache's manifest is written. Under torchrun
    (`world`) each process first encodes its share (`encode_share`); process
    0 then does the rest and returns the result, the others None.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with held_by_main(cache, world):
        shared = encode_share(manifest_path, cache, audio_tokenizer, options, world) if world.distributed else Share()
        if not world.main:
            return None
        writer = CacheWriter(cache, audio_tokenizer, options.batch_size, clean=not world.distributed)
        clips = MosFilter(writer, options.min_mos, metrics.mos_predictor()) if options.min_mos > 0 else writer
        try:
            result = manifest.check_manifest(manifest_path, clips, tokenizer, options.filters, options.strict,
                                                options.progress)
        finally:
            writer.flush()
        overlap = None
        if options.val_manifest:
            val_rows = manifest.rows_before_audio(options.val_manifest)
            overlap = manifest.check_overlap(result.kept, val_rows, options.strict_overlap)
        # Clips the processes encoded are found in the cache here: they count as encoded, not reused.
        encoded = writer.encoded + shared.encoded
        reused, repaired = writer.reused + writer.encoded - encoded, writer.repaired + shared.repaired
        mos_filter = {"min_mos": options.min_mos, "mos_model": clips.predictor.name} if clips is not writer else None
        write_finished(cache, result, writer, tokenizer, dict(encoded=encoded, reused=reused, repaired=repaired,
                                                              mos_filter=mos_filter))
    return PrepareResult(result, encoded, reused, repaired, overlap)


def write_finished(cache: Path, result: manifest.CheckedManifest, writer: CacheWriter, tokenizer, counts: dict) -> None:
    """The kept rows, the report and, last, the summary of a finished prepare."""
    text_counts = manifest.add_text_token_counts(result.kept, tokenizer) if tokenizer is not None else None
    (cache / "summary.json").unlink(missing_ok=True)
    files.write_text(cache / "manifest.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.kept))
    result.write_report(cache / "report.jsonl")
    summary = dict(manifest=result.manifest, rows_read=result.rows_read, kept=len(result.kept), rejected=result.counts(),
                   audio_tokenizer=writer.tokenizer_id, sampling_rate=writer.sampling_rate, text_token_counts=text_counts,
                   targets_only=result.targets_only(), **counts)
    files.write_text(cache / "summary.json", json.dumps(summary, indent=2))


# --------------------------------------------------------------------------
# Many processes: torchrun, one cache
# --------------------------------------------------------------------------
#
# Process 0 holds the cache's lock for the whole prepare and cleans the cache
# (stray files, damaged shards) while the others wait; then each process
# encodes its share of the clips into shards of its own (shard names are
# digests of their keys, so no two processes write one file) and commits them
# as one process does. Once all are done, process 0 checks the manifest as
# one process does: every clip is in the cache by then, so it encodes only
# what no share held. A killed process leaves whole shards, and torchrun ends
# the others: a re-run, with any number of processes, encodes only the rest.


@dataclass
class Share:
    """What the processes did together before the rows are checked."""

    encoded: int = 0
    repaired: int = 0


@contextlib.contextmanager
def held_by_main(cache: Path, world: World):
    """`prepare_lock`, held by process 0 for the whole prepare; every process learns whether it got it."""
    if not world.distributed:
        with prepare_lock(cache):
            yield
        return
    with contextlib.ExitStack() as held:
        refusal = None
        if world.main:
            try:
                held.enter_context(prepare_lock(cache))
            except CacheLocked as error:
                refusal = str(error)
        refusal = parallel.from_main_process(refusal, world)
        if refusal:
            raise CacheLocked(refusal)
        yield


def encode_share(manifest_path: str | Path, cache: Path, audio_tokenizer, options: Options, world: World) -> Share:
    """This process's share of the manifest's clips (`share_of`), encoded into shards of its own; the counts of all.

    A clip that cannot be loaded is left to the row check on process 0,
    which counts it under its reason. Any other error on any process is a
    RuntimeError on every process, naming it.
    """
    writer = CacheWriter(cache, audio_tokenizer, options.batch_size) if world.main else None
    parallel.wait_for_all(world)  # process 0 has cleaned the cache
    writer = writer or CacheWriter(cache, audio_tokenizer, options.batch_size, clean=False)
    error = None
    try:
        mine = share_of(manifest_path, options.filters, world)
        for path in tqdm(mine, desc="encode (process 0's share)", disable=not (options.progress and world.main)):
            with contextlib.suppress(data.AudioError):
                writer.clip(path)
        writer.flush()
    except Exception as failure:  # handed to every process, so that none waits for it forever
        error = f"process {world.rank}: {failure}"
    reports = parallel.gather_objects((writer.encoded, writer.repaired, error), world)
    errors = [error for _, _, error in reports if error]
    if errors:
        raise RuntimeError("; ".join(errors))
    return Share(sum(encoded for encoded, _, _ in reports), sum(repaired for _, repaired, _ in reports))


def share_of(manifest_path: str | Path, filters: manifest.Filters, world: World) -> list[str]:
    """This process's clips: the distinct clips of the rows that pass the checks needing no audio, dealt largest
    file first to the process with the fewest bytes so far, so that each encodes about as much audio."""
    paths = {row[key] for row in manifest.rows_before_audio(manifest_path, filters) for key in ("ref_audio", "audio") if key in row}
    sizes = {path: os.path.getsize(path) if os.path.isfile(path) else 0 for path in paths}
    loads, mine = [0] * world.size, []
    for path in sorted(paths, key=lambda path: (-sizes[path], path)):
        least = loads.index(min(loads))
        loads[least] += sizes[path] + 1
        if least == world.rank:
            mine.append(path)
    return mine


# --------------------------------------------------------------------------
# Command line: python prepare.py --manifest M --out CACHE
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if (checked := commands.run(lambda: _check_inputs(args))) != 0:
        return checked
    world = parallel.start_processes(args.device)
    kept = f"the clips encoded so far are kept in {args.out}; the same command encodes only the rest"
    try:
        return commands.run(lambda: _prepare_and_report(args, world), lambda _: commands.interrupted(kept))
    finally:
        parallel.stop_processes(world)


def _prepare_and_report(args: argparse.Namespace, world: World) -> int:
    result = _prepare(args, world)
    if result is not None:
        _print_result(result, args.out)
        if not result.checked.kept:  # nothing to train on: an error, and no next command
            return commands.fail(ValueError(f"nothing usable found in {args.manifest}: no row kept; "
                                            f"report: {Path(args.out) / 'report.jsonl'}"))
    return 0


def _check_inputs(args: argparse.Namespace) -> int:
    """The manifests exist and the training one holds a row (0), checked before a model loads or the cache
    folder is made, so that a mistyped path or an empty manifest leaves nothing behind."""
    if not 0 <= args.min_mos <= 5:
        raise ValueError(f"--min-mos {args.min_mos:g} must lie in 0-5 (0 = off; MOS runs 1-5)")
    for path in filter(None, (args.manifest, args.val_manifest)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such manifest: {path}")
    with open(args.manifest, "rb") as lines:
        if not any(line.strip() for line in lines):
            raise ValueError(f"nothing usable found in {args.manifest}: it holds no row")
    return 0


def _prepare(args: argparse.Namespace, world: World) -> PrepareResult | None:
    audio_tokenizer = (model_utils.load_audio_tokenizer(args.audio_tokenizer, world.device) if args.audio_tokenizer
                       else model_utils.build_tiny_audio_tokenizer(args.seed, world.device))
    tokenizer = _text_tokenizer(args.model)
    languages = tuple(manifest.canonical_language(tag) for tag in args.language)
    filters = manifest.Filters(args.min_seconds, args.max_seconds, args.max_tokens, languages, args.max_text_chars)
    options = Options(filters, strict=args.strict, batch_size=args.batch_size, progress=world.main,
                      val_manifest=args.val_manifest, strict_overlap=args.strict_overlap, min_mos=args.min_mos)
    return prepare(args.manifest, args.out, audio_tokenizer, tokenizer, options, world)


def _print_result(result: PrepareResult, out: str) -> None:
    checked = result.checked
    commands.list_first([f"row {r.row} ({r.id or 'no id'}): {r.reason}: {r.detail}" for r in checked.rejections])
    if result.overlap:
        print(result.overlap)
    print(f"report: {Path(out) / 'report.jsonl'}\n"
          f"clips: {result.encoded} encoded, {result.reused} already in the cache"
          + (f" ({result.repaired} damaged shard(s) deleted and their clips encoded again)" if result.repaired else "")
          + (f"; train with --cache {out}" if checked.kept else "") + "\n"
          f"{checked.summary()}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare.py", description="Check a manifest and cache its audio codes.")
    add = parser.add_argument
    add("--manifest", required=True, help="JSONL manifest (speaker-grouped or paired rows)")
    add("--out", required=True, help="cache directory (created; re-running reuses what is in it)")
    add("--audio-tokenizer", help="audio tokenizer directory [the tiny preset's, from --seed]")
    add("--seed", type=int, default=0, help="seed of the tiny preset's audio tokenizer, as train.py --seed [0]")
    add("--model", default=model_utils.TINY_PRESET,
        help="text tokenizer (tiny or a model directory) for --max-tokens and the text token counts stored for "
             "planning batches; training recounts when its tokenizer differs [tiny]")
    add("--min-seconds", type=float, default=0.0, help="shortest clip kept [0]")
    add("--max-seconds", type=float, default=math.inf, help="longest clip kept [no limit]")
    add("--max-tokens", type=int, help="largest training sample kept, in model positions [no limit]")
    add("--language", action="append", default=[],
        help="keep only this language (repeatable; any spelling of a BCP 47 tag: en, EN, en-US, en_us, eng; "
             "en keeps en-US too; rows store the canonical tag) [all]")
    add("--max-text-chars", type=int, default=manifest.Filters.max_text_chars,
        help=f"longest text kept, at most data.LIMITS' [{manifest.Filters.max_text_chars}]")
    add("--min-mos", type=float, default=0.0,
        help="reject clips (targets and references) whose predicted MOS (distillmos, 1-5) is under this, as low_mos; "
             "segment.py's default is 3.0 [0: off]")
    add("--strict", action="store_true", help="stop at the first bad row")
    add("--val-manifest", help="a validation manifest: report the speakers and clips it shares with the kept rows")
    add("--strict-overlap", action="store_true",
        help="with --val-manifest, refuse any shared speaker or clip (exit status 2) instead of reporting it")
    add("--batch-size", type=int, default=64, help="clips per committed shard [64]")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the audio tokenizer runs (under torchrun, cuda means each process's own GPU)")
    return parser.parse_args(argv)


def _text_tokenizer(model: str):
    if model in model_utils.PRESETS:
        return model_utils.build_tiny_text_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


if __name__ == "__main__":
    commands.loaded()
    sys.exit(main())
