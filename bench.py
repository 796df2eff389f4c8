"""Memory plan and speed benchmark of one training step (a script, not a test).

    python bench.py plan --model released --scope lora --tokens 4096 --grad-checkpoint
    python bench.py plan-table                      # the README table: scopes x tokens x checkpointing, before/after
    python bench.py validate                        # the plan against a measured CPU step of a mid-size model
    python bench.py run --preset tiny [--compile]   # tokens/s, step time, peak memory, MFU; vs transformers.Trainer
    python bench.py recompiles [--scope model]      # torch.compile recompiles over 50 steps of varied lengths
    python bench.py graphs                          # graphs and breaks per layer and of the whole model, compiled
    python bench.py syncs                           # host syncs per micro-batch, ours and the package's, per layer
    python bench.py plan-optimizer                  # the plan with fp32 vs 8-bit AdamW moments
    python bench.py adamw8bit                       # train.py's losses, 8-bit vs fp32 AdamW moments, 200 tiny steps
    python bench.py gpu                             # the GPU check: one call, <= 8 minutes on one H100/H200

Every mode runs the model `training.prepare_model` makes and the step
`training.train_step` takes, the ones `train.py` runs; a mode's settings are a
`config.TrainConfig` (`bench_config`).

**plan** runs that training step (forward, loss, backward, clipping, a fused
AdamW step, with the optimizer state resident as in every step after the first) on
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
import copy
import json
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import collate
import data
import model_utils
import syncs
import training
from config import TrainConfig, add_setting_flags, check_config
from parallel import World

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


# The settings that shape a step's memory and speed, which `plan` takes as flags; the rest are train.py's defaults.
STEP_SETTINGS = ("scope", "precision", "grad_checkpoint", "frozen_bf16", "text_logits", "compile", "compile_scope", "optimizer",
                 "kl_weight")
BENCH_DEFAULTS = {"scope": "lora", "precision": "bf16"}


def bench_config(**settings) -> TrainConfig:
    """The training settings of a benchmarked step: train.py's, with LoRA and bf16 unless `settings` say otherwise."""
    config = TrainConfig(**{**BENCH_DEFAULTS, **settings})
    check_config(config)
    return config


def build_training_model(config: HiggsAudioConfig, settings: TrainConfig, device: str = "cpu",
                         compile_backend: str | Callable = "inductor") -> torch.nn.Module:
    """A randomly initialised model of `config` (initialised on `device`), prepared as `train.py` prepares it
    (`training.prepare_model`); with `settings.compile`, compiled by `compile_backend` (`eager` traces the
    same graphs without generating code)."""
    with torch.device(device):
        model = HiggsAudioModel(config)
    model = training.prepare_model(model, replace(settings, compile=False), World(), device).train()
    if settings.compile:
        training.compile_model(model, settings.compile_scope, compile_backend)
    return model


def step_once(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, settings: TrainConfig,
              device: str = "cpu") -> training.StepStats:
    """`training.train_step` on one micro-batch at the peak learning rate."""
    return training.train_step(model, optimizer, [batch], settings, World(), device, settings.lr)


# --------------------------------------------------------------------------
# Memory plan: the step on fake tensors, data-dependent answers replayed from a proxy
# --------------------------------------------------------------------------

class RealIndexData(TorchDispatchMode):
    """Under `FakeTensorMode`, keeps the batch's index data real: ids, masks, positions, labels.

    Fake tensors have no data, so they cannot say how many positions a mask
    selects, and the package's forward asks that all through the merge of
    text and audio. The batch enters as real tensors; an operator whose
    tensor inputs are all real (or a factory of integers or booleans) runs
    for real, so every mask and position is computed exactly and only the
    floating-point work (weights, activations, gradients) is fake. Indexing
    a fake tensor with a real boolean mask is indexing with the mask's
    positions, which fake tensors can do. The one fake value the host reads
    is the step's skip flag, where the optimizer has no `found_inf`
    (`training._update_unless`, `--optimizer adamw8bit`): a planned step is
    a finite one, so the answer is False (not skipped).
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
        if func in syncs.BOOLEAN_INDEXED:
            args = (args[0], _positions(args[1]), *args[2:])
        if func is aten._local_scalar_dense.default and args[0].dtype == torch.bool and args[0].dim() == 0:
            return False
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
    weights_bytes: int
    optimizer_bytes: int
    parameters: int
    trained: int
    param_bytes: int
    tokens: int
    samples: int
    text_labels: int
    text_logits_gib: float


class PeakTracker(MemTracker):
    """torch's `MemTracker`, keeping the step's peak only, usable on models with frozen parameters.

    Three changes, all for limits of torch 2.9's tracker: it updates every
    tracked module's local peak after every operator (about 1,500 modules
    times 100,000 operators for the 28-layer LoRA model: an hour, where the
    peak alone takes a minute), so `_update_peak_stats` keeps the global peak
    only; it registers a gradient hook on every parameter of a module it
    enters, which raises on a frozen one, so frozen parameters are marked as
    hooked already (they get no gradient; their memory is counted); and it
    refuses a second forward of the root module in one step, which the
    forgetting guard's base pass is, so `_pre_fw_hook` lets it through (its
    tensors are counted like any others).
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

    def _pre_fw_hook(self, module: torch.nn.Module, inputs) -> None:
        # The forgetting guard (--kl-weight) calls the model a second time in a step, its adapters disabled;
        # torch's tracker refuses a second call of the root module, which only its per-module statistics need.
        name = self._mod_tracker.get_known_fqn(module)
        again = (module in self.memory_tracking and not self._mod_tracker.is_bw
                 and set(self._mod_tracker.parents) - {name} == {"Global"})
        if not again:
            super()._pre_fw_hook(module, inputs)


