"""A manifest's rows: which are kept, the training pairs they make, and the lengths of their samples.

A manifest is JSONL with audio paths relative to it: speaker-grouped rows
(id, audio, text, speaker) or paired rows (id, ref_audio, ref_text, audio,
text), either with an optional scene and language. `check_manifest` keeps
or rejects every row, each rejection with its row number and reason, so that
rows read = rows kept + rows rejected; it gets each clip from a `ClipSource`
(`codes.EncodedClips`, which encodes the clip in memory, or prepare.py's
`CacheWriter`, which encodes it into a cache).
`training_pairs` pairs each speaker row with another clip of its speaker,
drawn anew each epoch, and `sample_lengths` gives each training sample's
length from the numbers its rows carry, without building it. Samples are
built by `data.build_sample`, the one builder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import torch
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from tqdm import tqdm

import collate
import data
import files

SPEAKER_FIELDS = ("id", "audio", "text", "speaker")
PAIRED_FIELDS = ("id", "ref_audio", "ref_text", "audio", "text")
OPTIONAL_FIELDS = ("scene", "language")
TEXT_FIELDS = ("ref_text", "text")
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
    ("shorter than", "too_short"),
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
    languages: tuple[str, ...] = ()  # canonical tags (`canonical_language`); empty: every language
    max_text_chars: int = data.LIMITS.max_text_chars

    def check(self) -> None:
        """Filters narrow `data.LIMITS`, never widen them; a ValueError says which."""
        if self.max_text_chars > data.LIMITS.max_text_chars:
            raise ValueError(f"max_text_chars {self.max_text_chars} is over the {data.LIMITS.max_text_chars} of data.LIMITS")
        for language in self.languages:
            if canonical_language(language) != language:
                raise ValueError(f"language filter {language!r}: give its canonical tag {canonical_language(language)!r}")


@dataclass(frozen=True)
class Rejection:
    row: int  # line number in the manifest, from 1
    id: str | None  # None where the row has no readable id
    reason: str
    detail: str


@dataclass(frozen=True)
class Clip:
    """What checking a row learns of one audio file."""

    seconds: float
    frames: int  # frames of its audio codes
    key: str | None = None  # its entry in a prepared cache


# A clip's key in a prepared cache is `CONTENT-TOKENIZER`: the first 32 hex digits of its file's SHA-256 (one clip
# whatever its path) and the first 16 of the audio tokenizer's digest (`codes.audio_tokenizer_id`: another
# tokenizer's codes never match). `prepare.CacheWriter` keys clips by it; `overlap` compares clips by its content.


def clip_content(path: str | Path) -> str:
    """A clip's content: the first 32 hex digits of its file's SHA-256."""
    return data.file_digest(path)[:32]


def cache_key(path: str | Path, audio_tokenizer_id: str) -> str:
    """The key of a clip's codes, made by the audio tokenizer of `audio_tokenizer_id`, in a prepared cache."""
    return f"{clip_content(path)}-{audio_tokenizer_id[:16]}"


def content_of_cache_key(key: str) -> str:
    """The `clip_content` a `cache_key` holds."""
    return key.partition("-")[0]


class ClipSource(Protocol):
    """Where the row check gets clips: `codes.EncodedClips` (codes in memory) or `prepare.CacheWriter` (codes into a cache)."""

    num_codebooks: int

    def clip(self, path: str) -> Clip: ...


class ClipCodes(Protocol):
    """Codes by clip path for `pair_to_sample`: `codes.EncodedClips` (encoded on the fly) or
    `codes.PreparedCodes` (read from a cache)."""

    sampling_rate: int

    def __call__(self, path: str) -> torch.Tensor: ...


