"""Long texts in one voice: a text cut into chunks at sentence ends, each chunk spoken after the reference and the
last few chunks said before it, the chunks joined into one clip, and how far the voice drifts from chunk to chunk.

The model's context holds a few thousand positions, so an article or a
chapter is spoken in chunks (`chunk_text`): at sentence ends of Latin,
Arabic and CJK scripts, at most `--chunk-chars` characters a chunk (a CJK
character counts as three, about the time it takes to say; `spoken_length`).
Each chunk is prompted, by the one sample builder `data.build_sample`, with
the reference and the last `--context-chunks` good chunks (their text as a
user turn, their codes as an assistant turn), the layout upstream's
`examples/generation.py` chains its chunks in (`generation_chunk_buffer_size`;
`parity.check_chunked_prompt` compares the two). `speak_documents` speaks
many texts at once through `batched_generation.clone_many`, each row at its
own chunk: a text that finishes hands its row to the next one.

A chunk fails when its clone yields no clip, runs to `--max-seconds` or is
silent: it is named by index and text, left out of the joined clip and of
the context, and the rest still comes out (`LongClone`, `chunk_records`).
`measure_drift` scores each chunk with metrics.py's judge (SIM against the
reference and against the first chunk, WER) and sums the drift up (the
first and last chunks' SIM, the slopes over chunks); `infer.py --eval` does
so for rows longer than `--chunk-chars`.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import batched_generation
import data
import files
import generation
import metrics
import model_utils

# About 20 s of English at ~15 characters a second: a chunk fits in the default --max-seconds.
DEFAULT_CHUNK_CHARS = 300
# Upstream keeps every chunk (its buffer size defaults to None); two keep the voice's recent past and the prompt short.
DEFAULT_CONTEXT_CHUNKS = 2
MIN_CHUNK_CHARS = 20

# --------------------------------------------------------------------------
# The chunker
# --------------------------------------------------------------------------

_CLOSERS = "\"'”’»)\\]」』）》"
# Latin and Arabic sentence ends need a space (or the end) after them, so 3.14 and e.g.5 stay whole; CJK ones do not.
_SENTENCE_END = re.compile(rf"[.!?…؟۔]+[{_CLOSERS}]*(?=\s|$)|[。！？]+[{_CLOSERS}]*")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "fig"}
_CLAUSE_END = re.compile(r"(?<=[,;:，；：、،؛])\s*")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _is_cjk(character: str) -> bool:
    """An ideograph, kana or hangul syllable: a spoken syllable written without spaces."""
    code = ord(character)
    return 0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF


def _joins_without_space(character: str) -> bool:
    code = ord(character)
    return _is_cjk(character) or 0x3000 <= code <= 0x303F or 0xFF00 <= code <= 0xFFEF


def spoken_length(text: str) -> int:
    """Characters, a CJK one counting as three: English is said at about 15 characters a second, Chinese at about 5."""
    return len(text) + 2 * sum(map(_is_cjk, text))


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences, each with its closing mark: `. ! ? …` and Arabic `؟ ۔` before a space, CJK `。！？`
    anywhere; a full stop after a single capital (an initial) or a common abbreviation (Mr., e.g.) ends nothing."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        before = paragraph[start : match.start()].split()
        word = before[-1].lower() if before else ""
        if match.group().startswith(".") and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    sentences.append(paragraph[start:].strip())
    return [sentence for sentence in sentences if sentence]


def _join(left: str, right: str) -> str:
    if not left:
        return right
    space = "" if _joins_without_space(left[-1]) or _joins_without_space(right[0]) else " "
    return left + space + right


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Consecutive pieces joined while the chunk stays within `max_chars` (`spoken_length`)."""
    chunks, current = [], ""
    for piece in pieces:
        joined = _join(current, piece)
        if current and spoken_length(joined) > max_chars:
            chunks.append(current)
            joined = piece
        current = joined
    return chunks + ([current] if current else [])


def _fit(text: str, max_chars: int, level: int = 0) -> list[str]:
    """A sentence over the bound, cut at clause marks, else between words, else between characters."""
    if spoken_length(text) <= max_chars:
        return [text]
    if level == 2:
        pieces, current = [], ""
        for character in text:
            if current and spoken_length(current + character) > max_chars:
                pieces.append(current)
                current = ""
            current += character
        return pieces + [current]
    parts = _CLAUSE_END.split(text) if level == 0 else text.split()
    parts = [part.strip() for part in parts if part.strip()]
    if len(parts) <= 1:
        return _fit(text, max_chars, level + 1)
    return _pack([piece for part in parts for piece in _fit(part, max_chars, level + 1)], max_chars)


