"""Turns files into samples.

This module owns the one sample builder, `build_sample`, that training and
inference both call: with target codes it returns a training sample (only the
final assistant audio turn carries labels), without them the inference
prompt, which is exactly the training sample's input up to the point where
generation starts; a chunk of a long text (longform.py) is the same prompt
with the chunks said before it as context turns (`ContextTurn`). The prompt
layouts are those of the package's official voice-cloning example
(`examples/generation.py: prepare_generation_context` in boson-ai/higgs-audio), and the text normalisation that example applies before
generation is applied here, so training text is normalised as inference text.

It holds the one table of limits (`LIMITS`: sample rates, reference and clip
lengths, text length) that the manifest check, the segmenter and infer.py
read. It also loads audio: any WAV/FLAC (8 to 48 kHz, 16/24/32-bit int or float,
mono or multi-channel) to mono float32 at the audio tokenizer's rate
(`load_clip` first refuses a WAV cut short and more than MAX_CHANNELS
channels), and encodes a clip into audio codes (`encode_clip`). A manifest's
rows are `manifest.py`'s; the prepare step that caches audio codes is
`prepare.py`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

import collate
import files

SYSTEM_INSTRUCTION = "Generate audio following instruction."
GENERATION_PREFIX = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Text that spells a control token (<|eot_id|>, <|AUDIO_OUT|>, ...) would be
# tokenised into the real token by prepare_chatml_sample.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class Limits:
    """The one table of what a clip and a text may be, wherever they come in: the manifest check (prepare,
    training, `--eval`), the importers and the segmenter, and infer.py. Filters (`prepare --max-seconds`, ...)
    may narrow these, never widen them."""

    min_sample_rate: int = 8000
    max_sample_rate: int = 48000
    # A voice prompt: under a second carries little of the voice; over 30 s is past what the collator's Whisper
    # path handles and far past the voice prompts of the official examples (seconds).
    min_reference_seconds: float = 1.0
    max_reference_seconds: float = collate.WHISPER_MAX_SECONDS
    # A clip to speak: the audio tokenizer's convolutions need about 0.03 s (shorter is a RuntimeError inside
    # the package), and 0.1 s holds no word; 60 s is about what the longest text below takes to say.
    min_target_seconds: float = 0.1
    max_target_seconds: float = 60.0
    # Longer transcripts are mis-segmentations: 30 s of speech is ~500 characters.
    max_text_chars: int = 1000

    def reference_fits(self, seconds: float) -> bool:
        return self.min_reference_seconds <= seconds <= self.max_reference_seconds

    def reference_range(self) -> str:
        return f"{self.min_reference_seconds:g} to {self.max_reference_seconds:g} s"


LIMITS = Limits()


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
    if not LIMITS.min_sample_rate <= rate <= LIMITS.max_sample_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz is outside {LIMITS.min_sample_rate}-{LIMITS.max_sample_rate} Hz")
    return to_model_rate(samples.mean(axis=1), rate, target_rate, str(path))


def check_reference_seconds(seconds: float, name: str) -> None:
    """A reference clip outside the reference limits of `LIMITS` is an `AudioError` naming it."""
    if not LIMITS.reference_fits(seconds):
        raise AudioError(f"{name}: the reference lasts {seconds:.2f} s; a voice prompt must last {LIMITS.reference_range()}")


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


# Up to 7.1 surround is one performance and is averaged to mono; more channels
# come from multitrack or microphone-array recordings, whose average is not one voice.
MAX_CHANNELS = 8


def load_clip(path: str | Path, rate: int) -> np.ndarray:
    """`load_audio`, refusing first what it would turn into a wrong clip without complaint.

    libsndfile reads a WAV cut short (a copy interrupted mid-file) as a
    shorter clip, and `load_audio` averages any number of channels.
    """
    path = Path(path)
    if path.is_file():
        _check_container(path)
    samples = load_audio(path, rate)
    if len(samples) < LIMITS.min_target_seconds * rate:
        raise AudioError(f"{path}: lasts {len(samples) / rate:.3f} s, shorter than the {LIMITS.min_target_seconds:g} s "
                         "any clip must last")
    return samples


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


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: a clip's identity whatever its path (the cache's keys, train/val overlap)."""
    if not Path(path).is_file():
        raise AudioError(f"{path}: no such audio file")
    return files.sha256(path)


