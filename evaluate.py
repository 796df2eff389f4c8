"""Judging a model's clones: every row of a manifest or list cloned and measured (`python infer.py --eval`).

`--eval` (`evaluate_list`) reads a JSONL manifest or a Seed-TTS-eval list
(`read_eval_rows`), checking every clip without encoding any; encodes
each distinct reference once, or reads its codes from a prepared cache
(`reference_codes`, kept on disk across runs by `codes.StoredCodes`); clones
the rows `--batch-size` at a time (`batched_generation.clone_many`; a row
longer than `--chunk-chars` in chunks, by longform.py, with its drift
measured), writing each clip as it comes, while a
scoring thread (`ScoringWorker`) scores each clip and its real target
(`score_row`, the target's scores cached on disk) and appends the row to
rows.csv (`eval_dir.EvalDir`, which also refuses a used directory and
resumes a half-done one). The summary gives ours (means, corpus WER, the
real targets') and the Seed-TTS-eval aggregates (`seedtts.py`); summary.png
draws each metric's distribution (`plots.summary_figure`).

`clones_of` and `score_row` also make and judge the clones the training
loop makes of its held-out sets (`heldout.py`, which imports this module,
never the reverse), so that both measure a clone alike.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import batched_generation
import collate
import data
import eval_dir
import files
import generation
import longform
import manifest
import metrics
import model_utils
import plots
import seedtts
from codes import EncodedClips, StoredCodes, audio_tokenizer_id, read_prepared


@dataclass
class CloneSettings:
    """How the clips of an evaluation are made."""

    sampling: generation.Sampling
    layout: data.PromptLayout
    force_audio: bool = True
    batch_size: int = 1
    kv_cache: generation.StaticCacheBuckets | None = None
    chunk_chars: int | None = None  # rows longer than this are spoken in chunks (longform.py); None: never
    context_chunks: int = longform.DEFAULT_CONTEXT_CHUNKS


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
    if isinstance(clone, longform.LongClone):  # a row spoken in chunks: its drift, per chunk kept on the clone
        clone.drift = longform.measure_drift(judge, clone, embedding, language, rate)
    drift = clone.drift["summary"] if isinstance(clone, longform.LongClone) else None
    record = metrics.row_record(pair.id, language, pair.text, scores, clone.stopped, target, drift=drift,
                                clamped=clone.clamped)
    return with_chunk_failures(record, clone)


def with_chunk_failures(record: dict, clone: generation.Clone) -> dict:
    """A row spoken in chunks is `fail_silent` when any chunk was silent: that chunk is left out of the joined
    clip, whose level cannot tell (a chunk that ran to the limit makes the clip unstopped: longform.join_chunks)."""
    if isinstance(clone, longform.LongClone) and any(chunk.failure == "silent" for chunk in clone.chunks):
        record.update(fail_silent=True, fail_any=True)
    return record


def clones_of(bundle: model_utils.Bundle, pairs: list[manifest.Pair], codes: Callable[[str], torch.Tensor],
              settings: CloneSettings) -> Iterator[tuple[manifest.Pair, generation.Clone]]:
    """Each pair with its clone (a failed one carries its error), `settings.batch_size` per decoding step; each
    reference's codes from `codes` (which encodes a file once, or reads a cache)."""
    rate = bundle.audio_tokenizer.sampling_rate
    needs_waveform = settings.layout.ref_in_system and collate.uses_whisper(bundle.model.config)
    reference = lambda pair: generation.Reference(pair.ref_text, codes(pair.ref_audio),  # noqa: E731
                                                  data.load_audio(pair.ref_audio, rate) if needs_waveform else None, rate)
    chunked = {pair.id: longform.chunk_text(pair.text, settings.chunk_chars) for pair in pairs if settings.chunk_chars}
    long_pairs = [pair for pair in pairs if len(chunked.get(pair.id, ())) > 1]
    pairs = [pair for pair in pairs if len(chunked.get(pair.id, ())) <= 1]
    if long_pairs:
        print(f"{len(long_pairs)} rows over --chunk-chars {settings.chunk_chars}: spoken in chunks, their drift measured")
    for start in range(0, len(pairs), settings.batch_size):
        chunk = pairs[start : start + settings.batch_size]
        jobs = [batched_generation.Job(reference(pair), pair.text, pair.scene) for pair in chunk]
        clips = batched_generation.clone_many(bundle, jobs, settings.sampling, settings.layout, settings.force_audio,
                                              settings.batch_size, settings.kv_cache)
        yield from zip(chunk, clips)
    documents = [longform.Document(reference(pair), chunked[pair.id], pair.scene) for pair in long_pairs]
    for index, clip in longform.speak_documents(bundle, documents, settings.sampling, settings.layout, settings.context_chunks,
                                                settings.force_audio, settings.batch_size, settings.kv_cache):
        yield long_pairs[index], clip


