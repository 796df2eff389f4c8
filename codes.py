"""Audio codes of clips: encoded in memory on first use (`EncodedClips`), kept on disk across runs by file
content (`StoredCodes`, `infer.py --eval`'s references), or read from a cache that prepare.py wrote
(`PreparedCodes`, `read_prepared`), keyed by audio tokenizer (`audio_tokenizer_id`).

Training reads its clips' codes here, and so does `infer.py --eval` its
references'; writing the cache (locks, shards, many processes) is prepare.py's,
so nothing here imports the training stack.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import files
import manifest

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


REFERENCE_CACHE_DIR = files.CACHE_ROOT / "reference-codes"


class StoredCodes:
    """Audio codes by file, kept in `folder` across runs: one `.npy` (uint16) per clip, named by the SHA-256 of
    the file's bytes and of the audio tokenizer (`audio_tokenizer_id`), so a renamed or copied file hits, an
    edited one or another tokenizer misses. `hits` counts clips read from the folder, `encoded` clips encoded
    (and stored); an entry that cannot be read is said and encoded again. Written through files.py: a crash
    leaves whole entries or none."""

    def __init__(self, folder: str | Path, audio_tokenizer):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.encoder = EncodedClips(audio_tokenizer)
        self.tokenizer_id = audio_tokenizer_id(audio_tokenizer)
        self.codes: dict[str, torch.Tensor] = {}
        self.hits = self.encoded = 0

    def __call__(self, path: str) -> torch.Tensor:
        if path not in self.codes:
            entry = self.folder / f"{hashlib.sha256(f'{files.sha256(path)}|{self.tokenizer_id}'.encode()).hexdigest()}.npy"
            self.codes[path] = self._read(entry) if entry.is_file() else None
            if self.codes[path] is None:
                self.codes[path] = self.encoder(path)
                self.encoded += 1
                buffer = io.BytesIO()
                np.save(buffer, self.codes[path].numpy().astype(np.uint16), allow_pickle=False)
                with files.atomic_file(entry) as handle:
                    handle.write(buffer.getvalue())
        return self.codes[path]

    def _read(self, entry: Path) -> torch.Tensor | None:
        try:
            stored = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            stored, problem = None, str(error)
        else:
            problem = None if stored.dtype == np.uint16 and stored.ndim == 2 and stored.shape[0] == self.encoder.num_codebooks \
                and stored.shape[1] else f"{stored.dtype} {stored.shape}"
        if problem:
            print(f"warning: {entry} is not a clip's codes ({problem}); encoding the clip again", file=sys.stderr)
            return None
        self.hits += 1
        return torch.from_numpy(stored.astype(np.int64))


def audio_tokenizer_id(audio_tokenizer) -> str:
    """A digest of the audio tokenizer's weights, buffers and rate: codes of another tokenizer never match it."""
    digest = hashlib.sha256(str(audio_tokenizer.sampling_rate).encode())
    for name, tensor in sorted(audio_tokenizer.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------
#
# prepare.py checks a manifest and stores the audio codes of every kept
# clip in a cache, read here without the audio tokenizer:
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


REPAIR_HINT = "; python prepare.py on this cache re-encodes it"  # ends each CacheError's message


def read_shard(entry_file: Path) -> dict:
    """A shard's entry file: `codes_sha256`, `codes_shape` and `entries` (key -> offset, frames, seconds, source)."""
    try:
        shard = json.loads(entry_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{entry_file}: unreadable shard entry file ({error}){REPAIR_HINT}") from None
    if not isinstance(shard, dict) or not {"codes_sha256", "codes_shape", "entries"} <= shard.keys():
        raise CacheError(f"{entry_file}: not a shard entry file with a checksum (an older or damaged cache){REPAIR_HINT}")
    return shard


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
        digest = files.sha256(codes_file)
    except OSError as error:
        raise CacheError(f"{codes_file}: unreadable shard codes ({error.strerror}){REPAIR_HINT}") from None
    if digest != shard["codes_sha256"]:
        raise CacheError(f"{codes_file}: shard codes fail their checksum (truncated or altered){REPAIR_HINT}")
    return codes_file.stat().st_size


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
            raise CacheError(f"{codes_file}: unreadable shard codes ({error}){REPAIR_HINT}") from None
        if codes.dtype != np.uint16 or codes.shape != shape:
            raise CacheError(f"{codes_file}: shard codes are {codes.dtype} {codes.shape}, its entry file says uint16 {shape}{REPAIR_HINT}")
        return codes


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
    counts = manifest.reconcile(summary["rows_read"], summary["kept"], summary["rejected"], summary.get("targets_only", 0))
    return Prepared(rows, codes, counts,
                    summary["audio_tokenizer"], summary.get("text_token_counts"))
