"""The model as it is trained and the one training step: scopes, LoRA, bf16, the skip of a non-finite step,
the statistics the step keeps on the device until they are read, and the forgetting guard's KL to the base."""

from __future__ import annotations

import copy

import pytest
import torch

import checkpoints
import collate
import config
import generation
import loader
import manifest
import model_utils
import syncs


import train
import trainable
from codes import EncodedClips
from conftest import train_config
from parallel import World


def _prepared(tiny, **settings) -> tuple[torch.nn.Module, config.TrainConfig]:
    """The tiny model prepared as train.py prepares it for `settings` (on the CPU)."""
    settings = config.TrainConfig(**{"device": "cpu", **settings})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return trainable.prepare_model(copy.deepcopy(tiny.model), settings, World()).train(), settings


def test_bf16_training_with_both_fixes_stays_close_to_fp32(tiny, batches, parity_case):
    """The bf16 path on the CPU: LoRA, autocast bf16, frozen weights in bf16, text logits at labels, three
    AdamW steps as train.py takes them, then a generation under autocast (heldout.log_generations' path)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        model, settings = _prepared(tiny, scope="lora", precision=precision, lora_rank=4, lr=1e-3, grad_clip=0.0)
        optimizer = trainable.build_optimizer(model, settings, "cpu")
        steps = [trainable.train_step(model, optimizer, [batches[1]], settings, World(), settings.lr) for _ in range(3)]
        losses[precision] = [stats.read(World()).losses["total"] for stats in steps]
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"][-1] < losses["bf16"][0]
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert abs(bf16 - fp32) < 0.01 * fp32, losses
    reference = generation.Reference(parity_case.ref_text, parity_case.ref_codes, None, parity_case.sample_rate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        waveform = generation.clone(model_utils.Bundle(model.eval(), tiny.tokenizer, tiny.audio_tokenizer), reference,
                                    parity_case.text, generation.Sampling(greedy=True, max_seconds=0.2)).waveform
    assert waveform.size and bool(torch.isfinite(torch.from_numpy(waveform)).all())


@pytest.mark.parametrize("scope", ["audio", "full"])
def test_scope_trains_what_it_says_and_freezes_the_rest(tmp_path, small_manifest, scope):
    run = train.train(train_config(tmp_path, small_manifest, max_steps=2, scope=scope))
    tokenizer = model_utils.build_tiny_text_tokenizer()
    before = model_utils.build_tiny_model(tokenizer, seed=0).state_dict()
    after = model_utils.load_bundle(str(run / "export")).model.state_dict()
    audio = [name for name in before if any(marker in name for marker in trainable.AUDIO_PARAMETER_MARKERS)]
    text = [name for name in before if name not in audio and "rotary" not in name]
    assert audio and text
    assert all(not torch.equal(before[name], after[name]) for name in audio), "every trained tensor moves"
    unchanged = [name for name in text if torch.equal(before[name], after[name])]
    if scope == "audio":
        assert unchanged == text, "the text LLM stays bit-identical"
    else:
        assert not unchanged


def test_lora_trains_adapters_on_attention_and_both_ffns_and_merges_on_export(tmp_path, small_manifest):
    run = train.train(train_config(tmp_path, small_manifest, max_steps=2, scope="lora", lora_rank=4))
    saved = torch.load(checkpoints.latest_checkpoint(run), weights_only=True)["model"]
    assert saved and all("lora_" in name for name in saved)
    assert any("audio_mlp" in name for name in saved), "the audio FFN is adapted, not attention alone"
    before = model_utils.build_tiny_model(model_utils.build_tiny_text_tokenizer(), seed=0).state_dict()
    merged = model_utils.load_bundle(str(run / "export")).model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], merged[name])}
    targeted = {name for name in before if name.endswith(".weight") and name.split(".")[-2] in trainable.LORA_TARGETS}
    assert changed == targeted


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_non_finite_loss_skips_the_update_and_says_so(tiny, batches, fused):
    """A NaN in a trained weight makes the loss NaN: parameters and AdamW state stay as they were, on the host's
    decision (foreach AdamW) or on the device's alone (fused AdamW, through found_inf)."""
    model, settings = _prepared(tiny, scope="audio")
    optimizer = trainable.build_optimizer(model, settings, "cuda" if fused else "cpu")
    assert bool(optimizer.defaults["fused"]) == fused
    finite = trainable.train_step(model, optimizer, [batches[0]], settings, World(), settings.lr)
    assert not finite.read(World()).skipped
    head = model_utils.higgs_model(model).audio_decoder_proj.audio_lm_head.weight
    with torch.no_grad():
        head[0, 0] = float("nan")
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state = copy.deepcopy(optimizer.state_dict()["state"])
    values = trainable.train_step(model, optimizer, [batches[0]], settings, World(), settings.lr).read(World())
    assert values.skipped and values.losses["total"] != values.losses["total"]
    after = dict(model.named_parameters())
    assert all(torch.equal(before[name], after[name].detach()) or name.endswith("audio_lm_head.weight") for name in before)
    for key, moments in optimizer.state_dict()["state"].items():
        assert all(torch.equal(moments[name], state[key][name]) for name in moments), key


