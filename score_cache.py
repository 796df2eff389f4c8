"""Scores of real target clips, cached on disk: a target scored once is never scored again by the same scorer.

`--eval` scores every row's real target clip (its SIM against the reference,
its transcript, its silences) as the reference point for the generated one,
and those scores never change between runs. `TargetScores` keeps them in a
folder, one small JSON file per entry, keyed by the content of the target
and reference files (SHA-256 of their bytes, so a renamed or copied file
still hits and an edited one misses), the row's language and the identity of
the scorer (speaker encoder and ASR, with their versions or model folders).
The WER itself is not cached: it is recomputed from the cached transcript,
so a change in text normalisation never serves a stale rate. Entries are
written through `files.py`, so a crash leaves whole entries or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import files

DEFAULT_DIR = files.CACHE_ROOT / "target-scores"


class TargetScores:
    """Target-clip scores by (target content, reference content, language, scorer); counts its hits and misses."""

    def __init__(self, folder: str | Path, scorer: str):
        self.folder, self.scorer = Path(folder), scorer
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self._digests: dict[tuple[str, int, int], str] = {}

    def key(self, target: str, reference: str, language: str | None) -> str:
        parts = [self._digest(target), self._digest(reference), language or "", self.scorer]
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.misses += 1
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"warning: {path} is not a cache entry; scoring its target again", file=sys.stderr)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, scores: dict) -> None:
        files.write_text(self.folder / f"{key}.json", json.dumps(scores, ensure_ascii=False))

    def _digest(self, path: str) -> str:
        status = os.stat(path)
        stamp = (str(Path(path).resolve()), status.st_size, status.st_mtime_ns)
        if stamp not in self._digests:
            self._digests[stamp] = files.sha256(path)
        return self._digests[stamp]
