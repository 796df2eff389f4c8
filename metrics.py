"""Clone-quality metrics: does it sound like the reference, does it say the text, does it stop on time.

* speaker similarity (SIM): cosine of speaker embeddings of two clips;
  `resemblyzer`'s GE2E encoder by default (its weights ship in its wheel), or
  a local `WavLMForXVector` directory (`--speaker-model DIR`);
* intelligibility: WER of an ASR transcript against the text, or CER for
  languages written without spaces; ASR from a local Whisper directory
  (`--asr-model DIR`, any language) or, offline, pocketsphinx's bundled
  en-us model (English only). A language no ASR covers gives `None`
  ("n/a"), never 0;
* naturalness: a predicted mean opinion score (MOS, 1-5) per clip, from
  `distillmos`' distilled XLS-R speech-quality model (its weights ship in
  its wheel, so offline); a judge that cannot load is an error naming the
  package, never an `n/a`;
* timing: duration ratio generated / real target, whether the model ended
  the clip itself, leading and trailing silence;
* failures per generated clip (`failure_flags`, rates by `failure_rates`):
  ran to the length limit without ending, silent, far shorter than its text
  needs, codes clamped into the codebook before decoding;
* teacher-forced top-1 accuracy of the audio head, per codebook and on the
  stream-EOS column, from `audio_logits` and `label_audio_ids`;
* summaries: mean, median and a bootstrap 95% interval, the corpus error
  rate (errors over all rows' words), and the Seed-TTS-eval aggregates
  (`seedtts.py`), as a dict and as a printed table; the paired difference
  of two runs' rows (`paired_difference`, the same bootstrap over rows) and
  which way each metric gets better (`BETTER`).

A `Judge` scores clips with one encoder, one ASR and one MOS predictor; it keeps reference
embeddings in memory and, given a `score_cache.TargetScores`, real-target
scores on disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

import score_cache
import seedtts

IGNORE_INDEX = -100
ASR_RATE = 16000
# Written without spaces between words: scored by characters (CER).
CHARACTER_LANGUAGES = ("zh", "ja", "th", "lo", "km", "my", "yue", "bo")


def base_language(language: str | None) -> str | None:
    """`en-US` -> `en`; None stays None."""
    return language.replace("_", "-").split("-")[0].lower() if language else None


def _resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    import librosa

    waveform = np.asarray(waveform, dtype=np.float32)
    return waveform if rate == target else librosa.resample(waveform, orig_sr=rate, target_sr=target)


# --------------------------------------------------------------------------
# Speaker similarity
# --------------------------------------------------------------------------


class SpeakerEncoder(Protocol):
    name: str
    identity: str  # name, version or model folder digest: what a cached score was made with

    def embed(self, waveform: np.ndarray, rate: int) -> np.ndarray | None:
        """A unit-length speaker embedding, or None when the clip holds no speech to embed."""


class ResemblyzerEncoder:
    """GE2E speaker encoder of `resemblyzer` (weights inside its package, so offline).

    The clip is resampled to 16 kHz and its volume normalised as resemblyzer
    does, without its VAD trimming: like the WavLM encoders of zero-shot TTS
    benchmarks, the whole clip is embedded, so a noisy or babbling clip still
    gets a (low) score instead of none.
    """

    name = "resemblyzer"

    def __init__(self, device: str = "cpu"):
        from resemblyzer import VoiceEncoder

        self.encoder = VoiceEncoder(device=device, verbose=False)
        self.identity = f"resemblyzer-{version('resemblyzer')}"

    def embed(self, waveform: np.ndarray, rate: int) -> np.ndarray | None:
        from resemblyzer.audio import normalize_volume
        from resemblyzer.hparams import audio_norm_target_dBFS, sampling_rate

        if is_silent(waveform, rate):
            return None
        speech = normalize_volume(_resample(waveform, rate, sampling_rate), audio_norm_target_dBFS, increase_only=True)
        return np.asarray(self.encoder.embed_utterance(speech), dtype=np.float64)


def _check_model_dir(model_dir: str, flag: str, kind: str) -> None:
    """A local transformers model directory, or a FileNotFoundError naming the flag (there is no hub to fall back on)."""
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{flag} {model_dir}: no config.json ({kind})")


def model_dir_identity(model_dir: str) -> str:
    """A model folder's name and a digest of its files' names, sizes and modification times (hashing gigabytes of
    weights at every start would cost more than the scores it protects)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file():
            status = path.stat()
            digest.update(f"{path.relative_to(model_dir)}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    return f"{Path(model_dir).resolve().name}-{digest.hexdigest()[:16]}"


class WavLMEncoder:
    """A local speaker-verification model directory (e.g. a copy of microsoft/wavlm-base-plus-sv)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        _check_model_dir(model_dir, "--speaker-model", "a WavLMForXVector directory")
        self.name = f"wavlm:{Path(model_dir).name}"
        self.identity = f"wavlm:{model_dir_identity(model_dir)}"
        self.extractor = AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
        self.model = WavLMForXVector.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.device = device

    def embed(self, waveform: np.ndarray, rate: int) -> np.ndarray | None:
        if is_silent(waveform, rate):
            return None
        target = self.extractor.sampling_rate
        features = self.extractor(_resample(waveform, rate, target), sampling_rate=target, return_tensors="pt")
        with torch.no_grad():
            embedding = self.model(**features.to(self.device)).embeddings[0].double().cpu().numpy()
        return embedding / max(np.linalg.norm(embedding), 1e-12)


def speaker_encoder(model_dir: str | None = None, device: str = "cpu") -> SpeakerEncoder:
    """The default offline encoder, or a local WavLMForXVector directory."""
    return WavLMEncoder(model_dir, device) if model_dir else ResemblyzerEncoder(device)


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def speaker_similarity(encoder: SpeakerEncoder, clip: np.ndarray, reference: np.ndarray, rate: int) -> float | None:
    """Cosine similarity of the two clips' speaker embeddings; None when either holds no speech."""
    return cosine(encoder.embed(clip, rate), encoder.embed(reference, rate))


# --------------------------------------------------------------------------
# Intelligibility
# --------------------------------------------------------------------------


class Transcriber(Protocol):
    name: str
    identity: str

    def supports(self, language: str | None) -> bool: ...

    def transcribe(self, waveform: np.ndarray, rate: int, language: str | None) -> str: ...


class PocketsphinxTranscriber:
    """pocketsphinx with the en-us acoustic model, language model and dictionary its wheel ships: English only."""

    name = "pocketsphinx-en-us"

    def __init__(self):
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
        self.identity = f"pocketsphinx-{version('pocketsphinx')}-en-us"

    def supports(self, language: str | None) -> bool:
        return base_language(language) == "en"

    def transcribe(self, waveform: np.ndarray, rate: int, language: str | None = "en") -> str:
        samples = np.clip(_resample(waveform, rate, ASR_RATE), -1.0, 1.0)
        self.decoder.start_utt()
        self.decoder.process_raw((samples * 32767).astype(np.int16).tobytes(), full_utt=True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""


class WhisperTranscriber:
    """A local Whisper directory (processor + WhisperForConditionalGeneration), greedy, told the row's language."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        _check_model_dir(model_dir, "--asr-model", "a Whisper model directory")
        self.name = f"whisper:{Path(model_dir).name}"
        self.identity = f"whisper:{model_dir_identity(model_dir)}"
        self.processor = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.device = device
        self.languages = set(getattr(self.model.generation_config, "lang_to_id", {}) or {})

    def supports(self, language: str | None) -> bool:
        # Without a language Whisper detects one; otherwise it must know the language.
        return language is None or f"<|{base_language(language)}|>" in self.languages

    def transcribe(self, waveform: np.ndarray, rate: int, language: str | None) -> str:
        features = self.processor(_resample(waveform, rate, ASR_RATE), sampling_rate=ASR_RATE, return_tensors="pt")
        options = {"task": "transcribe"} if language is None else {"task": "transcribe", "language": base_language(language)}
        with torch.no_grad():
            ids = self.model.generate(features.input_features.to(self.device), **options)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def transcriber(model_dir: str | None = None, device: str = "cpu") -> Transcriber:
    """A local Whisper directory, or the offline English default."""
    return WhisperTranscriber(model_dir, device) if model_dir else PocketsphinxTranscriber()


def normalize_for_scoring(text: str) -> str:
    """Case-folded, punctuation and symbols removed (apostrophes inside words kept), spaces collapsed."""
    kept = []
    for char in unicodedata.normalize("NFKC", text).casefold():
        category = unicodedata.category(char)
        if char == "'" or not category.startswith(("P", "S")):
            kept.append(char)
        else:
            kept.append(" ")
    return " ".join(word.strip("'") for word in "".join(kept).split() if word.strip("'"))


def error_kind(language: str | None) -> str:
    """`cer` for languages written without spaces, else `wer`."""
    return "cer" if base_language(language) in CHARACTER_LANGUAGES else "wer"


def error_rate(reference: str, hypothesis: str, language: str | None) -> float:
    """WER (or CER, see `error_kind`) of `hypothesis` against `reference`, both normalised; can exceed 1."""
    import jiwer

    reference, hypothesis = normalize_for_scoring(reference), normalize_for_scoring(hypothesis)
    if not reference:
        raise ValueError("the reference text has no word left after normalisation")
    if error_kind(language) == "cer":
        return float(jiwer.cer(reference.replace(" ", ""), hypothesis.replace(" ", "")))
    return float(jiwer.wer(reference, hypothesis))


def reference_units(text: str, language: str | None) -> int:
    """What `error_rate` divides by: the normalised text's words, or characters for `cer` languages."""
    normalised = normalize_for_scoring(text)
    return len(normalised.replace(" ", "")) if error_kind(language) == "cer" else len(normalised.split())


# --------------------------------------------------------------------------
# Naturalness
# --------------------------------------------------------------------------

MOS_RATE = 16000


class MosPredictor(Protocol):
    name: str
    identity: str

    def score(self, waveform: np.ndarray, rate: int) -> float:
        """The clip's predicted MOS, 1 (bad) to 5 (excellent)."""


class DistillMos:
    """`distillmos`' ConvTransformer SQA model (variant 7, distilled from an XLS-R speech-quality model; its weights
    ship in its wheel). It peak-normalises the 16 kHz clip itself and scores it in 7.68 s windows (hop 1 s),
    averaged, so a clip's level does not change its score and a long clip costs one window per second beyond; a
    shorter clip is repeated to fill one window (`fill_window`)."""

    def __init__(self, device: str = "cpu"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints where it loaded its weights from
                import distillmos

                self.model = distillmos.ConvTransformerSQAModel().to(device).eval()
        except ImportError as error:  # a RuntimeError: every command prints it as its one `error:` line
            raise RuntimeError(f"the naturalness judge needs the distillmos package (pip install distillmos==0.9.1; "
                               f"{error})") from None
        from distillmos.sqa import SEQ_LEN

        self.device, self.window = device, SEQ_LEN  # 7.68 s at 16 kHz
        self.name, self.identity = f"distillmos-{version('distillmos')}", mos_identity()

    def score(self, waveform: np.ndarray, rate: int) -> float:
        samples = np.asarray(_resample(waveform, rate, MOS_RATE), dtype=np.float32)
        if len(samples) == 0:
            raise ValueError("an empty clip has no MOS")
        samples = fill_window(samples, self.window)
        with torch.no_grad(), full_precision():
            return float(self.model(torch.from_numpy(samples)[None].to(self.device)).mean())


def mos_identity() -> str:
    """The naturalness judge's model and how it scores short clips (`fill_window`): what a cached MOS, and an
    --eval run's MOS column, means."""
    return f"distillmos-{version('distillmos')}-filled"


def fill_window(samples: np.ndarray, window: int) -> np.ndarray:
    """A clip shorter than the MOS model's window repeated to fill it. distillmos pads a short clip with zeros,
    and the silence is scored as part of the clip: 1 s of en_man scores 2.21 zero-padded against 4.64 for its
    first 7.68 s, and 3.83 repeated (en_woman 1.94 / 4.20 / 3.93; tests/test_metrics.py shows it)."""
    if len(samples) >= window:
        return np.ascontiguousarray(samples)
    return np.ascontiguousarray(np.tile(samples, -(-window // len(samples)))[:window])


@functools.cache
def mos_predictor(device: str = "cpu") -> MosPredictor:
    """The naturalness judge (`DistillMos`), loaded once per device and process (it holds no state between clips);
    a RuntimeError naming the package when it cannot be imported."""
    return DistillMos(device)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def edge_silence(waveform: np.ndarray, rate: int, top_db: float = 40.0, floor_dbfs: float = -60.0) -> tuple[float, float]:
    """Seconds of silence before the first and after the last sounding 20 ms frame.

    A frame sounds when its RMS is within `top_db` of the loudest frame and
    above `floor_dbfs`; a clip with no sounding frame is silent from end to end.
    """
    waveform = np.asarray(waveform, dtype=np.float64)
    seconds = len(waveform) / rate
    frame = max(1, int(0.02 * rate))
    hop = max(1, frame // 2)
    if len(waveform) < frame:
        return seconds, seconds
    starts = np.arange(0, len(waveform) - frame + 1, hop)
    rms = np.sqrt(np.array([np.mean(waveform[s : s + frame] ** 2) for s in starts]))
    level = 20 * np.log10(np.maximum(rms, 1e-10))
    sounding = level >= max(level.max() - top_db, floor_dbfs)
    if not sounding.any():
        return seconds, seconds
    first = int(np.argmax(sounding))
    last = len(sounding) - 1 - int(np.argmax(sounding[::-1]))
    return starts[first] / rate, max(0.0, seconds - (starts[last] + frame) / rate)


def peak_dbfs(waveform: np.ndarray, rate: int) -> float:
    """The level of the clip's loudest 20 ms frame (RMS, dBFS); -200 for an empty clip."""
    waveform = np.asarray(waveform, dtype=np.float64)
    frame = max(1, int(0.02 * rate))
    if len(waveform) == 0:
        return -200.0
    frames = waveform[: len(waveform) // frame * frame].reshape(-1, frame) if len(waveform) >= frame else waveform[None]
    return float(20 * np.log10(max(float(np.sqrt((frames**2).mean(axis=1)).max()), 1e-10)))


def is_silent(waveform: np.ndarray, rate: int) -> bool:
    """No sounding frame at all (see `edge_silence`): nothing to embed or transcribe."""
    lead, _ = edge_silence(waveform, rate)
    return lead >= len(waveform) / rate


def duration_ratio(generated_seconds: float, target_seconds: float | None) -> float | None:
    """Generated / real target duration; None without a target."""
    if not target_seconds:
        return None
    return generated_seconds / target_seconds


# --------------------------------------------------------------------------
# Teacher-forced accuracy
# --------------------------------------------------------------------------


def teacher_forced_hits(audio_logits: torch.Tensor, label_audio_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Counts (n_q + 1, 2) of [correct top-1, labelled]: one row per codebook, the last for stream-EOS labels;
    float64, on the logits' device (the training step reads them only when it logs).

    The same shift as the loss: `audio_logits[:-1, k]` predicts
    `label_audio_ids[k, 1:]`; -100 labels are not counted. The EOS row counts
    every (column, codebook) whose label is the stream EOS, i.e. whether the
    model ends each delayed stream where the target does.
    """
    labels = label_audio_ids[:, 1:].to(audio_logits.device)
    predicted = audio_logits[:-1].argmax(-1).T
    labelled = labels != IGNORE_INDEX
    correct = (predicted == labels) & labelled
    eos = labels == eos_id
    per_codebook = torch.stack([correct.sum(1), labelled.sum(1)], dim=1)
    eos_counts = torch.stack([(correct & eos).sum(), eos.sum()])[None]
    return torch.cat([per_codebook, eos_counts]).double()


def accuracy_from_hits(hits: np.ndarray) -> dict[str, float]:
    """`codebook_K`, `all` (every labelled audio position) and `eos` accuracies; NaN where nothing was labelled."""

    def ratio(correct, total):
        return float(correct / total) if total else math.nan

    values = {f"codebook_{k}": ratio(*hits[k]) for k in range(len(hits) - 1)}
    values["all"] = ratio(hits[:-1, 0].sum(), hits[:-1, 1].sum())
    values["eos"] = ratio(*hits[-1])
    return values


# --------------------------------------------------------------------------
# Scoring clips and rows
# --------------------------------------------------------------------------


@dataclass
class ClipScores:
    """What is measured on one clip (generated or real target) against its reference and text."""

    seconds: float
    sim: float | None
    error_rate: float | None
    transcript: str | None
    lead_silence: float
    trail_silence: float
    mos: float | None = None  # None: scored without a MOS predictor
    peak_dbfs: float | None = None  # its loudest 20 ms frame; under SILENT_DBFS the clip is silent


class Judge:
    """Scores clips with one speaker encoder and the ASR that fits each language.

    Reference embeddings are kept in memory by path (the training loop scores
    the same validation rows at every evaluation); real-target scores too,
    and on disk across runs when `target_cache` is given.
    """

    def __init__(self, encoder: SpeakerEncoder, asr: Transcriber | None, default_language: str | None = None,
                 target_cache: score_cache.TargetScores | None = None, mos: MosPredictor | None = None):
        self.encoder, self.asr, self.default_language = encoder, asr, default_language
        self.target_cache, self.mos = target_cache, mos
        self._embeddings: dict[str, np.ndarray | None] = {}
        self._targets: dict[tuple[str, str, str | None], ClipScores] = {}

    def identity(self) -> str:
        """What a cached target score depends on besides the clips: the encoder's, the ASR's and the MOS predictor's
        identities."""
        return (f"{self.encoder.identity}|{self.asr.identity if self.asr else 'no-asr'}"
                f"|{self.mos.identity if self.mos else 'no-mos'}")

    def models(self) -> dict[str, str | None]:
        """The models that made the scores, as every summary names them."""
        return {"speaker_encoder": self.encoder.name, "asr": self.asr.name if self.asr else None,
                "mos_model": self.mos.name if self.mos else None}

    def judged_by(self) -> str:
        """The models as one line under a table."""
        models = self.models()
        return (f"judged by speaker encoder {models['speaker_encoder']}, ASR {models['asr'] or 'none'}, "
                f"MOS predictor {models['mos_model'] or 'none'}")

    def language(self, language: str | None) -> str | None:
        return language or self.default_language

    def intelligibility_available(self, language: str | None) -> bool:
        return self.asr is not None and self.asr.supports(self.language(language))

    def reference_embedding(self, path: str, load: Callable[[], np.ndarray], rate: int) -> np.ndarray | None:
        """The reference clip's embedding; `load` gives its waveform at `rate` the first time."""
        if path not in self._embeddings:
            with full_precision():
                self._embeddings[path] = self.encoder.embed(load(), rate)
        return self._embeddings[path]

    def score_clip(self, waveform: np.ndarray, rate: int, reference: np.ndarray | None, text: str, language: str | None,
                   embedding: np.ndarray | None = None) -> ClipScores:
        """The clip's scores; `embedding`: its speaker embedding, where the caller has already made it."""
        lead, trail = edge_silence(waveform, rate)
        language = self.language(language)
        transcript = rate_value = None
        with full_precision():
            if self.intelligibility_available(language):
                transcript = self.asr.transcribe(waveform, rate, language)
                rate_value = error_rate(text, transcript, language)
            sim = cosine(self.encoder.embed(waveform, rate) if embedding is None else embedding, reference)
            mos = self.mos.score(waveform, rate) if self.mos and len(waveform) else None
        return ClipScores(len(waveform) / rate, sim, rate_value, transcript, lead, trail, mos, peak_dbfs(waveform, rate))

    def score_target(self, path: str, load: Callable[[], np.ndarray], rate: int, reference_path: str,
                     reference: np.ndarray | None, text: str, language: str | None) -> ClipScores:
        """The real target's scores against its reference; from memory or the disk cache when scored before (the
        waveform is then never loaded), the error rate always recomputed from the transcript."""
        language = self.language(language)
        memory_key = (path, reference_path, language)
        if memory_key not in self._targets:
            self._targets[memory_key] = self._cached_target(path, load, rate, reference_path, reference, text, language)
        scores = self._targets[memory_key]
        if scores.transcript is not None:
            scores = ClipScores(**{**asdict(scores), "error_rate": error_rate(text, scores.transcript, language)})
        return scores

    def _cached_target(self, path, load, rate, reference_path, reference, text, language) -> ClipScores:
        cache = self.target_cache
        key = cache.key(path, reference_path, language) if cache else None
        entry = cache.get(key) if cache else None
        if entry is not None:
            return ClipScores(**entry, error_rate=None)
        scores = self.score_clip(load(), rate, reference, text, language)
        if cache:
            cache.put(key, {name: value for name, value in asdict(scores).items() if name != "error_rate"})
        return scores


def full_precision() -> contextlib.ExitStack:
    """The judge's models compute in their own fp32, also inside a caller's bf16 autocast (the training loop's
    evaluation generates under it): resemblyzer's LSTM has no bf16 kernel on the CPU, and scores should not
    depend on the precision the model under test was trained in."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def build_judge(speaker_model: str | None = None, asr_model: str | None = None, language: str | None = None,
                device: str = "cpu", target_cache_dir: str | Path | None = None) -> Judge:
    """The encoder and ASR chosen by `--speaker-model` / `--asr-model` (offline defaults otherwise) and the MOS
    predictor; real-target scores cached in `target_cache_dir` when given."""
    judge = Judge(speaker_encoder(speaker_model, device), transcriber(asr_model, device), language,
                  mos=mos_predictor(device))
    if target_cache_dir:
        judge.target_cache = score_cache.TargetScores(target_cache_dir, judge.identity())
    return judge


# A row spoken in chunks (longform.drift_summary): chunks, the first and last chunks' SIM, the last one's SIM to the
# first, the slopes of SIM and WER over chunks; n/a for a row spoken in one go.
DRIFT_COLUMNS = ("chunks", "drift_sim_first", "drift_sim_last", "drift_sim_last_to_first", "drift_sim_slope", "drift_wer_slope")



# --------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------

# A clip whose loudest 20 ms frame is under this level holds no audible speech: speech peaks at -30 to -6 dBFS (the
# shared voice prompts' loudest frames: -12.5 to -6.1), a quiet room's floor sits near -60; digital silence reads -200.
SILENT_DBFS = -40.0
# Letters and digits per second that no speech reaches: fast read speech runs 15-20. A clip shorter than its
# text at this rate is far shorter than the text needs (cut off, or most words skipped); segment.py's
# implausible-rate filter uses the same bound.
MAX_CHARS_PER_SECOND = 30.0
FAILURES = ("fail_runaway", "fail_silent", "fail_short", "fail_clamped")
FAILURE_NAMES = {"fail_runaway": "ran to the length limit without ending", "fail_silent": "silent",
                 "fail_short": "far shorter than the text needs", "fail_clamped": "codes clamped before decoding"}


def text_characters(text: str) -> int:
    """Letters and digits of a text: what its speaking time grows with."""
    return sum(character.isalnum() for character in text)


def failure_flags(scores: ClipScores | None, text: str, stopped: bool | None, clamped: int | None) -> dict:
    """The generated clip's failures, each True/False, or None where it cannot be told (no clip, or a clone that
    did not say): `fail_runaway` (the length limit ended it, not the model), `fail_silent` (loudest 20 ms frame
    under SILENT_DBFS), `fail_short` (under `text_characters / MAX_CHARS_PER_SECOND` seconds), `fail_clamped`
    (codes outside the codebook clamped before decoding); `fail_any`, any of them."""
    if scores is None:
        return dict.fromkeys(FAILURES + ("fail_any",))
    flags = {"fail_runaway": None if stopped is None else not stopped,
             "fail_silent": None if scores.peak_dbfs is None else scores.peak_dbfs < SILENT_DBFS,
             "fail_short": scores.seconds < text_characters(text) / MAX_CHARS_PER_SECOND,
             "fail_clamped": None if clamped is None else clamped > 0}
    flags["fail_any"] = any(flags.values())
    return flags


def failure_rates(records: list[dict]) -> dict[str, dict]:
    """Each failure's count over the generated clips that could tell it, and its rate (None without any)."""
    rates = {}
    for name in FAILURES + ("fail_any",):
        told = [record[name] for record in records if record.get(name) is not None and record.get(name) != ""]
        count = sum(bool(flag) for flag in told)
        rates[name] = {"n": len(told), "count": count, "rate": count / len(told) if told else None}
    return rates


def format_failures(rates: dict[str, dict]) -> str:
    """The failure counts as one printed line."""
    shown = [f"{FAILURE_NAMES[name]} {rates[name]['count']}" for name in FAILURES]
    return f"failures of {rates['fail_any']['n']} clips: " + ", ".join(shown) + f"; any {rates['fail_any']['count']}"


def row_record(row_id: str, language: str | None, text: str, generated: ClipScores | None, stopped: bool | None,
               target: ClipScores | None, error: str | None = None, clamped: int | None = None,
               drift: dict | None = None) -> dict:
    """One flat row of the per-row table: the generated clip's values and the real target's (`target_*`), the
    generated clip's failure flags (`clamped`: its codes clamped before decoding, None where unknown), the
    text's words (or characters) for the corpus rate, the Seed-TTS-eval per-utterance WER of both clips, and the
    drift columns of a row spoken in chunks."""
    kind = error_kind(language)
    record = {"id": row_id, "language": language or "", "metric": kind, "text": text, "stopped": stopped}
    for prefix, scores in (("", generated), ("target_", target)):
        values = asdict(scores) if scores else dict.fromkeys(CLIP_FIELDS)
        record.update({prefix + name: value for name, value in values.items()})
    record["duration_ratio"] = duration_ratio(generated.seconds, target.seconds if target else None) if generated else None
    record.update(failure_flags(generated, text, stopped, clamped))
    record["words"] = reference_units(text, language)
    for prefix, scores in (("", generated), ("target_", target)):
        transcript = scores.transcript if scores else None
        record[f"{prefix}wer_seedtts"] = None if transcript is None else seedtts.utterance_wer(text, transcript, language)
    record.update({column: (drift or {}).get(column) for column in DRIFT_COLUMNS})
    record["error"] = error or ""
    return record


CLIP_FIELDS = tuple(field.name for field in fields(ClipScores))
RECORD_COLUMNS = tuple(row_record("", None, "a", None, None, None))


# --------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------

SUMMARY_COLUMNS = ("sim", "error_rate", "mos", "duration_ratio", "stopped", "lead_silence", "trail_silence",
                   "target_sim", "target_error_rate", "target_mos") + FAILURES + ("fail_any",)
# The generated clips' per-row metrics (summary.png's panels, --compare's rows); `target_NAME` is NAME's reference point.
ROW_METRICS = tuple(column for column in SUMMARY_COLUMNS if not column.startswith("target_"))
# Which way a metric gets better; `near 1` is judged by the distance from 1. A metric not named here is compared
# without a direction (its verdict is `differs`, never better or worse).
BETTER = {"sim": "higher", "error_rate": "lower", "mos": "higher", "duration_ratio": "near 1", "stopped": "higher",
          "lead_silence": "lower", "trail_silence": "lower", "wer_seedtts": "lower"} | dict.fromkeys(FAILURES + ("fail_any",), "lower")


def present_values(values) -> np.ndarray:
    """The values that are there, as float64: None, "" (n/a in rows.csv) and NaN left out; booleans as 0 or 1."""
    kept = [float(v) for v in values if v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))]
    return np.array(kept, dtype=np.float64)


def expanded_tail(n: int) -> float:
    """The lower percentile (in %) of the expanded percentile bootstrap (Hesterberg 2015, "What teachers should know
    about the bootstrap", sec. 5.3): Phi(-sqrt(n / (n - 1)) t(n - 1, 0.975)) in place of 2.5, so that a 95% interval
    of a mean over few rows covers nearly 95% (the plain percentile interval is too narrow below some 40 rows)."""
    from scipy.stats import norm, t

    return 100 * float(norm.cdf(-math.sqrt(n / (n - 1)) * t.ppf(0.975, n - 1))) if n > 1 else 2.5


def summarize(values, seed: int = 0, resamples: int = 1000, expanded: bool = False) -> dict:
    """n, mean, median and a percentile-bootstrap 95% interval of the mean (`expanded`: the expanded percentile
    interval, `expanded_tail`); unavailable values left out."""
    numbers = present_values(values)
    if len(numbers) == 0:
        return {"n": 0, "mean": None, "median": None, "ci95": [None, None]}
    rng = np.random.default_rng(seed)
    means = numbers[rng.integers(0, len(numbers), size=(resamples, len(numbers)))].mean(axis=1)
    tail = expanded_tail(len(numbers)) if expanded else 2.5
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"n": int(len(numbers)), "mean": float(numbers.mean()), "median": float(np.median(numbers)),
            "ci95": [float(low), float(high)]}


# Fewer matched rows get no verdict: when every row's B - A has one sign (a chance of 2 / 2^n with no real difference,
# 6.25% at 5 rows, 50% at 2) the percentile interval lies within their range and excludes 0 whatever the noise.
MIN_VERDICT_ROWS = 6


def paired_difference(a_values, b_values, better: str | None, seed: int = 0, resamples: int = 4000) -> dict:
    """B - A over the rows (in the same order) where both have a value: `summarize` of the per-row differences (its
    bootstrap resamples rows, so the interval is paired; the expanded percentile interval, so that a verdict on a
    short list is not given more often than 5% of the time when nothing changed), the share of rows that improved and that worsened, and a
    verdict only where the 95% interval excludes 0 over at least MIN_VERDICT_ROWS rows. A `near 1` metric is compared by the distance from 1
    (|B - 1| - |A - 1|); a metric without a direction by B - A with the verdict `differs`."""
    both = np.array([(float(a), float(b)) for a, b in zip(a_values, b_values) if present_values([a]).size and present_values([b]).size],
                    dtype=np.float64).reshape(-1, 2)
    a, b = both[:, 0], both[:, 1]
    if better == "near 1":
        a, b = np.abs(a - 1), np.abs(b - 1)
    difference = b - a
    stats = summarize(difference, seed, resamples, expanded=True)
    sign = {"higher": 1.0, "lower": -1.0, "near 1": -1.0}.get(better)
    gain = difference * (sign or 1.0)
    low, high = stats["ci95"]
    if not stats["n"]:
        verdict = "n/a"
    elif stats["n"] < MIN_VERDICT_ROWS:
        verdict = "too few rows"
    elif not (low > 0 or high < 0):
        verdict = "no clear difference"
    elif sign is None:
        verdict = "differs"
    else:
        verdict = "better" if gain.mean() > 0 else "worse"
    return {**stats, "better": better, "a_mean": float(a.mean()) if len(a) else None,
            "b_mean": float(b.mean()) if len(b) else None,
            "improved": float((gain > 0).mean()) if len(a) and sign else None,
            "worsened": float((gain < 0).mean()) if len(a) and sign else None, "verdict": verdict}


def summarize_records(records: list[dict], seed: int = 0) -> dict[str, dict]:
    """`summarize` of each summary column over the rows (`stopped` becomes the stop rate)."""
    return {column: summarize([record[column] for record in records], seed) for column in SUMMARY_COLUMNS}


def corpus_error_rate(records: list[dict], prefix: str = "") -> dict:
    """Errors summed over the rows with a rate, over their words summed (a long row weighs more than in the mean
    of rates): rows, words and the rate (None without any)."""
    scored = [record for record in records if present_values([record[f"{prefix}error_rate"]]).size and record["words"]]
    words = sum(int(record["words"]) for record in scored)
    errors = sum(float(record[f"{prefix}error_rate"]) * int(record["words"]) for record in scored)
    return {"n": len(scored), "words": words, "rate": errors / words if words else None}


def fmt(value, digits: int = 3) -> str:
    """A number for a table; unavailable is `n/a`, never 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_summary(summary: dict[str, dict]) -> str:
    """The summary as a text table whose columns line up whatever the lengths of the names and counts."""
    name_width = max([len("metric")] + [len(name) for name in summary]) + 2
    count_width = max([len("n")] + [len(str(stats["n"])) for stats in summary.values()]) + 2
    lines = [f"{'metric':<{name_width}}{'n':>{count_width}}{'mean':>9}{'median':>9}   95% CI"]
    for name, stats in summary.items():
        low, high = stats["ci95"]
        interval = f"[{fmt(low)}, {fmt(high)}]" if stats["n"] else "n/a"
        lines.append(f"{name:<{name_width}}{stats['n']:>{count_width}}{fmt(stats['mean']):>9}{fmt(stats['median']):>9}   {interval}")
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    """Per-row values and transcripts as a Markdown table (TensorBoard's text panel renders it)."""
    header = ("| id | SIM | WER/CER | MOS | duration ratio | stopped | failures | transcript | target SIM | target WER/CER "
              "| target MOS | target transcript |")
    lines = [header, "|" + "---|" * 12]
    for r in records:
        failed = ", ".join(name.removeprefix("fail_") for name in FAILURES if r.get(name)) or ("none" if r.get("fail_any") is not None else "n/a")
        cells = [r["id"], fmt(r["sim"]), f"{fmt(r['error_rate'])} ({r['metric']})", fmt(r["mos"]), fmt(r["duration_ratio"]),
                 fmt(r["stopped"]), failed, f"no audio: {r['error']}" if r["error"] else _or_na(r["transcript"]),
                 fmt(r["target_sim"]), fmt(r["target_error_rate"]), fmt(r["target_mos"]),
                 _or_na(r["target_transcript"])]
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def _or_na(text: str | None) -> str:
    return "n/a" if text is None else text
