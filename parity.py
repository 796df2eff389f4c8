"""The parity suite: proof that training and inference build, score and generate the same thing.

One reference/target pair (`ParityCase`, from the demo data by `demo_case`)
goes through training's path (`data.build_sample` with target codes, the
training collator, the loss) and inference's (the prompt, the collator,
`generation.generate`); each check compares one stage and returns a
`CheckResult`, never raising on a mismatch:

- prefix: the inference prompt is the training input up to the generation point;
- official: it is also the official example's prompt, and `data.normalize_text`
  gives the example's outputs (`OFFICIAL_NORMALISATION`);
- collated: every field of the collated prompt is the prompt part of the training batch;
- labels: only the target turn carries loss;
- logits: teacher-forced training logits equal cached generation's;
- memorise: a copy trained on the one sample regenerates its codes exactly;
- chunked: a long text's chunk prompt (the reference, two chunks said before
  and the next text, by `data.build_sample`) is the one upstream's
  `examples/generation.py` builds for its chunks (`upstream_chunked_prompt`);
- batched (not in the default `run_parity`, in `python infer.py --parity`):
  greedy codes of `batched_generation.generate_batch` equal the package's
  batch-1 `generate`, row by row, for prompts of different lengths;
- logprobs (likewise): the log-probability the batched sampler recorded for
  each sampled clip equals the training forward's for the same codes in the
  sample the builder makes (`preference.training_logprobs`), the alignment
  preference tuning (DPO, GRPO) rests on.

`Pipeline` names the pieces compared, so tests can swap one for a known bug
and expect a check to fail. `python infer.py --parity` runs the suite through
`run_and_report`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

import batched_generation
import collate
import data
import generation
import model_utils
import preference

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "data"


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

    @property
    def layout(self) -> data.PromptLayout:
        """The case's layout, as `data.build_sample` takes it."""
        return data.PromptLayout(self.ref_in_system, self.scene)


def _training_sample(tokenizer, case: ParityCase):
    return data.build_sample(
        tokenizer, case.ref_text, case.ref_codes, case.text, target_codes=case.target_codes, layout=case.layout,
        ref_waveform=case.ref_waveform, sample_rate=case.sample_rate,
    )


