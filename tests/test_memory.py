"""Memory fixes keep the losses (text logits at labels, frozen weights in bf16), and the memory plan adds up."""

from __future__ import annotations

import copy

import pytest
import torch

import bench
import collate
import data
import generation
import model_utils
import train


@pytest.fixture(scope="module")
def batches(tiny, parity_case):
    """The demo voice-cloning sample alone (left-padded by the model) and twice (right-padded)."""
    sample = lambda: data.build_sample(tiny.tokenizer, parity_case.ref_text, parity_case.ref_codes,  # noqa: E731
                                       parity_case.text, parity_case.target_codes)
    collator = collate.build_collator(tiny.model.config)
    return [collate.collate(collator, [sample() for _ in range(n)], 1024) for n in (1, 2)]


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
    model_utils.text_logits_at_labels(model)
    outputs = model(**collate.batch_to_model_inputs(batch, "cpu"))
    assert outputs.logits.shape == (3 * size, tiny.model.config.text_config.vocab_size)
    selected, grads = _loss_and_grads(model, batch)
    assert selected.text_tokens == full.text_tokens == 3 * size
    torch.testing.assert_close(selected.text, full.text, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(selected.total, full.total, rtol=1e-6, atol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_text_logits_at_labels_leave_prompt_forwards_whole(tiny, batches):
    """Without labels (generation, validation prompts) the head computes every position, as before."""
    inputs = collate.batch_to_model_inputs(batches[1], "cpu")
    inputs.pop("label_ids")
    model = copy.deepcopy(tiny.model)
    model_utils.text_logits_at_labels(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, tiny.model(**inputs).logits, rtol=0, atol=0)


def test_frozen_linear_weights_in_bf16_give_bit_identical_losses_under_autocast(tiny, batches):
    config = train.TrainConfig(lora_rank=4)
    reference = train.add_lora(copy.deepcopy(tiny.model), config)
    model = copy.deepcopy(reference)
    assert model_utils.frozen_linear_weights_to_bf16(model) > 0
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


def test_bf16_training_with_both_fixes_stays_close_to_fp32(tiny, batches, parity_case):
    """The bf16 path on the CPU: LoRA, autocast bf16, frozen weights in bf16, text logits at labels, three
    AdamW steps as train.py takes them, then a generation under autocast (train.log_generations' path)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        options = bench.StepOptions(scope="lora", precision=precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = train.add_lora(copy.deepcopy(tiny.model), train.TrainConfig(lora_rank=4))
        train.reduce_memory(model, options.train_config("cpu"))
        optimizer = train.build_optimizer(model, train.TrainConfig(device="cpu", lr=1e-3))
        inputs = collate.batch_to_model_inputs(batches[1], "cpu")
        losses[precision] = [float(bench.training_step(model.train(), optimizer, inputs, batches[1].label_audio_ids,
                                                       options).total) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"][-1] < losses["bf16"][0]
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert abs(bf16 - fp32) < 0.01 * fp32, losses
    reference = generation.Reference(parity_case.ref_text, parity_case.ref_codes, None, parity_case.sample_rate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        waveform = generation.clone(model_utils.Bundle(model.eval(), tiny.tokenizer, tiny.audio_tokenizer), reference,
                                    parity_case.text, generation.Sampling(greedy=True, max_seconds=0.2)).waveform
    assert waveform.size and bool(torch.isfinite(torch.from_numpy(waveform)).all())


@pytest.fixture(scope="module")
def tiny_config():
    return bench.model_config("tiny")


def test_plan_breakdown_adds_up(tiny_config):
    options = bench.StepOptions(scope="lora", precision="bf16")
    plan = bench.plan_step(tiny_config, options, tokens=1024)
    model = bench.build_training_model(tiny_config, options, "meta")
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.weights_bytes == plan.param_bytes + buffers
    trained = [p for p in model.parameters() if p.requires_grad]
    assert plan.optimizer_bytes == sum(2 * 4 * p.numel() + 4 for p in trained), "fp32 exp_avg, exp_avg_sq and step"
    assert plan.peak_gib == pytest.approx(plan.weights_gib + plan.gradients_gib + plan.optimizer_gib + plan.activations_gib)
    assert plan.text_labels == 3 and plan.tokens == 1024 - 1024 % 8


def test_plan_matches_the_measured_step(tiny_config):
    """The fake step and the real one, under the same tracker, agree (the fake tensors lose no allocation)."""
    for options in (bench.StepOptions(scope="full", precision="fp32", text_logits="all"),
                    bench.StepOptions(scope="audio", precision="fp32", grad_checkpoint=True)):
        planned = bench.plan_step(tiny_config, options, tokens=1024).peak_gib
        measured = bench.measure_step(tiny_config, options, tokens=1024)["tracked_gib"]
        assert planned == pytest.approx(measured, rel=0.01), options


def test_plan_shows_what_each_fix_saves(tiny_config):
    before = bench.StepOptions(scope="lora", frozen_bf16=False, text_logits="all")
    plans = {name: bench.plan_step(tiny_config, options, tokens=1024) for name, options in
             (("before", before), ("bf16", bench.replace(before, frozen_bf16=True)),
              ("labelled", bench.replace(before, text_logits="labelled")))}
    assert plans["bf16"].weights_bytes < plans["before"].weights_bytes
    assert plans["labelled"].peak_gib < plans["before"].peak_gib
    assert plans["labelled"].text_logits_gib * 100 < plans["before"].text_logits_gib
