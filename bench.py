"""Memory plan and speed benchmark of one training step (a script, not a test).

    python bench.py plan --model released --scope lora --tokens 4096 --grad-checkpoint
    python bench.py plan-table                      # the README table: scopes x tokens x checkpointing, before/after
    python bench.py validate                        # the plan against a measured CPU step of a mid-size model
    python bench.py run --preset tiny [--compile]   # tokens/s, step time, peak memory, MFU; vs transformers.Trainer
    python bench.py recompiles                      # torch.compile recompiles over 50 steps of varied lengths

**plan** runs the real training step (the model, `model_utils.compute_loss`,
backward, a fused AdamW step, with the optimizer state resident as in every step after the first) on
fake tensors, which have shapes and dtypes but no storage, under torch's
`MemTracker`: the released 5.8B layout plans in seconds with no weights and
no GPU. Fake tensors cannot answer data-dependent questions (how many
positions a mask selects, `.item()`), and the package's forward asks many
while merging text and audio. So the same step first runs for real on a
*proxy*: the same layout (layers, dual FFN, codebooks, delay pattern,
scope, options) at width 16 with the batch's token ids mapped into a small
vocabulary, which gives identical masks; each data-dependent answer is
recorded, and the fake step replays them in order (a mismatch of operators
is an error, never a guess). The fake tensors live on the CPU: a faked CUDA
device fails here because composite operators (`embedding`) open a CUDA
device guard, which calls the driver. The plan therefore uses the CUDA
step's settings on CPU kernels: bf16 autocast, fused AdamW; the CPU's
scaled-dot-product attention keeps O(L) memory like the CUDA flash and
memory-efficient kernels. It counts tensor bytes (what
`torch.cuda.max_memory_allocated` reports), not the CUDA context (about
0.5 GB) or allocator fragmentation.

The batch is a voice-cloning layout (`synthetic_samples`): per sample a
prompt of text, a reference clip, the target text and the labelled target
clip, built by `data.build_sample` and collated by `collate.build_collator`,
filled with random codes to `--sample-tokens` merged positions, as many
samples as fit `--tokens`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import collate
import data
import model_utils
import train

GIB = 2**30
aten = torch.ops.aten

# --------------------------------------------------------------------------
# The released layout and a voice-cloning batch
# --------------------------------------------------------------------------

RELEASED_IDS = {"<|AUDIO|>": 128015, "<|AUDIO_OUT|>": 128016, "<|audio_out_bos|>": 128013, "<|audio_eos|>": 128012,
                "<|end_of_text|>": 128001}


def released_config(num_layers: int = 28) -> HiggsAudioConfig:
    """bosonai/higgs-audio-v2-generation-3B-base's layout: Llama-3.2-3B text model, dual FFN on every layer,
    8 codebooks of 1024 (+ stream BOS/EOS) with the delay pattern, no Whisper tower."""
    text_config = dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=num_layers,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=RELEASED_IDS["<|end_of_text|>"],
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    )
    config = HiggsAudioConfig(
        text_config=text_config, audio_adapter_type="dual_ffn_fast_forward", audio_ffn_hidden_size=3072,
        audio_ffn_intermediate_size=8192, audio_dual_ffn_layers=list(range(num_layers)), audio_decoder_proj_num_layers=0,
        use_audio_out_self_attention=False, audio_num_codebooks=8, audio_codebook_size=1024, audio_stream_bos_id=1024,
        audio_stream_eos_id=1025, use_delay_pattern=True, skip_audio_tower=True, encode_whisper_embed=False,
        encode_audio_in_tokens=True, audio_in_token_idx=RELEASED_IDS["<|AUDIO|>"],
        audio_out_token_idx=RELEASED_IDS["<|AUDIO_OUT|>"], audio_out_bos_token_id=RELEASED_IDS["<|audio_out_bos|>"],
        audio_eos_token_id=RELEASED_IDS["<|audio_eos|>"], pad_token_id=RELEASED_IDS["<|end_of_text|>"],
    )
    config._attn_implementation = "sdpa"
    return config


def model_config(model: str, num_layers: int | None = None) -> HiggsAudioConfig:
    """`released`, `tiny`, or a model directory's config; `num_layers` cuts the depth (dual FFN kept on every layer)."""
    if model == "released":
        return released_config(num_layers or 28)
    if model == model_utils.TINY_PRESET:
        config = model_utils.tiny_model_config(model_utils.build_tiny_text_tokenizer())
    else:
        config = HiggsAudioConfig.from_pretrained(model)
        config._attn_implementation = "sdpa"
    if num_layers:
        config = copy.deepcopy(config)
        config.text_config.num_hidden_layers = num_layers
        config.audio_dual_ffn_layers = [i for i in config.audio_dual_ffn_layers if i < num_layers]
    return config


