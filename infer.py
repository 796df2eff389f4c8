"""Voice-cloning generation, and the parity suite that proves training and inference agree.

Clone a voice (tiny preset by default, a real model with --model/--audio-tokenizer):

    python infer.py --ref-audio R.wav --ref-text "what R says" --text "new words" --out out.wav

Prove that training and inference build the same thing:

    python infer.py --parity

Measure clones of every row of a held-out manifest (SIM, WER/CER, timing; see metrics.py):

    python infer.py --eval held_out.jsonl --out eval/base

Both go through `data.build_sample` (the one sample builder) and
`collate.build_collator` (the one collator), then the package's `generate`,
delay-pattern revert and audio-tokenizer decode.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import collate
import data
import manifest
import metrics
import model_utils
import prepare

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "data"
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


def generate(bundle: model_utils.Bundle, batch_inputs: dict, sampling: Sampling, processors=(), **extra):
    """The package's `generate` on one collated prompt, with the stop strings it expects."""
    max_new_tokens = int(sampling.max_seconds * FRAMES_PER_SECOND) + bundle.model.config.audio_num_codebooks + 8
    return bundle.model.generate(
        **batch_inputs,
        max_new_tokens=max_new_tokens,
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
    all_eos = bool((sequence[:, -1] == codebook_size + 1).all())
    codes = revert_delay_pattern(sequence) if use_delay_pattern else sequence
    codes = codes[:, 1:-1] if all_eos else codes[:, 1:]
    stray = int(((codes < 0) | (codes >= codebook_size)).sum())
    if stray:
        print(f"warning: {stray} generated codes outside 0..{codebook_size - 1} clamped before decoding", file=sys.stderr)
    if not stream_ended(sequence, codebook_size, use_delay_pattern):
        print("warning: the clip reached --max-seconds before the model ended it", file=sys.stderr)
    return codes.clamp(0, codebook_size - 1)


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
    """A generated clip, and whether the model ended it itself (rather than the length limit)."""

    waveform: np.ndarray
    stopped: bool


def clone(
    bundle: model_utils.Bundle,
    reference: Reference,
    text: str,
    sampling: Sampling,
    scene: str | None = None,
    ref_in_system: bool = False,
    force_audio: bool = True,
) -> Clone:
    """Speak `text` in the reference voice: a waveform at the audio tokenizer's rate, and whether the audio
    stream ended with EOS before `sampling.max_seconds`."""
    config = bundle.model.config
    collator = collate.build_collator(config, collate.whisper_features(config))
    prompt = data.build_sample(
        bundle.tokenizer, reference.text, reference.codes, text, scene=scene, ref_in_system=ref_in_system,
        ref_waveform=reference.waveform, sample_rate=reference.sample_rate,
    )
    device = next(bundle.model.parameters()).device
    inputs = collate.batch_to_model_inputs(collate.collate(collator, [prompt], config.audio_codebook_size), device)
    # The target turn always opens with <|audio_out_bos|>; forcing it (as the
    # serve engine's force_audio_gen does) keeps the prompt itself unchanged.
    processors = [ForceTokens([config.audio_out_bos_token_id])] if force_audio else []
    with torch.inference_mode():
        _, audio_sequences = generate(bundle, inputs, sampling, processors)
    if not audio_sequences:
        raise RuntimeError("the model produced no audio (it answered in text); try --force-audio")
    sequence = audio_sequences[0].cpu()
    stopped = stream_ended(sequence, config.audio_codebook_size, config.use_delay_pattern)
    codes = audio_sequence_to_codes(sequence, config.audio_codebook_size, config.use_delay_pattern)
    if codes.shape[1] == 0:
        raise RuntimeError("the model ended the clip before producing any frame")
    with torch.autocast(device.type, enabled=False):  # the audio tokenizer decodes in its own fp32, under a caller's autocast too
        waveform = bundle.audio_tokenizer.decode(codes.unsqueeze(0).to(device))[0, 0]
    return Clone(np.asarray(waveform, dtype=np.float32), stopped)


# --------------------------------------------------------------------------
# The prompt layout a model was trained with
# --------------------------------------------------------------------------


def describe_layout(layout: data.PromptLayout) -> str:
    placement = "reference in the system message" if layout.ref_in_system else "reference as an assistant turn"
    return f"{placement}, " + (f"scene {layout.scene!r}" if layout.scene else "no scene")


def resolve_layout(
    model: str, ref_in_system: bool | None = None, scene: str | None = None, override: bool = False
) -> data.PromptLayout:
    """The layout to prompt `model` with: the one its export recorded (`prompt_layout.json`), else the flags'.

    `ref_in_system` and `scene` are explicit choices, None where not given
    (a scene of '' asks for none). One that contradicts the record is an
    error unless `override`, then a warning. A record in use is announced in
    one line; a record of another text normalisation than this code's is
    warned about, since the old one cannot be reproduced.
    """
    wanted_scene = None if scene is None else (scene.strip() or None)
    recorded = data.read_prompt_layout(model) if Path(model).is_dir() else None
    if recorded is None:
        return data.PromptLayout(bool(ref_in_system), wanted_scene)
    trained, path = recorded.layout, Path(model) / data.PROMPT_LAYOUT_FILE
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


def layout_from_args(args: argparse.Namespace) -> data.PromptLayout:
    """`resolve_layout` from infer.py's flags: --model, --ref-in-system, --scene, --layout-override."""
    return resolve_layout(args.model, args.ref_in_system, args.scene, args.layout_override)


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
    ref_text, text = data.prompt_texts(ref_text, text, layout.scene, layout.ref_in_system)
    reference = AudioContent(audio_url=str(ref_audio))
    return ChatMLSample(messages=[_with_audio(message, reference) for message in data.build_messages(ref_text, text, layout)])


def _with_audio(message: Message, audio: AudioContent) -> Message:
    content = message.content
    if isinstance(content, AudioContent):
        return dataclasses.replace(message, content=audio)
    if isinstance(content, list):
        return dataclasses.replace(message, content=[audio if isinstance(part, AudioContent) else part for part in content])
    return message


# --------------------------------------------------------------------------
# Parity suite
# --------------------------------------------------------------------------


@dataclass
class ParityCase:
    """One reference/target pair and the prompt layout to check it under."""

    ref_text: str
    ref_codes: torch.Tensor
    text: str
    target_codes: torch.Tensor
    ref_waveform: np.ndarray | None = None
    sample_rate: int = 24000
    scene: str | None = None
    ref_in_system: bool = False


def _training_sample(tokenizer, case: ParityCase):
    return data.build_sample(
        tokenizer, case.ref_text, case.ref_codes, case.text, target_codes=case.target_codes, scene=case.scene,
        ref_in_system=case.ref_in_system, ref_waveform=case.ref_waveform, sample_rate=case.sample_rate,
    )


def _inference_prompt(tokenizer, case: ParityCase):
    return data.build_sample(
        tokenizer, case.ref_text, case.ref_codes, case.text, scene=case.scene, ref_in_system=case.ref_in_system,
        ref_waveform=case.ref_waveform, sample_rate=case.sample_rate,
    )


@dataclass
class Pipeline:
    """The pieces of training and inference that parity compares; the defaults are the project's own.

    The tests swap one piece at a time for a known community bug and expect
    a check to fail.
    """

    training_sample: Callable = _training_sample
    inference_prompt: Callable = _inference_prompt
    training_collator: Callable = collate.build_collator
    inference_collator: Callable = collate.build_collator
    loss: Callable = lambda outputs, batch: model_utils.compute_loss(outputs, batch.label_audio_ids)


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass
class ParityTolerance:
    # fp32 logits: |diff| <= logits_rtol * max(1, largest |logit| compared); a
    # trained model's larger logits carry proportionally larger rounding.
    logits_rtol: float = 1e-5
    memorise_loss: float = 0.05
    memorise_steps: int = 300
    memorise_lr: float = 3e-3


@dataclass
class _Prepared:
    train_sample: object
    prompt: object
    train_batch: object
    prompt_batch: object
    prompt_len: int


def _prepare(bundle, case: ParityCase, pipeline: Pipeline) -> _Prepared:
    config = bundle.model.config
    whisper = collate.whisper_features(config)
    train_sample = pipeline.training_sample(bundle.tokenizer, case)
    prompt = pipeline.inference_prompt(bundle.tokenizer, case)
    train_batch = collate.collate(pipeline.training_collator(config, whisper), [train_sample], config.audio_codebook_size)
    prompt_batch = collate.collate(pipeline.inference_collator(config, whisper), [prompt], config.audio_codebook_size)
    return _Prepared(train_sample, prompt, train_batch, prompt_batch, len(prompt.input_ids))


def check_prompt_is_training_prefix(prepared: _Prepared) -> CheckResult:
    train_ids, prompt_ids = prepared.train_sample.input_ids, prepared.prompt.input_ids
    prefix = train_ids[: len(prompt_ids)]
    same = len(train_ids) > len(prompt_ids) and torch.equal(prefix, prompt_ids)
    first = _first_difference(prefix, prompt_ids)
    return CheckResult("prompt ids = training ids up to the generation point", same, f"{len(prompt_ids)} tokens" + first)


# What the official example (boson-ai/higgs-audio examples/generation.py, after its "se fix"; see data.py's
# _EVENT_TAGS for the versions read) makes of each text, written out by hand from its code and independent of
# data.normalize_text: every Chinese punctuation mark, symbol and event tag it maps, the order of its steps
# (punctuation, then parentheses and degrees, then tags, then whitespace per line) and its closing marks.
OFFICIAL_NORMALISATION = [
    ("你好，世界。", "你好, 世界."),
    ("注意：明天；后天", "注意:明天;后天."),
    ("真的吗？", "真的吗?"),
    ("太好了！", "太好了!"),
    ("备注（括号）", "备注 括号."),
    ("【laugh】", "<SE>[Laughter]</SE>"),
    ("《书名》", "<书名>."),
    ("“双引号”", '"双引号"'),
    ("‘单引号’", "'单引号'"),
    ("苹果、香蕉", "苹果,香蕉."),
    ("破折号—结束", "破折号-结束."),
    ("等等…", "等等..."),
    ("中间·点", "中间.点."),
    ("「直角」", '"直角"'),
    ("『双直角』", '"双直角"'),
    ("Hello (world) again", "Hello world again."),
    ("It is 20°C (68°F) outside", "It is 20 degrees Celsius 68 degrees Fahrenheit outside."),
    ("[laugh]", "<SE>[Laughter]</SE>"),
    ("[humming start]", "<SE_s>[Humming]</SE_s>."),
    ("[humming end]", "<SE_e>[Humming]</SE_e>"),
    ("[music start]", "<SE_s>[Music]</SE_s>."),
    ("[music end]", "<SE_e>[Music]</SE_e>"),
    ("[music]", "<SE>[Music]</SE>"),
    ("[sing start]", "<SE_s>[Singing]</SE_s>."),
    ("[sing end]", "<SE_e>[Singing]</SE_e>"),
    ("[applause]", "<SE>[Applause]</SE>"),
    ("[cheering]", "<SE>[Cheering]</SE>"),
    ("[cough]", "<SE>[Cough]</SE>"),
    ("Well [laugh] that is funny", "Well <SE>[Laughter]</SE> that is funny."),
    ("  Hello   world \n\n  \n second\tline  ", "Hello world\nsecond line."),
    ("Hello", "Hello."),
    ("Note:", "Note:."),
    ("Hello.", "Hello."),
    ("Really?", "Really?"),
    ("Wow!", "Wow!"),
    ("Wait,", "Wait,"),
    ("First; second;", "First; second;"),
    ('He said "hi"', 'He said "hi"'),
    ("It's 'ok'", "It's 'ok'"),
]


def official_normalisation_differences(normalize: Callable[[str], str] = data.normalize_text) -> list[str]:
    """Each text of OFFICIAL_NORMALISATION that `normalize` does not turn into the official example's output."""
    differences = []
    for text, expected in OFFICIAL_NORMALISATION:
        got = normalize(text)
        if got != expected:
            differences.append(f"{text!r} -> {got!r}, the official example gives {expected!r}")
    return differences


def official_prompt_ids(tokenizer, case: ParityCase) -> list[int]:
    """What the official example feeds `generate`, built as `prepare_generation_context` does.

    Written from the example's own code path (the system message as one
    string with an audio placeholder split out), independently of
    `data.build_messages`. The target text goes through the shared
    normaliser, which `check_prompt_is_official` holds to the example's
    outputs in OFFICIAL_NORMALISATION.
    """
    placeholder = "<|__AUDIO_PLACEHOLDER__|>"
    messages = []
    if case.ref_in_system:
        if case.scene:
            system = (
                "Generate audio following instruction.\n\n"
                f"<|scene_desc_start|>\n{case.scene}\n\n" + f"SPEAKER0: {placeholder}" + "\n<|scene_desc_end|>"
            )
        else:
            system = "Generate audio following instruction.\n\n<|scene_desc_start|>\n" + f"SPEAKER0: {placeholder}" + "\n<|scene_desc_end|>"
        before, after = system.split(placeholder)
        messages.append(Message(role="system", content=[TextContent(before), AudioContent(audio_url=""), TextContent(after)]))
    else:
        if case.scene:
            messages.append(
                Message(
                    role="system",
                    content=f"Generate audio following instruction.\n\n<|scene_desc_start|>\n{case.scene}\n<|scene_desc_end|>",
                )
            )
        messages.append(Message(role="user", content=case.ref_text.strip()))
        messages.append(Message(role="assistant", content=AudioContent(audio_url="")))
    messages.append(Message(role="user", content=data.normalize_text(case.text)))
    input_tokens, _, _, _ = prepare_chatml_sample(ChatMLSample(messages=messages), tokenizer)
    return input_tokens + tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)