def test_the_step_reads_what_compute_loss_gives_and_counts_what_the_model_saw(tiny, batches):
    model, settings = _prepared(tiny, scope="full", grad_clip=0.0)
    batch = batches[1]
    with torch.no_grad():
        outputs = copy.deepcopy(model)(**collate.batch_to_model_inputs(batch, "cpu"))
    reference, mask = model_utils.compute_loss(outputs, batch.label_audio_ids), outputs.attention_mask
    stats = trainable.train_step(model, trainable.build_optimizer(model, settings, "cpu"), [batch], settings, World(), 1e-3)
    assert all(tensor.device.type == "cpu" and not tensor.requires_grad for tensor in (stats.losses, stats.counts, stats.hits))
    values = stats.read(World())
    assert values.losses["total"] == pytest.approx(float(reference.total), rel=1e-6)
    assert values.losses["codebook_7"] == pytest.approx(float(reference.per_codebook[7]), rel=1e-6)
    assert (values.tokens, values.padded, values.samples) == (int(mask.sum()), int(mask.numel() - mask.sum()), 2)
    assert 0 <= values.accuracy["all"] <= 1 and values.grad_norm > 0
    assert not values.stop and stats.read(World(), stop_requested=True).stop, "a stop request travels with the read"


def _model_state(optimizer) -> dict:
    """The optimizer's state as plain tensors (torchao's 8-bit moments dequantized), copied."""
    return {key: {name: (value.dequantize() if hasattr(value, "dequantize") else value).clone()
                  for name, value in state.items()} for key, state in optimizer.state.items()}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_a_step_that_does_not_log_makes_no_host_sync_of_ours(tiny, batches, optimizer):
    """The step as train.py takes it on a GPU (fused AdamW, which runs on the CPU too): two micro-batches,
    checkpointed layers, text logits at labels, under the sync counter. torchao's 8-bit AdamW has no
    found_inf, so there the host reads the skip flag: one sync per step, and no other."""
    model, settings = _prepared(tiny, scope="full", grad_checkpoint=True, optimizer=optimizer)
    built = trainable.build_optimizer(model, settings, "cuda")
    with syncs.SyncCounter(model) as counter:
        stats = trainable.train_step(model, built, [batches[1], batches[0]], settings, World(), 1e-3)
    ours = [(sync.operator, sync.where) for sync in counter.ours()]
    if optimizer == "adamw":
        assert ours == [], ours
    else:
        assert len(ours) == 1 and ours[0][0] == "item" and "_update_unless" in ours[0][1], ours
    assert counter.summary()[syncs.PACKAGE] > 0, "the counter sees the package's"
    assert not stats.read(World()).skipped


