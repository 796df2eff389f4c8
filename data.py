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
mono or multi-channel) to mono float32 at the audio tokenizer's rate.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

SYSTEM_INSTRUCTION = "Generate audio following instruction."
GENERATION_PREFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Text that spells a control token (<|eot_id|>, <|AUDIO_OUT|>, ...) would be
# tokenised into the real token by prepare_chatml_sample.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000


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
_EVENT_TAGS = {
    "[laugh]": "<SE>[Laughter]</SE>",
    "[humming start]": "<SE>[Humming]</SE>",
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


# --------------------------------------------------------------------------
# The sample builder
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLayout:
    """Where the reference clip goes: an assistant turn (default) or the system message."""

    ref_in_system: bool = False
    scene: str | None = None


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
    text = normalize_text(text)
    if not text:
        raise ValueError("the text to speak is empty")
    if not ref_in_system:
        ref_text = (ref_text or "").strip()
        if not ref_text:
            raise ValueError("the reference transcript is empty")
    for name, value in (("text", text), ("reference transcript", ref_text or ""), ("scene", scene or "")):
        control = _CONTROL_TOKEN.search(value)
        if control:
            raise ValueError(f"the {name} contains the control token {control.group()}, which would become a real one")
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
# Manifests and training pairs
# --------------------------------------------------------------------------

SPEAKER_FIELDS = ("id", "audio", "text", "speaker")
PAIRED_FIELDS = ("id", "ref_audio", "ref_text", "audio", "text")


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message names the file and row."""


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a JSONL manifest, audio paths made absolute (relative to the manifest's folder).

    Each row is either speaker-grouped (`id, audio, text, speaker`) or paired
    (`id, ref_audio, ref_text, audio, text`); optional `scene`, `language`.
    A malformed row or a duplicate id is a `ManifestError` naming the row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such manifest: {path}")
    rows, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        fields = PAIRED_FIELDS if "ref_audio" in row else SPEAKER_FIELDS
        missing = [name for name in fields if not str(row.get(name, "")).strip()]
        if missing:
            raise ManifestError(f"{path}:{number}: missing or empty {', '.join(missing)}")
        if row["id"] in seen:
            raise ManifestError(f"{path}:{number}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        for key in ("audio", "ref_audio"):
            if key in row:
                row[key] = str((path.parent / row[key]).resolve())
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class Pair:
    """One training example: speak `target`'s text in `reference`'s voice."""

    id: str
    ref_audio: str
    ref_text: str
    audio: str
    text: str
    scene: str | None = None


def training_pairs(rows: list[dict], seed: int, epoch: int) -> tuple[list[Pair], list[str]]:
    """This epoch's pairs, and the ids left out because their speaker has no other utterance.

    Speaker-grouped rows take as reference a different utterance of the same
    speaker, drawn anew each epoch and deterministically from (seed, epoch);
    paired rows keep their own reference.
    """
    rng = random.Random(seed * 100_003 + epoch)
    by_speaker: dict[str, list[dict]] = {}
    for row in rows:
        if "speaker" in row and "ref_audio" not in row:
            by_speaker.setdefault(row["speaker"], []).append(row)
    pairs, lonely = [], []
    for row in rows:
        if "ref_audio" in row:
            pairs.append(Pair(row["id"], row["ref_audio"], row["ref_text"], row["audio"], row["text"], row.get("scene")))
            continue
        others = [other for other in by_speaker[row["speaker"]] if other["id"] != row["id"]]
        if not others:
            lonely.append(row["id"])
            continue
        ref = rng.choice(others)
        pairs.append(Pair(row["id"], ref["audio"], ref["text"], row["audio"], row["text"], row.get("scene")))
    return pairs, lonely


class CodeCache:
    """Audio codes by file, each clip encoded once per process (a clip may serve as reference and target)."""

    def __init__(self, audio_tokenizer):
        self.audio_tokenizer = audio_tokenizer
        self.codes: dict[str, torch.Tensor] = {}

    def __call__(self, path: str) -> torch.Tensor:
        if path not in self.codes:
            rate = self.audio_tokenizer.sampling_rate
            with torch.no_grad():
                self.codes[path] = self.audio_tokenizer.encode(load_audio(path, rate), rate).cpu()
        return self.codes[path]


def pair_to_sample(pair: Pair, tokenizer, codes: CodeCache, ref_in_system: bool = False, whisper: bool = False) -> ChatMLDatasetSample:
    """A training sample for one pair, through the shared builder.

    `whisper`: the model turns the system-message reference into Whisper
    features too, so the sample carries the reference waveform.
    """
    rate = codes.audio_tokenizer.sampling_rate
    waveform = load_audio(pair.ref_audio, rate) if whisper and ref_in_system else None
    return build_sample(
        tokenizer, pair.ref_text, codes(pair.ref_audio), pair.text, target_codes=codes(pair.audio),
        scene=pair.scene, ref_in_system=ref_in_system, ref_waveform=waveform, sample_rate=rate,
    )
