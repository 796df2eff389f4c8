"""Turns files into samples.

This module owns the one sample builder, `build_sample`, that training and
inference both call: with target codes it returns a training sample (only the
final assistant audio turn carries labels), without them the inference
prompt, which is exactly the training sample's input up to the point where
generation starts. The prompt layouts are those of the package's official
voice-cloning example (`examples/generation.py: prepare_generation_context` in
boson-ai/higgs-audio), and the text normalisation that example applies before
generation is applied here, so training text is normalised as inference text.

It also loads audio: any WAV/FLAC (8 to 48 kHz, 16/24/32-bit int or float,
mono or multi-channel) to mono float32 at the audio tokenizer's rate; and it
reads manifests: validation that rejects bad rows with a counted reason, the
prepare step that caches audio codes (`python data.py prepare`), and the
speaker pairing of training examples.
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
import random
import re
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Protocol

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from tqdm import tqdm

import collate
import model_utils

SYSTEM_INSTRUCTION = "Generate audio following instruction."
GENERATION_PREFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Text that spells a control token (<|eot_id|>, <|AUDIO_OUT|>, ...) would be
# tokenised into the real token by prepare_chatml_sample.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
# A voice prompt for cloning: under a second carries little of the voice (and a few samples are shorter than
# the audio tokenizer's convolutions take); over 30 s is past what the collator's Whisper path handles and far
# past the voice prompts of the official examples (seconds).
MIN_REFERENCE_SECONDS, MAX_REFERENCE_SECONDS = 1.0, collate.WHISPER_MAX_SECONDS


class AudioError(ValueError):
    """An audio file that cannot become a clip; the message names the file and the reason."""


# --------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------


def load_audio(path: str | Path, target_rate: int) -> np.ndarray:
    """Read a WAV/FLAC file as mono float32 at `target_rate`.

    Channels are averaged; the rate must lie in 8 to 48 kHz. An unreadable,
    empty, all-silent or non-finite file is an `AudioError`, never a quiet
    substitute.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioError(f"{path}: unreadable audio ({error})") from None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    return to_model_rate(samples.mean(axis=1), rate, target_rate, str(path))


def check_reference_seconds(seconds: float, name: str) -> None:
    """A reference clip outside MIN_REFERENCE_SECONDS..MAX_REFERENCE_SECONDS is an `AudioError` naming it."""
    if not MIN_REFERENCE_SECONDS <= seconds <= MAX_REFERENCE_SECONDS:
        raise AudioError(f"{name}: the reference lasts {seconds:.2f} s; a voice prompt must last "
                         f"{MIN_REFERENCE_SECONDS:g} to {MAX_REFERENCE_SECONDS:g} s")