@dataclass
class CheckedManifest:
    """The rows of a manifest, each kept or rejected."""

    manifest: str
    rows_read: int = 0
    kept: list[dict] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Rejections by reason, most frequent first."""
        return dict(Counter(rejection.reason for rejection in self.rejections).most_common())

    def targets_only(self) -> int:
        """Kept speaker rows whose clip cannot serve as reference (`can_refer`): trained as targets only."""
        return sum(1 for row in self.kept if "ref_audio" not in row and not can_refer(row))

    def summary(self) -> str:
        return reconcile(self.rows_read, len(self.kept), self.counts(), self.targets_only())

    def write_report(self, path: str | Path) -> None:
        """One JSON line per rejection: row, id, reason, detail."""
        lines = [json.dumps(asdict(rejection), ensure_ascii=False) + "\n" for rejection in self.rejections]
        files.write_text(Path(path), "".join(lines))


@functools.lru_cache(maxsize=4096)  # a corpus has few distinct tags; langcodes takes ~40 us a call
def canonical_language(tag: str) -> str:
    """The one spelling of a language tag that rows and filters store: BCP 47 as `langcodes` standardises it
    (`EN` -> `en`, `en_us` -> `en-US`, `eng` -> `en`); a ValueError for what is no known language."""
    import langcodes

    try:
        canonical = langcodes.standardize_tag(tag.strip())
    except ValueError as error:
        raise ValueError(f"{tag!r} is not a language tag ({error})") from None
    if not langcodes.tag_is_valid(canonical):
        raise ValueError(f"{tag!r} is not a known language (a BCP 47 tag such as en, en-US, ar, zh-Hans)")
    return canonical


def language_matches(language: str | None, wanted: tuple[str, ...]) -> bool:
    """Whether a row's canonical tag is among `wanted` or narrows one of them (`en-US` under `en`)."""
    return language is not None and any(language == tag or language.startswith(tag + "-") for tag in wanted)


def reconcile(rows_read: int, kept: int, rejected: dict[str, int], targets_only: int = 0) -> str:
    """`rows read N = kept K + rejected R (reason n, ...)`, and how many kept clips serve as targets only;
    an error when the numbers do not add up."""
    total = sum(rejected.values())
    if rows_read != kept + total:
        raise ValueError(f"counts do not reconcile: {rows_read} rows read, {kept} kept, {total} rejected")
    reasons = ", ".join(f"{reason} {count}" for reason, count in rejected.items())
    line = f"rows read {rows_read} = kept {kept} + rejected {total}" + (f" ({reasons})" if reasons else "")
    if targets_only:
        line += f"; {targets_only} kept clip(s) outside {data.LIMITS.reference_range()} serve as targets only, never as references"
    return line


# Checking rows ------------------------------------------------------------


def check_manifest(
    path: str | Path,
    clips: ClipSource,
    tokenizer=None,
    filters: Filters = Filters(),
    strict: bool = False,
    progress: bool = False,
) -> CheckedManifest:
    """Every row of a manifest, kept or rejected with its row number and reason.

    In order: UTF-8 (rows are read as bytes, so one bad line is one rejected
    row), JSON, fields, duplicate id, texts, language (stored canonical); each
    clip (`load_clip`) and its duration within `data.LIMITS` (a paired row's
    reference within the reference limits) and `filters`; then, over the rows
    still standing, `filters.max_tokens` (needs the text `tokenizer`) and
    speaker rows whose speaker has no other clip that can serve as reference
    (see `can_refer`). Blank lines are not rows. `strict` raises `ManifestError` at the
    first rejection. Kept rows carry absolute audio paths and, per clip,
    `seconds`, `frames` and (from a `CacheWriter`) `audio_key`; a paired row's
    reference has them with a `ref_` prefix.
    """
    if filters.max_tokens is not None and tokenizer is None:
        raise ValueError("the max_tokens filter needs the text tokenizer")
    filters.check()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such manifest: {path}")
    result = CheckedManifest(str(path))
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
    path: Path, clips: ClipSource, filters: Filters, result: CheckedManifest, strict: bool, progress: bool
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


