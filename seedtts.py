"""The Seed-TTS-eval protocol: its test lists, its text normalisation, its per-utterance WER and its aggregates.

Followed from BytedanceSpeech/seed-tts-eval at commit 95003fe41923e46cf45d14a13143b0879f38415e
(`get_wav_res_ref_text.py`, `run_wer.py`, `average_wer.py`, `cal_sim.sh`):

- a test list (`meta.lst`) has one line per utterance,
  `utt|prompt_text|prompt_wav|target_text`, or with a fifth field `|gt_wav`
  (the real recording of the target text); paths are relative to the list.
  `read_list` turns each well-formed line into one of our paired manifest
  rows (`id`, `ref_audio`, `ref_text`, `text`, and `audio` when the line has a
  `gt_wav`) and rejects every other line with its line number and reason;
- WER: each generated clip is transcribed (Whisper-large-v3 told the language
  is English, Paraformer-zh for Chinese), then the transcript and the target
  text lose every punctuation mark of `string.punctuation` and of
  `zhon.hanzi.punctuation` except the apostrophe, English is lower-cased and
  Chinese split into characters, and jiwer scores the pair
  (`normalize`, `utterance_wer`). The reported WER is the mean of the
  per-utterance WERs, x100 (`aggregates`);
- SIM: the cosine between the generated clip's and the prompt clip's speaker
  embeddings (their WavLM-large ECAPA-TDNN verification model), mean x100.

Only the arithmetic and the text handling are reproduced here; whether a
score is comparable with published ones depends on the models that made the
transcripts and embeddings (see docs/judging.md).
"""

from __future__ import annotations

import string
from pathlib import Path

from zhon.hanzi import punctuation as chinese_punctuation

import data
import manifest

PROTOCOL_COMMIT = "BytedanceSpeech/seed-tts-eval@95003fe"
# Every mark the protocol strips before scoring; the apostrophe stays ("it's" is one word).
_STRIPPED = {ord(mark): None for mark in string.punctuation + chinese_punctuation if mark != "'"}
# Published figures, for the summary: boson-ai/higgs-audio README at commit 05ce8695 ("Seed-TTS Eval & ESD" table;
# the README does not say which of test-en and test-zh they are).
PUBLISHED = {"model": "Higgs Audio v2 (base)", "wer": 2.44, "sim": 67.70, "source": "boson-ai/higgs-audio README @05ce869"}