def to_model_rate(samples: np.ndarray, rate: int, target_rate: int, name: str = "audio") -> np.ndarray:
    """Check a mono waveform and resample it to `target_rate`."""
    if samples.size == 0:
        raise AudioError(f"{name}: zero-length audio")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    if not np.any(samples):
        raise AudioError(f"{name}: audio is all silence")
    if rate != target_rate:
        import librosa

        samples = librosa.resample(samples, orig_sr=rate, target_sr=target_rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


# --------------------------------------------------------------------------
# Text normalisation (the official example's, applied to the text to speak)
# --------------------------------------------------------------------------

_CHINESE_PUNCTUATION = {
    "，": ", ",
    "。": ".",
    "：": ":",
    "；": ";",
    "？": "?",
    "！": "!",
    "（": "(",
    "）": ")",
    "【": "[",
    "】": "]",
    "《": "<",
    "》": ">",
    "“": '"',
    "”": '"',
    "‘": "'",
    "’": "'",
    "、": ",",
    "—": "-",
    "…": "...",
    "·": ".",
    "「": '"',
    "」": '"',
    "『": '"',
    "』": '"',
}
_SYMBOLS = {"(": " ", ")": " ", "°F": " degrees Fahrenheit", "°C": " degrees Celsius"}
# The table of upstream's current examples/generation.py, after its "se fix" commit, which made
# `[humming start]` open with <SE_s> like the other start tags. The search index holds boson-ai/higgs-audio's
# generation.py only before that fix (03dcdf698ba3cfdb9ff74df47f8937dceabe869d: `<SE>[Humming]</SE>`), so the
# fixed text was read from forks that track upstream's head (langfod/higgs-audio
# 5f7135e0389b9aac5bbdbc75f18bf0a3a678799c, yapit-tts/higgs-audio ae3de721520a8766ce8a4b52c8c068a4b0d95494):
# this table, the punctuation and symbol tables, the order of the steps and the closing marks are theirs.
# infer.OFFICIAL_NORMALISATION holds the expected outputs independently; the parity suite compares them.
_EVENT_TAGS = {
    "[laugh]": "<SE>[Laughter]</SE>",
    "[humming start]": "<SE_s>[Humming]</SE_s>",
    "[humming end]": "<SE_e>[Humming]</SE_e>",
    "[music start]": "<SE_s>[Music]</SE_s>",
    "[music end]": "<SE_e>[Music]</SE_e>",
    "[music]": "<SE>[Music]</SE>",
    "[sing start]": "<SE_s>[Singing]</SE_s>",
    "[sing end]": "<SE_e>[Singing]</SE_e>",
    "[applause]": "<SE>[Applause]</SE>",
    "[cheering]": "<SE>[Cheering]</SE>",
    "[cough]": "<SE>[Cough]</SE>",
}
_CLOSING_MARKS = (".", "!", "?", ",", ";", '"', "'", "</SE_e>", "</SE>")


def normalize_text(text: str) -> str:
    """The official example's normalisation of the text to speak.

    Chinese punctuation to ASCII, parentheses to spaces, degree signs spelled
    out, event tags such as `[laugh]` to `<SE>` markup, runs of whitespace
    collapsed within each non-empty line, and a full stop added when the text
    does not already close with punctuation or a tag.
    """
    for table in (_CHINESE_PUNCTUATION, _SYMBOLS, _EVENT_TAGS):
        for old, new in table.items():
            text = text.replace(old, new)
    text = "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip()).strip()
    if text and not text.endswith(_CLOSING_MARKS):
        text += "."
    return text


def is_speakable(text: str) -> bool:
    """Whether a (normalised) text has a letter or digit in any script: emoji and punctuation alone say nothing."""
    return any(character.isalnum() for character in text)


def normalization_version() -> str:
    """A digest of the normalisation tables: an export records it, so a later change to them is detected."""
    tables = [_CHINESE_PUNCTUATION, _SYMBOLS, _EVENT_TAGS, list(_CLOSING_MARKS)]
    return "sha256:" + hashlib.sha256(json.dumps(tables, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------
# The sample builder
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLayout:
    """Where the reference clip goes: an assistant turn (default) or the system message."""

    ref_in_system: bool = False
    scene: str | None = None


# An export records the layout it was trained with, so inference does not depend on repeating the flags.
PROMPT_LAYOUT_FILE = "prompt_layout.json"


@dataclass(frozen=True)
class RecordedLayout:
    """What `prompt_layout.json` holds: the layout, and the normalisation the training text went through."""

    layout: PromptLayout
    normalization: str


def write_prompt_layout(model_dir: str | Path, layout: PromptLayout) -> Path:
    """Write `model_dir/prompt_layout.json` (atomically) with the current normalisation version.

    `scene` is the scene every sample without one of its own got: train.py
    has no scene flag, so it is null there, and rows with a `scene` field
    carried theirs.
    """
    record = dict(ref_in_system=layout.ref_in_system, scene=layout.scene, normalization=normalization_version())
    path = Path(model_dir) / PROMPT_LAYOUT_FILE
    _write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def read_prompt_layout(model_dir: str | Path) -> RecordedLayout | None:
    """The layout recorded beside a model's weights; None when it has no `prompt_layout.json` (a preset, an old export)."""
    path = Path(model_dir) / PROMPT_LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON prompt layout ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("ref_in_system"), bool) \
            or not isinstance(record.get("scene"), (str, type(None))) or not isinstance(record.get("normalization"), str):
        raise ValueError(f"{path}: needs ref_in_system (true/false), scene (text or null) and normalization (text)")
    return RecordedLayout(PromptLayout(record["ref_in_system"], record["scene"]), record["normalization"])


def build_messages(ref_text: str | None, text: str, layout: PromptLayout) -> list[Message]:
    """The message list of the official example, up to and including the user turn with `text`."""
    messages = []
    scene = layout.scene.strip() if layout.scene else None
    if layout.ref_in_system:
        scene_lines = f"{scene}\n\n" if scene else ""
        opening = f"{SYSTEM_INSTRUCTION}\n\n<|scene_desc_start|>\n{scene_lines}SPEAKER0: "
        messages.append(
            Message("system", [TextContent(opening), AudioContent(audio_url=""), TextContent("\n<|scene_desc_end|>")])
        )
    else:
        if scene:
            messages.append(
                Message("system", f"{SYSTEM_INSTRUCTION}\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>")
            )
        messages.append(Message("user", ref_text))
        messages.append(Message("assistant", AudioContent(audio_url="")))
    messages.append(Message("user", text))
    return messages


def tokenize_messages(messages: list[Message], tokenizer, start_index: int | None) -> tuple[list[int], list[int]]:
    """`prepare_chatml_sample`, with its silent `(None,)*4` failure turned into an error."""
    input_ids, label_ids, _, _ = prepare_chatml_sample(ChatMLSample(messages=messages, start_index=start_index), tokenizer)
    if input_ids is None:
        raise ValueError("prepare_chatml_sample rejected the message list (see the message it printed above)")
    return input_ids, label_ids


def build_sample(
    tokenizer,
    ref_text: str | None,
    ref_codes: torch.Tensor,
    text: str,
    target_codes: torch.Tensor | None = None,
    scene: str | None = None,
    ref_in_system: bool = False,
    ref_waveform: np.ndarray | torch.Tensor | None = None,
    sample_rate: int | None = None,
) -> ChatMLDatasetSample:
    """The one builder of training samples and inference prompts.

    `ref_codes` and `target_codes` are raw audio-tokenizer codes (n_q, T); the
    collator adds stream BOS/EOS and the delay pattern. With `target_codes`
    the final assistant turn holds the target clip and is the only labelled
    turn (`start_index` points at it, so the reference clip is never a
    target); without, the prompt ends with the assistant header where
    generation starts. `ref_in_system` puts the reference in the system
    message (as `<|AUDIO|>`, no transcript turn); pass `ref_waveform` at
    `sample_rate` there when the model uses Whisper features.
    """
    ref_text, text = prompt_texts(ref_text, text, scene, ref_in_system)
    layout = PromptLayout(ref_in_system=ref_in_system, scene=scene)
    messages = build_messages(ref_text, text, layout)
    clips = [_check_codes(ref_codes, "reference")]
    if target_codes is None:
        input_ids, _ = tokenize_messages(messages, tokenizer, start_index=None)
        input_ids += tokenizer.encode(GENERATION_PREFIX, add_special_tokens=False)
        label_ids = None
    else:
        clips.append(_check_codes(target_codes, "target"))
        messages.append(Message("assistant", AudioContent(audio_url="")))
        input_ids, label_ids = tokenize_messages(messages, tokenizer, start_index=len(messages) - 1)
        label_ids = torch.tensor(label_ids, dtype=torch.long)

    starts = torch.tensor([0] + [clip.shape[1] for clip in clips[:-1]], dtype=torch.long).cumsum(0)
    waveform, waveform_start, rates = _reference_waveform(ref_waveform, sample_rate, ref_in_system)
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        label_ids=label_ids,
        audio_ids_concat=torch.cat(clips, dim=1),
        audio_ids_start=starts,
        audio_waveforms_concat=waveform,
        audio_waveforms_start=waveform_start,
        audio_sample_rate=rates,
        audio_speaker_indices=torch.full((len(clips),), -1, dtype=torch.long),
    )


def prompt_texts(ref_text: str | None, text: str, scene: str | None, ref_in_system: bool) -> tuple[str | None, str]:
    """The reference transcript (stripped) and the text to speak (normalised) as a prompt holds them, checked:
    something to speak, a transcript unless the reference is in the system message, no spelled control token."""
    text = normalize_text(text)
    if not text:
        raise ValueError("the text to speak is empty")
    if not is_speakable(text):
        raise ValueError(f"the text to speak has no letter or digit once normalised ({text!r})")
    if not ref_in_system:
        ref_text = (ref_text or "").strip()
        if not ref_text:
            raise ValueError("the reference transcript is empty")
    for name, value in (("text", text), ("reference transcript", ref_text or ""), ("scene", scene or "")):
        control = _CONTROL_TOKEN.search(value)
        if control:
            raise ValueError(f"the {name} contains the control token {control.group()}, which would become a real one")
    return ref_text, text


def _check_codes(codes: torch.Tensor, role: str) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] == 0:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"{role} codes must be a non-empty (num_codebooks, frames) tensor, got {shape}")
    return codes.long().cpu()