def _inference_prompt(tokenizer, case: ParityCase):
    return data.build_sample(
        tokenizer, case.ref_text, case.ref_codes, case.text, layout=case.layout,
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
    batched_rows: int = 4
    batched_seconds: float = 2.0
    # log-probabilities of sampled clips, fp32: |sampler - training| <= this x the positions compared (measured on
    # the tiny preset: at most 1.3e-6 nats a position, from the logits' ~1e-6 rounding)
    logprob_per_position: float = 1e-4
    logprob_clips: int = 4


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


def official_prompt_ids(tokenizer, case: ParityCase, chunk_turns: list[Message] = ()) -> list[int]:
    """What the official example feeds `generate`, built as `prepare_generation_context` does.

    Written from the example's own code path (the system message as one
    string with an audio placeholder split out), independently of
    `data.build_messages`. The target text goes through the shared
    normaliser, which `check_prompt_is_official` holds to the example's
    outputs in OFFICIAL_NORMALISATION. `chunk_turns`: the turns of chunks said
    before it (`upstream_chunked_prompt`).
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
    messages += list(chunk_turns) + [Message(role="user", content=data.normalize_text(case.text))]
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


# boson-ai/higgs-audio's examples/generation.py at f04f5df76a6a7b14674e0d6d715b436c422883c6 (its latest change,
# 2025-08-04): HiggsAudioModelClient.generate chains chunks so.
UPSTREAM_CHUNKING_COMMIT = "f04f5df76a6a7b14674e0d6d715b436c422883c6"


def upstream_chunked_prompt(tokenizer, case: ParityCase, context: list[tuple[str, torch.Tensor]]) -> tuple[list[int], list[torch.Tensor]]:
    """The ids and clips upstream's generation script feeds `generate` for the case's text after the chunks of
    `context` (text, codes), written from its `generate` loop and independent of `data.build_messages`: the
    context messages of `official_prompt_ids`, then per chunk said a user turn with its text and an assistant
    audio turn, then a user turn with the next text; its audio the reference's codes, then each chunk's. Texts
    go through the shared normaliser, as upstream normalises the whole transcript before it chunks it."""
    turns = []
    for text, _ in context:
        turns += [Message(role="user", content=data.normalize_text(text)), Message(role="assistant", content=AudioContent(audio_url=""))]
    ids = official_prompt_ids(tokenizer, case, turns)
    return ids, [case.ref_codes] + [codes for _, codes in context]


def check_chunked_prompt(bundle, case: ParityCase) -> CheckResult:
    """The prompt of a long text's third chunk (reference + two chunks said before + its text, by the one builder)
    = upstream's for the same inputs: the same ids and the same clips in the same order. The chunks said before
    are the case's target text and codes, halved."""
    words, codes = case.text.split(), case.target_codes
    half_words, half_frames = len(words) // 2, codes.shape[1] // 2
    context = [(" ".join(words[:half_words]), codes[:, :half_frames]), (" ".join(words[half_words:]), codes[:, half_frames:])]
    ours = data.build_sample(bundle.tokenizer, case.ref_text, case.ref_codes, case.text, layout=case.layout,
                             ref_waveform=case.ref_waveform, sample_rate=case.sample_rate,
                             context=tuple(data.ContextTurn(text, clip) for text, clip in context))
    ids, clips = upstream_chunked_prompt(bundle.tokenizer, case, context)
    ours_clips = [ours.get_audio_codes(index) for index in range(len(ours.audio_ids_start))]
    same_ids = torch.equal(ours.input_ids, torch.tensor(ids))
    same_clips = len(ours_clips) == len(clips) and all(torch.equal(a, b.long()) for a, b in zip(ours_clips, clips))
    detail = (f"{len(ids)} tokens{_first_difference(ours.input_ids, torch.tensor(ids))}, {len(clips)} clips "
              f"({' + '.join(str(clip.shape[1]) for clip in clips)} frames){'' if same_clips else ', clips DIFFER'}; "
              f"upstream examples/generation.py at {UPSTREAM_CHUNKING_COMMIT[:7]}")
    return CheckResult("chunked prompt = upstream's generation script's", same_ids and same_clips, detail)


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
    forced = generation.ForceTokens(
        [config.audio_out_bos_token_id, config.audio_out_token_idx, bundle.tokenizer.convert_tokens_to_ids("<|eot_id|>")],
        target[:, 1:],
    )
    sampling = generation.Sampling(greedy=True, seed=0, max_seconds=target.shape[1] / generation.FRAMES_PER_SECOND + 1)
    generated = generation.generate(
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
    sampling = generation.Sampling(greedy=True, seed=0, max_seconds=case.target_codes.shape[1] / generation.FRAMES_PER_SECOND + 1)
    with torch.inference_mode():
        _, audio_sequences = generation.generate(learner, prompt_inputs, sampling)
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


def check_batched_generation(bundle, case: ParityCase, tolerance: ParityTolerance) -> CheckResult:
    """Greedy codes of B prompts generated together = each prompt's codes from the package's batch-1 `generate`.

    The prompts differ in length: the case's reference cut to 1, 2/3, 1/2, 2/5...
    of its frames, and its text to as many fractions of its words, so rows are
    padded differently and may end at different steps.
    """
    config = bundle.model.config
    device = next(bundle.model.parameters()).device
    sampling = generation.Sampling(greedy=True, seed=0, max_seconds=tolerance.batched_seconds)
    prompts = _prompts_of_different_lengths(bundle, case, tolerance.batched_rows)
    collator = collate.build_collator(config, collate.whisper_features(config))
    alone = []
    for prompt in prompts:
        inputs = collate.batch_to_model_inputs(collate.collate(collator, [prompt], config.audio_codebook_size), device)
        with torch.inference_mode():
            _, streams = generation.generate(bundle, inputs, sampling, [generation.ForceTokens([config.audio_out_bos_token_id])])
        alone.append(streams[0].cpu())
    together = batched_generation.generate_batch(bundle, prompts, sampling)
    rows = [f"{len(prompt.input_ids)} tokens + {prompt.audio_ids_concat.shape[1]} reference frames: {_compare_streams(a, b)}"
            for prompt, a, b in zip(prompts, alone, together)]
    passed = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(alone, together))
    return CheckResult("batched generation = the package's generate, row by row", passed,
                       f"{len(prompts)} prompts in one batch, greedy; " + "; ".join(rows))


def _prompts_of_different_lengths(bundle, case: ParityCase, count: int) -> list:
    words = case.text.split()
    prompts = []
    for index in range(count):
        keep = 1 / (1 + index / 2) if index else 1.0  # 1, 2/3, 1/2, 2/5, ...
        frames = max(1, int(case.ref_codes.shape[1] * keep))
        waveform = None if case.ref_waveform is None else case.ref_waveform[: frames * case.sample_rate // generation.FRAMES_PER_SECOND]
        text = " ".join(words[: max(1, round(len(words) * keep))])
        prompts.append(data.build_sample(bundle.tokenizer, case.ref_text, case.ref_codes[:, :frames], text, layout=case.layout,
                                         ref_waveform=waveform, sample_rate=case.sample_rate))
    return prompts


def _compare_streams(alone: torch.Tensor, together: torch.Tensor) -> str:
    if alone.shape == together.shape and torch.equal(alone, together):
        return f"{alone.shape[1]} columns equal"
    same = min(alone.shape[1], together.shape[1])
    differing = (alone[:, :same] != together[:, :same]).any(0).nonzero().flatten()
    first = int(differing[0]) if len(differing) else same
    return f"DIFFERENT ({alone.shape[1]} vs {together.shape[1]} columns, first difference at column {first})"


def check_logprobs(bundle, case: ParityCase, tolerance: ParityTolerance) -> CheckResult:
    """Sampled clips (the serve engine's sampling settings, one seed each, in one batch): the log-probability the
    sampler recorded for each equals the training forward's for the same codes in the builder's sample, summed
    over the positions both cover (`preference.parity_weights`)."""
    prompt = preference.Prompt("parity", case.ref_text, case.ref_codes, case.text, case.layout,
                               ref_waveform=case.ref_waveform, sample_rate=case.sample_rate)
    prompts = [prompt] * tolerance.logprob_clips
    sampling = generation.Sampling(seed=0, max_seconds=tolerance.batched_seconds)
    clips = preference.sample_clips(bundle, prompts, list(range(len(prompts))), sampling)
    preference.training_logprobs(bundle, prompts, clips)
    rows, passed = [], True
    for clip in clips:
        if clip.codes is None or not clip.positions:
            passed = False
            rows.append(f"seed {clip.seed}: no position to compare ({clip.error or 'the stream departs at once'})")
            continue
        difference = abs(clip.sampler_logp - clip.training_logp)
        passed &= difference <= tolerance.logprob_per_position * clip.positions
        rows.append(f"seed {clip.seed}: {clip.positions} positions, {clip.sampler_logp:.3f} vs {clip.training_logp:.3f} "
                    f"({difference / clip.positions:.1e} a position)")
    return CheckResult("sampler log-probabilities = training forward's", passed,
                       f"tolerance {tolerance.logprob_per_position:.0e} nats a position; " + "; ".join(rows))


CHECKS = ("prefix", "official", "collated", "labels", "logits", "memorise", "chunked")
ALL_CHECKS = CHECKS + ("batched", "logprobs")


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
        "batched": lambda: check_batched_generation(bundle, case, tolerance),
        "chunked": lambda: check_chunked_prompt(bundle, case),
        "logprobs": lambda: check_logprobs(bundle, case, tolerance),
    }
    return [runners[name]() for name in checks]


def demo_case(bundle: model_utils.Bundle, ref_in_system: bool = False, scene: str | None = None) -> ParityCase:
    """A parity case from the committed demo data: two utterances of one Arabic speaker."""
    rows = {row["id"]: row for row in map(json.loads, (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines())}
    ref, target = rows["ar_female_0"], rows["ar_female_1"]
    reference = generation.encode_reference(bundle, str(DEMO_DIR / ref["audio"]), ref["text"], ref_in_system)
    target_codes = data.encode_clip(bundle.audio_tokenizer, data.load_audio(DEMO_DIR / target["audio"], reference.sample_rate))
    return ParityCase(
        ref_text=reference.text, ref_codes=reference.codes, text=target["text"], target_codes=target_codes,
        ref_waveform=reference.waveform, sample_rate=reference.sample_rate, scene=scene, ref_in_system=ref_in_system,
    )


def run_and_report(
    layouts: list[tuple[str, bool]], scene: str | None, checks: tuple[str, ...], load: Callable[[str], model_utils.Bundle]
) -> int:
    """The suite on the demo case for each (model, reference in the system message) of `layouts`, `load` giving a
    model's bundle by name: a header per model, one PASS/FAIL line per check, a verdict; 1 if any check failed, else 0."""
    failures = 0
    for model_name, in_system in layouts:
        bundle = load(model_name)
        placement = "reference in system message" if in_system else "reference as assistant turn"
        whisper = " + Whisper" if collate.uses_whisper(bundle.model.config) else ""
        print(f"== parity: {model_name}, {placement}{whisper}")
        for result in run_parity(bundle, demo_case(bundle, in_system, scene), checks=checks):
            failures += not result.passed
            print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}: {result.detail}")
    print("parity: all checks passed" if not failures else f"parity: {failures} check(s) FAILED")
    return 1 if failures else 0