def check_prompt_is_official(bundle, case: ParityCase, prepared: _Prepared) -> CheckResult:
    official = torch.tensor(official_prompt_ids(bundle.tokenizer, case))
    same = torch.equal(official, prepared.prompt.input_ids)
    first = _first_difference(prepared.prompt.input_ids, official)
    differences = official_normalisation_differences()
    agreeing = len(OFFICIAL_NORMALISATION) - len(differences)
    detail = f"{len(official)} tokens{first}; normalisation as the official example's on {agreeing}/{len(OFFICIAL_NORMALISATION)} texts"
    if differences:
        detail += f"; first difference: {differences[0]}"
    return CheckResult("prompt ids = the official example's prompt", same and not differences, detail)


def _first_difference(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    if torch.equal(ours, theirs):
        return ""
    n = min(len(ours), len(theirs))
    diff = (ours[:n] != theirs[:n]).nonzero()
    at = int(diff[0]) if len(diff) else n
    return f"; first difference at token {at} (lengths {len(ours)} vs {len(theirs)})"


def check_collated_prompt(prepared: _Prepared) -> CheckResult:
    """Every field of the collated prompt equals the prompt part of the collated training batch."""
    train, prompt, length = prepared.train_batch, prepared.prompt_batch, prepared.prompt_len
    ref_columns = prompt.audio_out_ids.shape[1]
    pairs = {
        "input_ids": (train.input_ids[:, :length], prompt.input_ids),
        "attention_mask": (train.attention_mask[:, :length], prompt.attention_mask),
        "audio_out_ids": (train.audio_out_ids[:, :ref_columns], prompt.audio_out_ids),
        "audio_out_ids_start": (train.audio_out_ids_start[: len(prompt.audio_out_ids_start)], prompt.audio_out_ids_start),
        "audio_in_ids": (train.audio_in_ids, prompt.audio_in_ids),
        "audio_in_ids_start": (train.audio_in_ids_start, prompt.audio_in_ids_start),
        "audio_features": (train.audio_features, prompt.audio_features),
        "audio_feature_attention_mask": (train.audio_feature_attention_mask, prompt.audio_feature_attention_mask),
    }
    differing = [name for name, (a, b) in pairs.items() if not _same_tensor(a, b)]
    if prompt.label_ids is not None:
        differing.append("label_ids (the prompt must carry none)")
    detail = f"{len(pairs)} fields" + (f"; differ: {', '.join(differing)}" if differing else "")
    return CheckResult("collated prompt = prompt part of the training batch", not differing, detail)


def _same_tensor(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.numel() == 0 and b.numel() == 0:
        return True
    return a.shape == b.shape and torch.equal(a, b)


def check_trained_positions(bundle, prepared: _Prepared, pipeline: Pipeline) -> CheckResult:
    """Only the target turn is trained: the loss has gradient only at positions after the prompt and target columns."""
    model = bundle.model
    inputs = collate.batch_to_model_inputs(prepared.train_batch, next(model.parameters()).device)
    with torch.no_grad():
        outputs = model(**inputs)
    logits = outputs.logits.detach().float().requires_grad_()
    audio_logits = outputs.audio_logits.detach().float().requires_grad_()
    loss = pipeline.loss(replace_outputs(outputs, logits, audio_logits), prepared.train_batch)
    loss.total.backward()
    text_positions = logits.grad[0].abs().sum(-1).nonzero().flatten()
    audio_rows = audio_logits.grad.abs().sum(-1).sum(-1).nonzero().flatten()
    prompt_end = _target_turn_positions(model.config, outputs)[0]
    ref_columns = prepared.prompt_batch.audio_out_ids.shape[1]
    target_columns = prepared.train_batch.audio_out_ids.shape[1] - ref_columns
    problems = []
    if len(text_positions) == 0 or text_positions.min() < prompt_end:
        problems.append(f"text gradient at positions {text_positions.tolist()[:6]}, prompt ends at {prompt_end}")
    if len(audio_rows) == 0 or audio_rows.min() < ref_columns or audio_rows.max() >= ref_columns + target_columns:
        problems.append(f"audio gradient on columns {_span(audio_rows)}, target is {ref_columns}..{ref_columns + target_columns - 1}")
    detail = f"{len(text_positions)} text positions, {len(audio_rows)} audio columns" + ("; " + "; ".join(problems) if problems else "")
    return CheckResult("only the target turn carries loss", not problems, detail)


def _span(rows: torch.Tensor) -> str:
    return f"{int(rows.min())}..{int(rows.max())}" if len(rows) else "none"


def replace_outputs(outputs, logits, audio_logits):
    copied = copy.copy(outputs)
    copied.logits, copied.audio_logits = logits, audio_logits
    return copied


def _target_turn_positions(config, outputs) -> tuple[int, int]:
    """Positions, in the model's merged (audio-expanded, padded) sequence, of the prompt's last
    token and of the target clip's closing <|audio_eos|>."""
    ids = outputs.expanded_input_ids[0]
    audio_out_bos = (ids == config.audio_out_bos_token_id).nonzero().flatten()
    audio_eos = (ids == config.audio_eos_token_id).nonzero().flatten()
    return int(audio_out_bos[-1]) - 1, int(audio_eos[-1])


def check_teacher_forcing(bundle, prepared: _Prepared, tolerance: ParityTolerance) -> CheckResult:
    """Training logits at every target position = logits of cached generation forced along the same codes.

    Compared: the prompt's last position (text), every audio column that
    predicts a target column (all codebooks), and the <|audio_eos|> position.
    Known package behaviour, reported separately: `generate` never feeds the
    final all-EOS delayed column back (it appends <|audio_eos|> instead)
    while training does, so the text logits after the clip differ slightly;
    there only the argmax must agree.
    """
    model, config = bundle.model, bundle.model.config
    device = next(model.parameters()).device
    with torch.no_grad():
        train_out = model(**collate.batch_to_model_inputs(prepared.train_batch, device))
    ref_columns = prepared.prompt_batch.audio_out_ids.shape[1]
    target = prepared.train_batch.audio_out_ids[:, ref_columns:]
    prompt_end, eos_position = _target_turn_positions(config, train_out)
    forced = ForceTokens(
        [config.audio_out_bos_token_id, config.audio_out_token_idx, bundle.tokenizer.convert_tokens_to_ids("<|eot_id|>")],
        target[:, 1:],
    )
    sampling = Sampling(greedy=True, seed=0, max_seconds=target.shape[1] / FRAMES_PER_SECOND + 1)
    generated = generate(
        bundle, collate.batch_to_model_inputs(prepared.prompt_batch, device), sampling, [forced],
        output_logits=True, return_dict_in_generate=True,
    )
    steps = [step.float().cpu() for step in generated.logits]
    audio_steps = target.shape[1] - 1
    expected_steps = 2 + audio_steps + 1
    if len(steps) != expected_steps:
        return CheckResult("teacher-forced logits = cached generation logits", False, f"{len(steps)} generation steps, expected {expected_steps}")
    train_text = train_out.logits[0].float().cpu()
    train_audio = train_out.audio_logits.float().cpu()
    diffs = [
        (steps[0][0] - train_text[prompt_end]).abs().max(),
        (steps[1][0] - train_text[prompt_end + 1]).abs().max(),
    ]
    for j in range(audio_steps):
        diffs.append((steps[2 + j] - train_audio[ref_columns + j]).abs().max())
    worst = float(torch.stack(diffs).max())
    scale = max(1.0, float(train_text.abs().max()), float(train_audio.abs().max()))
    allowed = tolerance.logits_rtol * scale
    eot_step, eot_train = steps[-1][0], train_text[eos_position]
    eot_diff = float((eot_step - eot_train).abs().max())
    same_argmax = int(eot_step.argmax()) == int(eot_train.argmax())
    passed = worst <= allowed and same_argmax
    detail = (
        f"{len(diffs)} positions ({audio_steps} audio columns x {config.audio_num_codebooks} codebooks), "
        f"max |diff| {worst:.2e} (tolerance {allowed:.1e} = {tolerance.logits_rtol:.0e} x max |logit| {scale:.1f}); "
        f"after the clip {eot_diff:.2e}, "
        f"argmax {'equal' if same_argmax else 'DIFFERENT'}"
    )
    return CheckResult("teacher-forced logits = cached generation logits", passed, detail)


def check_memorisation(bundle, case: ParityCase, prepared: _Prepared, pipeline: Pipeline, tolerance: ParityTolerance) -> CheckResult:
    """A copy of the model trained on the one sample regenerates its target codes exactly, greedily."""
    learner = model_utils.Bundle(copy.deepcopy(bundle.model), bundle.tokenizer, bundle.audio_tokenizer)
    device = next(learner.model.parameters()).device
    inputs = collate.batch_to_model_inputs(prepared.train_batch, device)
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=tolerance.memorise_lr, weight_decay=0.0)
    learner.model.train()
    loss_value, step = float("inf"), 0
    for step in range(1, tolerance.memorise_steps + 1):
        loss = pipeline.loss(learner.model(**inputs), prepared.train_batch).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss)
        if loss_value < tolerance.memorise_loss:
            break
    learner.model.eval()
    config = learner.model.config
    prompt_inputs = collate.batch_to_model_inputs(prepared.prompt_batch, device)
    sampling = Sampling(greedy=True, seed=0, max_seconds=case.target_codes.shape[1] / FRAMES_PER_SECOND + 1)
    with torch.inference_mode():
        _, audio_sequences = generate(learner, prompt_inputs, sampling)
    if not audio_sequences:
        return CheckResult("memorised sample regenerates exactly", False, f"loss {loss_value:.3f} after {step} steps; no audio generated")
    codes = revert_delay_pattern(audio_sequences[0].cpu())[:, 1:-1] if config.use_delay_pattern else audio_sequences[0].cpu()[:, 1:-1]
    exact = codes.shape == case.target_codes.shape and torch.equal(codes, case.target_codes.long())
    matching = _matching_frames(codes, case.target_codes)
    detail = f"loss {loss_value:.3f} after {step} steps; {matching}/{case.target_codes.shape[1]} frames regenerated"
    return CheckResult("memorised sample regenerates exactly", exact, detail)