def _reference_waveform(waveform, sample_rate: int | None, ref_in_system: bool):
    """The waveform fields of a sample: the reference clip when it enters as `<|AUDIO|>`, else empty."""
    if waveform is None:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    if not ref_in_system:
        raise ValueError("a reference waveform (for Whisper) only enters with the reference in the system message")
    if sample_rate is None:
        raise ValueError("a reference waveform needs its sample_rate")
    waveform = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    return waveform, torch.zeros(1, dtype=torch.long), torch.tensor([float(sample_rate)])


# --------------------------------------------------------------------------
# Manifests, the prepare step and training pairs
# --------------------------------------------------------------------------
#
# A manifest is JSONL with audio paths relative to it. `validate_manifest`
# keeps or rejects every row, each rejection with its row number and reason,
# so that rows read = rows kept + rows rejected. `prepare` (also
# `python data.py prepare`) validates a manifest and stores the audio codes of
# every kept clip in a cache that training reads without the audio tokenizer:
#
#   CACHE/shards/NAME.npy    codes of up to --batch-size clips, (codebooks, frames) uint16, memory-mapped
#   CACHE/shards/NAME.json   the shard's entries (key -> offset, frames, seconds, source) and the SHA-256 and
#                            shape of its codes; written after the codes, so it is what commits the shard
#   CACHE/manifest.jsonl     the kept rows, each clip with its cache key (`audio_key`, `ref_audio_key`) and
#                            each row with its text token counts (`text_tokens`, ...), for planning batches
#   CACHE/prepare.lock       held while a prepare runs, naming its pid
#   CACHE/report.jsonl       one line per rejected row: row, id, reason, detail
#   CACHE/summary.json       the counts; written last, so a cache without it holds no finished prepare