def encode_clip(audio_tokenizer, waveform: np.ndarray) -> torch.Tensor:
    """Codes (codebooks, frames) of a clip at the tokenizer's rate, on the CPU.

    One clip per forward pass: the package's encoder has no batch path for
    clips of different lengths (its frame-alignment fallback assumes a batch
    of one, and HuBERT gets no attention mask, so zero padding changes the
    codes of the shorter clip: 1.3% of them for two demo clips).
    """
    with torch.no_grad():
        return audio_tokenizer.encode(waveform, audio_tokenizer.sampling_rate).cpu().long()


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
    files.write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
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


@dataclass(frozen=True)
class ContextTurn:
    """A chunk generated before, given back as context: its text (a user turn) and raw codes (an assistant turn)."""

    text: str
    codes: torch.Tensor


def build_messages(ref_text: str | None, text: str, layout: PromptLayout, context_texts: tuple[str, ...] = ()) -> list[Message]:
    """The message list of the official example, up to and including the user turn with `text`; each context
    text (a chunk said before) comes before it as a user turn answered by an assistant audio turn."""
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
    for context_text in context_texts:
        messages += [Message("user", context_text), Message("assistant", AudioContent(audio_url=""))]
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
    layout: PromptLayout = PromptLayout(),
    ref_waveform: np.ndarray | torch.Tensor | None = None,
    sample_rate: int | None = None,
    context: tuple[ContextTurn, ...] = (),
) -> ChatMLDatasetSample:
    """The one builder of training samples and inference prompts.

    `ref_codes` and `target_codes` are raw audio-tokenizer codes (n_q, T); the
    collator adds stream BOS/EOS and the delay pattern. With `target_codes`
    the final assistant turn holds the target clip and is the only labelled
    turn (`start_index` points at it, so the reference clip is never a
    target); without, the prompt ends with the assistant header where
    generation starts. `layout.ref_in_system` puts the reference in the
    system message (as `<|AUDIO|>`, no transcript turn); pass `ref_waveform`
    at `sample_rate` there when the model uses Whisper features. `context`:
    the chunks of a long text said before this one (longform.py), each a user
    turn with its text and an assistant turn with its codes between the
    reference and `text`, as upstream's generation script chains its chunks;
    none gives every other sample, unchanged.
    """
    ref_text, text = prompt_texts(ref_text, text, layout)
    context_texts = tuple(prompt_texts(ref_text, turn.text, layout)[1] for turn in context)
    messages = build_messages(ref_text, text, layout, context_texts)
    clips = [_check_codes(ref_codes, "reference")] + [_check_codes(turn.codes, f"context chunk {index}")
                                                       for index, turn in enumerate(context)]
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
    waveform, waveform_start, rates = _reference_waveform(ref_waveform, sample_rate, layout.ref_in_system)
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


def prompt_texts(ref_text: str | None, text: str, layout: PromptLayout) -> tuple[str | None, str]:
    """The reference transcript (stripped) and the text to speak (normalised) as a prompt holds them, checked:
    something to speak, a transcript unless the reference is in the system message, no spelled control token."""
    text = normalize_text(text)
    if not text:
        raise ValueError("the text to speak is empty")
    if not is_speakable(text):
        raise ValueError(f"the text to speak has no letter or digit once normalised ({text!r})")
    if not layout.ref_in_system:
        ref_text = (ref_text or "").strip()
        if not ref_text:
            raise ValueError("the reference transcript is empty")
    for name, value in (("text", text), ("reference transcript", ref_text or ""), ("scene", layout.scene or "")):
        control = CONTROL_TOKEN.search(value)
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