def is_seedtts_list(path: str | Path) -> bool:
    """Whether a file given to --eval is a Seed-TTS-eval list rather than a JSONL manifest: its first non-blank line
    is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.strip():
                return not line.lstrip().startswith("{")
    return False


def read_list(path: str | Path, clips: manifest.ClipSource) -> manifest.CheckedManifest:
    """Every line of a list, kept as a paired manifest row or rejected with its line number and reason.

    A line is read as UTF-8 (a line that is not is rejected, not the file);
    it needs four or five `|`-separated fields, a non-empty utt, prompt wav
    and target text, an utt no earlier line used, and clips that `clips`
    accepts (the reasons are the manifest's: missing_audio, corrupt_audio...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such list: {path}")
    result, seen = manifest.CheckedManifest(str(path)), set()
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            result.rows_read += 1
            try:
                row = _row(raw, path.parent, seen)
                _check_clips(row, clips)
            except manifest.RowRejected as rejected:
                result.rejections.append(manifest.Rejection(number, None, rejected.reason, rejected.detail))
                continue
            result.kept.append(row)
    return result


def _check_clips(row: dict, clips: manifest.ClipSource) -> None:
    for key, prefix in (("ref_audio", "ref_"), ("audio", "")):
        if key in row:
            try:
                seconds = clips.clip(row[key]).seconds
            except data.AudioError as error:
                raise manifest.RowRejected(manifest.audio_reason(error, row[key]), str(error)) from None
            manifest.check_limits(key, seconds)
            row[f"{prefix}seconds"] = round(seconds, 3)


def _row(raw: bytes, base: Path, seen: set[str]) -> dict:
    try:
        line = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise manifest.RowRejected("non_utf8", f"byte {error.start} is not UTF-8") from None
    fields = line.split("|")
    if len(fields) not in (4, 5):
        raise manifest.RowRejected("bad_line", f"{len(fields)} |-separated fields; a Seed-TTS-eval line has "
                                               "utt|prompt_text|prompt_wav|target_text[|gt_wav]")
    utt, prompt_text, prompt_wav, text = (field.strip() for field in fields[:4])
    empty = [name for name, value in (("utt", utt), ("prompt_wav", prompt_wav), ("target_text", text)) if not value]
    if empty:
        raise manifest.RowRejected("missing_field", f"empty {', '.join(empty)}")
    if not data.is_speakable(data.normalize_text(text)):
        raise manifest.RowRejected("empty_text", f"target_text has no letter or digit to speak ({text!r})")
    if utt in seen:
        raise manifest.RowRejected("duplicate_id", f"utt {utt!r} is taken by an earlier line")
    seen.add(utt)
    row = {"id": utt, "ref_audio": str((base / prompt_wav).resolve()), "ref_text": prompt_text, "text": text}
    if len(fields) == 5 and fields[4].strip():
        row["audio"] = str((base / fields[4].strip()).resolve())
    return row


def normalize(text: str, language: str | None) -> str | None:
    """The protocol's text before WER: punctuation out (the apostrophe kept), English lower-cased, Chinese split
    into characters; None for a language the protocol does not score (it knows en and zh)."""
    kind = (language or "").replace("_", "-").split("-")[0].lower()
    if kind not in ("en", "zh"):
        return None
    stripped = text.translate(_STRIPPED).replace("  ", " ")
    return " ".join(stripped) if kind == "zh" else stripped.lower()


def utterance_wer(text: str, transcript: str, language: str | None) -> float | None:
    """The protocol's WER of one utterance (a fraction; the protocol reports means x100); None for a language it
    does not score or a text with no word left."""
    import jiwer

    truth, hypothesis = normalize(text, language), normalize(transcript, language)
    if truth is None or not truth.split():
        return None
    return float(jiwer.wer(truth, hypothesis))


def aggregates(records: list[dict]) -> dict:
    """The protocol's figures over the rows: mean per-utterance WER x100 of the generated clips (and of the real
    targets, where a list gives them) and mean SIM generated-vs-prompt x100, each with its row count."""

    def mean_x100(column: str) -> dict:
        values = [float(record[column]) for record in records if record.get(column) is not None]
        return {"n": len(values), "value": 100 * sum(values) / len(values) if values else None}

    def mean(column: str) -> dict:
        values = [float(record[column]) for record in records if record.get(column) is not None]
        return {"n": len(values), "value": sum(values) / len(values) if values else None}

    return {"wer": mean_x100("wer_seedtts"), "sim": mean_x100("sim"), "target_wer": mean_x100("target_wer_seedtts"),
            "mos": mean("mos"), "target_mos": mean("target_mos")}


def _shown(entry: dict) -> str:
    return "n/a" if entry["value"] is None else f"{entry['value']:.2f} (n={entry['n']})"


def format_figures(figures: dict, with_mos: bool) -> str:
    """The generated clips' aggregates in one phrase: `WER x (n=N), SIM y (n=N)[, MOS z (n=N)]`."""
    return f"WER {_shown(figures['wer'])}, SIM {_shown(figures['sim'])}" + (f", MOS {_shown(figures['mos'])}" if with_mos else "")


def format_aggregates(figures: dict, asr: str, speaker_encoder: str, mos_model: str | None = None) -> str:
    """The protocol's figures as printed lines, with the models that made them and the published figures; the
    mean MOS beside them (the protocol has none: F5-TTS's papers add UTMOS the same way)."""
    targets = [f"WER {_shown(figures['target_wer'])}"] * bool(figures["target_wer"]["n"])
    targets += [f"MOS {_shown(figures['target_mos'])}"] * bool(figures["target_mos"]["n"])
    lines = [f"Seed-TTS-eval ({PROTOCOL_COMMIT}): {format_figures(figures, bool(mos_model))}"
             + (f"; real targets' {', '.join(targets)}" if targets else ""),
             f"  made with ASR {asr}, speaker encoder {speaker_encoder}"
             + (f" and MOS predictor {mos_model}" if mos_model else "") + f"; published ({PUBLISHED['source']}): "
             f"{PUBLISHED['model']} WER {PUBLISHED['wer']:.2f}, SIM {PUBLISHED['sim']:.2f} with the protocol's own models"]
    return "\n".join(lines)