def _special_ids(config: HiggsAudioConfig) -> dict[str, int]:
    return {"<|AUDIO|>": config.audio_in_token_idx, "<|AUDIO_OUT|>": config.audio_out_token_idx,
            "<|audio_out_bos|>": config.audio_out_bos_token_id, "<|audio_eos|>": config.audio_eos_token_id,
            "<|end_of_text|>": config.pad_token_id}


def synthetic_samples(config: HiggsAudioConfig, tokens: int, sample_tokens: int = 1024, seed: int = 0) -> list:
    """Voice-cloning samples of `sample_tokens` merged positions each (the last one shorter), `tokens` in all.

    Built by the tiny text tokenizer and `data.build_sample` (the project's
    one sample builder), then the five special ids mapped to `config`'s; the
    other text ids (< 600) are valid in any Higgs vocabulary. Reference clip
    one third of the audio frames, target two thirds; codes are random.
    """
    tokenizer = model_utils.build_tiny_text_tokenizer()
    to_config = {tokenizer.convert_tokens_to_ids(name): config_id for name, config_id in _special_ids(config).items()}
    generator = torch.Generator().manual_seed(seed)
    codebooks, size = config.audio_num_codebooks, config.audio_codebook_size
    ref_text = "Voice cloning speaks new text in the voice of a short reference clip."
    text = "The quick brown fox jumps over the lazy dog, and then it rests."
    samples, left = [], tokens
    while left >= 64:
        length = min(sample_tokens, left)
        probe = data.build_sample(tokenizer, ref_text, torch.zeros(codebooks, 1, dtype=torch.long), text,
                                  torch.zeros(codebooks, 1, dtype=torch.long))
        frames = length - collate.sample_tokens(probe, codebooks, config.use_delay_pattern) + 2
        ref_frames = max(1, frames // 3)
        codes = lambda n: torch.randint(0, size, (codebooks, n), generator=generator)  # noqa: E731
        sample = data.build_sample(tokenizer, ref_text, codes(ref_frames), text, codes(frames - ref_frames))
        for field in ("input_ids", "label_ids"):
            ids = getattr(sample, field)
            setattr(sample, field, ids.apply_(lambda i: to_config.get(i, i)))
        samples.append(sample)
        left -= length
    if not samples:
        raise ValueError(f"--tokens {tokens} is too few for one voice-cloning sample (at least 64)")
    return samples


def synthetic_batch(config: HiggsAudioConfig, tokens: int, sample_tokens: int = 1024, seed: int = 0):
    """The collated batch of `synthetic_samples` and each sample's merged length."""
    samples = synthetic_samples(config, tokens, sample_tokens, seed)
    lengths = [collate.sample_tokens(sample, config.audio_num_codebooks, config.use_delay_pattern) for sample in samples]
    return collate.collate(collate.build_collator(config), samples, config.audio_codebook_size), lengths


# --------------------------------------------------------------------------
# The step, as train.py runs it
# --------------------------------------------------------------------------


@dataclass
class StepOptions:
    scope: str = "lora"
    precision: str = "bf16"
    grad_checkpoint: bool = False
    frozen_bf16: bool = True
    text_logits: str = "labelled"
    compile: bool = False

    def train_config(self, device: str) -> train.TrainConfig:
        return train.TrainConfig(scope=self.scope, precision=self.precision, grad_checkpoint=self.grad_checkpoint,
                                 frozen_bf16=self.frozen_bf16, text_logits=self.text_logits, compile=self.compile,
                                 device=device)


def build_training_model(config: HiggsAudioConfig, options: StepOptions, device: str = "cpu") -> torch.nn.Module:
    """The model as `train._train` prepares it: scope or LoRA, memory options, wrapped decoder layers."""
    train_config = options.train_config(device)
    model = HiggsAudioModel(config).to(device)
    if options.scope == "lora":
        model = train.add_lora(model, train_config)
    else:
        train.select_trainable(model, options.scope)
    train.reduce_memory(model, train_config)
    train.wrap_decoder_layers(model, train_config)
    return model.train()


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, label_audio_ids: torch.Tensor,
                  options: StepOptions) -> model_utils.LossBreakdown:
    """Forward, loss, backward and AdamW step, as in `train._train`'s loop."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=options.precision == "bf16"):
        loss = model_utils.compute_loss(model(**inputs), label_audio_ids)
        loss.total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def cuda_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """`train.build_optimizer` as it is on CUDA (fused AdamW, no per-parameter temporaries)."""
    return train.build_optimizer(model, train.TrainConfig(device="cuda"))


# --------------------------------------------------------------------------
# Memory plan: the step on fake tensors, data-dependent answers replayed from a proxy
# --------------------------------------------------------------------------

_BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class RealIndexData(TorchDispatchMode):
    """Under `FakeTensorMode`, keeps the batch's index data real: ids, masks, positions, labels.

    Fake tensors have no data, so they cannot say how many positions a mask
    selects, and the package's forward asks that all through the merge of
    text and audio. The batch enters as real tensors; an operator whose
    tensor inputs are all real (or a factory of integers or booleans) runs
    for real, so every mask and position is computed exactly and only the
    floating-point work (weights, activations, gradients) is fake. Indexing
    a fake tensor with a real boolean mask is indexing with the mask's
    positions, which fake tensors can do.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not any(isinstance(t, FakeTensor) for t in tensors):
            if tensors:
                with unset_fake_temporarily():
                    return func(*args, **kwargs)
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor) and not (result.is_floating_point() or result.is_complex()):
                with unset_fake_temporarily():
                    return func(*args, **kwargs)
            return result
        if func in _BOOL_INDEXED:
            args = (args[0], _positions(args[1]), *args[2:])
        return func(*args, **kwargs)


