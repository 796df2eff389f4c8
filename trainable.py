"""The training step, and the model as the step trains it.

    model = prepare_model(bundle.model, config, world)     # what is trained, memory, compile, DDP/FSDP2
    optimizer = build_optimizer(model, config, world.device)
    stats = train_step(model, optimizer, micro_batches, config, world, lr_at(step, config, max_steps))

`prepare_model` makes the model the step trains; its memory options change
how the package's model computes, never what: text logits only where a text
label is (`text_logits_at_labels`, forward hooks) and frozen linear weights
held in bf16 (`frozen_linear_weights_to_bf16`).

`train_step` is the one optimizer step that `train.py`, `memory_plan.py`, the benchmarks and the
tests run: forward, loss and backward over the step's micro-batches (DDP's
gradient all-reduce only on the last), gradient clipping and the AdamW
update, skipped when a loss is not finite. With `--kl-weight` the loss adds
the forgetting guard, `forgetting_kl`: the KL from the base (the same LoRA
model with its adapters disabled) at the batch's audio targets. Its statistics stay on the device
(`StepStats`) until the loop reads them on a step that logs (`read`: one
all-reduce, one transfer), so a step that logs nothing never waits for the
GPU on our account.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioBatchInput
from boson_multimodal.model.higgs_audio import HiggsAudioModel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import collate
import metrics
import model_utils
import parallel
from config import TrainConfig

AUDIO_PARAMETER_MARKERS = ("audio_mlp", "audio_post_attention_layernorm", "audio_input_layernorm",
                           "audio_codebook_embeddings", "audio_decoder_proj.audio_lm_head")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------
# The model as it is trained
# --------------------------------------------------------------------------


def prepare_model(model: torch.nn.Module, config: TrainConfig, world: parallel.World) -> torch.nn.Module:
    """What is trained (`--scope`, or LoRA adapters), the memory options, activation checkpointing per
    decoder layer, compile (`--compile`, per layer or whole), then DDP or FSDP2 across processes: the model
    `train_step` steps."""
    if config.scope == "lora":
        model = add_lora(model, config)
    else:
        select_trainable(model, config.scope)
    if config.objective != "sft":
        # DPO and GRPO score audio codes only (objectives.py): the text head gets no gradient, and AdamW holds no state
        # for a parameter without one, which a checkpoint's optimizer state could not be loaded back into.
        model_utils.higgs_model(model).audio_decoder_proj.text_lm_head.requires_grad_(False)
    reduce_memory(model, config)
    wrap_decoder_layers(model, config)
    if config.compile:
        compile_model(model, config.compile_scope)
    return parallel.wrap_model(model, config.parallel, config.precision, world)


def select_trainable(model: torch.nn.Module, scope: str) -> None:
    """`full` trains everything, `audio` the audio side of the dual-FFN layers, codebook embeddings and audio head."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(scope == "full" or any(marker in name for marker in AUDIO_PARAMETER_MARKERS))


