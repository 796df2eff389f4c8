"""Generation of a cloned clip, and the prompt it is generated from.

This module owns:

- cloning: `encode_reference` turns a reference clip into codes, `clone` builds
  the prompt with `data.build_sample` (the one sample builder, `build_prompt`)
  and `collate.build_collator` (the one collator), runs the package's
  `generate` (`Sampling`, `ForceTokens`, `STOP_STRINGS`, a frame budget that
  `--max-seconds` bounds: `max_new_tokens`), reverts the delay pattern and
  decodes the codes with the audio tokenizer (`audio_sequence_to_codes`,
  `stream_ended`, `decode_codes`);
- the serve engine's speed on a GPU: its static KV-cache buckets and CUDA
  graphs, through the package's own arguments (`StaticCacheBuckets`);
- the prompt layout a model was trained with: `resolve_layout` reads the
  `prompt_layout.json` an export records and weighs explicit choices against it;
- the package's `HiggsAudioServeEngine` prompted as training prompts
  (`align_serve_engine`, `serve_engine_sample`).

Many clips per decoding step are batched_generation.py's. The command line is
infer.py; parity.py proves this prompts as training does; evaluate.py judges
the clones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import StaticCache

import collate
import data
import model_utils

STOP_STRINGS = ["<|end_of_text|>", "<|eot_id|>"]
FRAMES_PER_SECOND = 25


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


@dataclass
class Sampling:
    """How the next audio column is drawn.

    The defaults are those of `HiggsAudioServeEngine.generate` in the
    installed package: temperature 0.7, no top-k, top-p 0.95, a
    repetition-aware sampling window of 7 with at most 2 repeats.
    """

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float = 0.95
    ras_win_len: int | None = 7
    ras_win_max_num_repeat: int = 2
    greedy: bool = False
    seed: int | None = 0
    max_seconds: float = 20.0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            # Repetition-aware sampling resamples with multinomial even when
            # greedy, so it is off for exact, repeatable decoding.
            return dict(do_sample=False, ras_win_len=None)
        return dict(
            do_sample=True,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            ras_win_len=self.ras_win_len,
            ras_win_max_num_repeat=self.ras_win_max_num_repeat,
        )


class ForceTokens(LogitsProcessor):
    """Forces generation along given text tokens and audio columns, one per step.

    The package calls logits processors with `input_ids=None` for an audio
    step and with the ids for a text step, so the two queues are told apart
    by that. A queue that runs dry leaves the scores untouched.
    """

    def __init__(self, text_tokens: list[int], audio_columns: torch.Tensor | None = None):
        self.text_tokens = list(text_tokens)
        self.audio_columns = [] if audio_columns is None else list(audio_columns.T)

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        queue = self.text_tokens if input_ids is not None else self.audio_columns
        if not queue:
            return scores
        forced = torch.as_tensor(queue.pop(0), device=scores.device).reshape(-1, 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, forced.expand(scores.shape[0], 1), 0.0)


def max_frames(max_seconds: float) -> int:
    """Frames of audio (25 a second) that fit in `max_seconds` (infer.py refuses a limit under one frame)."""
    return math.floor(max_seconds * FRAMES_PER_SECOND + 1e-9)


def max_new_tokens(config, max_seconds: float) -> int:
    """Generation steps that produce at most `max_frames(max_seconds)` frames once the delay pattern is reverted.

    With `<|audio_out_bos|>` forced, one step emits it, one the all-BOS column,
    then one step per delayed column; a clip of F frames spans F + n_q - 1
    delayed columns, so F frames take F + n_q + 1 steps (F + 2 without the
    delay pattern). The old budget, frames + n_q + 8, let `--max-seconds 1`
    run to 1.28 s.
    """
    tail = config.audio_num_codebooks - 1 if config.use_delay_pattern else 0
    return max_frames(max_seconds) + tail + 2


def generate(bundle: model_utils.Bundle, batch_inputs: dict, sampling: Sampling, processors=(),
             kv_cache: StaticCacheBuckets | None = None, **extra):
    """The package's `generate` on one collated prompt, with the stop strings it expects; `kv_cache`: the serve
    engine's static buckets (and CUDA graphs) instead of the dynamic cache."""
    if kv_cache is not None:
        extra = {**extra, **kv_cache.generate_kwargs()}
    return bundle.model.generate(
        **batch_inputs,
        max_new_tokens=max_new_tokens(bundle.model.config, sampling.max_seconds),
        use_cache=True,
        stop_strings=STOP_STRINGS,
        tokenizer=bundle.tokenizer,
        seed=sampling.seed,
        logits_processor=LogitsProcessorList(processors),
        **sampling.generate_kwargs(),
        **extra,
    )