def _matching_frames(codes: torch.Tensor, target: torch.Tensor) -> int:
    n = min(codes.shape[1], target.shape[1])
    return int((codes[:, :n] == target[:, :n]).all(0).sum())


CHECKS = ("prefix", "official", "collated", "labels", "logits", "memorise")


def run_parity(
    bundle: model_utils.Bundle,
    case: ParityCase,
    pipeline: Pipeline | None = None,
    tolerance: ParityTolerance | None = None,
    checks: tuple[str, ...] = CHECKS,
) -> list[CheckResult]:
    """Run the chosen parity checks on one case; each returns a result, none raises on a mismatch."""
    pipeline = pipeline or Pipeline()
    tolerance = tolerance or ParityTolerance()
    prepared = _prepare(bundle, case, pipeline)
    runners = {
        "prefix": lambda: check_prompt_is_training_prefix(prepared),
        "official": lambda: check_prompt_is_official(bundle, case, prepared),
        "collated": lambda: check_collated_prompt(prepared),
        "labels": lambda: check_trained_positions(bundle, prepared, pipeline),
        "logits": lambda: check_teacher_forcing(bundle, prepared, tolerance),
        "memorise": lambda: check_memorisation(bundle, case, prepared, pipeline, tolerance),
    }
    return [runners[name]() for name in checks]