class _NoHook:
    def remove(self) -> None:
        pass


def resident_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One AdamW step on zero gradients: the state every step after the first holds (fake tensors, no cost)."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    training.step_optimizer(optimizer, "cpu")
    optimizer.zero_grad(set_to_none=True)


def plan_step(config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> Plan:
    """Peak memory of a training step of `config` at `tokens` positions per micro-batch, without weights.

    The optimizer is CUDA's (fused AdamW, no per-parameter temporaries)."""
    batch, lengths = synthetic_batch(config, tokens, sample_tokens)
    if settings.optimizer == "adamw8bit":
        _build_torchao_tables()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = build_training_model(config, settings)
        optimizer = training.build_optimizer(model, settings, "cuda")
        resident_optimizer_state(model, optimizer)
    tracker = PeakTracker(model)
    tracker.track_external(model, optimizer)
    with fake, RealIndexData(), tracker:
        step_once(model, optimizer, batch, settings)
    return _plan_from(tracker, model, batch, lengths, config, settings)


def _build_torchao_tables() -> None:
    """torchao computes its 8-bit quantisation tables with torch operators on first use and caches them as
    Python lists; fake tensors cannot give values, so they are built for real before the fake step."""
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    get_qmap_signed(), get_qmap_unsigned()


def _plan_from(tracker: MemTracker, model, batch, lengths: list[int], config: HiggsAudioConfig,
               settings: TrainConfig) -> Plan:
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    categories = {str(getattr(key, "value", key)).lower(): value for key, value in snapshot.items()}
    weights = categories.get("parameter", 0) + categories.get("buffer", 0)
    held = weights + categories.get("gradient", 0) + categories.get("optstate", 0)
    parameters = list(model.parameters())
    padded = collate.padded_tokens(lengths)
    text_labels = collate.text_label_count(batch, config)
    logit_rows = text_labels if settings.text_logits == "labelled" else padded
    return Plan(
        peak_gib=categories["total"] / GIB,
        weights_gib=weights / GIB,
        gradients_gib=categories.get("gradient", 0) / GIB,
        optimizer_gib=categories.get("optstate", 0) / GIB,
        activations_gib=(categories["total"] - held) / GIB,
        weights_bytes=weights,
        optimizer_bytes=categories.get("optstate", 0),
        parameters=sum(p.numel() for p in parameters),
        trained=sum(p.numel() for p in parameters if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in parameters),
        tokens=padded,
        samples=len(lengths),
        text_labels=text_labels,
        text_logits_gib=logit_rows * config.text_config.vocab_size * 4 / GIB,
    )


# --------------------------------------------------------------------------
# Validation: the plan against a measured step on the CPU
# --------------------------------------------------------------------------


def mid_config() -> HiggsAudioConfig:
    """A mid-size model with the released layout: 4 layers of width 1024, 32,000-token vocabulary (164M parameters)."""
    tokenizer = model_utils.build_tiny_text_tokenizer()
    dims = model_utils.TinyDims(hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=8, num_kv_heads=4)
    config = model_utils.tiny_model_config(tokenizer, dims=dims)
    config.text_config.vocab_size = 32000
    return config


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step(config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> dict:
    """The step for real on the CPU: tracked peak (same tracker, real tensors) and the process's peak RSS growth."""
    batch, _ = synthetic_batch(config, tokens, sample_tokens)
    before = _rss_bytes()
    model = build_training_model(config, settings)
    optimizer = training.build_optimizer(model, settings, "cuda")  # fused, as planned (it runs on the CPU too)
    resident_optimizer_state(model, optimizer)
    tracker = PeakTracker(model)
    tracker.track_external(model, optimizer)
    with tracker:
        step_once(model, optimizer, batch, settings)
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tracked_gib": snapshot["Total"] / GIB, "rss_growth_gib": (peak_rss - before) / GIB}


def validate(tokens: int = 2048) -> list[dict]:
    """Plan vs measured peak of the mid-size model on the CPU, fp32, for both text-logit modes."""
    rows = []
    for text_logits in ("all", "labelled"):
        settings = bench_config(scope="audio", precision="fp32", frozen_bf16=False, text_logits=text_logits)
        planned = plan_step(mid_config(), settings, tokens).peak_gib
        measured = measure_step(mid_config(), settings, tokens)
        rows.append({"model": "mid (4 x 1024, 164M)", "scope": "audio", "tokens": tokens, "text_logits": text_logits,
                     "planned_gib": planned, **measured,
                     "error_vs_tracked_pct": 100 * (planned - measured["tracked_gib"]) / measured["tracked_gib"],
                     "error_vs_rss_pct": 100 * (planned - measured["rss_growth_gib"]) / measured["rss_growth_gib"]})
    return rows


# --------------------------------------------------------------------------
# FLOPs of the real layout, and the speed benchmark
# --------------------------------------------------------------------------


def step_flops(config: HiggsAudioConfig, batch, lengths: list[int], settings: TrainConfig, trained_fraction: float) -> float:
    """Model FLOPs of one training step, counted for the real layout on real (unpadded) positions.

    Per layer: q/k/v/o projections for every position; causal attention
    (2 L^2 d per sample); the text MLP on every position that is not an
    audio-out column and the audio MLP on the audio-out columns (the dual
    FFN routes each position to one of them). Heads: the text head at every
    position (`--text-logits all`) or at the labelled ones, the audio head on
    the audio-out columns. Backward: twice the forward for input gradients,
    plus the weight gradients of the trained fraction of the weights.
    Activation recomputation is not counted (the usual MFU convention).
    """
    text = config.text_config
    hidden, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    positions = sum(lengths)
    audio = batch.audio_out_ids.shape[1]
    projections = 2 * hidden * (2 * heads * head_dim + 2 * kv * head_dim) * positions
    attention = sum(2 * length * length * heads * head_dim for length in lengths)
    mlps = 2 * 3 * hidden * (text.intermediate_size * (positions - audio) + config.audio_ffn_intermediate_size * audio)
    text_rows = collate.text_label_count(batch, config) if settings.text_logits == "labelled" else positions
    heads_flops = 2 * hidden * (text.vocab_size * text_rows + config.audio_num_codebooks * (config.audio_codebook_size + 2) * audio)
    matmuls = text.num_hidden_layers * (projections + mlps) + heads_flops
    forward = matmuls + text.num_hidden_layers * attention
    return forward + 2 * forward + trained_fraction * matmuls


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """Dense peak of the device: a data-sheet figure on CUDA, a measured large matmul on the CPU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 dense data sheet"
        raise ValueError(f"no peak FLOPs known for {name}; add it to PEAK_TFLOPS")
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a
    started = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - started), f"measured 1024^3 {dtype} matmul on this CPU"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def our_loop(model, steps: list[list], settings: TrainConfig, device: str, warmup: int) -> tuple[list[float], list[float]]:
    """Step times of `training.train_step` over `steps`, each a step's micro-batches, at train.py's learning
    rate schedule (the first `warmup` not timed); and each step's total loss, read once the last step is
    timed so that reading waits for nothing inside the times."""
    optimizer = training.build_optimizer(model, settings, device)
    times, stats = [], []
    for index, micro_batches in enumerate(steps):
        _synchronize(device)
        started = time.perf_counter()
        lr = training.lr_at(index, settings, settings.max_steps)
        stats.append(training.train_step(model, optimizer, micro_batches, settings, World(), device, lr))
        _synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times, [step_stats.read(World()).losses["total"] for step_stats in stats]


def trainer_loop(model, steps: list[list], settings: TrainConfig, device: str, warmup: int) -> list[float]:
    """Step times of a `transformers.Trainer` over the same model and batches, the way the public scripts
    for this model train: `Trainer` with its own optimizer, loop, autocast and a `compute_loss` override."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(steps)

        def __getitem__(self, index):
            (batch,) = steps[index]
            return {**collate.batch_to_model_inputs(batch, device), "label_audio_ids": batch.label_audio_ids.to(device)}

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            label_audio_ids = inputs.pop("label_audio_ids")
            outputs = model(**inputs, label_audio_ids=label_audio_ids)
            loss = model_utils.compute_loss(outputs, label_audio_ids).total
            return (loss, outputs) if return_outputs else loss

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, max_steps=len(steps), per_device_train_batch_size=1, learning_rate=1e-5,
            bf16=settings.precision == "bf16", use_cpu=not device.startswith("cuda"), report_to=[], save_strategy="no",
            logging_strategy="no", dataloader_pin_memory=False, remove_unused_columns=False, max_grad_norm=0.0,
            optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch", disable_tqdm=True,
        )
        trainer = LossTrainer(model=model, args=arguments, train_dataset=Batches(), data_collator=lambda items: items[0],
                              callbacks=[timer])
        trainer.train()
    return timer.times[warmup:]


@dataclass
class RunCase:
    name: str
    model: str
    layers: int | None
    settings: TrainConfig
    tokens: int
    steps: int = 6
    warmup: int = 2
    trainer: bool = True
    count_syncs: bool = False


def run_case(case: RunCase, device: str, trainer: bool, compile_backend: str = "inductor") -> dict:
    """Tokens/s, step time, peak memory and MFU of `case`, its host syncs if asked, and a `transformers.Trainer`
    loop's step time if asked."""
    config = model_config(case.model, case.layers)
    batch, lengths = synthetic_batch(config, case.tokens)
    if device.startswith("cuda"):
        batch = collate.pinned(batch)  # as the loader hands train.py its batches
    steps = [[batch]] * (case.warmup + case.steps)
    dtype = torch.bfloat16 if case.settings.precision == "bf16" else torch.float32
    peak, peak_source = peak_flops(device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_training_model(config, case.settings, device, compile_backend)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    matrix = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    flops = step_flops(config, batch, lengths, case.settings, min(1.0, trained / matrix))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, _ = our_loop(model, steps, case.settings, device, case.warmup)
    step_time = sorted(times)[len(times) // 2]
    row = {"case": case.name, "device": device if device == "cpu" else torch.cuda.get_device_name(), "scope": case.settings.scope,
           "precision": case.settings.precision, "compile": case.settings.compile,
           "grad_checkpoint": case.settings.grad_checkpoint, "tokens": sum(lengths), "step_s": step_time,
           "tokens_per_s": sum(lengths) / step_time, "peak_memory_gib": _peak_memory_gib(device),
           "peak_memory_kind": "max_memory_allocated" if device.startswith("cuda") else "process peak RSS",
           "mfu_pct": 100 * flops / step_time / peak, "peak_flops_source": peak_source, "step_tflop": flops / 1e12}
    if case.count_syncs:
        row.update(step_syncs(model, batch, case.settings, device))
    del model  # the Trainer's copy must not share the card with ours
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if trainer and case.trainer:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reference = build_training_model(config, case.settings, device, compile_backend)
        trainer_time = sorted(trainer_loop(reference, steps, case.settings, device, case.warmup))
        row["trainer_step_s"] = trainer_time[len(trainer_time) // 2]
        row["speedup_vs_trainer"] = row["trainer_step_s"] / step_time
    return row


def cpu_cases() -> list[RunCase]:
    """(a) the tiny preset, eager and compiled, fp32 and bf16, each against a Trainer loop; (b) the released layout
    (full width and vocabulary) at 2 layers, fp32, LoRA with checkpointing, eager and compiled, one timed step
    each (minutes on 2 cores)."""
    released = bench_config(scope="lora", precision="fp32", grad_checkpoint=True)
    return [
        RunCase("tiny eager fp32", "tiny", None, bench_config(scope="full", precision="fp32"), 2048, steps=4),
        RunCase("tiny compile fp32", "tiny", None, bench_config(scope="full", precision="fp32", compile=True), 2048, steps=4),
        RunCase("tiny eager bf16", "tiny", None, bench_config(scope="full", precision="bf16"), 2048, steps=4),
        RunCase("released x2 layers lora fp32", "released", 2, released, 1024, steps=2, warmup=1, trainer=False),
        RunCase("released x2 layers lora fp32 compile", "released", 2, replace(released, compile=True), 1024, steps=2,
                warmup=1, trainer=False),
    ]


def gpu_cases() -> list[RunCase]:
    """(c) the released layout, random weights, bf16: scopes x checkpointing x 2k/4k/8k tokens."""
    return [RunCase(f"released {scope} ckpt={checkpoint} {tokens}", "released", None,
                    bench_config(scope=scope, grad_checkpoint=checkpoint), tokens, steps=5, warmup=2)
            for scope in ("lora", "audio", "full") for checkpoint in (True, False) for tokens in (2048, 4096, 8192)]


# --------------------------------------------------------------------------
# The GPU check: one call, at most 8 minutes on one H100/H200
# --------------------------------------------------------------------------

GPU_CHECK_COLUMNS = ["case", "device", "tokens", "step_s", "tokens_per_s", "mfu_pct", "peak_memory_gib", "planned_gib",
                     "syncs_ours", "syncs_package", "trainer_step_s", "speedup_vs_trainer", "seconds"]


def gpu_check(device: str, model: str = "released", tokens: int = 4096, steps: int = 5, warmup: int = 2,
              compile_backend: str = "inductor") -> list[dict]:
    """The released layout with random weights, bf16, checkpointing, `tokens` per micro-batch: scopes lora and
    audio, compile off and on. Per case: step time, tokens/s, MFU of the real layout's FLOPs, peak
    `max_memory_allocated` against the plan of the same step, and, compile off, the host syncs of one step
    (ours and the package's) and the `transformers.Trainer` loop's step time. On the CPU (`model="tiny"`,
    `compile_backend="eager"`) the same code runs in seconds (tests/test_bench.py)."""
    import torch._dynamo

    rows = []
    for scope in ("lora", "audio"):
        settings = bench_config(scope=scope, precision="bf16", grad_checkpoint=True)
        planned = plan_step(model_config(model), settings, tokens).peak_gib
        for compiled in (False, True):
            started = time.perf_counter()
            case = RunCase(f"{model} {scope} {'compile' if compiled else 'eager'}", model, None,
                           replace(settings, compile=compiled), tokens, steps=steps, warmup=warmup,
                           trainer=not compiled, count_syncs=not compiled)
            row = run_case(case, device, trainer=True, compile_backend=compile_backend)
            rows.append({**row, "planned_gib": planned, "seconds": time.perf_counter() - started})
            print_table(rows[-1:], GPU_CHECK_COLUMNS)
            if compiled:
                torch._dynamo.reset()  # the next model's layers compile afresh
    return rows


# --------------------------------------------------------------------------
# 8-bit AdamW moments against fp32 ones, over a train.py run
# --------------------------------------------------------------------------


def optimizer_losses(steps: int = 200) -> list[dict]:
    """`train.py` on the tiny preset and the demo data for `steps` steps (no validation), once with fp32 AdamW
    and once with torchao's AdamW8bit: the logged total losses, step by step, and their gap."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train

    logged = {}
    with tempfile.TemporaryDirectory() as out:
        for optimizer in ("adamw", "adamw8bit"):
            settings = TrainConfig(max_steps=steps, optimizer=optimizer, val_manifest="", eval_every=0, save_every=steps,
                                   out_dir=out, run_name=optimizer, device="cpu", precision="fp32")
            events = EventAccumulator(str(train.train(settings) / "tensorboard"))
            events.Reload()
            logged[optimizer] = [event.value for event in events.Scalars("loss/total")]
    gaps = [abs(a - b) for a, b in zip(logged["adamw"], logged["adamw8bit"])]
    relative = [gap / abs(a) for gap, a in zip(gaps, logged["adamw"])]
    tail = max(1, steps // 10)
    return [{"steps": len(gaps), "max_abs_gap": max(gaps), "max_rel_gap": max(relative),
             "step_of_max_gap": 1 + gaps.index(max(gaps)), "first_loss": logged["adamw"][0],
             f"adamw_mean_last_{tail}": sum(logged["adamw"][-tail:]) / tail,
             f"adamw8bit_mean_last_{tail}": sum(logged["adamw8bit"][-tail:]) / tail,
             "adamw_losses": logged["adamw"], "adamw8bit_losses": logged["adamw8bit"]}]


# --------------------------------------------------------------------------
# Host syncs of a step
# --------------------------------------------------------------------------


def step_syncs(model: torch.nn.Module, batch, settings: TrainConfig, device: str) -> dict:
    """Host syncs of one `training.train_step` of one micro-batch, counted on the device it runs on, with a
    fresh optimizer of the CUDA step (fused AdamW, which runs on the CPU too); compiled layers run eagerly
    under the counter."""
    optimizer = training.build_optimizer(model, settings, "cuda")
    with syncs.SyncCounter(model, device) as counter:
        step_once(model, optimizer, batch, settings, device)
    summary = counter.summary()
    return {"syncs_ours": summary[syncs.OURS], "syncs_package": summary[syncs.PACKAGE],
            "syncs_ours_sites": [site for site in summary["by_site"] if site.startswith(syncs.OURS)]}


def planned_syncs(config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> dict:
    """Host syncs of one step of one micro-batch of `config`, on fake tensors with the batch's index data real
    (the plan's `RealIndexData`), with the CUDA step's optimizer (fused AdamW): every data-dependent operator
    the GPU step would run, attributed to ours or the package's, per decoder layer. Copies between host and
    device are not seen on the CPU; `bench.py gpu` counts them on a GPU."""
    batch, _ = synthetic_batch(config, tokens, sample_tokens)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = build_training_model(config, settings)
        optimizer = training.build_optimizer(model, settings, "cuda")
        resident_optimizer_state(model, optimizer)
    with fake, RealIndexData(), syncs.SyncCounter(model) as counter:
        step_once(model, optimizer, batch, settings)
    return counter.summary()


def sync_rows(layers: int, tokens: int) -> list[dict]:
    """`planned_syncs` of the released layout at `layers` layers: lora and audio, checkpointing off and on,
    with the package's count per layer and extrapolated to the released 28 layers."""
    rows = []
    for scope in ("lora", "audio"):
        for checkpoint in (False, True):
            settings = bench_config(scope=scope, grad_checkpoint=checkpoint)
            summary = planned_syncs(released_config(layers), settings, tokens)
            per_layer = summary["by_layer"].get("layer 0", {}).get(syncs.PACKAGE, 0)
            outside = summary["by_layer"].get("outside layers", {}).get(syncs.PACKAGE, 0)
            rows.append({"scope": scope, "grad_checkpoint": checkpoint, "layers": layers, "ours": summary[syncs.OURS],
                         "package": summary[syncs.PACKAGE], "package_per_layer": per_layer,
                         "package_outside_layers": outside, "package_at_28_layers": outside + 28 * per_layer,
                         "ours_sites": [site for site in summary["by_site"] if site.startswith(syncs.OURS)]})
            print_table(rows[-1:], list(rows[-1])[:-1])
    return rows


# --------------------------------------------------------------------------
# torch.compile: graphs and breaks, recompiles over steps of varied lengths
# --------------------------------------------------------------------------


def compile_graphs(scope: str, data_dependent_shapes: bool, backend: str = "eager", tokens: int = 1024) -> dict:
    """Graphs and graph breaks of one training step of the tiny model compiled at `scope`
    (`training.compile_model`), with or without dynamo's data-dependent-shape settings (`--compile` sets
    them for `layers` only; without them is how the package compiled before); the loss and gradient norm
    against the same step uncompiled, or the backend's error in one line.

    The layers share their code, so dynamo compiles a layer's graphs once and every layer runs them:
    `graphs` is per layer for `layers`. Breaks are decided by dynamo before any backend runs, so `eager`
    counts what `inductor` compiles, without the code generation."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = model_config("tiny")
    settings = bench_config(scope="full", precision="fp32")
    batch, _ = synthetic_batch(config, tokens, tokens // 2)
    values = {}
    for compiled in (True, False):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_training_model(config, replace(settings, compile=compiled, compile_scope=scope), "cpu", backend)
        started = time.perf_counter()
        try:
            with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=data_dependent_shapes,
                                            capture_scalar_outputs=data_dependent_shapes):
                stats = step_once(model, training.build_optimizer(model, settings, "cpu"), batch, settings)
        except Exception as error:  # a backend that cannot compile the graph: the row says so, the table goes on
            return {"scope": scope, "data_dependent_shapes": data_dependent_shapes, "backend": str(backend),
                    "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        values[compiled] = (stats.read(World()), time.perf_counter() - started)
    counters = torch._dynamo.utils.counters
    (compiled_values, compiled_seconds), (eager_values, eager_seconds) = values[True], values[False]
    return {"scope": scope, "data_dependent_shapes": data_dependent_shapes, "backend": str(backend),
            "frames": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": {reason.splitlines()[0][:120]: count for reason, count in counters["graph_break"].items()},
            "loss_difference": abs(compiled_values.losses["total"] - eager_values.losses["total"]),
            "grad_norm_difference": abs(compiled_values.grad_norm - eager_values.grad_norm),
            "first_step_s": compiled_seconds, "eager_step_s": eager_seconds}


def count_recompiles(dynamic: bool | None, steps: int = 50, seed: int = 0, backend: str = "eager",
                     scope: str = "layers") -> dict:
    """Compiles of the tiny model (`training.compile_model` at `scope`) over `steps` training steps whose lengths
    all differ.

    Whether a new length recompiles is decided by dynamo's guards, before any
    backend runs, so the count is the same for every backend; `eager` skips
    inductor's code generation, which takes minutes per graph on this CPU.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    limit_hits = LimitHits()  # dynamo logs a hit of its recompile limit but keeps no counter of it
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    dynamo_log.addHandler(limit_hits)
    config = model_config("tiny")
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randperm(700, generator=generator)[:steps] + 100).tolist()
    settings = bench_config(scope="full", precision="fp32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_training_model(config, settings)
    training.compile_model(model, scope, backend, dynamic)
    optimizer = training.build_optimizer(model, settings, "cpu")
    started = time.perf_counter()
    for length in lengths:
        batch, _ = synthetic_batch(config, 2 * length, length)
        step_once(model, optimizer, batch, settings)
    dynamo_log.removeHandler(limit_hits)
    counters = torch._dynamo.utils.counters
    return {"scope": scope, "dynamic": str(dynamic), "steps": steps, "distinct_lengths": len(set(lengths)),
            "frames_compiled": int(counters["frames"]["ok"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "recompile_limit_hits": limit_hits.count, "seconds": time.perf_counter() - started}


class LimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past it, that code runs uncompiled."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "recompile_limit" in record.getMessage()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


CARDS_GIB = (("24 GB", 24e9 / GIB), ("40 GB", 40e9 / GIB), ("48 GB", 48e9 / GIB), ("80 GB", 80e9 / GIB))


def fits(peak_gib: float) -> str:
    """The smallest card that holds the planned peak with 10% allocator slack (the validation's RSS gap) and
    0.75 GiB of CUDA context; every larger card holds it too."""
    for name, gib in CARDS_GIB:
        if peak_gib * 1.10 + 0.75 <= gib:
            return name
    return "none: shard it (FSDP)"


def plan_table(tokens_list: list[int], scopes: list[str]) -> list[dict]:
    rows = []
    for scope in scopes:
        for tokens in tokens_list:
            for checkpoint in (True, False):
                before = bench_config(scope=scope, grad_checkpoint=checkpoint, frozen_bf16=False, text_logits="all")
                after = replace(before, frozen_bf16=True, text_logits="labelled")
                planned = {name: plan_step(released_config(), settings, tokens) for name, settings in (("before", before), ("after", after))}
                rows.append({"scope": scope, "tokens": tokens, "grad_checkpoint": checkpoint,
                             "before_gib": planned["before"].peak_gib, "after_gib": planned["after"].peak_gib,
                             "after_weights": planned["after"].weights_gib, "after_grads": planned["after"].gradients_gib,
                             "after_optimizer": planned["after"].optimizer_gib, "after_activations": planned["after"].activations_gib,
                             "fits_before": fits(planned["before"].peak_gib), "fits_after": fits(planned["after"].peak_gib)})
                print_table(rows[-1:], list(rows[-1]))
    return rows


def optimizer_table(tokens: int, scopes: list[str]) -> list[dict]:
    """The plan with fp32 AdamW moments against torchao's 8-bit ones, both fixes on, checkpointing on."""
    rows = []
    for scope in scopes:
        settings = bench_config(scope=scope, grad_checkpoint=True)
        planned = {name: plan_step(released_config(), replace(settings, optimizer=name), tokens) for name in ("adamw", "adamw8bit")}
        rows.append({"scope": scope, "tokens": tokens, "grad_checkpoint": True,
                     "adamw_gib": planned["adamw"].peak_gib, "adamw8bit_gib": planned["adamw8bit"].peak_gib,
                     "adamw_optimizer": planned["adamw"].optimizer_gib, "adamw8bit_optimizer": planned["adamw8bit"].optimizer_gib,
                     "adamw8bit_weights": planned["adamw8bit"].weights_gib, "adamw8bit_grads": planned["adamw8bit"].gradients_gib,
                     "adamw8bit_activations": planned["adamw8bit"].activations_gib,
                     "fits_adamw": fits(planned["adamw"].peak_gib), "fits_adamw8bit": fits(planned["adamw8bit"].peak_gib)})
        print_table(rows[-1:], list(rows[-1]))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="planned peak memory of one training step")
    plan.add_argument("--model", default="released", help="released, tiny, or a model directory (its config.json) [released]")
    plan.add_argument("--layers", type=int, help="cut the model to this many layers [all]")
    plan.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    plan.add_argument("--sample-tokens", type=int, default=1024, help="positions per voice-cloning sample [1024]")
    add_setting_flags(plan, STEP_SETTINGS, BENCH_DEFAULTS)
    table = commands.add_parser("plan-table", help="the README table: released model, scopes x tokens x checkpointing, before/after the fixes")
    table.add_argument("--tokens", default="2048,4096,8192", help="comma-separated micro-batch sizes [2048,4096,8192]")
    table.add_argument("--scopes", default="lora,audio,full", help="comma-separated scopes [lora,audio,full]")
    optimizer = commands.add_parser("plan-optimizer", help="the plan with fp32 vs 8-bit AdamW moments, checkpointing on")
    optimizer.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    optimizer.add_argument("--scopes", default="lora,audio,full", help="comma-separated scopes [lora,audio,full]")
    commands.add_parser("validate", help="the plan against a measured CPU step of a 164M-parameter model")
    run = commands.add_parser("run", help="tokens/s, step time, peak memory, MFU; our loop vs a transformers.Trainer loop")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="[cuda if present, else cpu]")
    run.add_argument("--cases", default="", help="comma-separated case names to run [all of the device's]")
    run.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                     help="also time a transformers.Trainer loop over the same model and batches [on]")
    recompiles = commands.add_parser("recompiles", help="torch.compile recompiles over 50 steps of distinct lengths, per dynamic setting")
    recompiles.add_argument("--scope", default="layers", choices=("layers", "model"), help="what is compiled [layers]")
    graphs = commands.add_parser("graphs", help="graphs and breaks of a compiled step: layers and whole model, before/after")
    graphs.add_argument("--backend", default="inductor", help="dynamo backend: inductor (what --compile uses) or eager [inductor]")
    sync = commands.add_parser("syncs", help="host syncs per micro-batch, ours and the package's, per layer (released layout, fake tensors)")
    sync.add_argument("--layers", type=int, default=2, help="decoder layers of the released layout [2]")
    sync.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    losses = commands.add_parser("adamw8bit", help="train.py's losses with 8-bit vs fp32 AdamW moments (tiny preset, demo data)")
    losses.add_argument("--steps", type=int, default=200, help="training steps [200]")
    gpu = commands.add_parser("gpu", help="the GPU check: released layout, lora/audio at 4k tokens, compile off/on (<= 8 min on an H100)")
    gpu.add_argument("--device", default="cuda", help="[cuda]; cpu with --model tiny runs the same code in seconds")
    gpu.add_argument("--model", default="released", help="released or tiny [released]")
    gpu.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    gpu.add_argument("--steps", type=int, default=5, help="timed steps per case [5]")
    gpu.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles) [2]")
    gpu.add_argument("--compile-backend", default="inductor", help="dynamo backend of the compiled cases [inductor]")
    for sub in commands.choices.values():
        sub.add_argument("--json", default="gpu_check.json" if sub is gpu else None,
                         help="also write the rows to this JSON file" + (" [gpu_check.json]" if sub is gpu else ""))
    return parser.parse_args(argv)


def _plan(args) -> list[dict]:
    config = model_config(args.model, args.layers)
    settings = bench_config(**{name: getattr(args, name) for name in STEP_SETTINGS if getattr(args, name) is not None})
    started = time.perf_counter()
    plan = plan_step(config, settings, args.tokens, args.sample_tokens)
    chosen = {name: getattr(settings, name) for name in STEP_SETTINGS}
    rows = [{**chosen, **asdict(plan), "seconds": time.perf_counter() - started, "fits": fits(plan.peak_gib)}]
    for key, value in rows[0].items():
        print(f"{key:>16}: {value:,.3f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return rows


def _run(args) -> list[dict]:
    cases = gpu_cases() if args.device.startswith("cuda") else cpu_cases()
    wanted = set(filter(None, args.cases.split(",")))
    rows = []
    for case in cases:
        if not wanted or case.name in wanted:
            try:
                rows.append(run_case(case, args.device, args.trainer))
            except torch.OutOfMemoryError:  # e.g. full fine-tuning of 5.8B on one card: reported, not fatal
                rows.append({"case": case.name, "device": args.device, "step_s": "out of memory"})
                torch.cuda.empty_cache()
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["case", "device", "tokens", "step_s", "tokens_per_s", "peak_memory_gib", "mfu_pct",
                       "trainer_step_s", "speedup_vs_trainer"])
    return rows


def _gpu(args) -> list[dict]:
    started = time.perf_counter()
    rows = gpu_check(args.device, args.model, args.tokens, args.steps, args.warmup, args.compile_backend)
    print(f"\nGPU check: {time.perf_counter() - started:.0f} s in all")
    print_table(rows, GPU_CHECK_COLUMNS)
    return rows


def _table(rows: list[dict], columns: list[str] | None = None) -> list[dict]:
    print()
    print_table(rows, columns or [column for column in rows[0] if not isinstance(rows[0][column], (list, dict))])
    return rows


COMMANDS = {
    "plan": _plan,
    "plan-table": lambda args: _table(plan_table([int(t) for t in args.tokens.split(",")], args.scopes.split(","))),
    "plan-optimizer": lambda args: _table(optimizer_table(args.tokens, args.scopes.split(","))),
    "validate": lambda args: _table(validate()),
    "run": _run,
    "recompiles": lambda args: _table([count_recompiles(dynamic, scope=args.scope) for dynamic in (False, None, True)]),
    "graphs": lambda args: _table([compile_graphs(scope, shapes, args.backend) for scope in ("layers", "model")
                                   for shapes in (False, True)]),
    "syncs": lambda args: _table(sync_rows(args.layers, args.tokens)),
    "adamw8bit": lambda args: _table(optimizer_losses(args.steps)),
    "gpu": _gpu,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = COMMANDS[args.command](args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
