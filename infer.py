"""Voice-cloning generation, and the parity suite that proves training and inference agree.

Clone a voice (tiny preset by default, a real model with --model/--audio-tokenizer):

    python infer.py --ref-audio R.wav --ref-text "what R says" --text "new words" --out out.wav

Prove that training and inference build the same thing:

    python infer.py --parity

Both go through `data.build_sample` (the one sample builder) and
`collate.build_collator` (the one collator), then the package's `generate`,
delay-pattern revert and audio-tokenizer decode.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
from transformers import LogitsProcessor, LogitsProcessorList

import collate
import data
import model_utils

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "data"
STOP_STRINGS = ["<|end_of_text|>", "<|eot_id|>"]
FRAMES_PER_SECOND = 25


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------


@dataclass
class Sampling:
    """How the next audio column is drawn (defaults: the package's serve engine)."""

    temperature: float = 0.7
    top_k: int | None = 50
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
    eos = codebook_size + 1
    finished = bool((sequence[:, -1] == eos).all())
    codes = revert_delay_pattern(sequence) if use_delay_pattern else sequence
    codes = codes[:, 1:-1] if finished else codes[:, 1:]
    stray = int(((codes < 0) | (codes >= codebook_size)).sum())
    if stray:
        print(f"warning: {stray} generated codes outside 0..{codebook_size - 1} clamped before decoding", file=sys.stderr)
    if not finished:
        print("warning: the clip reached --max-seconds before the model ended it", file=sys.stderr)
    return codes.clamp(0, codebook_size - 1)


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
    codes = data.encode_clip(bundle.audio_tokenizer, waveform)
    needs_waveform = ref_in_system and collate.uses_whisper(bundle.model.config)
    return Reference(text, codes, waveform if needs_waveform else None, rate)


def clone(
    bundle: model_utils.Bundle,
    reference: Reference,
    text: str,
    sampling: Sampling,
    scene: str | None = None,
    ref_in_system: bool = False,
    force_audio: bool = True,
) -> np.ndarray:
    """Speak `text` in the reference voice; returns a waveform at the audio tokenizer's rate."""
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
    codes = audio_sequence_to_codes(audio_sequences[0].cpu(), config.audio_codebook_size, config.use_delay_pattern)
    if codes.shape[1] == 0:
        raise RuntimeError("the model ended the clip before producing any frame")
    with torch.autocast(device.type, enabled=False):  # the audio tokenizer decodes in its own fp32, under a caller's autocast too
        waveform = bundle.audio_tokenizer.decode(codes.unsqueeze(0).to(device))[0, 0]
    return np.asarray(waveform, dtype=np.float32)


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


def official_prompt_ids(tokenizer, case: ParityCase) -> list[int]:
    """What the official example feeds `generate`, built as `prepare_generation_context` does.

    Written from the example's own code path (the system message as one
    string with an audio placeholder split out; the target text normalised
    by the shared normaliser), independently of `data.build_messages`.
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
    return CheckResult("prompt ids = the official example's prompt", same, f"{len(official)} tokens" + first)


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
    io.add_argument("--scene", help="scene description for the system message (default: none, as in training)")
    io.add_argument("--ref-in-system", action="store_true", help="put the reference in the system message instead of an assistant turn")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="model directory, or a preset: tiny, tiny-whisper "
                       "[the newest runs/*/export of train.py, else tiny]")
    model.add_argument("--audio-tokenizer", help="audio tokenizer directory (config.json + model.pth); required with a model directory")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device [cuda if present, else cpu]")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights dtype [float32]")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=Sampling.temperature, help="[0.7]")
    sampling.add_argument("--top-k", type=int, default=Sampling.top_k, help="[50]")
    sampling.add_argument("--top-p", type=float, default=Sampling.top_p, help="[0.95]")
    sampling.add_argument("--ras-win-len", type=int, default=Sampling.ras_win_len, help="repetition-aware sampling window, 0 = off [7]")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding, repetition-aware sampling off")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    sampling.add_argument("--max-seconds", type=float, default=Sampling.max_seconds, help="longest clip to generate [20]")
    sampling.add_argument("--no-force-audio", dest="force_audio", action="store_false",
                          help="let the model choose its first token instead of forcing <|audio_out_bos|>")
    parity = parser.add_argument_group("parity")
    parity.add_argument("--parity", action="store_true", help="run the training/inference parity suite and exit")
    parity.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated parity checks [{','.join(CHECKS)}]")
    return parser.parse_args(argv)


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{path} has no non-empty line")
        return lines
    if args.text is None:
        return ["This voice was cloned from a few seconds of speech."]
    if not args.text.strip():
        raise ValueError("--text is empty")
    return [args.text]


def _reference_paths(args: argparse.Namespace) -> tuple[str, str]:
    if args.ref_audio:
        if not Path(args.ref_audio).is_file():
            raise data.AudioError(f"{args.ref_audio}: no such audio file")
        if args.ref_text is None and not args.ref_in_system:
            raise ValueError("--ref-audio needs --ref-text (its transcript)")
        return args.ref_audio, args.ref_text or ""
    row = json.loads((DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return str(DEMO_DIR / row["audio"]), row["text"]


def _load(args: argparse.Namespace) -> model_utils.Bundle:
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return model_utils.load_bundle(args.model, args.audio_tokenizer, seed=args.seed, device=args.device, dtype=dtype)


def run_parity_cli(args: argparse.Namespace) -> int:
    checks = tuple(name.strip() for name in args.checks.split(",") if name.strip())
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown parity checks: {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
    layouts = [(args.model, False)]
    if args.model == model_utils.TINY_PRESET:
        layouts.append((model_utils.TINY_WHISPER_PRESET, True))
    elif args.ref_in_system:
        layouts = [(args.model, True)]
    failures = 0
    for model_name, in_system in layouts:
        bundle = _load(replace_namespace(args, model=model_name))
        placement = "reference in system message" if in_system else "reference as assistant turn"
        whisper = " + Whisper" if collate.uses_whisper(bundle.model.config) else ""
        print(f"== parity: {model_name}, {placement}{whisper}")
        for result in run_parity(bundle, demo_case(bundle, in_system, args.scene), checks=checks):
            failures += not result.passed
            print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}: {result.detail}")
    print("parity: all checks passed" if not failures else f"parity: {failures} check(s) FAILED")
    return 1 if failures else 0


def replace_namespace(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def run_clone_cli(args: argparse.Namespace) -> int:
    texts = _texts(args)
    ref_audio, ref_text = _reference_paths(args)
    bundle = _load(args)
    reference = encode_reference(bundle, ref_audio, ref_text, args.ref_in_system)
    sampling = Sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, ras_win_len=args.ras_win_len or None,
        greedy=args.greedy, seed=args.seed, max_seconds=args.max_seconds,
    )
    out = Path(args.out)
    targets = [out / f"{index:04d}.wav" for index in range(len(texts))] if args.text_file else [out]
    for text, target in zip(texts, targets):
        waveform = clone(bundle, reference, text, sampling, args.scene, args.ref_in_system, args.force_audio)
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
        return run_parity_cli(args) if args.parity else run_clone_cli(args)
    except (data.AudioError, collate.SampleError, FileNotFoundError, ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