SPEAKER_FIELDS = ("id", "audio", "text", "speaker")
PAIRED_FIELDS = ("id", "ref_audio", "ref_text", "audio", "text")
OPTIONAL_FIELDS = ("scene", "language")
TEXT_FIELDS = ("ref_text", "text")
# Up to 7.1 surround is one performance and is averaged to mono; more channels
# come from multitrack or microphone-array recordings, whose average is not one voice.
MAX_CHANNELS = 8
# The messages of load_audio (pinned by tests/test_data.py) and load_clip -> the reason counted.
_AUDIO_REASONS = (
    ("no such audio file", "missing_audio"),
    ("unreadable audio", "corrupt_audio"),
    ("truncated", "truncated_audio"),
    ("zero-length", "empty_audio"),
    ("all silence", "silent_audio"),
    ("NaN or infinite", "nonfinite_audio"),
    ("sample rate", "sample_rate"),
    ("channels", "channels"),
)


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message names the file and row."""


class RowRejected(ValueError):
    """Why a row is left out: `reason` is what is counted, `detail` what is reported."""

    def __init__(self, reason: str, detail: str):
        detail = detail.replace("\n", " ")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Filters:
    """What a well-formed row must also satisfy to be kept."""

    min_seconds: float = 0.0
    max_seconds: float = math.inf
    max_tokens: int | None = None  # positions of the training sample in the model's sequence
    languages: tuple[str, ...] = ()  # empty: every language
    # Longer transcripts are mis-segmentations: 30 s of speech is ~500 characters.
    max_text_chars: int = 1000


@dataclass(frozen=True)
class Rejection:
    row: int  # line number in the manifest, from 1
    id: str | None  # None where the row has no readable id
    reason: str
    detail: str


@dataclass(frozen=True)
class Clip:
    """What validation learns of one audio file."""

    seconds: float
    frames: int  # frames of its audio codes
    key: str | None = None  # its entry in a prepared cache


class ClipSource(Protocol):
    """Where validation gets clips: `CodeCache` (codes in memory) or `CacheWriter` (codes into a cache)."""

    num_codebooks: int

    def clip(self, path: str) -> Clip: ...


@dataclass
class ValidationResult:
    """The rows of a manifest, each kept or rejected."""

    manifest: str
    rows_read: int = 0
    kept: list[dict] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Rejections by reason, most frequent first."""
        return dict(Counter(rejection.reason for rejection in self.rejections).most_common())

    def summary(self) -> str:
        return reconcile(self.rows_read, len(self.kept), self.counts())

    def write_report(self, path: str | Path) -> None:
        """One JSON line per rejection: row, id, reason, detail."""
        lines = [json.dumps(asdict(rejection), ensure_ascii=False) + "\n" for rejection in self.rejections]
        _write_text(Path(path), "".join(lines))


def reconcile(rows_read: int, kept: int, rejected: dict[str, int]) -> str:
    """`rows read N = kept K + rejected R (reason n, ...)`; an error when the numbers do not add up."""
    total = sum(rejected.values())
    if rows_read != kept + total:
        raise ValueError(f"counts do not reconcile: {rows_read} rows read, {kept} kept, {total} rejected")
    reasons = ", ".join(f"{reason} {count}" for reason, count in rejected.items())
    return f"rows read {rows_read} = kept {kept} + rejected {total}" + (f" ({reasons})" if reasons else "")


# Validation ---------------------------------------------------------------


def validate_manifest(
    path: str | Path,
    clips: ClipSource,
    tokenizer=None,
    filters: Filters = Filters(),
    strict: bool = False,
    progress: bool = False,
) -> ValidationResult:
    """Every row of a manifest, kept or rejected with its row number and reason.

    In order: UTF-8 (rows are read as bytes, so one bad line is one rejected
    row), JSON, fields, duplicate id, texts, language; each clip (`load_clip`)
    and its duration; then, over the rows still standing, `filters.max_tokens`
    (needs the text `tokenizer`) and speaker rows whose speaker has no other
    clip left. Blank lines are not rows. `strict` raises `ManifestError` at the
    first rejection. Kept rows carry absolute audio paths and, per clip,
    `seconds`, `frames` and (from a `CacheWriter`) `audio_key`; a paired row's
    reference has them with a `ref_` prefix.
    """
    if filters.max_tokens is not None and tokenizer is None:
        raise ValueError("the max_tokens filter needs the text tokenizer")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such manifest: {path}")
    result = ValidationResult(str(path))
    standing = _check_rows(path, clips, filters, result, strict, progress)
    late = _token_rejections(standing, tokenizer, clips.num_codebooks, filters.max_tokens)
    late.update(_lone_speaker_rejections([(n, row) for n, row in standing if n not in late]))
    for number, row in standing:
        if number in late:
            _reject(result, Rejection(number, row["id"], late[number].reason, late[number].detail), strict)
        else:
            result.kept.append(row)
    result.rejections.sort(key=lambda rejection: rejection.row)
    return result


def _check_rows(
    path: Path, clips: ClipSource, filters: Filters, result: ValidationResult, strict: bool, progress: bool
) -> list[tuple[int, dict]]:
    """The per-row checks; returns the (row number, row) pairs that pass them."""
    standing, seen = [], set()
    with path.open("rb") as lines:
        for number, raw in enumerate(tqdm(lines, total=_line_count(path), desc="rows", disable=not progress), start=1):
            if not raw.strip():
                continue
            result.rows_read += 1
            row = None
            try:
                row = _read_json(raw)
                _check_row(row, path.parent, seen, filters)
                _add_clips(row, clips, filters)
            except RowRejected as error:
                _reject(result, Rejection(number, _row_id(row), error.reason, error.detail), strict)
                continue
            standing.append((number, row))
    return standing


def _reject(result: ValidationResult, rejection: Rejection, strict: bool) -> None:
    if strict:
        raise ManifestError(f"{result.manifest}:{rejection.row}: {rejection.reason}: {rejection.detail}")
    result.rejections.append(rejection)


def _row_id(row: dict | None) -> str | None:
    return row["id"] if isinstance(row, dict) and isinstance(row.get("id"), str) else None


def _line_count(path: Path) -> int:
    with path.open("rb") as lines:
        return sum(1 for _ in lines)