def add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """peft LoRA on attention and on both FFNs of every layer, the text MLP and the audio MLP alike.

    The wrapper is peft's base `PeftModel`, whose forward passes the batch
    through unchanged (no injected `labels`), so DDP wraps it like any module.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, lora)


def reduce_memory(model: torch.nn.Module, config: TrainConfig) -> None:
    """Text logits only at labelled positions (`--text-logits labelled`) and, under bf16, frozen
    linear weights in bf16 (`--frozen-bf16`); both leave the losses unchanged (tests/test_trainable.py)."""
    if config.text_logits == "labelled":
        text_logits_at_labels(model, check=config.debug_checks)
    if config.frozen_bf16 and config.precision == "bf16":
        frozen_linear_weights_to_bf16(model)


def wrap_decoder_layers(model: torch.nn.Module, config: TrainConfig) -> None:
    """Activation checkpointing (the package has none), one decoder layer at a time.

    Each layer keeps its class and its parameter names: the package's decoder
    calls a layer with the audio mask only `if isinstance(layer,
    HiggsAudioDualFFNDecoderLayer)`, so a wrapper module (`checkpoint_wrapper`,
    the `OptimizedModule` of `torch.compile(layer)`) would silently route
    every token through the text FFN. Hence the layer's own `forward` is
    checkpointed, and `compile_model` compiles in place.
    """
    if config.grad_checkpoint:
        for layer in model_utils.decoder_layers(model):
            checkpoint_forward(layer)


def compile_model(model: torch.nn.Module, scope: str, backend: str | Callable = "inductor", dynamic: bool | None = True) -> None:
    """`Module.compile` in place, with dynamic shapes: each decoder layer (`layers`: one graph per layer,
    `trace_data_dependent_shapes`) or the whole `HiggsAudioModel` (`model`: the merge of text and audio, the
    layers and the heads, broken where the package's sizes depend on the data, since inductor in torch 2.9.1
    fails on those sizes when it must keep them: on the package's merge, and on several layers in one graph;
    docs/memory-and-speed.md gives both graph counts)."""
    trace_data_dependent_shapes(scope == "layers")
    modules = model_utils.decoder_layers(model) if scope == "layers" else [model_utils.higgs_model(model)]
    for module in modules:
        module.compile(dynamic=dynamic, backend=backend)


def trace_data_dependent_shapes(enabled: bool) -> None:
    """Whether dynamo traces operators whose output size depends on the data, instead of breaking the graph.

    The package's dual-FFN layer routes text and audio positions with boolean
    masks (`hidden_states[mask]`, `residual[mask] += ...`: modeling_higgs_audio.py
    lines 692-699 of boson-multimodal 0.1.1), each an `aten.nonzero`, whose
    output size dynamo cannot know while tracing: by default every layer
    breaks into 5 graphs (4 breaks). With these two dynamo settings such a
    size is an unbacked symbol inside one graph: 1 graph per layer, the same
    losses (tests/test_trainable.py), and still one FFN per position (computing
    both FFNs on every token and selecting would also remove the breaks, at
    1.75x the layer's FLOPs). They are process-wide settings of dynamo, set
    here only, by `compile_model`.
    """
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = enabled
    torch._dynamo.config.capture_scalar_outputs = enabled


def checkpoint_forward(layer: torch.nn.Module) -> None:
    """Recompute `layer`'s activations in backward instead of keeping them (training only)."""
    forward = layer.forward

    def checkpointed(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    layer.forward = checkpointed


def autocast(precision: str, device: str):
    """bf16 autocast under `--precision bf16` (on the CPU too), nothing under fp32."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------
# Memory: text logits only where a text label is, frozen weights in bf16
# --------------------------------------------------------------------------


TEXT_LABEL_COUNT = "text_label_count"  # the keyword a training forward passes `collate.text_label_count` by


def text_logits_at_labels(model: torch.nn.Module, check: bool = False) -> None:
    """Make the training forward compute text logits only at positions whose next token is a text label.

    The package's head computes 128,256-way logits at every position of the
    merged sequence (about 4 GiB in fp32 for 8,192 positions), while a
    voice-cloning sample has about 3 text labels. In a forward with
    `label_ids`, the text head passes the final hidden states through, and a
    forward hook on the model takes the labelled rows out of them, at the
    positions of the labels the model's own merge returned
    (`expanded_labels`: one merge, the model's), and applies the head there:
    `outputs.logits` is (N, vocab), which `model_utils.compute_loss` pairs with the labels
    in the same row-major order. N is the keyword `text_label_count`, counted
    on the host from the CPU batch (`collate.text_label_count`), so that no
    size comes back from the device; a forward that does not give it
    (validation losses, tests) has N counted on the device, one host sync.
    A forward without `label_ids` (generation, validation prompts) keeps the
    full head, so inference is unchanged. Parameter names are untouched, so
    checkpoints and exports are as before. `check` (`--debug-checks`) runs
    the package's merge a second time and compares labels and count, each
    forward: host syncs, for debugging only.
    """
    higgs = model_utils.higgs_model(model)
    if not higgs.config.skip_audio_tower:
        raise ValueError("--text-logits labelled needs a model without a Whisper tower (the released model has none); use --text-logits all")
    head = higgs.audio_decoder_proj.text_lm_head
    full_forward = head.forward
    state: dict = {"deferred": False, "count": None}

    def take_count(_module, args, kwargs):
        count = kwargs.pop(TEXT_LABEL_COUNT, None)
        state["deferred"], state["count"] = kwargs.get("label_ids") is not None, count
        return args, kwargs

    def pass_hidden_states(hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states if state["deferred"] else full_forward(hidden_states)

    def logits_at_labels(_module, _args, kwargs, outputs):
        if not state["deferred"]:
            return outputs
        state["deferred"] = False
        labels, hidden = outputs.expanded_labels, outputs.logits
        count = state["count"] if state["count"] is not None else int((labels[:, 1:] != model_utils.IGNORE_INDEX).sum())
        if check:
            _check_labelled_positions(higgs, kwargs, labels, count)
        flat = model_utils.labelled_positions(labels, count)
        width = labels.shape[1] - 1  # positions of the shifted grid per row; the hidden states have one more
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat // width * labels.shape[1] + flat % width)
        outputs.logits = full_forward(rows)
        return outputs

    higgs.register_forward_pre_hook(take_count, with_kwargs=True)
    higgs.register_forward_hook(logits_at_labels, with_kwargs=True)
    head.forward = pass_hidden_states


def _check_labelled_positions(higgs: HiggsAudioModel, inputs: dict, labels: torch.Tensor, count: int) -> None:
    """`--debug-checks`: the model merged the labels a second merge gives, and `count` is their number."""
    if not torch.equal(merged_text_labels(higgs, inputs), labels):
        raise RuntimeError("text logits at labels: the model merged its labels differently from merged_text_labels")
    labelled = int((labels[:, 1:] != model_utils.IGNORE_INDEX).sum())
    if labelled != count:
        raise RuntimeError(f"text logits at labels: {TEXT_LABEL_COUNT} {count}, but the merged labels hold {labelled}")


def merged_text_labels(model: HiggsAudioModel, inputs: dict) -> torch.Tensor:
    """The text labels of the merged text-and-audio sequence, by a second run of the package's merge.

    Only `--debug-checks` and the tests use it, to check the labels the
    model's own merge returned: the package's `merge_input_ids_with_audio_features`
    runs on 1-wide zero embeddings (a few kilobytes), with the arguments the
    training forward gives it (no cache: 8-position rounding, left padding for
    a batch of one).
    """
    from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features

    input_ids = inputs["input_ids"]
    width = lambda ids: ids.shape[-1] if ids is not None else 0  # noqa: E731
    zeros = lambda n: torch.zeros(n, 1, device=input_ids.device)  # noqa: E731
    audio_in = zeros(width(inputs.get("audio_in_ids"))) if model.config.encode_audio_in_tokens else None
    merged = merge_input_ids_with_audio_features(
        None, None, audio_in, inputs.get("audio_in_ids_start"), zeros(width(inputs.get("audio_out_ids"))),
        inputs.get("audio_out_ids_start"), model.audio_in_token_idx, model.audio_out_token_idx,
        zeros(input_ids.numel()).view(*input_ids.shape, 1), input_ids, inputs["attention_mask"], inputs["label_ids"],
        pad_token_id=model.padding_idx, round_to=8, left_padding=input_ids.shape[0] == 1,
    )
    return merged[2]


def frozen_linear_weights_to_bf16(model: torch.nn.Module) -> int:
    """Hold the frozen weights of linear layers in bf16; returns how many parameters were cast.

    Under bf16 autocast a linear layer casts its fp32 weight to bf16 (round to
    nearest even) at every use, so a frozen linear weight stored in bf16 gives
    bit-identical results at half the memory; trained parameters keep their
    fp32 master copy. Norms and embeddings stay fp32: autocast does not cast
    them, so there bf16 would change the numerics (and the package merges
    text and audio embeddings in one buffer of one dtype).
    """
    cast = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            cast += module.weight.numel()
    return cast


# --------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: str) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (no decay on norms and biases): torch's, fused on CUDA, or with
    8-bit moments (`--optimizer adamw8bit`: torchao's `AdamW8bit`)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, lr=config.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """`lr` in every parameter group; torchao keeps it as a (CPU) tensor, filled in place so that its
    compiled update sees a new value without recompiling."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def step_optimizer(optimizer: torch.optim.Optimizer, device: str) -> None:
    """`optimizer.step()`, under `update_stance`."""
    with update_stance(optimizer, device):
        optimizer.step()


def update_stance(optimizer: torch.optim.Optimizer, device: str) -> contextlib.AbstractContextManager:
    """Where the optimizer's update runs: torchao compiles its 8-bit update per parameter shape with
    inductor, a few seconds once on a GPU but about 30 s for the tiny preset's 7 shapes on 2 CPU cores, so
    on the CPU the same update function runs eagerly (`force_eager`); torch's AdamW is never compiled.
    Around every step of it, and around a checkpoint's load (torch's state-dict loading takes one step to
    create the optimizer state)."""
    eager = torch.device(device).type == "cpu" and not isinstance(optimizer, torch.optim.AdamW)
    return torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()


def lr_at(step: int, config: TrainConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step measured, kept on the device; `read` brings it to the host.

    `losses`: total, text, audio and per-codebook losses, each the mean over
    the micro-batches (float64, as the host would add them); `counts`: real
    positions, padded positions and samples; `hits`: teacher-forced top-1
    [correct, labelled] per codebook and on stream EOS; `skipped`: some
    process had a non-finite loss, so the update was not applied.
    """

    losses: torch.Tensor
    counts: torch.Tensor
    hits: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor
    kl: torch.Tensor  # [sum of the forgetting KL over the micro-batches that took it, their number]

    def read(self, world: parallel.World, stop_requested: bool = False) -> StepValues:
        """Means over processes (sums for `counts`; whether any process asked to stop), in one all-reduce and
        one device-to-host transfer."""
        stop = torch.full((1,), float(stop_requested), dtype=torch.float64, device=self.losses.device)
        shared = torch.cat([self.losses, self.counts, self.hits.reshape(-1), self.kl, stop])
        values = torch.cat([parallel.mean_over_processes(shared, world),
                            self.grad_norm.double().reshape(1), self.skipped.double().reshape(1)]).tolist()
        losses, counts = values[: len(self.losses)], values[len(self.losses) : len(self.losses) + 3]
        hits = np.array(values[len(self.losses) + 3 : -5]).reshape(self.hits.shape)
        tokens, padded, samples = (value * world.size for value in counts)
        kl_sum, kl_batches = values[-5:-3]
        return StepValues(dict(zip(loss_names(len(self.losses) - 3), losses)), tokens, padded, samples,
                          metrics.accuracy_from_hits(hits), values[-2], bool(values[-1]),
                          kl_sum / kl_batches if kl_batches else math.nan, values[-3] > 0)


@dataclass
class StepValues:
    """`StepStats` on the host, over every process."""

    losses: dict[str, float]
    tokens: float
    padded: float
    samples: float
    accuracy: dict[str, float]
    grad_norm: float
    skipped: bool
    kl: float  # mean forgetting KL of the micro-batches that took it; NaN where none did
    stop: bool = False  # some process asked to stop (a signal)
    panels: dict[str, float] = field(default_factory=dict)  # an objective's own scalars, by TensorBoard tag (objectives.py)


def loss_names(num_codebooks: int) -> list[str]:
    return ["total", "text", "audio"] + [f"codebook_{k}" for k in range(num_codebooks)]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[HiggsAudioBatchInput],
               config: TrainConfig, world: parallel.World, lr: float,
               set_names: list[str] | None = None, objective=None) -> StepStats:
    """One optimizer step at learning rate `lr` over `batches`, the step's micro-batches (its gradient accumulation).

    Each micro-batch's loss is scaled by 1/len(batches), so the gradient is
    the mean over them; under DDP gradients are all-reduced on the last one
    only. A non-finite loss on any process skips the update everywhere (the
    gradients are dropped, the optimizer state is untouched); `StepStats.skipped`
    says so. Gradients are clipped to `config.grad_clip` (0 = off). With
    `--kl-weight`, each micro-batch that `takes_kl` (`set_names`: the training
    set each came from) adds that weight times `forgetting_kl` to its loss. With
    torch's fused AdamW nothing here makes the host wait for the device
    (`syncs.py` counts; tests/test_trainable.py checks). With `objective`
    (`--objective dpo|grpo`, objectives.py) the step is that objective's, over
    the inputs it made of the micro-batches, and ends in the same `apply_update`.
    """
    set_learning_rate(optimizer, lr)
    if objective is not None:
        return objective.step(model, optimizer, batches, config, world)
    device = world.device
    model_config = model_utils.higgs_model(parallel.unwrap(model)).config
    codebooks, stream_eos = model_config.audio_num_codebooks, model_config.audio_codebook_size + 1
    losses = torch.zeros(3 + codebooks, dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    hits = torch.zeros(codebooks + 1, 2, dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    kl = torch.zeros(2, dtype=torch.float64, device=device)
    guarded = takes_kl(config, set_names, len(batches))
    for index, batch in enumerate(batches):
        inputs = model_inputs(batch, model_config, config, device)
        with sync_context(model, index == len(batches) - 1), autocast(config.precision, device):
            outputs = model(**inputs)
            loss = model_utils.compute_loss(outputs, inputs["label_audio_ids"])
            total = loss.total
            if guarded[index]:
                divergence = forgetting_kl(model, inputs, outputs.audio_logits, inputs["label_audio_ids"])
                total = total + config.kl_weight * divergence
                kl += torch.stack([divergence.detach().double(), kl.new_ones(())])
            (total / len(batches)).backward()
        finite = finite & torch.isfinite(total.detach())
        losses += _loss_vector(loss) * (1 / len(batches))
        counts += batch_counts(outputs, len(batch.input_ids))
        hits += metrics.teacher_forced_hits(outputs.audio_logits.detach(), inputs["label_audio_ids"], stream_eos)
    grad_norm, skipped = apply_update(model, optimizer, finite, config, world)
    return StepStats(losses, counts, hits, grad_norm, skipped, kl)


def model_inputs(batch: HiggsAudioBatchInput, model_config, config: TrainConfig, device: str) -> dict:
    """A collated batch as the training forward's keyword arguments (with `--text-logits labelled`, the count of
    labelled text positions that `text_logits_at_labels` takes)."""
    inputs = collate.batch_to_model_inputs(batch, device)
    if config.text_logits == "labelled":
        inputs[TEXT_LABEL_COUNT] = collate.text_label_count(batch, model_config)
    return inputs


def sync_context(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce on the step's last micro-batch only."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()


def batch_counts(outputs, samples: int) -> torch.Tensor:
    """Real and padded positions of the merged text-and-audio sequence the model ran on, and the samples (float64)."""
    real = outputs.attention_mask.sum()
    return torch.stack([real, outputs.attention_mask.numel() - real, torch.full_like(real, samples)]).double()


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, finite: torch.Tensor, config: TrainConfig,
                 world: parallel.World) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of every step, whatever its objective: the gradients clipped, the update applied unless a loss was
    not `finite` on some process, the gradients dropped; the gradient norm and the skip flag (on the device)."""
    skipped = _on_any_process(~finite, world)
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, config.grad_clip if config.grad_clip > 0 else float("inf"))
    # Under FSDP the norm is a DTensor; making it whole is a collective, so every process does it.
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    _update_unless(skipped, optimizer, world.device)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach(), skipped


def takes_kl(config: TrainConfig, set_names: list[str] | None, count: int) -> list[bool]:
    """Which of a step's `count` micro-batches add the forgetting term: none without --kl-weight, those of the
    --kl-replay set if one is named, else all."""
    if not config.kl_weight:
        return [False] * count
    if not config.kl_replay:
        return [True] * count
    if set_names is None:
        raise ValueError("--kl-replay: the step needs the training set of each micro-batch")
    return [name == config.kl_replay for name in set_names]


def forgetting_kl(model: torch.nn.Module, inputs: dict, audio_logits: torch.Tensor, label_audio_ids: torch.Tensor) -> torch.Tensor:
    """KL(base || adapted) of the audio-token distributions, averaged over the target positions and codebooks.

    The base is the same LoRA model with its adapters disabled (peft's own
    switch), run under no_grad, so no second model is held and its pass keeps
    no activations for backward. The targets are where the loss is: column
    t's logits predict label column t + 1 (`model_utils.compute_loss`'s shift).
    The direction KL(base || adapted) penalises the adapted model for dropping
    what the base found likely.
    """
    with torch.no_grad(), parallel.unwrap(model).disable_adapter():
        base = parallel.unwrap(model)(**inputs).audio_logits
    # Every column is computed and the targets weighted in, rather than selected: selecting by a mask would make
    # the host wait for the device to count them.
    targets = (label_audio_ids[:, 1:] != model_utils.IGNORE_INDEX).T.to(audio_logits.device)  # (columns - 1, codebooks)
    adapted = F.log_softmax(audio_logits[:-1].float(), dim=-1)
    reference = F.log_softmax(base[:-1].float(), dim=-1)
    per_position = (reference.exp() * (reference - adapted)).sum(-1)
    return (per_position * targets).sum() / targets.sum().clamp(min=1)


def _loss_vector(loss: model_utils.LossBreakdown) -> torch.Tensor:
    """[total, text, audio, codebook_0, ...] as float64, the precision the host adds in."""
    parts = torch.stack([loss.total.detach(), loss.text.detach(), loss.audio.detach()]).float()
    return torch.cat([parts, loss.per_codebook.detach().float()]).double()


def _on_any_process(flag: torch.Tensor, world: parallel.World) -> torch.Tensor:
    """A device flag set wherever it is set on some process (a device collective; the host does not wait)."""
    if not world.distributed:
        return flag
    flag = flag.to(torch.float32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.bool()


def _update_unless(skipped: torch.Tensor, optimizer: torch.optim.Optimizer, device: str) -> None:
    """The optimizer's update, unless `skipped`.

    A fused AdamW (CUDA) takes the flag on the device through `found_inf`, the
    protocol `torch.amp.GradScaler` uses: the kernel leaves parameters, moments
    and step count alone when it is set, and the host never reads it. The
    foreach AdamW (CPU, where reading a tensor waits for nothing) and
    torchao's `AdamW8bit` have no such argument, so the host decides: with
    `--optimizer adamw8bit` on a GPU that is one host sync per step.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped.to(torch.float32)
        optimizer.step()
    elif not skipped.item():
        step_optimizer(optimizer, device)