def audio_sequence_to_codes(sequence: torch.Tensor, codebook_size: int, use_delay_pattern: bool) -> torch.Tensor:
    """A generated audio stream (BOS column, codes, EOS tail) as raw codes (n_q, T).

    An unfinished stream (stopped by the length limit) keeps all its complete
    frames. Codes outside the codebook inside the clip are clamped as the
    package's serve engine does, but reported, never silently.
    """
    codes = unclamped_codes(sequence, codebook_size, use_delay_pattern)
    stray = out_of_codebook(codes, codebook_size)
    if stray:
        print(f"warning: {stray} generated codes outside 0..{codebook_size - 1} clamped before decoding", file=sys.stderr)
    if not stream_ended(sequence, codebook_size, use_delay_pattern):
        print("warning: the clip reached --max-seconds before the model ended it", file=sys.stderr)
    return codes.clamp(0, codebook_size - 1)


def unclamped_codes(sequence: torch.Tensor, codebook_size: int, use_delay_pattern: bool) -> torch.Tensor:
    """The stream's frames (n_q, T), BOS column and EOS tail removed, as generated (before any clamping)."""
    all_eos = bool((sequence[:, -1] == codebook_size + 1).all())
    codes = revert_delay_pattern(sequence) if use_delay_pattern else sequence
    return codes[:, 1:-1] if all_eos else codes[:, 1:]


def out_of_codebook(codes: torch.Tensor, codebook_size: int) -> int:
    """How many codes lie outside 0..codebook_size-1 (what decoding must clamp)."""
    return int(((codes < 0) | (codes >= codebook_size)).sum())


def stream_ended(sequence: torch.Tensor, codebook_size: int, use_delay_pattern: bool) -> bool:
    """Whether the model ended the audio stream itself, rather than the length limit.

    With the delay pattern the package's `generate` stops one column short of
    the all-EOS one (it emits `<|audio_eos|>` instead of appending it), so a
    stream it ended has EOS in every codebook but the last in its final column.
    """
    eos = codebook_size + 1
    last = sequence[:-1, -1] if use_delay_pattern else sequence[:, -1]
    return bool((last == eos).all())


@dataclass
class Reference:
    """A reference clip as the builder wants it: transcript, codes, and the waveform when Whisper needs it."""

    text: str
    codes: torch.Tensor
    waveform: np.ndarray | None
    sample_rate: int


def encode_reference(bundle: model_utils.Bundle, audio_path: str, text: str, ref_in_system: bool) -> Reference:
    rate = bundle.audio_tokenizer.sampling_rate
    waveform = data.load_audio(audio_path, rate)
    data.check_reference_seconds(len(waveform) / rate, audio_path)
    codes = data.encode_clip(bundle.audio_tokenizer, waveform)
    needs_waveform = ref_in_system and collate.uses_whisper(bundle.model.config)
    return Reference(text, codes, waveform if needs_waveform else None, rate)


@dataclass
class Clone:
    """A generated clip, and whether the model ended it itself (rather than the length limit); or a clone that
    yielded no clip: its `error`, the reason, and no waveform (a list of clones goes on past one that failed);
    `clamped`: its codes outside the codebook, clamped before decoding (None where not counted)."""

    waveform: np.ndarray | None
    stopped: bool = False
    error: str | None = None
    codes: torch.Tensor | None = None  # the clip's raw codes (n_q, T): a long text's next chunks take them as context
    clamped: int | None = None


def build_prompt(bundle: model_utils.Bundle, reference: Reference, text: str, scene: str | None = None,
                 ref_in_system: bool = False, context: tuple[data.ContextTurn, ...] = ()) -> ChatMLDatasetSample:
    """The generation prompt for `text` in the reference's voice (after the chunks of `context`), by the one
    sample builder."""
    return data.build_sample(
        bundle.tokenizer, reference.text, reference.codes, text, layout=data.PromptLayout(ref_in_system, scene),
        ref_waveform=reference.waveform, sample_rate=reference.sample_rate, context=context,
    )


