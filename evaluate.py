"""Judging clones: clone a held-out row from its reference and measure the clip.

`evaluate_pair` clones one row (`generation.clone`) and scores the clip and
the real target with a `metrics.Judge` (SIM, WER/CER, timing);
`evaluate_manifest` does so for every row of a manifest, writing the clips,
one CSV line per row and a summary (`python infer.py --eval`). The training
loop judges its validation clones with `evaluate_pair` too.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

import collate
import data
import generation
import metrics
import model_utils


def evaluate_pair(
    bundle: model_utils.Bundle,
    judge: metrics.Judge,
    pair: data.Pair,
    language: str | None,
    sampling: generation.Sampling,
    codes,
    scene: str | None = None,
    ref_in_system: bool = False,
    force_audio: bool = True,
) -> tuple[dict, np.ndarray | None]:
    """Clone `pair.text` from its reference; the row's record (generated and real target scores) and the clip.

    A generation that yields no audio is a record with its error and no
    generated values, never a dropped row. `codes` gives a clip's codes by path.
    """
    rate = bundle.audio_tokenizer.sampling_rate
    ref_waveform = data.load_audio(pair.ref_audio, rate)
    needs_waveform = ref_in_system and collate.uses_whisper(bundle.model.config)
    reference = generation.Reference(pair.ref_text, codes(pair.ref_audio), ref_waveform if needs_waveform else None, rate)
    embedding = judge.reference_embedding(pair.ref_audio, ref_waveform, rate)
    language = judge.language(language)
    target = judge.score_target(pair.audio, data.load_audio(pair.audio, rate), rate, embedding, pair.text, language)
    try:
        result = generation.clone(bundle, reference, pair.text, sampling, pair.scene or scene, ref_in_system, force_audio)
    except RuntimeError as error:
        return metrics.row_record(pair.id, language, pair.text, None, None, target, str(error)), None
    scores = judge.score_clip(result.waveform, rate, embedding, pair.text, language)
    return metrics.row_record(pair.id, language, pair.text, scores, result.stopped, target), result.waveform


def write_records_csv(records: list[dict], path: Path) -> None:
    """One line per row; unavailable values are written `n/a`."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]) if records else ["id"])
        writer.writeheader()
        for record in records:
            writer.writerow({key: value if isinstance(value, str) else metrics.fmt(value, 4) for key, value in record.items()})


def _wav_name(index: int, row_id: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', row_id)}.wav"


def evaluate_manifest(
    bundle: model_utils.Bundle,
    judge: metrics.Judge,
    manifest: str,
    out: Path,
    sampling: generation.Sampling,
    layout: data.PromptLayout,
    seed: int,
    force_audio: bool,
    model: str,
) -> None:
    """Clone and measure every row of `manifest`: wavs/, rows.csv, summary.json and rejections.jsonl in `out`, and a
    printed summary. `seed` fixes the speaker pairing of speaker-grouped rows; `model` names the model in summary.json."""
    codes = data.CodeCache(bundle.audio_tokenizer)
    validated = data.validate_manifest(manifest, codes, progress=True)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    validated.write_report(out / "rejections.jsonl")
    print(f"data: {manifest}: {validated.summary()}" + (f"; rejected rows: {out / 'rejections.jsonl'}" if validated.rejections else ""))
    pairs, _ = data.training_pairs(validated.kept, seed, 0)
    languages = {row["id"]: row.get("language") for row in validated.kept}
    records, started = [], time.time()
    for index, pair in enumerate(tqdm(pairs, desc="eval", dynamic_ncols=True)):
        record, waveform = evaluate_pair(bundle, judge, pair, languages[pair.id], sampling, codes, layout.scene,
                                         layout.ref_in_system, force_audio)
        if waveform is not None:
            sf.write(out / "wavs" / _wav_name(index, pair.id), waveform, bundle.audio_tokenizer.sampling_rate)
        records.append(record)
    seconds = time.time() - started
    write_records_csv(records, out / "rows.csv")
    summary = metrics.summarize_records(records, seed)
    failed = sum(bool(record["error"]) for record in records)
    report = {
        "manifest": str(manifest), "model": model, "rows_read": validated.rows_read, "kept": len(validated.kept),
        "rejected": len(validated.rejections), "rejected_by_reason": validated.counts(), "evaluated": len(records),
        "generation_failed": failed, "speaker_encoder": judge.encoder.name, "asr": judge.asr.name,
        "seed": seed, "sampling": vars(sampling), "scene": layout.scene, "ref_in_system": layout.ref_in_system,
        "seconds_per_row": seconds / max(1, len(records)), "metrics": summary,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(metrics.format_summary(summary))
    print(f"{len(records)} rows evaluated ({failed} without audio), {validated.summary()}; "
          f"{seconds / max(1, len(records)):.2f} s per row; wrote {out / 'rows.csv'}, {out / 'summary.json'}, {out / 'wavs'}")
