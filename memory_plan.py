"""The memory plan: peak memory of one training step of the released 5.8B layout, with no weights and no GPU.

    python memory_plan.py plan --model released --scope lora --tokens 4096 --grad-checkpoint   # one step, seconds
    python memory_plan.py plan --model released --scope lora --tokens 4096 --kl-weight 1       # with the forgetting guard
    python memory_plan.py plan-table            # the table of docs/memory-and-speed.md: scopes x tokens x checkpointing
    python memory_plan.py plan-optimizer        # fp32 vs 8-bit AdamW moments, 4,096 tokens, checkpointing
    python memory_plan.py validate              # the plan against the same step run for real on the CPU (164M model)
    python memory_plan.py plan-preference       # DPO and GRPO steps (docs/preference-tuning.md), LoRA and audio scopes

**What runs.** `plan_step` runs the step `train.py` runs: the model
`trainable.prepare_model` makes (scope or LoRA, frozen weights in bf16,
activation checkpointing) and `trainable.train_step` on one micro-batch
(forward, loss, the forgetting guard's base pass with `--kl-weight`,
backward, clipping, the optimizer step). The optimizer is the CUDA step's
(fused AdamW, or torchao's AdamW8bit) and its state is resident, as in every
step after the first (one update on zero gradients before the tracked step).

**What is fake, what is real.** The model, its optimizer state, and every
floating-point tensor of the step (weights, activations, gradients) are
torch fake tensors: shapes and dtypes, no storage, no arithmetic. The batch
is real: a voice-cloning layout (`synthetic_samples`: per sample a prompt
of text, a reference clip, the target text and the labelled target clip,
built by `data.build_sample` with random codes, collated by
`collate.build_collator`, `--sample-tokens` merged positions each, as many
samples as fit `--tokens`). `RealIndexData` keeps the index data real: an
operator whose tensor inputs are all real, or a factory of integers or
booleans, runs for real, so every mask, position and count of the
package's merge of text and audio is computed exactly, and a fake tensor
indexed by a real boolean mask is indexed by its positions. The one fake
value the host reads is the skip flag of an optimizer without `found_inf`
(AdamW8bit): a planned step is finite, so it is not skipped. The fake
tensors live on the CPU, with the CUDA step's settings (bf16 autocast,
fused AdamW): a faked CUDA device fails, since composite operators
(`embedding`) open a CUDA device guard, which calls the driver. The CPU's
scaled-dot-product attention keeps O(L) memory, as the CUDA flash and
memory-efficient kernels do.

**What it counts.** `PeakTracker` (torch's `MemTracker`) adds up the bytes
of the tensors alive after each operator and keeps the largest total, split
into weights (parameters and buffers), gradients, optimizer state and the
rest (activations and temporaries): what `torch.cuda.max_memory_allocated`
reports, not the CUDA context (about 0.5 GB) or allocator fragmentation;
the card column (`fits`) adds 10% and 0.75 GiB for them. `validate` runs a
164M-parameter model of the released layout for real on the CPU under the
same tracker and compares it with its plan, and with the process's RSS.

The benchmarks run the same step: they take the layouts (`model_config`),
the batch (`synthetic_batch`), the settings (`step_settings`), the model
(`build_training_model`) and the fake step (`FakeStep`) from here.
"""

from __future__ import annotations

import argparse
import copy
import json
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
import trainable
from config import TrainConfig, add_setting_flags, check_config
from parallel import World

GIB = 2**30
aten = torch.ops.aten

# --------------------------------------------------------------------------
# The layouts and a voice-cloning batch
# --------------------------------------------------------------------------

RELEASED_IDS = {"<|AUDIO|>": 128015, "<|AUDIO_OUT|>": 128016, "<|audio_out_bos|>": 128013, "<|audio_eos|>": 128012,
                "<|end_of_text|>": 128001}
RELEASED_VOCAB = 128256
# Llama-3.2-3B's attention and RoPE, which the tiny preset leaves at Llama's defaults.
RELEASED_TEXT_OPTIONS = dict(
    head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)


def released_dims(num_layers: int = 28) -> model_utils.TinyDims:
    """The release's sizes: width 3072, FFN 8192 (text and audio), 24 query and 8 key/value heads."""
    return model_utils.TinyDims(hidden_size=3072, intermediate_size=8192, num_layers=num_layers, num_heads=24,
                                num_kv_heads=8)


def released_config(num_layers: int = 28) -> HiggsAudioConfig:
    """bosonai/higgs-audio-v2-generation-3B-base's layout: Llama-3.2-3B text model, dual FFN on every layer,
    8 codebooks of 1024 (+ stream BOS/EOS) with the delay pattern, no Whisper tower."""
    return model_utils.layout_config(RELEASED_IDS, RELEASED_VOCAB, released_dims(num_layers), **RELEASED_TEXT_OPTIONS)