# --------------------------------------------------------------------------
# python infer.py --eval
# --------------------------------------------------------------------------


class CheckedClips:
    """`--eval`'s clip source for the row check: each clip loaded and checked as training checks it, never encoded
    (a target is only scored; a reference is encoded later, once, or read from a cache). Its `frames` is an
    estimate, seconds x 25 rounded (the tokenizer's own count differs by a frame at some lengths): `--eval` applies
    no token filter and reads no frame count."""

    def __init__(self, sampling_rate: int, num_codebooks: int):
        self.sampling_rate, self.num_codebooks = sampling_rate, num_codebooks

    def clip(self, path: str) -> manifest.Clip:
        seconds = len(data.load_clip(path, self.sampling_rate)) / self.sampling_rate
        return manifest.Clip(seconds, round(seconds * generation.FRAMES_PER_SECOND))


def read_eval_rows(path: str, clips: CheckedClips, seed: int) -> tuple[manifest.CheckedManifest, list[manifest.Pair], dict]:
    """A JSONL manifest (speaker rows paired as in training, fixed by `seed`) or a Seed-TTS-eval list, checked:
    the check, the pairs and each row's language."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such manifest or list: {path}")
    if seedtts.is_seedtts_list(path):
        checked = seedtts.read_list(path, clips)
        pairs = [manifest.Pair(row["id"], row["ref_audio"], row["ref_text"], row.get("audio"), row["text"]) for row in checked.kept]
    else:
        checked = manifest.check_manifest(path, clips, progress=True)
        pairs = manifest.training_pairs(checked.kept, seed, 0)[0]
    return checked, pairs, {row["id"]: row.get("language") for row in checked.kept}


def reference_codes(bundle: model_utils.Bundle, cache_dir: str | None, paths: list[str],
                    stored_dir: str | None = None) -> Callable[[str], torch.Tensor]:
    """Codes of each reference by path: read from the prepared cache `cache_dir` when it holds the clip, else
    from `stored_dir` (`codes.StoredCodes`) when given, else encoded once per distinct file; the split is printed."""
    encoded = StoredCodes(stored_dir, bundle.audio_tokenizer) if stored_dir else EncodedClips(bundle.audio_tokenizer)
    if not cache_dir:
        return encoded
    prepared = read_prepared(cache_dir, audio_tokenizer_id(bundle.audio_tokenizer))
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
        record = score_row(self.judge, pair, language, clone, self.rate)
        if getattr(clone, "drift", None):  # before the row: a row in rows.csv is done, its drift line with it
            files.append_text(self.out.path / "drift.jsonl", json.dumps({"id": pair.id, **clone.drift}, ensure_ascii=False) + "\n")
        self.out.append(record)
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
                  settings: CloneSettings, codes_cache: str | None = None, stored_codes: str | None = None) -> dict:
    """Clone and measure every row of a manifest or Seed-TTS-eval list into `out`; returns summary.json's content.

    Rows already in `out`'s rows.csv (a resumed run) are skipped. Every row
    rejected is an error after rejections.jsonl is written; Ctrl-C is an
    `EvalInterrupted` after the row being scored is kept.
    """
    timings, started = {}, time.perf_counter()
    rate = bundle.audio_tokenizer.sampling_rate
    checked, pairs, languages = read_eval_rows(list_path, CheckedClips(rate, bundle.model.config.audio_num_codebooks),
                                                 settings.sampling.seed or 0)
    checked.write_report(out.path / "rejections.jsonl")
    print(f"data: {list_path}: {checked.summary()}" + (f"; rejected rows: {out.path / 'rejections.jsonl'}" if checked.rejections else ""))
    if not pairs:
        raise ValueError(f"no row of {list_path} can be evaluated ({checked.summary()}); see {out.path / 'rejections.jsonl'}")
    warn_about_languages(judge, pairs, languages)
    done = {record["id"] for record in out.done()}
    todo = [(index, pair) for index, pair in enumerate(pairs) if pair.id not in done]
    if done:
        print(f"resuming: {len(done)} rows already scored in {out.path / eval_dir.ROWS_FILE}, {len(todo)} to go")
    timings["validation"] = time.perf_counter() - started
    codes = _Timed(reference_codes(bundle, codes_cache, [pair.ref_audio for _, pair in todo], stored_codes))
    try:
        timings.update(_generate_and_score(bundle, judge, todo, languages, codes, out, settings))
    except KeyboardInterrupt:
        raise EvalInterrupted(len(out.done()), len(pairs), out.path) from None
    timings["reference_codes"] = codes.seconds
    timings["wall"] = time.perf_counter() - started
    stored = codes.function if isinstance(codes.function, StoredCodes) else None
    return _summary(out, list_path, checked, judge, settings, timings, len(todo), stored)


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


def _summary(out: eval_dir.EvalDir, list_path: str, checked, judge: metrics.Judge, settings: CloneSettings,
             timings: dict, made: int, stored: StoredCodes | None = None) -> dict:
    """summary.json and the printed summary, from every row in rows.csv (this run's and a resumed run's)."""
    records = out.done()
    seed = settings.sampling.seed or 0
    summary = metrics.summarize_records(records, seed)
    corpus = {"error_rate": metrics.corpus_error_rate(records), "target_error_rate": metrics.corpus_error_rate(records, "target_")}
    protocol = seedtts.aggregates(records)
    failed = sum(bool(record["error"]) for record in records)
    report = {
        "list": str(list_path), "rows_read": checked.rows_read, "kept": len(checked.kept), "rejected": len(checked.rejections),
        "rejected_by_reason": checked.counts(), "evaluated": len(records), "generation_failed": failed,
        **judge.models(), "failures": metrics.failure_rates(records),
        "sampling": vars(settings.sampling), "scene": settings.layout.scene, "ref_in_system": settings.layout.ref_in_system,
        "batch_size": settings.batch_size, "seconds": timings, "clips_made_this_run": made,
        "metrics": summary, "corpus": corpus, "seedtts": protocol,
    }
    if judge.target_cache:
        report["target_score_cache"] = {"folder": str(judge.target_cache.folder), "hits": judge.target_cache.hits,
                                        "misses": judge.target_cache.misses}
    if stored:
        report["reference_code_cache"] = {"folder": str(stored.folder), "hits": stored.hits, "encoded": stored.encoded}
        print(f"reference codes: {stored.hits} read from {stored.folder}, {stored.encoded} encoded")
    drift = {column: metrics.summarize([r[column] for r in records if r["chunks"]], seed) for column in metrics.DRIFT_COLUMNS}
    if drift["chunks"]["n"]:
        report["drift"] = drift
        print(metrics.format_summary(drift) + f"\nper chunk: {out.path / 'drift.jsonl'}")
    files.write_text(out.path / "summary.json", json.dumps(report, indent=2, ensure_ascii=False))
    plots.write_png(plots.summary_figure(records, f"{list_path}: {len(records)} rows"), out.path / "summary.png")
    print(metrics.format_summary(summary))
    print(f"corpus WER/CER {metrics.fmt(corpus['error_rate']['rate'])} over {corpus['error_rate']['words']} words "
          f"of {corpus['error_rate']['n']} rows; real targets' {metrics.fmt(corpus['target_error_rate']['rate'])}")
    print(metrics.format_failures(report["failures"]))
    print(seedtts.format_aggregates(protocol, report["asr"] or "none", judge.encoder.name, report["mos_model"]))
    print(f"{len(records)} rows evaluated ({failed} without audio), {checked.summary()}; {made} clips made in "
          f"{timings['wall']:.1f} s; wrote {out.path / eval_dir.ROWS_FILE}, {out.path / 'summary.json'}, {out.path / 'summary.png'}, "
          f"{out.path / 'wavs'}")
    return report