def _positions(indices: list) -> list:
    """Boolean masks among real indices replaced by their positions (the same indexing)."""
    expanded = []
    for index in indices:
        if index is not None and not isinstance(index, FakeTensor) and index.dtype in (torch.bool, torch.uint8):
            with unset_fake_temporarily():
                expanded.extend(index.nonzero(as_tuple=True))
        else:
            expanded.append(index)
    return expanded


@dataclass
class Plan:
    peak_gib: float
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    parameters: int
    trained: int
    param_bytes: int
    tokens: int
    samples: int
    text_labels: int
    text_logits_gib: float


class PeakTracker(MemTracker):
    """torch's `MemTracker`, keeping the step's peak only, usable on models with frozen parameters.

    Two changes, both for limits of torch 2.9's tracker: it updates every
    tracked module's local peak after every operator (about 1,500 modules
    times 100,000 operators for the 28-layer LoRA model: an hour, where the
    peak alone takes a minute), so `_update_peak_stats` keeps the global peak
    only; and it registers a gradient hook on every parameter of a module it
    enters, which raises on a frozen one, so frozen parameters are marked as
    hooked already (they get no gradient; their memory is counted).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        for parameter in model.parameters():
            if not parameter.requires_grad:
                self._param_to_grad_hook_handles[parameter] = (_NoHook(), _NoHook())

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


class _NoHook:
    def remove(self) -> None:
        pass


def resident_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One AdamW step on zero gradients: the state every step after the first holds (fake tensors, no cost)."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plan_step(config: HiggsAudioConfig, options: StepOptions, tokens: int, sample_tokens: int = 1024) -> Plan:
    """Peak memory of a training step of `config` at `tokens` positions per micro-batch, without weights."""
    batch, lengths = synthetic_batch(config, tokens, sample_tokens)
    inputs = collate.batch_to_model_inputs(batch, "cpu")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = build_training_model(config, options)
        optimizer = cuda_optimizer(model)
        resident_optimizer_state(model, optimizer)
    tracker = PeakTracker(model)
    tracker.track_external(model, optimizer)
    with fake, RealIndexData(), tracker:
        training_step(model, optimizer, inputs, batch.label_audio_ids, options)
    return _plan_from(tracker, model, batch, lengths, config, options)


def text_label_count(batch, config: HiggsAudioConfig) -> int:
    """Positions with a text label in the merged sequence (audio placeholders become audio columns)."""
    text = (batch.input_ids != config.audio_in_token_idx) & (batch.input_ids != config.audio_out_token_idx)
    return int(((batch.label_ids != model_utils.IGNORE_INDEX) & text).sum())


def _plan_from(tracker: MemTracker, model, batch, lengths: list[int], config: HiggsAudioConfig,
               options: StepOptions) -> Plan:
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    categories = {str(getattr(key, "value", key)).lower(): value for key, value in snapshot.items()}
    weights = categories.get("parameter", 0) + categories.get("buffer", 0)
    held = weights + categories.get("gradient", 0) + categories.get("optstate", 0)
    parameters = list(model.parameters())
    padded = collate.padded_tokens(lengths)
    text_labels = text_label_count(batch, config)
    logit_rows = text_labels if options.text_logits == "labelled" else padded
    return Plan(
        peak_gib=categories["total"] / GIB,
        weights_gib=weights / GIB,
        gradients_gib=categories.get("gradient", 0) / GIB,
        optimizer_gib=categories.get("optstate", 0) / GIB,
        activations_gib=(categories["total"] - held) / GIB,
        parameters=sum(p.numel() for p in parameters),
        trained=sum(p.numel() for p in parameters if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in parameters),
        tokens=padded,
        samples=len(lengths),
        text_labels=text_labels,
        text_logits_gib=logit_rows * config.text_config.vocab_size * 4 / GIB,
    )