def test_8bit_adamw_skips_a_non_finite_step_leaving_its_state_alone(tiny, batches):
    model, settings = _prepared(tiny, scope="audio", optimizer="adamw8bit")
    optimizer = trainable.build_optimizer(model, settings, "cpu")
    trainable.train_step(model, optimizer, [batches[0]], settings, World(), settings.lr)
    assert any(type(state["exp_avg"]).__name__ == "OptimState8bit" for state in optimizer.state.values())
    with torch.no_grad():
        model_utils.higgs_model(model).audio_decoder_proj.audio_lm_head.weight[0, 0] = float("nan")
    before, state = {name: p.detach().clone() for name, p in model.named_parameters()}, _model_state(optimizer)
    assert trainable.train_step(model, optimizer, [batches[0]], settings, World(), settings.lr).read(World()).skipped
    assert all(torch.equal(before[name], p.detach()) or name.endswith("audio_lm_head.weight") for name, p in model.named_parameters())
    after = _model_state(optimizer)
    assert all(torch.equal(after[key][name], state[key][name]) for key in state for name in state[key])


def test_8bit_adamw_losses_stay_close_to_fp32_adamw(tiny, batches):
    """Five steps on one batch (the 200-step figures are in docs/memory-and-speed.md:
    benchmarks/adamw8bit_benchmark.py)."""
    losses = {}
    for optimizer in ("adamw", "adamw8bit"):
        model, settings = _prepared(tiny, scope="full", optimizer=optimizer)
        built = trainable.build_optimizer(model, settings, "cpu")
        losses[optimizer] = [trainable.train_step(model, built, [batches[1]], settings, World(), settings.lr)
                             .read(World()).losses["total"] for _ in range(5)]
    assert losses["adamw8bit"][-1] < losses["adamw8bit"][0] - 1.0, ("it learns", losses)
    assert max(abs(a - b) for a, b in zip(losses["adamw"], losses["adamw8bit"])) < 0.05 * losses["adamw"][0], losses


def _loss_and_grads(model, batch):
    model.train()
    loss = model_utils.compute_loss(model(**collate.batch_to_model_inputs(batch, "cpu")), batch.label_audio_ids)
    loss.total.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("size", [1, 2])