def mid_config() -> HiggsAudioConfig:
    """A mid-size model with the released layout: 4 layers of width 1024, 32,000-token vocabulary (164M parameters)."""
    tokenizer = model_utils.build_tiny_text_tokenizer()
    dims = model_utils.TinyDims(hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=8, num_kv_heads=4)
    config = model_utils.tiny_model_config(tokenizer, dims=dims)
    config.text_config.vocab_size = 32000
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
STEP_DEFAULTS = {"scope": "lora", "precision": "bf16"}


def step_settings(**settings) -> TrainConfig:
    """The training settings of a planned or benchmarked step: train.py's, with LoRA and bf16 unless `settings`
    say otherwise."""
    config = TrainConfig(**{**STEP_DEFAULTS, **settings})
    check_config(config)
    return config


def build_training_model(config: HiggsAudioConfig, settings: TrainConfig, device: str = "cpu",
                         compile_backend: str | Callable = "inductor") -> torch.nn.Module:
    """A randomly initialised model of `config` (initialised on `device`), prepared as `train.py` prepares it
    (`trainable.prepare_model`); with `settings.compile`, compiled by `compile_backend` (`eager` traces the
    same graphs without generating code)."""
    with torch.device(device):
        model = HiggsAudioModel(config)
    model = trainable.prepare_model(model, replace(settings, compile=False), World(device=device)).train()
    if settings.compile:
        trainable.compile_model(model, settings.compile_scope, compile_backend)
    return model


def step_once(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, settings: TrainConfig,
              device: str = "cpu") -> trainable.StepStats:
    """`trainable.train_step` on one micro-batch at the peak learning rate."""
    return trainable.train_step(model, optimizer, [batch], settings, World(device=device), settings.lr)


def resident_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: the state every step after the first holds."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    trainable.step_optimizer(optimizer, "cpu")
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------
# The step on fake tensors, its index data real
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
    (`trainable._update_unless`, `--optimizer adamw8bit`): a planned step is
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
class FakeStep:
    """One training step of `config` on fake tensors, built and ready to run: the model and its optimizer with
    resident state (fake), the synthetic batch (real) and each sample's merged length."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: object
    lengths: list[int]
    settings: TrainConfig
    mode: FakeTensorMode

    @classmethod
    def build(cls, config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> FakeStep:
        batch, lengths = synthetic_batch(config, tokens, sample_tokens)
        if settings.optimizer == "adamw8bit":
            _build_torchao_tables()
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = build_training_model(config, settings)
            optimizer = trainable.build_optimizer(model, settings, "cuda")  # fused, as on the GPU
            resident_optimizer_state(model, optimizer)
        return cls(model, optimizer, batch, lengths, settings, mode)

    def run(self, observer: TorchDispatchMode) -> None:
        """The step under `observer` (a tracker or a counter), which sees each operator before the index data
        is made real and the rest faked."""
        with self.mode, RealIndexData(), observer:
            step_once(self.model, self.optimizer, self.batch, self.settings)


def _build_torchao_tables() -> None:
    """torchao computes its 8-bit quantisation tables with torch operators on first use and caches them as
    Python lists; fake tensors cannot give values, so they are built for real before the fake step."""
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    get_qmap_signed(), get_qmap_unsigned()


# --------------------------------------------------------------------------
# The plan: the fake step's peak, by category
# --------------------------------------------------------------------------


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

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__()
        for parameter in model.parameters():
            if not parameter.requires_grad:
                self._param_to_grad_hook_handles[parameter] = (_NoHook(), _NoHook())
        self.track_external(model, optimizer)

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

    def peak_bytes(self) -> dict[str, int]:
        """Bytes at the peak by category (parameter, buffer, gradient, optstate, ...; total)."""
        (snapshot,) = self.get_tracker_snapshot("peak").values()
        return {str(getattr(key, "value", key)).lower(): value for key, value in snapshot.items()}


class _NoHook:
    def remove(self) -> None:
        pass


def plan_step(config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> Plan:
    """Peak memory of a training step of `config` at `tokens` positions per micro-batch, without weights.

    The optimizer is CUDA's (fused AdamW, no per-parameter temporaries)."""
    step = FakeStep.build(config, settings, tokens, sample_tokens)
    tracker = PeakTracker(step.model, step.optimizer)
    step.run(tracker)
    return _plan_from(tracker.peak_bytes(), step, config)


def _plan_from(categories: dict[str, int], step: FakeStep, config: HiggsAudioConfig) -> Plan:
    weights = categories.get("parameter", 0) + categories.get("buffer", 0)
    held = weights + categories.get("gradient", 0) + categories.get("optstate", 0)
    parameters = list(step.model.parameters())
    padded = collate.padded_tokens(step.lengths)
    text_labels = collate.text_label_count(step.batch, config)
    logit_rows = text_labels if step.settings.text_logits == "labelled" else padded
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
        samples=len(step.lengths),
        text_labels=text_labels,
        text_logits_gib=logit_rows * config.text_config.vocab_size * 4 / GIB,
    )