def _read_json(raw: bytes) -> dict:
    try:
        line = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RowRejected("non_utf8", f"byte {error.start} ({raw[error.start]:#04x}) is not UTF-8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise RowRejected("invalid_json", f"{error.msg} at column {error.colno}") from None
    if not isinstance(row, dict):
        raise RowRejected("invalid_json", f"a JSON {type(row).__name__}, not an object")
    return row


def _check_row(row: dict, base: Path, seen: set[str], filters: Filters) -> None:
    """Fields, id, texts and language of a parsed row; makes its audio paths absolute."""
    fields = PAIRED_FIELDS if "ref_audio" in row else SPEAKER_FIELDS
    _check_fields(row, fields)
    if row["id"] in seen:
        raise RowRejected("duplicate_id", f"id {row['id']!r} is taken by an earlier row")
    seen.add(row["id"])
    for name in ("ref_text", "text", "scene"):
        if row.get(name) is not None:
            _check_text(name, row[name], filters.max_text_chars)
    if filters.languages and row.get("language") not in filters.languages:
        raise RowRejected("language", f"language {row.get('language')!r} is not among {', '.join(filters.languages)}")
    for key in ("ref_audio", "audio"):
        if key in row:
            row[key] = str((base / row[key]).resolve())


def _check_fields(row: dict, fields: tuple[str, ...]) -> None:
    absent = [name for name in fields if row.get(name) is None]
    if absent:
        raise RowRejected("missing_field", f"no {', '.join(absent)}")
    for name in fields + OPTIONAL_FIELDS:
        if row.get(name) is not None and not isinstance(row[name], str):
            raise RowRejected("bad_field", f"{name} is a {type(row[name]).__name__}, not a string")
    empty = [name for name in fields if name not in TEXT_FIELDS and not row[name].strip()]
    if empty:
        raise RowRejected("missing_field", f"empty {', '.join(empty)}")


def _check_text(name: str, value: str, max_chars: int) -> None:
    # The text to speak is normalised by build_sample, the reference transcript only stripped.
    spoken = normalize_text(value) if name == "text" else value.strip()
    if name in TEXT_FIELDS and not spoken:
        raise RowRejected("empty_text", f"{name} is empty or whitespace")
    if name == "text" and not is_speakable(spoken):
        raise RowRejected("empty_text", f"{name} has no letter or digit to speak ({spoken!r})")
    if len(value) > max_chars:
        raise RowRejected("text_too_long", f"{name} has {len(value)} characters, over {max_chars}")
    control = _CONTROL_TOKEN.search(value)
    if control:
        raise RowRejected("control_token", f"{name} spells the control token {control.group()}")


def _add_clips(row: dict, clips: ClipSource, filters: Filters) -> None:
    """Check each clip of the row and its duration; record its length (and cache key) in the row."""
    for key, prefix in (("ref_audio", "ref_"), ("audio", "")):
        if key not in row:
            continue
        try:
            clip = clips.clip(row[key])
        except AudioError as error:
            raise RowRejected(_audio_reason(error, row[key]), str(error)) from None
        if clip.seconds < filters.min_seconds:
            raise RowRejected("too_short", f"{key} lasts {clip.seconds:.2f} s, under {filters.min_seconds:g} s")
        if clip.seconds > filters.max_seconds:
            raise RowRejected("too_long", f"{key} lasts {clip.seconds:.2f} s, over {filters.max_seconds:g} s")
        row[f"{prefix}seconds"], row[f"{prefix}frames"] = round(clip.seconds, 3), clip.frames
        if clip.key is not None:
            row[f"{key}_key"] = clip.key
    if "ref_audio" in row and _clip_identity(row, "ref_audio") == _clip_identity(row):
        raise RowRejected("self_reference", "the reference is the target clip itself")


def _audio_reason(error: AudioError, path: str) -> str:
    message = str(error).removeprefix(f"{path}: ")  # a path may spell any word
    for fragment, reason in _AUDIO_REASONS:
        if fragment in message:
            return reason
    return "bad_audio"


def _token_rejections(
    standing: list[tuple[int, dict]], tokenizer, num_codebooks: int, max_tokens: int | None
) -> dict[int, RowRejected]:
    """Rows whose training sample would exceed `max_tokens`.

    A speaker row's reference is drawn each epoch, so it is measured with its
    speaker's longest other clip: every sample it can be part of fits.
    """
    if max_tokens is None:
        return {}
    longest = {speaker: sorted(group, key=lambda row: -row["frames"])[:2]
               for speaker, group in _speaker_clips(row for _, row in standing).items()}
    late = {}
    for number, row in standing:
        if "ref_audio" in row:
            reference = (row["ref_text"], row["ref_frames"])
        else:
            others = [other for other in longest[row["speaker"]] if _clip_identity(other) != _clip_identity(row)]
            if not others:
                continue  # a lone speaker, rejected as such
            reference = (others[0]["text"], others[0]["frames"])
        tokens = _sample_tokens(tokenizer, *reference, row["text"], row["frames"], row.get("scene"), num_codebooks)
        if tokens > max_tokens:
            late[number] = RowRejected("too_many_tokens", f"its sample takes {tokens} tokens, over {max_tokens}")
    return late


def _sample_tokens(
    tokenizer, ref_text: str, ref_frames: int, text: str, frames: int, scene: str | None, num_codebooks: int
) -> int:
    """Exact positions of the training sample (default layout) with clips of these lengths; codes do not change it."""
    def blank(count: int) -> torch.Tensor:
        return torch.zeros(num_codebooks, count, dtype=torch.long)

    sample = build_sample(tokenizer, ref_text, blank(ref_frames), text, target_codes=blank(frames), scene=scene)
    return collate.sample_tokens(sample, num_codebooks)


def _lone_speaker_rejections(standing: list[tuple[int, dict]]) -> dict[int, RowRejected]:
    groups = _speaker_clips(row for _, row in standing)
    return {
        number: RowRejected("lone_speaker", f"speaker {row['speaker']!r} has no other clip to serve as reference")
        for number, row in standing
        if "ref_audio" not in row and len(groups[row["speaker"]]) < 2
    }


# Clips and their codes ----------------------------------------------------


def load_clip(path: str | Path, rate: int) -> np.ndarray:
    """`load_audio`, refusing first what it would turn into a wrong clip without complaint.

    libsndfile reads a WAV cut short (a copy interrupted mid-file) as a
    shorter clip, and `load_audio` averages any number of channels.
    """
    path = Path(path)
    if path.is_file():
        _check_container(path)
    return load_audio(path, rate)


def _check_container(path: Path) -> None:
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError):
        return  # load_audio reports the file unreadable
    if info.channels > MAX_CHANNELS:
        raise AudioError(f"{path}: {info.channels} channels; at most {MAX_CHANNELS} are mixed down to mono")
    missing = _wav_missing_bytes(path)
    if missing:
        raise AudioError(f"{path}: truncated: its WAV data chunk lacks {missing} of the bytes its header declares")