def clone(
    bundle: model_utils.Bundle,
    reference: Reference,
    text: str,
    sampling: Sampling,
    scene: str | None = None,
    ref_in_system: bool = False,
    force_audio: bool = True,
    kv_cache: StaticCacheBuckets | None = None,
    context: tuple[data.ContextTurn, ...] = (),
) -> Clone:
    """Speak `text` in the reference voice (after the chunks of `context`): a waveform at the audio tokenizer's
    rate, and whether the audio stream ended with EOS before `sampling.max_seconds`."""
    config = bundle.model.config
    collator = collate.build_collator(config, collate.whisper_features(config))
    prompt = build_prompt(bundle, reference, text, scene, ref_in_system, context)
    device = next(bundle.model.parameters()).device
    inputs = collate.batch_to_model_inputs(collate.collate(collator, [prompt], config.audio_codebook_size), device)
    # The target turn always opens with <|audio_out_bos|>; forcing it (as the
    # serve engine's force_audio_gen does) keeps the prompt itself unchanged.
    processors = [ForceTokens([config.audio_out_bos_token_id])] if force_audio else []
    with torch.inference_mode():
        _, audio_sequences = generate(bundle, inputs, sampling, processors, kv_cache)
    if not audio_sequences:
        raise RuntimeError("the model produced no audio (it answered in text); leave out --no-force-audio")
    return clip_from_stream(bundle, audio_sequences[0])


def clip_from_stream(bundle: model_utils.Bundle, sequence: torch.Tensor) -> Clone:
    """A generated audio stream (as `generate` returns it) decoded into a clip; a stream without a frame is an error."""
    config = bundle.model.config
    sequence = sequence.cpu()
    stopped = stream_ended(sequence, config.audio_codebook_size, config.use_delay_pattern)
    clamped = out_of_codebook(unclamped_codes(sequence, config.audio_codebook_size, config.use_delay_pattern),
                              config.audio_codebook_size)
    codes = audio_sequence_to_codes(sequence, config.audio_codebook_size, config.use_delay_pattern)
    if codes.shape[1] == 0:
        raise RuntimeError("the model ended the clip before producing any frame")
    return Clone(decode_codes(bundle, codes), stopped, codes=codes, clamped=clamped)


def decode_codes(bundle: model_utils.Bundle, codes: torch.Tensor) -> np.ndarray:
    """Raw codes (n_q, T) as a float32 waveform at the audio tokenizer's rate."""
    device = next(bundle.model.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, enabled=False):  # the audio tokenizer decodes in its own fp32, under a caller's autocast too
        waveform = bundle.audio_tokenizer.decode(codes.unsqueeze(0).to(device))[0, 0]
    return np.asarray(waveform, dtype=np.float32)


# --------------------------------------------------------------------------
# The serve engine's speed on a GPU: static KV-cache buckets and CUDA graphs
# --------------------------------------------------------------------------

# The serve engine's default bucket lengths (HiggsAudioServeEngine's kv_cache_lengths).
KV_CACHE_LENGTHS = (1024, 4096, 8192)


class StaticCacheBuckets:
    """The package's static KV caches, one per length, that its `generate` picks from (`past_key_values_buckets`).

    As `HiggsAudioServeEngine` builds them: batch size 1, one cache layer per
    decoder layer and per dual-FFN layer, the model's dtype; with
    `capture_graphs` (CUDA only) the model's decoding steps are captured as
    CUDA graphs once, bound to these caches, so the same caches are reset and
    reused for every clip. A prompt plus clip longer than the largest bucket
    is the package's error naming the lengths.
    """

    def __init__(self, model, lengths: tuple[int, ...] = KV_CACHE_LENGTHS, capture_graphs: bool = False):
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        if capture_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        cache_config = copy.deepcopy(model.config.text_config)
        cache_config.num_hidden_layers += len(model.config.audio_dual_ffn_layers or ())
        self.caches = OrderedDict(
            (length, StaticCache(config=cache_config, batch_size=1, max_cache_len=length, device=device, dtype=dtype))
            for length in sorted(lengths)
        )
        if capture_graphs:
            # capture_model builds its dummy inputs in config.torch_dtype, which a model cast after loading (the
            # tiny preset) does not update.
            model.config.torch_dtype = dtype
            model.capture_model(self.caches.values())

    def generate_kwargs(self) -> dict:
        """`generate`'s arguments, the caches emptied of the previous clip."""
        for cache in self.caches.values():
            cache.reset()
        return {"past_key_values_buckets": self.caches}


# --------------------------------------------------------------------------
# The prompt layout a model was trained with
# --------------------------------------------------------------------------