# --------------------------------------------------------------------------
# Validation: the plan against the same step run for real on the CPU
# --------------------------------------------------------------------------


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step(config: HiggsAudioConfig, settings: TrainConfig, tokens: int, sample_tokens: int = 1024) -> dict:
    """The step for real on the CPU: tracked peak (same tracker, real tensors) and the process's peak RSS growth."""
    batch, _ = synthetic_batch(config, tokens, sample_tokens)
    before = _rss_bytes()
    model = build_training_model(config, settings)
    optimizer = trainable.build_optimizer(model, settings, "cuda")  # fused, as planned (it runs on the CPU too)
    resident_optimizer_state(model, optimizer)
    tracker = PeakTracker(model, optimizer)
    with tracker:
        step_once(model, optimizer, batch, settings)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tracked_gib": tracker.peak_bytes()["total"] / GIB, "rss_growth_gib": (peak_rss - before) / GIB}


def validate(tokens: int = 2048) -> list[dict]:
    """Plan vs measured peak of the mid-size model on the CPU, fp32, for both text-logit modes."""
    rows = []
    for text_logits in ("all", "labelled"):
        settings = step_settings(scope="audio", precision="fp32", frozen_bf16=False, text_logits=text_logits)
        planned = plan_step(mid_config(), settings, tokens).peak_gib
        measured = measure_step(mid_config(), settings, tokens)
        rows.append({"model": "mid (4 x 1024, 164M)", "scope": "audio", "tokens": tokens, "text_logits": text_logits,
                     "planned_gib": planned, **measured,
                     "error_vs_tracked_pct": 100 * (planned - measured["tracked_gib"]) / measured["tracked_gib"],
                     "error_vs_rss_pct": 100 * (planned - measured["rss_growth_gib"]) / measured["rss_growth_gib"]})
    return rows


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

CARDS_GIB = (("24 GB", 24e9 / GIB), ("40 GB", 40e9 / GIB), ("48 GB", 48e9 / GIB), ("80 GB", 80e9 / GIB))


def fits(peak_gib: float) -> str:
    """The smallest card that holds the planned peak with 10% allocator slack (the validation's RSS gap) and
    0.75 GiB of CUDA context; every larger card holds it too."""
    for name, gib in CARDS_GIB:
        if peak_gib * 1.10 + 0.75 <= gib:
            return name
    return "none: shard it (FSDP)"


def plan_table(tokens_list: list[int], scopes: list[str]) -> list[dict]:
    """The released layout's plans, scopes x tokens x checkpointing, before (both memory fixes off) and after."""
    rows = []
    for scope in scopes:
        for tokens in tokens_list:
            for checkpoint in (True, False):
                before = step_settings(scope=scope, grad_checkpoint=checkpoint, frozen_bf16=False, text_logits="all")
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
        settings = step_settings(scope=scope, grad_checkpoint=True)
        planned = {name: plan_step(released_config(), replace(settings, optimizer=name), tokens) for name in ("adamw", "adamw8bit")}
        rows.append({"scope": scope, "tokens": tokens, "grad_checkpoint": True,
                     "adamw_gib": planned["adamw"].peak_gib, "adamw8bit_gib": planned["adamw8bit"].peak_gib,
                     "adamw_optimizer": planned["adamw"].optimizer_gib, "adamw8bit_optimizer": planned["adamw8bit"].optimizer_gib,
                     "adamw8bit_weights": planned["adamw8bit"].weights_gib, "adamw8bit_grads": planned["adamw8bit"].gradients_gib,
                     "adamw8bit_activations": planned["adamw8bit"].activations_gib,
                     "fits_adamw": fits(planned["adamw"].peak_gib), "fits_adamw8bit": fits(planned["adamw8bit"].peak_gib)})
        print_table(rows[-1:], list(rows[-1]))
    return rows