def chunk_text(text: str, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """`text` as chunks of whole sentences, each at most `max_chars` long (`spoken_length`); a blank line (a new
    paragraph) always starts a chunk, and a sentence over the bound is cut at its clauses, then its words."""
    if max_chars < MIN_CHUNK_CHARS:
        raise ValueError(f"--chunk-chars must be at least {MIN_CHUNK_CHARS}, got {max_chars}")
    chunks = []
    for paragraph in _PARAGRAPH.split(text):
        sentences = [piece for sentence in split_sentences(paragraph) for piece in _fit(sentence, max_chars)]
        chunks += _pack(sentences, max_chars)
    return _attach_unspeakable(chunks)


def _attach_unspeakable(chunks: list[str]) -> list[str]:
    """A chunk with nothing to say (a `* * *` section break, a lone `...`) joined to the chunk before it (the first
    one to the chunk after it): the sample builder refuses a text without a letter or digit."""
    kept: list[str] = []
    pending = ""
    for chunk in chunks:
        if not data.is_speakable(data.normalize_text(chunk)):
            if kept:
                kept[-1] = _join(kept[-1], chunk)
            else:
                pending = _join(pending, chunk)
            continue
        kept.append(_join(pending, chunk))
        pending = ""
    return kept if kept or not pending else [pending]


# --------------------------------------------------------------------------
# Speaking many texts, each row at its own chunk
# --------------------------------------------------------------------------


@dataclass
class Document:
    """A text to speak in one voice, chunked: the reference, the chunks and its own scene (None: the layout's)."""

    reference: generation.Reference
    chunks: list[str]
    scene: str | None = None


@dataclass
class SpokenChunk:
    """One chunk's clone and why it failed (None: it is in the clip and may serve as context)."""

    index: int
    text: str
    clone: generation.Clone
    failure: str | None


@dataclass
class LongClone(generation.Clone):
    """A text's clip joined from its good chunks, and every chunk (`drift`: `measure_drift`'s, once scored)."""

    chunks: list[SpokenChunk] = field(default_factory=list)
    drift: dict | None = None


def next_job(document: Document, spoken: list[SpokenChunk], context_chunks: int) -> batched_generation.Job:
    """The job of a document's next chunk: the last `context_chunks` good chunks said before it as context."""
    good = [chunk for chunk in spoken if chunk.failure is None]
    kept = good[-context_chunks:] if context_chunks > 0 else []
    context = tuple(data.ContextTurn(chunk.text, chunk.clone.codes) for chunk in kept)
    return batched_generation.Job(document.reference, document.chunks[len(spoken)], document.scene, context)


def chunk_failure(clone: generation.Clone, rate: int, chunked: bool) -> str | None:
    """Why a chunk is left out: no clip; or, for a text of several chunks, a clip the model did not end (it ran to
    --max-seconds) or a silent one. A text of one chunk keeps its clip as a plain clone does."""
    if clone.error is not None:
        return clone.error
    if not chunked:
        return None
    if not clone.stopped:
        return "ran to --max-seconds before the model ended it"
    if metrics.is_silent(clone.waveform, rate):
        return "silent"
    return None


def speak_documents(bundle: model_utils.Bundle, documents: list[Document], sampling: generation.Sampling, layout,
                    context_chunks: int = DEFAULT_CONTEXT_CHUNKS, force_audio: bool = True, batch_size: int = 1,
                    kv_cache: generation.StaticCacheBuckets | None = None) -> Iterator[tuple[int, LongClone]]:
    """Each document's joined clip as `(index, LongClone)`, as it finishes; up to `batch_size` documents per
    decoding step, each at its own chunk (a clip does not depend on its batch: see batched_generation.py)."""
    rate = bundle.audio_tokenizer.sampling_rate
    spoken: list[list[SpokenChunk]] = [[] for _ in documents]
    waiting, active = deque(range(len(documents))), []
    progress = tqdm(total=sum(len(document.chunks) for document in documents), desc="chunks", unit="chunk",
                    disable=all(len(document.chunks) == 1 for document in documents), dynamic_ncols=True, leave=False)
    with progress:
        while waiting or active:
            while waiting and len(active) < batch_size:
                active.append(waiting.popleft())
            jobs = [next_job(documents[index], spoken[index], context_chunks) for index in active]
            clones = batched_generation.clone_many(bundle, jobs, sampling, layout, force_audio, batch_size, kv_cache)
            for index, job, clone in zip(active, jobs, clones):
                failure = chunk_failure(clone, rate, len(documents[index].chunks) > 1)
                spoken[index].append(SpokenChunk(len(spoken[index]), job.text, clone, failure))
                progress.update(1)
            for index in [index for index in active if len(spoken[index]) == len(documents[index].chunks)]:
                active.remove(index)
                yield index, join_chunks(spoken[index])


def join_chunks(spoken: list[SpokenChunk]) -> LongClone:
    """The good chunks' clips end to end, stopped when the model ended every chunk; a text none of whose chunks came
    out is a clone with an error."""
    good = [chunk for chunk in spoken if chunk.failure is None]
    if not good:
        reasons = "; ".join(f"chunk {chunk.index}: {chunk.failure}" for chunk in spoken)
        error = spoken[0].failure if len(spoken) == 1 else f"no chunk of the text came out ({reasons})"
        return LongClone(None, error=error, chunks=spoken)
    waveform = np.concatenate([chunk.clone.waveform for chunk in good])
    clamped = [chunk.clone.clamped for chunk in good]
    # Stopped only when the model ended every chunk it made, the failed ones too: a good chunk always ended, so
    # judging the good ones alone would never count a long text as running to the limit (fail_runaway, stop rate).
    ended = [chunk.clone.stopped for chunk in spoken if chunk.clone.error is None]
    return LongClone(waveform, all(ended),
                     clamped=None if None in clamped else sum(clamped), chunks=spoken)


def chunk_records(clone: LongClone, rate: int) -> list[dict]:
    """Each chunk's text, start and length in the joined clip (seconds; none for a failed one), whether the model
    ended it, and why it failed."""
    records, start = [], 0
    for chunk in clone.chunks:
        length = None if chunk.failure or chunk.clone.waveform is None else len(chunk.clone.waveform)
        records.append({"index": chunk.index, "text": chunk.text, "start": None if length is None else round(start / rate, 3),
                        "seconds": None if length is None else round(length / rate, 3),
                        "ended_by_model": chunk.clone.stopped if chunk.clone.error is None else None,
                        "failure": chunk.failure})
        start += length or 0
    return records


def write_chunk_json(path: Path, clone: LongClone, rate: int, settings: dict) -> None:
    """The JSON beside a joined clip: the chunking settings and `chunk_records`."""
    record = {**settings, "sample_rate": rate, "chunks": chunk_records(clone, rate)}
    files.write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------


def measure_drift(judge: metrics.Judge, clone: LongClone, reference, language: str | None, rate: int) -> dict:
    """Per chunk, the judge's SIM against the reference embedding `reference` and against the first good chunk,
    and its WER; and `drift_summary` of them. A failed chunk has no figures."""
    per_chunk, first = [], None
    for chunk in clone.chunks:
        figures = {"index": chunk.index, "text": chunk.text, "failure": chunk.failure}
        if chunk.failure is None:
            with metrics.full_precision():
                embedding = judge.encoder.embed(chunk.clone.waveform, rate)
            scores = judge.score_clip(chunk.clone.waveform, rate, reference, chunk.text, language, embedding)
            first = embedding if first is None else first
            figures.update(sim=scores.sim, sim_to_first=metrics.cosine(embedding, first), error_rate=scores.error_rate,
                           transcript=scores.transcript)
        per_chunk.append(figures)
    return {"summary": drift_summary(per_chunk), "chunks": per_chunk}


def _slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares change per chunk; None under two points."""
    if len(points) < 2:
        return None
    x, y = np.array(points, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0])


def drift_summary(per_chunk: list[dict]) -> dict:
    """The drift columns of a row (metrics.DRIFT_COLUMNS): chunks, the first and last good chunks' SIM against the
    reference, the last one's SIM against the first, and the slopes of SIM and WER over chunk indices."""
    sims = [(row["index"], row["sim"]) for row in per_chunk if row.get("sim") is not None]
    rates = [(row["index"], row["error_rate"]) for row in per_chunk if row.get("error_rate") is not None]
    last_to_first = [row["sim_to_first"] for row in per_chunk if row.get("sim_to_first") is not None]
    return {"chunks": len(per_chunk), "drift_sim_first": sims[0][1] if sims else None,
            "drift_sim_last": sims[-1][1] if sims else None,
            "drift_sim_last_to_first": last_to_first[-1] if len(last_to_first) > 1 else None,
            "drift_sim_slope": _slope(sims), "drift_wer_slope": _slope(rates)}