def test_text_logits_at_labels_keep_the_loss_and_gradients(tiny, batches, size):
    batch = batches[size - 1]
    full, full_grads = _loss_and_grads(copy.deepcopy(tiny.model), batch)
    model = copy.deepcopy(tiny.model)
    trainable.text_logits_at_labels(model)
    outputs = model(**collate.batch_to_model_inputs(batch, "cpu"))
    assert outputs.logits.shape == (3 * size, tiny.model.config.text_config.vocab_size)
    selected, grads = _loss_and_grads(model, batch)
    assert int(selected.text_tokens) == int(full.text_tokens) == 3 * size
    torch.testing.assert_close(selected.text, full.text, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(selected.total, full.total, rtol=1e-6, atol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_labelled_text_logits_take_their_count_from_the_host_and_check_it_on_request(tiny, batches):
    """The training step's forward: one merge (the model's), the count from the host; `check` (--debug-checks)
    compares labels and count with a second merge, and a count off by one fails either way."""
    batch = batches[1]
    inputs = collate.batch_to_model_inputs(batch, "cpu")
    count = collate.text_label_count(batch, tiny.model.config)
    reference = model_utils.compute_loss(tiny.model(**inputs), batch.label_audio_ids)
    models = {}
    for check in (False, True):
        models[check] = copy.deepcopy(tiny.model)
        trainable.text_logits_at_labels(models[check], check=check)
        outputs = models[check](**inputs, **{trainable.TEXT_LABEL_COUNT: count})
        assert outputs.logits.shape == (count, tiny.model.config.text_config.vocab_size)
        torch.testing.assert_close(model_utils.compute_loss(outputs, batch.label_audio_ids).total, reference.total,
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError):
        models[False](**inputs, **{trainable.TEXT_LABEL_COUNT: count + 1})
    with pytest.raises(RuntimeError, match=f"text_label_count {count - 1}, but the merged labels hold {count}"):
        models[True](**inputs, **{trainable.TEXT_LABEL_COUNT: count - 1})


def test_text_logits_at_labels_leave_prompt_forwards_whole(tiny, batches):
    """Without labels (generation, validation prompts) the head computes every position, as before."""
    inputs = collate.batch_to_model_inputs(batches[1], "cpu")
    inputs.pop("label_ids")
    model = copy.deepcopy(tiny.model)
    trainable.text_logits_at_labels(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, tiny.model(**inputs).logits, rtol=0, atol=0)


def test_frozen_linear_weights_in_bf16_give_bit_identical_losses_under_autocast(tiny, batches):
    reference = trainable.add_lora(copy.deepcopy(tiny.model), config.TrainConfig(lora_rank=4))
    model = copy.deepcopy(reference)
    assert trainable.frozen_linear_weights_to_bf16(model) > 0
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            frozen_linear = isinstance(module, torch.nn.Linear) and not parameter.requires_grad
            assert parameter.dtype == (torch.bfloat16 if frozen_linear else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = _loss_and_grads(reference, batches[1])
        got, grads = _loss_and_grads(model, batches[1])
    assert torch.equal(got.total, expected.total) and torch.isfinite(got.total)
    for name in grads:
        assert torch.equal(grads[name], expected_grads[name]), name


def _forward_backward(model, batch) -> tuple[torch.Tensor, dict]:
    """A training forward (labelled text logits, counted on the host) and backward: the loss and the gradients."""
    inputs = collate.batch_to_model_inputs(batch, "cpu")
    inputs[trainable.TEXT_LABEL_COUNT] = collate.text_label_count(batch, model_utils.higgs_model(model).config)
    loss = model_utils.compute_loss(model(**inputs), inputs["label_audio_ids"]).total
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _compiled_step(tiny, batch, scope: str, backend: str) -> dict:
    """The graphs and breaks dynamo makes of a forward and backward of the tiny model compiled at `scope`
    (`trainable.compile_model`), with its loss and gradients and those of the same model uncompiled."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, _ = _prepared(tiny, scope="full")
    trainable.compile_model(model, scope, backend=backend)
    compiled = _forward_backward(model, batch)
    eager = _forward_backward(_prepared(tiny, scope="full")[0], batch)
    counters = torch._dynamo.utils.counters
    graphs, breaks = int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))
    torch._dynamo.reset()
    return {"graphs": graphs, "breaks": breaks, "compiled": compiled, "eager": eager}


def test_each_compiled_layer_is_one_graph_with_the_eager_loss_and_gradients(tiny, batches):
    """The layers share their code, so dynamo's graphs of one layer serve all: 1, where the package's boolean
    masks broke each layer into 5 before (benchmarks/compile_benchmark.py graphs counts both). aot_eager traces
    the forward and backward graphs as inductor does (inductor itself: tests/test_train.py and
    benchmarks/compile_benchmark.py graphs)."""
    after = _compiled_step(tiny, batches[1], "layers", "aot_eager")
    assert (after["graphs"], after["breaks"]) == (1, 0)
    (loss, grads), (reference, reference_grads) = after["compiled"], after["eager"]
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_whole_model_compiles_with_the_eager_loss_breaking_where_sizes_depend_on_the_data(tiny, batches):
    """--compile-scope model: the merge, the layers and the heads, with the package's data-dependent sizes left
    to graph breaks (inductor fails on them otherwise: docs/memory-and-speed.md)."""
    whole = _compiled_step(tiny, batches[1], "model", "eager")
    assert (whole["graphs"], whole["breaks"]) == (22, 16)
    torch.testing.assert_close(whole["compiled"][0], whole["eager"][0], rtol=0, atol=0)


# --------------------------------------------------------------------------
# The forgetting guard: KL(base || adapted), the base being the adapters disabled
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arabic_and_english(tiny, short_manifest):
    """The short manifest's Arabic pairs (adapted to) and English pairs (held back), one batch each."""
    codes = EncodedClips(tiny.audio_tokenizer)
    rows = manifest.check_manifest(short_manifest, codes).kept
    builder = loader.BatchBuilder(tiny, config.TrainConfig(device="cpu"), codes)
    return [builder.batch(manifest.training_pairs([row for row in rows if row["language"] == language], 0, 0)[0])
            for language in ("ar", "en")]


def _loss_and_kl(model, batch) -> tuple[float, float]:
    """The loss and the KL to the base on `batch`, without dropout."""
    model.eval()
    with torch.no_grad():
        inputs = collate.batch_to_model_inputs(batch, "cpu")
        outputs = model(**inputs)
        kl = trainable.forgetting_kl(model, inputs, outputs.audio_logits, batch.label_audio_ids)
        loss = model_utils.compute_loss(outputs, batch.label_audio_ids).total
    model.train()
    return float(loss), float(kl)


def test_the_forgetting_guard_keeps_a_held_back_set_nearer_the_base(tiny, arabic_and_english):
    """LoRA adapts to the Arabic pairs for 4 steps at a high learning rate, with and without --kl-weight 100:
    the KL to the base on the held-back English pairs ends lower with the guard (seen: 0.0272 without, 0.0150
    with, for an Arabic loss of 12.29 without and 12.66 with; benchmarks/forgetting_benchmark.py measures
    longer runs)."""
    arabic, english = arabic_and_english
    held_back, logged = {}, {}
    for weight in (0.0, 100.0):
        model, settings = _prepared(tiny, scope="lora", lora_rank=4, lr=0.1, warmup_steps=0, kl_weight=weight)
        optimizer = trainable.build_optimizer(model, settings, "cpu")
        for _ in range(4):
            stats = trainable.train_step(model, optimizer, [arabic], settings, World(), settings.lr)
        logged[weight] = stats.read(World()).kl
        held_back[weight] = _loss_and_kl(model, english)[1]
    assert logged[0.0] != logged[0.0] and logged[100.0] > 0, "the term is taken, and logged, only with --kl-weight"
    assert held_back[100.0] < 0.8 * held_back[0.0], held_back


def test_the_base_pass_leaves_the_adapters_on_and_the_kl_pulls_only_the_adapters(tiny, batches):
    model, settings = _prepared(tiny, scope="lora", lora_rank=4, lr=0.1, warmup_steps=0)
    batch = batches[1]
    assert _loss_and_kl(model, batch)[1] == pytest.approx(0.0, abs=1e-7), "fresh adapters add nothing"
    trainable.train_step(model, trainable.build_optimizer(model, settings, "cpu"), [batch], settings, World(), settings.lr)
    inputs = collate.batch_to_model_inputs(batch, "cpu")
    outputs = model(**inputs)
    kl = trainable.forgetting_kl(model, inputs, outputs.audio_logits, batch.label_audio_ids)
    kl.backward()
    with torch.no_grad():
        again = model(**inputs).audio_logits
    assert torch.equal(again, outputs.audio_logits.detach()), "the adapters are on again after the base pass"
    assert float(kl) > 0
    moved = {name for name, parameter in model.named_parameters() if parameter.grad is not None and parameter.grad.abs().sum() > 0}
    assert moved and all("lora_" in name for name in moved)


def test_the_kl_term_is_taken_on_every_micro_batch_or_on_the_replay_sets():
    assert trainable.takes_kl(config.TrainConfig(), ["vi", "en"], 2) == [False, False]
    assert trainable.takes_kl(config.TrainConfig(scope="lora", kl_weight=1.0), None, 2) == [True, True]
    replay = config.TrainConfig(scope="lora", kl_weight=1.0, kl_replay="en")
    assert trainable.takes_kl(replay, ["vi", "en", "vi"], 3) == [False, True, False]
    with pytest.raises(ValueError, match="--kl-replay"):
        trainable.takes_kl(replay, None, 2)