def _wav_missing_bytes(path: Path) -> int:
    """Bytes of a RIFF/WAVE data chunk that its header declares and the file lacks; 0 for other formats."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        offset = 12
        while offset + 8 <= size:
            file.seek(offset)
            chunk, length = struct.unpack("<4sI", file.read(8))
            if chunk == b"data":
                # Streaming writers declare 0 or 0xFFFFFFFF when the length is not known yet.
                return 0 if length in (0, 0xFFFFFFFF) else max(0, offset + 8 + length - size)
            offset += 8 + length + length % 2
    return 0


def encode_clip(audio_tokenizer, waveform: np.ndarray) -> torch.Tensor:
    """Codes (codebooks, frames) of a clip at the tokenizer's rate, on the CPU.

    One clip per forward pass: the package's encoder has no batch path for
    clips of different lengths (its frame-alignment fallback assumes a batch
    of one, and HuBERT gets no attention mask, so zero padding changes the
    codes of the shorter clip: 1.3% of them for two demo clips).
    """
    with torch.no_grad():
        return audio_tokenizer.encode(waveform, audio_tokenizer.sampling_rate).cpu().long()


class CodeCache:
    """Audio codes by file, encoded on the fly once per process (a clip may serve as reference and target)."""

    def __init__(self, audio_tokenizer):
        self.audio_tokenizer = audio_tokenizer
        self.sampling_rate = audio_tokenizer.sampling_rate
        self.num_codebooks = audio_tokenizer.num_codebooks
        self.codes: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, path: str) -> torch.Tensor:
        if path not in self.codes:
            waveform = load_clip(path, self.sampling_rate)
            self.codes[path] = encode_clip(self.audio_tokenizer, waveform)
            self.seconds[path] = len(waveform) / self.sampling_rate
        return self.codes[path]

    def clip(self, path: str) -> Clip:
        codes = self(path)
        return Clip(self.seconds[path], codes.shape[1])


def audio_tokenizer_id(audio_tokenizer) -> str:
    """A digest of the audio tokenizer's weights, buffers and rate: codes of another tokenizer never match it."""
    digest = hashlib.sha256(str(audio_tokenizer.sampling_rate).encode())
    for name, tensor in sorted(audio_tokenizer.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file")
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# The cache ----------------------------------------------------------------


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
        self.clips: dict[str, Clip] = {}
        self.encoded = self.reused = 0

    def clip(self, path: str) -> Clip:
        if path not in self.clips:
            key = f"{_file_digest(path)[:32]}-{self.tokenizer_id[:16]}"
            entry = self.index.get(key) or (self.pending[key][1] if key in self.pending else None)
            if entry is None:
                entry = self._encode(path, key)
            else:
                self.reused += 1
            self.clips[path] = Clip(entry["seconds"], entry["frames"], key)
        return self.clips[path]

    def _encode(self, path: str, key: str) -> dict:
        waveform = load_clip(path, self.sampling_rate)
        codes = encode_clip(self.audio_tokenizer, waveform).numpy()
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
        _replace_atomically(self.shards / f"{name}.npy", lambda file: file.write(payload))
        _write_text(self.shards / f"{name}.json", json.dumps(shard))
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


_REPAIR = "; python data.py prepare on this cache re-encodes it"


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
    stray = [p for p in shards.iterdir() if p.suffix == ".tmp" or (p.suffix == ".npy" and not p.with_suffix(".json").exists())]
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


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _write_text(path: Path, text: str) -> None:
    _replace_atomically(path, lambda file: file.write(text.encode("utf-8")))


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


class CachedCodes:
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
    validation: ValidationResult
    encoded: int  # clips this run encoded
    reused: int  # clips whose codes the cache (or this run, at another path) already held
    repaired: int = 0  # shards that failed verification, deleted and encoded again


def prepare(
    manifest: str | Path,
    cache_dir: str | Path,
    audio_tokenizer,
    tokenizer=None,
    filters: Filters = Filters(),
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
            result = validate_manifest(manifest, writer, tokenizer, filters, strict, progress)
        finally:
            writer.flush()
        text_counts = add_text_token_counts(result.kept, tokenizer) if tokenizer is not None else None
        (cache / "summary.json").unlink(missing_ok=True)
        _write_text(cache / "manifest.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.kept))
        result.write_report(cache / "report.jsonl")
        summary = dict(manifest=result.manifest, rows_read=result.rows_read, kept=len(result.kept), rejected=result.counts(),
                       audio_tokenizer=writer.tokenizer_id, sampling_rate=writer.sampling_rate, text_token_counts=text_counts,
                       encoded=writer.encoded, reused=writer.reused, repaired=writer.repaired)
        _write_text(cache / "summary.json", json.dumps(summary, indent=2))
    return PrepareResult(result, writer.encoded, writer.reused, writer.repaired)


@dataclass
class Prepared:
    """A prepared cache as training reads it."""

    rows: list[dict]
    codes: CachedCodes
    summary: str  # the prepare step's `rows read = kept + rejected` line
    audio_tokenizer_id: str
    text_token_counts: str | None  # `text_counting_id` of the counts the rows carry; None: they carry none


def read_prepared(cache_dir: str | Path, audio_tokenizer_id: str | None = None, verify: bool = True) -> Prepared:
    """The kept rows and codes of a finished prepare; with `audio_tokenizer_id`, an error if another tokenizer made them.

    `verify`: check every shard the rows use against its checksum now (see `CachedCodes`).
    """
    cache = Path(cache_dir)
    if not (cache / "summary.json").is_file():
        raise FileNotFoundError(f"{cache} holds no finished prepare (no summary.json): run python data.py prepare --out {cache}")
    summary = json.loads((cache / "summary.json").read_text(encoding="utf-8"))
    if audio_tokenizer_id is not None and audio_tokenizer_id != summary["audio_tokenizer"]:
        raise ValueError(f"{cache} holds codes of audio tokenizer {summary['audio_tokenizer'][:16]}, "
                         f"not of this one ({audio_tokenizer_id[:16]}): prepare it again")
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    codes = CachedCodes(cache, rows, summary["sampling_rate"], verify)
    return Prepared(rows, codes, reconcile(summary["rows_read"], summary["kept"], summary["rejected"]),
                    summary["audio_tokenizer"], summary.get("text_token_counts"))


# Training pairs -----------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One training example: speak `target`'s text in `reference`'s voice."""

    id: str
    ref_audio: str
    ref_text: str
    audio: str
    text: str
    scene: str | None = None


def _clip_identity(row: dict, key: str = "audio") -> str:
    """Two clips are one when they are one file or (in a prepared cache) one content."""
    return row.get(f"{key}_key") or row[key]


def _speaker_clips(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """Speaker-grouped rows by speaker, one row per distinct clip."""
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        if "ref_audio" not in row:
            groups.setdefault(row["speaker"], {}).setdefault(_clip_identity(row), row)
    return {speaker: list(clips.values()) for speaker, clips in groups.items()}


def training_pairs(rows: list[dict], seed: int, epoch: int) -> tuple[list[Pair], list[str]]:
    """This epoch's pairs, and the ids left out because their speaker has no other clip.

    A speaker-grouped row takes as reference another clip of its speaker
    (never its own, nor a copy of it under another id), drawn uniformly and
    anew each epoch, deterministically from (seed, epoch); paired rows keep
    their reference. Validated rows have no lone speaker left.
    """
    rng = random.Random(seed * 100_003 + epoch)
    groups = _speaker_clips(rows)
    position = {(speaker, _clip_identity(row)): i for speaker, group in groups.items() for i, row in enumerate(group)}
    pairs, lonely = [], []
    for row in rows:
        if "ref_audio" in row:
            pairs.append(Pair(row["id"], row["ref_audio"], row["ref_text"], row["audio"], row["text"], row.get("scene")))
            continue
        group = groups[row["speaker"]]
        if len(group) < 2:
            lonely.append(row["id"])
            continue
        # Draw among the others: skip over the row's own clip.
        pick = rng.randrange(len(group) - 1)
        pick += pick >= position[(row["speaker"], _clip_identity(row))]
        ref = group[pick]
        pairs.append(Pair(row["id"], ref["audio"], ref["text"], row["audio"], row["text"], row.get("scene")))
    return pairs, lonely


def pair_to_sample(
    pair: Pair, tokenizer, codes: CodeCache | CachedCodes, ref_in_system: bool = False, whisper: bool = False
) -> ChatMLDatasetSample:
    """A training sample for one pair, through the shared builder; `codes` encodes on the fly or reads a cache.

    `whisper`: the model turns the system-message reference into Whisper
    features too, so the sample carries the reference waveform.
    """
    rate = codes.sampling_rate
    waveform = load_audio(pair.ref_audio, rate) if whisper and ref_in_system else None
    return build_sample(
        tokenizer, pair.ref_text, codes(pair.ref_audio), pair.text, target_codes=codes(pair.audio),
        scene=pair.scene, ref_in_system=ref_in_system, ref_waveform=waveform, sample_rate=rate,
    )


# Sample lengths without building samples -----------------------------------
#
# A training sample's positions (`collate.sample_tokens`) are those of its
# prompt template, which depend on the layout and scene alone, plus the tokens
# of its reference transcript and of its normalised text (prepare_chatml_sample
# tokenises each message's text on its own), plus the frames of its two clips.
# The rows carry their clips' frames and their text token counts (stored by
# the prepare step, or counted once when training starts from a manifest), so
# planning an epoch of token-budget batches builds no sample.

# Every tag and symbol the normalisation maps: counts made under another normalisation are not reused.
_NORMALISATION_PROBE = ("[laugh] [humming start] [humming end] [music start] [music end] [music] [sing start] "
                        "[sing end] [applause] [cheering] [cough] （x）【x】《x》“x”‘x’、—…·「x」『x』，。：；？！ (x) 5°F 5°C")


def text_counting_id(tokenizer) -> str:
    """A digest of what text token counts depend on: the text tokenizer and the normalisation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((spec + normalize_text(_NORMALISATION_PROBE)).encode()).hexdigest()


def count_text_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text as `prepare_chatml_sample` encodes a message's text (no special tokens added)."""
    counts = []
    for start in range(0, len(texts), 10_000):
        counts += [len(ids) for ids in tokenizer(texts[start : start + 10_000], add_special_tokens=False)["input_ids"]]
    return counts


def add_text_token_counts(rows: list[dict], tokenizer) -> str:
    """Store in each row the tokens of its text as spoken (`text_tokens`, normalised) and as a reference
    transcript (`transcript_tokens` of a speaker row, `ref_text_tokens` of a paired row's reference, stripped);
    returns their `text_counting_id`."""
    targets = count_text_tokens(tokenizer, [normalize_text(row["text"]) for row in rows])
    references = count_text_tokens(tokenizer, [row.get("ref_text", row["text"]).strip() for row in rows])
    for row, target, reference in zip(rows, targets, references):
        row["text_tokens"] = target
        row["ref_text_tokens" if "ref_audio" in row else "transcript_tokens"] = reference
    return text_counting_id(tokenizer)


def template_tokens(tokenizer, scene: str | None, ref_in_system: bool, num_codebooks: int, delay_pattern: bool = True) -> int:
    """Positions of a training sample besides its texts' tokens and its clips' frames, from a probe sample."""
    probe = torch.zeros(num_codebooks, 1, dtype=torch.long)
    sample = build_sample(tokenizer, "a", probe, "a", target_codes=probe, scene=scene, ref_in_system=ref_in_system)
    text, reference = count_text_tokens(tokenizer, [normalize_text("a"), "a"])
    return collate.sample_tokens(sample, num_codebooks, delay_pattern) - text - (0 if ref_in_system else reference) - 2


def sample_lengths(
    pairs: list[Pair], rows: list[dict], tokenizer, num_codebooks: int, ref_in_system: bool = False, delay_pattern: bool = True
) -> list[int]:
    """`collate.sample_tokens` of each pair's training sample, exactly, from the numbers its rows carry.

    The rows need their text token counts (`add_text_token_counts`); no
    sample is built and no code is read.
    """
    if rows and "text_tokens" not in rows[0]:
        raise ValueError("the rows carry no text token counts: call data.add_text_token_counts first")
    frames, targets, transcripts = {}, {}, {}
    for row in rows:
        frames[row["audio"]] = row["frames"]
        targets[row["id"]] = row["text_tokens"]
        if "ref_audio" in row:
            frames[row["ref_audio"]] = row["ref_frames"]
            transcripts[row["ref_text"]] = row["ref_text_tokens"]
        else:
            transcripts[row["text"]] = row["transcript_tokens"]
    templates: dict[str | None, int] = {}
    lengths = []
    for pair in pairs:
        if pair.scene not in templates:
            templates[pair.scene] = template_tokens(tokenizer, pair.scene, ref_in_system, num_codebooks, delay_pattern)
        reference = 0 if ref_in_system else transcripts[pair.ref_text]
        lengths.append(templates[pair.scene] + targets[pair.id] + reference + frames[pair.ref_audio] + frames[pair.audio])
    return lengths


# --------------------------------------------------------------------------
# Command line: python data.py prepare --manifest M --out CACHE
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        audio_tokenizer = (model_utils.load_audio_tokenizer(args.audio_tokenizer, args.device) if args.audio_tokenizer
                           else model_utils.build_tiny_audio_tokenizer(args.seed, args.device))
        tokenizer = _text_tokenizer(args.model)
        filters = Filters(args.min_seconds, args.max_seconds, args.max_tokens, tuple(args.language), args.max_text_chars)
        result = prepare(args.manifest, args.out, audio_tokenizer, tokenizer, filters, args.strict, args.batch_size, progress=True)
    except (ValueError, CacheLocked) as error:
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
    parser = argparse.ArgumentParser(prog="data.py", description="Validate a manifest and cache its audio codes.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="validate a manifest and cache the codes of its kept clips")
    add = prepare_parser.add_argument
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
    add("--max-text-chars", type=int, default=Filters.max_text_chars, help=f"longest text kept [{Filters.max_text_chars}]")
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