def demo_case(bundle: model_utils.Bundle, ref_in_system: bool = False, scene: str | None = None) -> ParityCase:
    """A parity case from the committed demo data: two utterances of one Arabic speaker."""
    rows = {row["id"]: row for row in map(json.loads, (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines())}
    ref, target = rows["ar_female_0"], rows["ar_female_1"]
    reference = encode_reference(bundle, str(DEMO_DIR / ref["audio"]), ref["text"], ref_in_system)
    target_codes = data.encode_clip(bundle.audio_tokenizer, data.load_audio(DEMO_DIR / target["audio"], reference.sample_rate))
    return ParityCase(
        ref_text=reference.text, ref_codes=reference.codes, text=target["text"], target_codes=target_codes,
        ref_waveform=reference.waveform, sample_rate=reference.sample_rate, scene=scene, ref_in_system=ref_in_system,
    )


# --------------------------------------------------------------------------
# Evaluation: clone each row of a manifest and measure the clip
# --------------------------------------------------------------------------


def evaluate_pair(
    bundle: model_utils.Bundle,
    judge: metrics.Judge,
    pair: manifest.Pair,
    language: str | None,
    sampling: Sampling,
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
    reference = Reference(pair.ref_text, codes(pair.ref_audio), ref_waveform if needs_waveform else None, rate)
    embedding = judge.reference_embedding(pair.ref_audio, ref_waveform, rate)
    language = judge.language(language)
    target = judge.score_target(pair.audio, data.load_audio(pair.audio, rate), rate, embedding, pair.text, language)
    try:
        result = clone(bundle, reference, pair.text, sampling, pair.scene or scene, ref_in_system, force_audio)
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


def run_eval_cli(args: argparse.Namespace) -> int:
    """`--eval MANIFEST --out DIR`: wavs/, rows.csv, summary.json and rejections.jsonl in DIR, and a printed summary."""
    out = Path(args.out)
    if out.suffix.lower() == ".wav":
        raise ValueError("--eval writes a directory of results: give --out DIR")
    check_sampling_args(args)
    layout = layout_from_args(args)
    bundle = _load(args)
    judge = metrics.build_judge(args.speaker_model, args.asr_model, args.language, args.device)
    codes = prepare.EncodedClips(bundle.audio_tokenizer)
    validated = manifest.validate_manifest(args.eval, codes, progress=True)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    validated.write_report(out / "rejections.jsonl")
    print(f"data: {args.eval}: {validated.summary()}" + (f"; rejected rows: {out / 'rejections.jsonl'}" if validated.rejections else ""))
    pairs, _ = manifest.training_pairs(validated.kept, args.seed, 0)
    languages = {row["id"]: row.get("language") for row in validated.kept}
    sampling = sampling_from_args(args)
    records, started = [], time.time()
    for index, pair in enumerate(tqdm(pairs, desc="eval", dynamic_ncols=True)):
        record, waveform = evaluate_pair(bundle, judge, pair, languages[pair.id], sampling, codes, layout.scene,
                                         layout.ref_in_system, args.force_audio)
        if waveform is not None:
            sf.write(out / "wavs" / _wav_name(index, pair.id), waveform, bundle.audio_tokenizer.sampling_rate)
        records.append(record)
    seconds = time.time() - started
    write_records_csv(records, out / "rows.csv")
    summary = metrics.summarize_records(records, args.seed)
    failed = sum(bool(record["error"]) for record in records)
    report = {
        "manifest": str(args.eval), "model": args.model, "rows_read": validated.rows_read, "kept": len(validated.kept),
        "rejected": len(validated.rejections), "rejected_by_reason": validated.counts(), "evaluated": len(records),
        "generation_failed": failed, "speaker_encoder": judge.encoder.name, "asr": judge.asr.name,
        "seed": args.seed, "sampling": vars(sampling), "scene": layout.scene, "ref_in_system": layout.ref_in_system,
        "seconds_per_row": seconds / max(1, len(records)), "metrics": summary,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(metrics.format_summary(summary))
    print(f"{len(records)} rows evaluated ({failed} without audio), {validated.summary()}; "
          f"{seconds / max(1, len(records)):.2f} s per row; wrote {out / 'rows.csv'}, {out / 'summary.json'}, {out / 'wavs'}")
    return 0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("what to say and where")
    io.add_argument("--ref-audio", help="reference clip (WAV/FLAC, any rate 8-48 kHz); default: a demo clip")
    io.add_argument("--ref-text", help="transcript of the reference clip (default: the demo clip's)")
    io.add_argument("--text", help="text to speak in the reference voice")
    io.add_argument("--text-file", help="a UTF-8 file with one text per line; writes one wav per line into --out")
    io.add_argument("--out", default="out.wav", help="output wav (or directory with --text-file) [out.wav]")
    io.add_argument("--scene", help="scene description for the system message; '' for none "
                    "[the model's prompt_layout.json, else none]")
    io.add_argument("--ref-in-system", action=argparse.BooleanOptionalAction, default=None,
                    help="put the reference in the system message (--no-ref-in-system: in an assistant turn) "
                    "[the model's prompt_layout.json, else an assistant turn]")
    io.add_argument("--layout-override", action="store_true",
                    help="prompt with --ref-in-system/--scene even where they contradict the model's prompt_layout.json")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="model directory, or a preset: tiny, tiny-whisper "
                       "[the newest runs/*/export of train.py, else tiny]")
    model.add_argument("--audio-tokenizer", help="audio tokenizer directory (config.json + model.pth); required with a model directory")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device [cuda if present, else cpu]")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights dtype [float32]")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=Sampling.temperature,
                          help="> 0; --greedy for argmax [0.7, the serve engine's]")
    sampling.add_argument("--top-k", type=int, default=Sampling.top_k,
                          help="sample among the k likeliest codes, k >= 1 [off, as in the serve engine]")
    sampling.add_argument("--top-p", type=float, default=Sampling.top_p, help="nucleus mass, in (0, 1] [0.95, the serve engine's]")
    sampling.add_argument("--ras-win-len", type=int, default=Sampling.ras_win_len,
                          help="repetition-aware sampling window, 0 = off [7, the serve engine's]")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding, repetition-aware sampling off")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    sampling.add_argument("--max-seconds", type=float, default=Sampling.max_seconds, help="longest clip to generate, > 0 [20]")
    sampling.add_argument("--no-force-audio", dest="force_audio", action="store_false",
                          help="let the model choose its first token instead of forcing <|audio_out_bos|>")
    parity = parser.add_argument_group("parity")
    parity.add_argument("--parity", action="store_true", help="run the training/inference parity suite and exit")
    parity.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated parity checks [{','.join(CHECKS)}]")
    evaluation = parser.add_argument_group("evaluation (--eval)")
    evaluation.add_argument("--eval", metavar="MANIFEST", help="clone every row of a paired or speaker-grouped manifest "
                            "(speaker pairing fixed by --seed) and measure SIM, WER/CER and timing; --out is a directory")
    evaluation.add_argument("--asr-model", metavar="DIR", help="local Whisper directory for WER/CER in any language "
                            "[pocketsphinx en-us: English rows only, other languages n/a]")
    evaluation.add_argument("--speaker-model", metavar="DIR", help="local WavLMForXVector directory for SIM [resemblyzer GE2E]")
    evaluation.add_argument("--language", help="language of rows that have no language field (e.g. en) [none: their WER is n/a]")
    return parser.parse_args(argv)