def describe_layout(layout: data.PromptLayout) -> str:
    placement = "reference in the system message" if layout.ref_in_system else "reference as an assistant turn"
    return f"{placement}, " + (f"scene {layout.scene!r}" if layout.scene else "no scene")


def resolve_layout(
    model: str, ref_in_system: bool | None = None, scene: str | None = None, override: bool = False,
    recorded: data.RecordedLayout | None = None,
) -> data.PromptLayout:
    """The layout to prompt `model` with: the one it was trained with, else the flags'.

    The trained layout is `recorded` when given (a checkpoint's, from its
    config; `model` then names the checkpoint), else the one the export
    recorded (`prompt_layout.json`). `ref_in_system` and `scene` are
    explicit choices, None where not given (a scene of '' asks for none).
    One that contradicts the record is an error unless `override`, then a
    warning. A record in use is announced in one line; a record of another
    text normalisation than this code's is warned about, since the old one
    cannot be reproduced.
    """
    wanted_scene = None if scene is None else (scene.strip() or None)
    path = f"{model}'s training settings" if recorded else Path(model) / data.PROMPT_LAYOUT_FILE
    if recorded is None and Path(model).is_dir():
        recorded = data.read_prompt_layout(model)
    if recorded is None:
        return data.PromptLayout(bool(ref_in_system), wanted_scene)
    trained = recorded.layout
    conflicts = []
    if ref_in_system is not None and ref_in_system != trained.ref_in_system:
        conflicts.append("--ref-in-system" if ref_in_system else "--no-ref-in-system")
    if scene is not None and wanted_scene != trained.scene:
        conflicts.append(f"--scene {scene!r}")
    if conflicts and not override:
        raise ValueError(f"{' and '.join(conflicts)} contradicts {path} (trained with {describe_layout(trained)}); "
                         "leave the flag out, or add --layout-override to prompt the model so anyway")
    layout = data.PromptLayout(trained.ref_in_system if ref_in_system is None else ref_in_system,
                               trained.scene if scene is None else wanted_scene)
    if conflicts:
        print(f"warning: --layout-override: prompting with {describe_layout(layout)}, "
              f"although the model was trained with {describe_layout(trained)}", file=sys.stderr)
    else:
        print(f"layout: {describe_layout(layout)}, from {path}")
    if recorded.normalization != data.normalization_version():
        print(f"warning: {path}: the model was trained with text normalisation {recorded.normalization}, this code's is "
              f"{data.normalization_version()}: texts with event tags or Chinese punctuation are prompted unlike training",
              file=sys.stderr)
    return layout


# --------------------------------------------------------------------------
# The package's HiggsAudioServeEngine, prompted as training prompts
# --------------------------------------------------------------------------
#
# The engine departs from training in three ways, which these two functions
# undo without patching the package: it builds its collator with
# `return_audio_in_tokens=False` (a reference in the system message then
# enters without its codes, so the merged sequence differs), it does not
# normalise text, and the official example puts a scene in its prompts by default.


def align_serve_engine(engine) -> None:
    """Give a `HiggsAudioServeEngine` the training collator, through its public `collator` attribute."""
    config = engine.model.config
    if collate.uses_whisper(config):
        raise ValueError("the serve engine passes no reference waveform, so a model with a Whisper tower "
                         "cannot be prompted there as trained; use infer.py")
    engine.collator = collate.build_collator(config)


def serve_engine_sample(
    engine, ref_audio: str, ref_text: str | None, text: str, layout: data.PromptLayout | None = None
) -> ChatMLSample:
    """A `ChatMLSample` for `engine.generate(sample, ..., force_audio_gen=True)` in the trained layout.

    The messages of `data.build_messages`, with the texts normalised and
    checked as `data.build_sample` does them, and the reference clip at
    `ref_audio` (the engine reads and encodes it). `layout`: by default the
    one recorded beside the engine's model.
    """
    layout = layout or resolve_layout(engine.model_name_or_path)
    ref_text, text = data.prompt_texts(ref_text, text, layout)
    reference = AudioContent(audio_url=str(ref_audio))
    return ChatMLSample(messages=[_with_audio(message, reference) for message in data.build_messages(ref_text, text, layout)])


def _with_audio(message: Message, audio: AudioContent) -> Message:
    content = message.content
    if isinstance(content, AudioContent):
        return dataclasses.replace(message, content=audio)
    if isinstance(content, list):
        return dataclasses.replace(message, content=[audio if isinstance(part, AudioContent) else part for part in content])
    return message