def rows_before_audio(path: str | Path, filters: Filters = Filters()) -> list[dict]:
    """The rows of a manifest that pass every check needing no audio (JSON, fields, id, texts, language), their
    paths made absolute: the clips a check will open, found without opening one. The rows left out are
    counted by the check itself."""
    path = Path(path)
    rows, seen = [], set()
    with path.open("rb") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            try:
                row = _read_json(raw)
                _check_row(row, path.parent, seen, filters)
            except RowRejected:
                continue
            rows.append(row)
    return rows


def _reject(result: CheckedManifest, rejection: Rejection, strict: bool) -> None:
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
    if row.get("language") is not None:
        try:
            row["language"] = canonical_language(row["language"])
        except ValueError as error:
            raise RowRejected("bad_language", str(error)) from None
    if filters.languages and not language_matches(row.get("language"), filters.languages):
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
    spoken = data.normalize_text(value) if name == "text" else value.strip()
    if name in TEXT_FIELDS and not spoken:
        raise RowRejected("empty_text", f"{name} is empty or whitespace")
    if name == "text" and not data.is_speakable(spoken):
        raise RowRejected("empty_text", f"{name} has no letter or digit to speak ({spoken!r})")
    if len(value) > max_chars:
        raise RowRejected("text_too_long", f"{name} has {len(value)} characters, over {max_chars}")
    control = data.CONTROL_TOKEN.search(value)
    if control:
        raise RowRejected("control_token", f"{name} spells the control token {control.group()}")


def _add_clips(row: dict, clips: ClipSource, filters: Filters) -> None:
    """Check each clip of the row and its duration; record its length (and cache key) in the row."""
    for key, prefix in (("ref_audio", "ref_"), ("audio", "")):
        if key not in row:
            continue
        try:
            clip = clips.clip(row[key])
        except data.AudioError as error:
            raise RowRejected(audio_reason(error, row[key]), str(error)) from None
        _check_seconds(key, clip.seconds, filters)
        row[f"{prefix}seconds"], row[f"{prefix}frames"] = round(clip.seconds, 3), clip.frames
        if clip.key is not None:
            row[f"{key}_key"] = clip.key
    if "ref_audio" in row and _clip_identity(row, "ref_audio") == _clip_identity(row):
        raise RowRejected("self_reference", "the reference is the target clip itself")


def _check_seconds(key: str, seconds: float, filters: Filters) -> None:
    """A clip's duration within `data.LIMITS` and the filters."""
    check_limits(key, seconds)
    if seconds < filters.min_seconds:
        raise RowRejected("too_short", f"{key} lasts {seconds:.2f} s, under {filters.min_seconds:g} s")
    if seconds > filters.max_seconds:
        raise RowRejected("too_long", f"{key} lasts {seconds:.2f} s, over {filters.max_seconds:g} s")


def check_limits(key: str, seconds: float) -> None:
    """A clip's duration within `data.LIMITS` (`ref_audio` within the reference limits), else `RowRejected`."""
    limits = data.LIMITS
    if key == "ref_audio" and not limits.reference_fits(seconds):
        reason = "reference_too_short" if seconds < limits.min_reference_seconds else "reference_too_long"
        raise RowRejected(reason, f"ref_audio lasts {seconds:.2f} s; a voice prompt must last {limits.reference_range()}")
    if seconds > limits.max_target_seconds:
        raise RowRejected("too_long", f"{key} lasts {seconds:.2f} s, over the {limits.max_target_seconds:g} s any clip may last")


def audio_reason(error: data.AudioError, path: str) -> str:
    """The rejection reason counted for a clip that `data.load_clip` refused."""
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
    speaker's longest other clip that can serve as reference: every sample it
    can be part of fits.
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
            others = [other for other in longest.get(row["speaker"], []) if _clip_identity(other) != _clip_identity(row)]
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

    sample = data.build_sample(tokenizer, ref_text, blank(ref_frames), text, target_codes=blank(frames),
                               layout=data.PromptLayout(scene=scene))
    return collate.sample_tokens(sample, num_codebooks)


