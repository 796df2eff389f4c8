"""Audio codes of clips: encoded in memory, or prepared once into a cache on disk that training reads.

`EncodedClips` encodes a clip the first time it is asked for and keeps its
codes in memory (training from a manifest, evaluation). `prepare` validates a
manifest and stores the audio codes of every kept clip in a cache that
training reads without the audio tokenizer (`read_prepared`, `PreparedCodes`);
its command line is

    python prepare.py --manifest M --out CACHE [--audio-tokenizer DIR] [--model DIR] [filters]

(`python data.py prepare ...`, its spelling before it moved here, still runs it).
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import files
import manifest
import model_utils

# --------------------------------------------------------------------------
# Codes in memory
# --------------------------------------------------------------------------


class EncodedClips:
    """Audio codes by file: a clip is encoded the first time it is asked for and its codes kept in memory,
    so it is encoded once per process (a clip may serve as reference and target)."""

    def __init__(self, audio_tokenizer):
        self.audio_tokenizer = audio_tokenizer
        self.sampling_rate = audio_tokenizer.sampling_rate
        self.num_codebooks = audio_tokenizer.num_codebooks
        self.codes: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, path: str) -> torch.Tensor:
        if path not in self.codes:
            waveform = data.load_clip(path, self.sampling_rate)
            self.codes[path] = data.encode_clip(self.audio_tokenizer, waveform)
            self.seconds[path] = len(waveform) / self.sampling_rate
        return self.codes[path]

    def clip(self, path: str) -> manifest.Clip:
        codes = self(path)
        return manifest.Clip(self.seconds[path], codes.shape[1])


def audio_tokenizer_id(audio_tokenizer) -> str:
    """A digest of the audio tokenizer's weights, buffers and rate: codes of another tokenizer never match it."""
    digest = hashlib.sha256(str(audio_tokenizer.sampling_rate).encode())
    for name, tensor in sorted(audio_tokenizer.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    if not os.path.isfile(path):
        raise data.AudioError(f"{path}: no such audio file")
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------
#
# `prepare` validates a manifest and stores the audio codes of every kept
# clip in a cache that training reads without the audio tokenizer:
#
#   CACHE/shards/NAME.npy    codes of up to --batch-size clips, (codebooks, frames) uint16, memory-mapped
#   CACHE/shards/NAME.json   the shard's entries (key -> offset, frames, seconds, source) and the SHA-256 and
#                            shape of its codes; written after the codes, so it is what commits the shard
#   CACHE/manifest.jsonl     the kept rows, each clip with its cache key (`audio_key`, `ref_audio_key`) and
#                            each row with its text token counts (`text_tokens`, ...), for planning batches
#   CACHE/prepare.lock       held while a prepare runs, naming its pid
#   CACHE/report.jsonl       one line per rejected row: row, id, reason, detail
#   CACHE/summary.json       the counts; written last, so a cache without it holds no finished prepare


class CacheError(ValueError):
    """A cache file that cannot be used; the message names it and says how to repair it."""


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
    caller holds the cache's lock (`prepare_lock`).
    """

    def __init__(self, cache_dir: str | Path, audio_tokenizer, batch_size: int = 64):
        self.shards = Path(cache_dir) / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
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
            key = f"{_file_digest(path)[:32]}-{self.tokenizer_id[:16]}"
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


def read_shard(entry_file: Path) -> dict:
    """A shard's entry file: `codes_sha256`, `codes_shape` and `entries` (key -> offset, frames, seconds, source)."""
    try:
        shard = json.loads(entry_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{entry_file}: unreadable shard entry file ({error}){_REPAIR}") from None
    if not isinstance(shard, dict) or not {"codes_sha256", "codes_shape", "entries"} <= shard.keys():
        raise CacheError(f"{entry_file}: not a shard entry file with a checksum (an older or damaged cache){_REPAIR}")
    return shard


_REPAIR = "; python prepare.py on this cache re-encodes it"


def read_index(cache_dir: str | Path) -> dict[str, dict]:
    """Every committed entry of a cache: key -> shard, offset, frames, seconds, source."""
    index = {}
    for entry_file in sorted((Path(cache_dir) / "shards").glob("*.json")):
        entries = read_shard(entry_file)["entries"]
        index.update({key: dict(entry, shard=entry_file.stem) for key, entry in entries.items()})
    return index


def verify_shard(entry_file: Path) -> int:
    """Check a shard's codes against the checksum in its entry file; returns their size in bytes.

    A `CacheError` naming the shard for a missing, truncated, empty or altered `.npy` or a bad `.json`.
    """
    shard = read_shard(entry_file)
    codes_file = entry_file.with_suffix(".npy")
    try:
        with codes_file.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as error:
        raise CacheError(f"{codes_file}: unreadable shard codes ({error.strerror}){_REPAIR}") from None
    if digest != shard["codes_sha256"]:
        raise CacheError(f"{codes_file}: shard codes fail their checksum (truncated or altered){_REPAIR}")
    return codes_file.stat().st_size


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
            print(f"cache: {str(error).removesuffix(_REPAIR)}: deleted, its clips are encoded again", file=sys.stderr)
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
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


class PreparedCodes:
    """Codes of a prepared cache by audio path, read from memory-mapped shards without the audio tokenizer.

    `verify` checks every shard the rows use against its checksum now
    (`verified_shards`, `verified_bytes`, `verify_seconds`); either way a shard is checked
    against its recorded shape when it is first opened, so a damaged shard is
    an error naming it, never a crash hours in that names no file.
    """

    def __init__(self, cache_dir: str | Path, rows: list[dict], sampling_rate: int, verify: bool = True):
        self.cache_dir, self.sampling_rate = Path(cache_dir), sampling_rate
        self.index = read_index(cache_dir)
        self.keys = {row[name]: row[f"{name}_key"] for row in rows for name in ("ref_audio", "audio") if name in row}
        missing = sorted(set(self.keys.values()) - set(self.index))
        if missing:
            raise ValueError(f"{cache_dir}: {len(missing)} clips of its manifest are in no shard, e.g. {missing[0]}")
        self.shards: dict[str, np.ndarray] = {}
        self.verified_shards, self.verified_bytes, self.verify_seconds = 0, 0, 0.0
        if verify:
            started = time.perf_counter()
            used = sorted({self.index[key]["shard"] for key in self.keys.values()})
            self.verified_bytes = sum(verify_shard(self.cache_dir / "shards" / f"{name}.json") for name in used)
            self.verified_shards, self.verify_seconds = len(used), time.perf_counter() - started

    def __call__(self, path: str) -> torch.Tensor:
        if path not in self.keys:
            raise KeyError(f"{path} is no clip of the prepared manifest in {self.cache_dir}")
        entry = self.index[self.keys[path]]
        if entry["shard"] not in self.shards:
            self.shards[entry["shard"]] = self._open(entry["shard"])
        codes = self.shards[entry["shard"]][:, entry["offset"] : entry["offset"] + entry["frames"]]
        return torch.from_numpy(codes.astype(np.int64))

    def _open(self, name: str) -> np.ndarray:
        codes_file = self.cache_dir / "shards" / f"{name}.npy"
        shape = tuple(read_shard(codes_file.with_suffix(".json"))["codes_shape"])
        try:
            codes = np.load(codes_file, mmap_mode="r")
        except (OSError, ValueError, EOFError) as error:
            raise CacheError(f"{codes_file}: unreadable shard codes ({error}){_REPAIR}") from None
        if codes.dtype != np.uint16 or codes.shape != shape:
            raise CacheError(f"{codes_file}: shard codes are {codes.dtype} {codes.shape}, its entry file says uint16 {shape}{_REPAIR}")
        return codes


@dataclass
class PrepareResult:
    validation: manifest.ValidationResult
    encoded: int  # clips this run encoded
    reused: int  # clips whose codes the cache (or this run, at another path) already held
    repaired: int = 0  # shards that failed verification, deleted and encoded again


def prepare(
    manifest_path: str | Path,
    cache_dir: str | Path,
    audio_tokenizer,
    tokenizer=None,
    filters: manifest.Filters = manifest.Filters(),
    strict: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> PrepareResult:
    """Validate a manifest and cache the codes of every kept clip (the layout is above).

    What was encoded before an error, a `strict` stop or Ctrl-C is committed,
    so a re-run encodes only the rest. The manifest, report and summary are
    written at the end, the summary last: until then the cache holds the
    previous finished prepare, if any. With the text `tokenizer`, each kept
    row carries its text token counts (`add_text_token_counts`), so training
    plans token-budget batches without building samples. A second prepare of
    the same cache while one runs is a `CacheLocked` error.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with prepare_lock(cache):
        writer = CacheWriter(cache, audio_tokenizer, batch_size)
        try:
            result = manifest.validate_manifest(manifest_path, writer, tokenizer, filters, strict, progress)
        finally:
            writer.flush()
        text_counts = manifest.add_text_token_counts(result.kept, tokenizer) if tokenizer is not None else None
        (cache / "summary.json").unlink(missing_ok=True)
        files.write_text(cache / "manifest.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.kept))
        result.write_report(cache / "report.jsonl")
        summary = dict(manifest=result.manifest, rows_read=result.rows_read, kept=len(result.kept), rejected=result.counts(),
                       audio_tokenizer=writer.tokenizer_id, sampling_rate=writer.sampling_rate, text_token_counts=text_counts,
                       encoded=writer.encoded, reused=writer.reused, repaired=writer.repaired)
        files.write_text(cache / "summary.json", json.dumps(summary, indent=2))
    return PrepareResult(result, writer.encoded, writer.reused, writer.repaired)


@dataclass
class Prepared:
    """A prepared cache as training reads it."""

    rows: list[dict]
    codes: PreparedCodes
    summary: str  # the prepare step's `rows read = kept + rejected` line
    audio_tokenizer_id: str
    text_token_counts: str | None  # `text_counting_id` of the counts the rows carry; None: they carry none


def read_prepared(cache_dir: str | Path, audio_tokenizer_id: str | None = None, verify: bool = True) -> Prepared:
    """The kept rows and codes of a finished prepare; with `audio_tokenizer_id`, an error if another tokenizer made them.

    `verify`: check every shard the rows use against its checksum now (see `PreparedCodes`).
    """
    cache = Path(cache_dir)
    if not (cache / "summary.json").is_file():
        raise FileNotFoundError(f"{cache} holds no finished prepare (no summary.json): run python prepare.py --out {cache}")
    summary = json.loads((cache / "summary.json").read_text(encoding="utf-8"))
    if audio_tokenizer_id is not None and audio_tokenizer_id != summary["audio_tokenizer"]:
        raise ValueError(f"{cache} holds codes of audio tokenizer {summary['audio_tokenizer'][:16]}, "
                         f"not of this one ({audio_tokenizer_id[:16]}): prepare it again")
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    codes = PreparedCodes(cache, rows, summary["sampling_rate"], verify)
    return Prepared(rows, codes, manifest.reconcile(summary["rows_read"], summary["kept"], summary["rejected"]),
                    summary["audio_tokenizer"], summary.get("text_token_counts"))


# --------------------------------------------------------------------------
# Command line: python prepare.py --manifest M --out CACHE
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        audio_tokenizer = (model_utils.load_audio_tokenizer(args.audio_tokenizer, args.device) if args.audio_tokenizer
                           else model_utils.build_tiny_audio_tokenizer(args.seed, args.device))
        tokenizer = _text_tokenizer(args.model)
        filters = manifest.Filters(args.min_seconds, args.max_seconds, args.max_tokens, tuple(args.language), args.max_text_chars)
        result = prepare(args.manifest, args.out, audio_tokenizer, tokenizer, filters, args.strict, args.batch_size, progress=True)
    except (ValueError, CacheLocked, files.WriteError) as error:  # WriteError: a cache file the disk could not take
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a missing manifest, a read-only or full disk: the path and the reason
        print(f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error}", file=sys.stderr)
        return 2
    validation = result.validation
    for rejection in validation.rejections[:5]:
        print(f"  row {rejection.row} ({rejection.id or 'no id'}): {rejection.reason}: {rejection.detail}")
    if len(validation.rejections) > 5:
        print(f"  ... {len(validation.rejections) - 5} more")
    print(f"report: {Path(args.out) / 'report.jsonl'}\n"
          f"clips: {result.encoded} encoded, {result.reused} already in the cache"
          + (f" ({result.repaired} damaged shard(s) deleted and their clips encoded again)" if result.repaired else "")
          + f"; train with --cache {args.out}\n"
          f"{validation.summary()}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare.py", description="Validate a manifest and cache its audio codes.")
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
    add("--language", action="append", default=[], help="keep only this language (repeatable) [all]")
    add("--max-text-chars", type=int, default=manifest.Filters.max_text_chars,
        help=f"longest text kept [{manifest.Filters.max_text_chars}]")
    add("--strict", action="store_true", help="stop at the first bad row")
    add("--batch-size", type=int, default=64, help="clips per committed shard [64]")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the audio tokenizer runs")
    return parser.parse_args(argv)


def _text_tokenizer(model: str):
    if model in model_utils.PRESETS:
        return model_utils.build_tiny_text_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


if __name__ == "__main__":
    sys.exit(main())