def check_sampling_args(args: argparse.Namespace) -> None:
    """Sampling values the package would reject with its own messages, or take silently (`--max-seconds 0`)."""
    if not args.max_seconds > 0 or not math.isfinite(args.max_seconds):
        raise ValueError(f"--max-seconds must be a positive number of seconds, got {args.max_seconds:g}")
    if not args.temperature > 0 or not math.isfinite(args.temperature):
        raise ValueError(f"--temperature must be > 0, got {args.temperature:g} (--greedy decodes by argmax)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p:g}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k} (leave it out for no top-k)")
    if args.ras_win_len < 0:
        raise ValueError(f"--ras-win-len must be >= 0 (0 turns it off), got {args.ras_win_len}")


def check_text(text: str, name: str) -> None:
    """A text to speak within training's limits: at most manifest.Filters.max_text_chars characters, something speakable."""
    limit = manifest.Filters.max_text_chars
    if len(text) > limit:
        raise ValueError(f"{name} has {len(text)} characters, over the {limit} training accepts; split it")
    spoken = data.normalize_text(text)
    if not data.is_speakable(spoken):
        raise ValueError(f"{name} has no letter or digit to speak once normalised ({spoken!r})")


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        numbered = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        if not numbered:
            raise ValueError(f"{path} has no non-empty line")
        for number, line in numbered:
            check_text(line, f"{path}:{number}")
        return [line for _, line in numbered]
    if args.text is None:
        return ["This voice was cloned from a few seconds of speech."]
    if not args.text.strip():
        raise ValueError("--text is empty")
    check_text(args.text, "--text")
    return [args.text]