def _lone_speaker_rejections(standing: list[tuple[int, dict]]) -> dict[int, RowRejected]:
    """Speaker rows whose speaker has fewer than two distinct clips that can serve as reference: the one such
    clip has no other to refer to, and once it is rejected the clips that cannot refer (targets only) have none
    left either."""
    references = _speaker_clips(row for _, row in standing)
    return {
        number: RowRejected("lone_speaker", f"speaker {row['speaker']!r} has no other clip of "
                                            f"{data.LIMITS.reference_range()} to serve as reference")
        for number, row in standing
        if "ref_audio" not in row and len(references.get(row["speaker"], [])) < 2
    }


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


def can_refer(row: dict) -> bool:
    """Whether a speaker row's clip can serve its speaker's other rows as reference: within the reference limits
    of `data.LIMITS`. One that cannot is still a target; `CheckedManifest.targets_only` counts them."""
    return data.LIMITS.reference_fits(row["seconds"])


def _speaker_clips(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """The clips that can serve as reference (`can_refer`) of speaker-grouped rows, by speaker, one row per
    distinct clip."""
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        if "ref_audio" not in row and can_refer(row):
            groups.setdefault(row["speaker"], {}).setdefault(_clip_identity(row), row)
    return {speaker: list(clips.values()) for speaker, clips in groups.items()}


def training_pairs(rows: list[dict], seed: int, epoch: int) -> tuple[list[Pair], list[str]]:
    """This epoch's pairs, and the ids left out because their speaker has no other clip.

    A speaker-grouped row takes as reference another clip of its speaker
    that can serve as one (`can_refer`; never its own, nor a copy of it under
    another id), drawn uniformly and anew each epoch, deterministically from
    (seed, epoch); paired rows keep their reference. Checked rows have no
    lone speaker left.
    """
    rng = random.Random(seed * 100_003 + epoch)
    groups = _speaker_clips(rows)
    position = {(speaker, _clip_identity(row)): i for speaker, group in groups.items() for i, row in enumerate(group)}
    pairs, lonely = [], []
    for row in rows:
        if "ref_audio" in row:
            pairs.append(Pair(row["id"], row["ref_audio"], row["ref_text"], row["audio"], row["text"], row.get("scene")))
            continue
        group = groups.get(row["speaker"], [])
        own = position.get((row["speaker"], _clip_identity(row)))
        if len(group) - (own is not None) < 1:
            lonely.append(row["id"])
            continue
        # Draw among the others: skip over the row's own clip.
        pick = rng.randrange(len(group) - (own is not None))
        pick += own is not None and pick >= own
        ref = group[pick]
        pairs.append(Pair(row["id"], ref["audio"], ref["text"], row["audio"], row["text"], row.get("scene")))
    return pairs, lonely


def pair_to_sample(
    pair: Pair, tokenizer, codes: ClipCodes, ref_in_system: bool = False, whisper: bool = False
) -> ChatMLDatasetSample:
    """A training sample for one pair, through the shared builder; `codes` encodes on the fly or reads a cache.

    `whisper`: the model turns the system-message reference into Whisper
    features too, so the sample carries the reference waveform.
    """
    rate = codes.sampling_rate
    waveform = data.load_audio(pair.ref_audio, rate) if whisper and ref_in_system else None
    return data.build_sample(
        tokenizer, pair.ref_text, codes(pair.ref_audio), pair.text, target_codes=codes(pair.audio),
        layout=data.PromptLayout(ref_in_system, pair.scene), ref_waveform=waveform, sample_rate=rate,
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
    return hashlib.sha256((spec + data.normalize_text(_NORMALISATION_PROBE)).encode()).hexdigest()


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
    targets = count_text_tokens(tokenizer, [data.normalize_text(row["text"]) for row in rows])
    references = count_text_tokens(tokenizer, [row.get("ref_text", row["text"]).strip() for row in rows])
    for row, target, reference in zip(rows, targets, references):
        row["text_tokens"] = target
        row["ref_text_tokens" if "ref_audio" in row else "transcript_tokens"] = reference
    return text_counting_id(tokenizer)


def template_tokens(tokenizer, scene: str | None, ref_in_system: bool, num_codebooks: int, delay_pattern: bool = True) -> int:
    """Positions of a training sample besides its texts' tokens and its clips' frames, from a probe sample."""
    probe = torch.zeros(num_codebooks, 1, dtype=torch.long)
    sample = data.build_sample(tokenizer, "a", probe, "a", target_codes=probe, layout=data.PromptLayout(ref_in_system, scene))
    text, reference = count_text_tokens(tokenizer, [data.normalize_text("a"), "a"])
    return collate.sample_tokens(sample, num_codebooks, delay_pattern) - text - (0 if ref_in_system else reference) - 2


def sample_lengths(
    pairs: list[Pair], rows: list[dict], tokenizer, num_codebooks: int, ref_in_system: bool = False, delay_pattern: bool = True
) -> list[int]:
    """`collate.sample_tokens` of each pair's training sample, exactly, from the numbers its rows carry.

    The rows need their text token counts (`add_text_token_counts`); no
    sample is built and no code is read.
    """
    if rows and "text_tokens" not in rows[0]:
        raise ValueError("the rows carry no text token counts: call manifest.add_text_token_counts first")
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


# Overlap between a training and a validation set ---------------------------


@dataclass(frozen=True)
class Overlap:
    """What a validation set shares with its training set: speaker ids, and rows whose clip (target or
    reference) is a training clip by content, whatever its path."""

    speakers: list[str]
    clip_rows: list[str]  # validation row ids

    def describe(self) -> str:
        if not self.speakers and not self.clip_rows:
            return "train/val overlap: none (no shared speaker id, no shared clip)"
        parts = []
        if self.speakers:
            parts.append(f"{len(self.speakers)} speaker(s) ({_some(self.speakers)})")
        if self.clip_rows:
            parts.append(f"{len(self.clip_rows)} validation row(s) whose clip is a training clip ({_some(self.clip_rows)})")
        return "train/val overlap: " + " and ".join(parts) + ": validation scores are inflated"


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def overlap(train_rows: list[dict], val_rows: list[dict]) -> Overlap:
    """Speakers (same id) and clips (same file content) that a validation set shares with a training set."""
    train_speakers = {row["speaker"] for row in train_rows if row.get("speaker")}
    speakers = sorted({row["speaker"] for row in val_rows if row.get("speaker") in train_speakers})
    file_digests: dict[str, str] = {}  # a reference that many paired rows share is read once
    train_clips = {content for row in train_rows for content in _contents(row, file_digests)}
    clip_rows = [row["id"] for row in val_rows if not train_clips.isdisjoint(_contents(row, file_digests))]
    return Overlap(speakers, clip_rows)


def _contents(row: dict, file_digests: dict[str, str]) -> list[str]:
    """Content digests of a row's clips: from its cache keys (a file digest and the tokenizer's), else the files
    (digests kept in `file_digests` by path); a missing file has none."""
    digests = []
    for key in ("ref_audio", "audio"):
        if key in row:
            cached = row.get(f"{key}_key")
            if cached:
                digests.append(content_of_cache_key(cached))
            elif Path(row[key]).is_file():
                if row[key] not in file_digests:
                    file_digests[row[key]] = clip_content(row[key])
                digests.append(file_digests[row[key]])
    return digests


class OverlapError(ValueError):
    """A validation set that shares speakers or clips with its training set, refused (--strict-overlap)."""


def check_overlap(train_rows: list[dict], val_rows: list[dict], strict: bool) -> str:
    """The overlap report line; with `strict`, an `OverlapError` when there is any overlap."""
    found = overlap(train_rows, val_rows)
    line = found.describe()
    if strict and (found.speakers or found.clip_rows):
        raise OverlapError(f"{line}; --strict-overlap refuses it: take them out of one of the sets")
    return line