def sampling_cache_gib(config: HiggsAudioConfig, rows: int, positions: int) -> float:
    """The KV cache of `rows` clips sampled together to `positions` each, bf16: keys and values of every decoder
    layer (the batched generator's dynamic cache; the audio FFNs add no attention of their own in this layout)."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2 * rows * positions / GIB


def preference_table(scopes: list[str], sample_tokens: int = 1024, pairs: int = 2, group: int = 4) -> list[dict]:
    """DPO and GRPO steps of the released layout, activation checkpointing on.

    Their update is the supervised step's forward and backward over the same
    samples (`trainable.train_step`, planned as above): DPO's over `pairs`
    chosen and rejected clips (2 x pairs samples; the reference log-probs are
    stored with the pairs, so no second model), GRPO's over `group` sampled clips
    of one prompt, with the KL base pass through disabled adapters for LoRA
    (`--kl-weight 1`). Both losses read the audio logits the supervised loss
    reads. GRPO's sampling comes before the update, the gradients released: its
    peak is the weights, the optimizer state and the `group` clips' KV cache
    (`sampling_cache_gib`)."""
    config, rows = released_config(), []
    for scope in scopes:
        settings = step_settings(scope=scope, grad_checkpoint=True)
        dpo = plan_step(config, settings, 2 * pairs * sample_tokens, sample_tokens)
        grpo = plan_step(config, replace(settings, kl_weight=1.0 if scope == "lora" else 0.0), group * sample_tokens, sample_tokens)
        sampling = grpo.weights_gib + grpo.optimizer_gib + sampling_cache_gib(config, group, sample_tokens)
        grpo_peak = max(grpo.peak_gib, sampling)
        rows.append({"scope": scope, "sample_tokens": sample_tokens, "dpo_pairs": pairs, "dpo_gib": dpo.peak_gib,
                     "dpo_activations": dpo.activations_gib, "grpo_group": group, "grpo_update_gib": grpo.peak_gib,
                     "grpo_sampling_gib": sampling, "grpo_gib": grpo_peak, "weights": grpo.weights_gib,
                     "optimizer": grpo.optimizer_gib, "fits_dpo": fits(dpo.peak_gib), "fits_grpo": fits(grpo_peak)})
        print_table(rows[-1:], list(rows[-1]))
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def report(rows: list[dict], json_path: str | None, columns: list[str] | None = None) -> int:
    """The rows as a table (`columns`, else every column that is not a list or dict), and in `json_path` if given."""
    print()
    print_table(rows, columns or [column for column in rows[0] if not isinstance(rows[0][column], (list, dict))])
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memory_plan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="planned peak memory of one training step")
    plan.add_argument("--model", default="released", help="released, tiny, or a model directory (its config.json) [released]")
    plan.add_argument("--layers", type=int, help="cut the model to this many layers [all]")
    plan.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    plan.add_argument("--sample-tokens", type=int, default=1024, help="positions per voice-cloning sample [1024]")
    add_setting_flags(plan, STEP_SETTINGS, STEP_DEFAULTS)
    table = commands.add_parser("plan-table", help="the released model: scopes x tokens x checkpointing, before/after the fixes")
    table.add_argument("--tokens", default="2048,4096,8192", help="comma-separated micro-batch sizes [2048,4096,8192]")
    table.add_argument("--scopes", default="lora,audio,full", help="comma-separated scopes [lora,audio,full]")
    optimizer = commands.add_parser("plan-optimizer", help="the plan with fp32 vs 8-bit AdamW moments, checkpointing on")
    optimizer.add_argument("--tokens", type=int, default=4096, help="merged positions per micro-batch [4096]")
    optimizer.add_argument("--scopes", default="lora,audio,full", help="comma-separated scopes [lora,audio,full]")
    commands.add_parser("validate", help="the plan against a measured CPU step of a 164M-parameter model")
    preference = commands.add_parser("plan-preference", help="the released model: DPO and GRPO steps, checkpointing on")
    preference.add_argument("--scopes", default="lora,audio", help="comma-separated scopes [lora,audio]")
    preference.add_argument("--sample-tokens", type=int, default=1024, help="positions per sample [1024]")
    preference.add_argument("--pairs", type=int, default=2, help="DPO pairs per micro-batch [2]")
    preference.add_argument("--group", type=int, default=4, help="GRPO clips per prompt [4]")
    for sub in commands.choices.values():
        sub.add_argument("--json", help="also write the rows to this JSON file")
    return parser


def _plan(args: argparse.Namespace) -> int:
    config = model_config(args.model, args.layers)
    settings = step_settings(**{name: getattr(args, name) for name in STEP_SETTINGS if getattr(args, name) is not None})
    started = time.perf_counter()
    plan = plan_step(config, settings, args.tokens, args.sample_tokens)
    chosen = {name: getattr(settings, name) for name in STEP_SETTINGS}
    row = {**chosen, **asdict(plan), "seconds": time.perf_counter() - started, "fits": fits(plan.peak_gib)}
    for key, value in row.items():
        print(f"{key:>16}: {value:,.3f}" if isinstance(value, float) else f"{key:>16}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps([row], indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "plan-table":
        rows = plan_table([int(t) for t in args.tokens.split(",")], args.scopes.split(","))
    elif args.command == "plan-optimizer":
        rows = optimizer_table(args.tokens, args.scopes.split(","))
    elif args.command == "plan-preference":
        rows = preference_table(args.scopes.split(","), args.sample_tokens, args.pairs, args.group)
    else:
        rows = validate()
    return report(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