def _reference_paths(args: argparse.Namespace, layout: data.PromptLayout) -> tuple[str, str]:
    if args.ref_audio:
        if not Path(args.ref_audio).is_file():
            raise data.AudioError(f"{args.ref_audio}: no such audio file")
        if args.ref_text is None and not layout.ref_in_system:
            raise ValueError("--ref-audio needs --ref-text (its transcript)")
        if args.ref_text is not None and len(args.ref_text) > manifest.Filters.max_text_chars:
            raise ValueError(f"--ref-text has {len(args.ref_text)} characters, over the {manifest.Filters.max_text_chars} training accepts")
        _check_reference_file(args.ref_audio)
        return args.ref_audio, args.ref_text or ""
    row = json.loads((DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return str(DEMO_DIR / row["audio"]), row["text"]


def _check_reference_file(path: str) -> None:
    """The reference's duration, from its header, before the model loads (encode_reference checks the clip itself)."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError):
        return  # data.load_audio reports it unreadable
    data.check_reference_seconds(info.frames / info.samplerate, path)


def _load(args: argparse.Namespace) -> model_utils.Bundle:
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return model_utils.load_bundle(args.model, args.audio_tokenizer, seed=args.seed, device=args.device, dtype=dtype)


def run_parity_cli(args: argparse.Namespace) -> int:
    checks = tuple(name.strip() for name in args.checks.split(",") if name.strip())
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown parity checks: {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
    if args.model == model_utils.TINY_PRESET:
        layouts = [(args.model, False), (model_utils.TINY_WHISPER_PRESET, True)]
        scene = args.scene or None
    else:
        layout = layout_from_args(args)
        layouts, scene = [(args.model, layout.ref_in_system)], layout.scene
    failures = 0
    for model_name, in_system in layouts:
        bundle = _load(replace_namespace(args, model=model_name))
        placement = "reference in system message" if in_system else "reference as assistant turn"
        whisper = " + Whisper" if collate.uses_whisper(bundle.model.config) else ""
        print(f"== parity: {model_name}, {placement}{whisper}")
        for result in run_parity(bundle, demo_case(bundle, in_system, scene), checks=checks):
            failures += not result.passed
            print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}: {result.detail}")
    print("parity: all checks passed" if not failures else f"parity: {failures} check(s) FAILED")
    return 1 if failures else 0


def replace_namespace(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, ras_win_len=args.ras_win_len or None,
        greedy=args.greedy, seed=args.seed, max_seconds=args.max_seconds,
    )


def run_clone_cli(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    texts = _texts(args)
    layout = layout_from_args(args)
    ref_audio, ref_text = _reference_paths(args, layout)
    bundle = _load(args)
    reference = encode_reference(bundle, ref_audio, ref_text, layout.ref_in_system)
    sampling = sampling_from_args(args)
    out = Path(args.out)
    targets = [out / f"{index:04d}.wav" for index in range(len(texts))] if args.text_file else [out]
    for text, target in zip(texts, targets):
        waveform = clone(bundle, reference, text, sampling, layout.scene, layout.ref_in_system, args.force_audio).waveform
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, waveform, bundle.audio_tokenizer.sampling_rate)
        seconds = len(waveform) / bundle.audio_tokenizer.sampling_rate
        print(f"wrote {target} ({seconds:.2f} s at {bundle.audio_tokenizer.sampling_rate} Hz): {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        args.model = model_utils.TINY_PRESET if args.parity else (model_utils.newest_export() or model_utils.TINY_PRESET)
        print(f"model: {args.model}")
    try:
        if args.parity:
            return run_parity_cli(args)
        return run_eval_cli(args) if args.eval else run_clone_cli(args)
    except (data.AudioError, manifest.ManifestError, collate.SampleError, FileNotFoundError, ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
