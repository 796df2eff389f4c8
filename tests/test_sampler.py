"""Tests of collate.py's token-budget batching: sample lengths as the model counts them, budget, determinism, DDP, resume."""

import random

import numpy as np
import pytest
import torch

import collate
import data

# --------------------------------------------------------------------------
# sample_tokens and padding, against the model's own merged sequence
# --------------------------------------------------------------------------


def codes(frames, seed):
    return torch.randint(0, 1024, (8, frames), generator=torch.Generator().manual_seed(seed))


def samples(tokenizer, ref_in_system):
    texts = ["Hi.", "A somewhat longer sentence to speak, with more words in it.", "Medium length text here."]
    return [
        data.build_sample(tokenizer, "Reference words.", codes(5 + 7 * i, i), text, target_codes=codes(20 - 6 * i, 9 + i),
                          ref_in_system=ref_in_system)
        for i, text in enumerate(texts)
    ]


@pytest.mark.parametrize("ref_in_system", [False, True], ids=["reference-turn", "reference-in-system"])
def test_sample_tokens_and_padding_are_what_the_model_sees(tiny, ref_in_system):
    batch_samples = samples(tiny.tokenizer, ref_in_system)
    collator = collate.build_collator(tiny.model.config)
    batch = collate.collate(collator, batch_samples, tiny.model.config.audio_codebook_size)
    with torch.no_grad():
        outputs = tiny.model(**collate.batch_to_model_inputs(batch, "cpu"))

    lengths = [collate.sample_tokens(sample, 8) for sample in batch_samples]
    assert outputs.attention_mask.sum(dim=1).tolist() == lengths
    assert outputs.attention_mask.numel() == collate.padded_tokens(lengths)
    real = outputs.attention_mask.sum().item()
    assert collate.padding_fraction(lengths) == pytest.approx(1 - real / outputs.attention_mask.numel())


def test_sample_tokens_refuses_a_sample_with_whisper_features(tiny):
    sample = data.build_sample(tiny.tokenizer, None, codes(5, 0), "Hi.", ref_in_system=True,
                               ref_waveform=np.ones(2400, np.float32), sample_rate=24000)
    with pytest.raises(ValueError, match="Whisper"):
        collate.sample_tokens(sample, 8)


def test_padding_rounds_to_the_models_multiple_of_8():
    assert collate.padded_tokens([10, 16]) == 32
    assert collate.padded_tokens([17]) == 24
    assert collate.padding_fraction([10, 16]) == pytest.approx(6 / 32)


# --------------------------------------------------------------------------
# token_budget_batches
# --------------------------------------------------------------------------


def length_mix(count=3000, seed=0):
    """Sample lengths of a LibriTTS-like mix: two clips of log-normal duration (median 6 s, 1-20 s) at 25 frames/s."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.5, size=(count, 2)), 1.0, 20.0)
    return [int(30 + sum(25 * s + 9 + 3.5 * s for s in pair)) for pair in seconds]


LENGTHS = length_mix()
BUDGET = 8192


def test_every_sample_comes_once_per_epoch_within_the_budget():
    batches = collate.token_budget_batches(LENGTHS, BUDGET, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    assert all(collate.padded_tokens([LENGTHS[i] for i in batch]) <= BUDGET for batch in batches)
    # Greedy packing fills the budget: a batch leaves room for less than one more of its longest sample.
    sizes = [len(batch) for batch in batches]
    assert np.mean(sizes) > 0.8 * BUDGET / np.mean(LENGTHS)


def test_bucketed_batches_pad_little_and_random_ones_much_more():
    def padding(batches):
        lengths = [[LENGTHS[i] for i in batch] for batch in batches]
        return 1 - sum(map(sum, lengths)) / sum(map(collate.padded_tokens, lengths))

    bucketed = padding(collate.token_budget_batches(LENGTHS, BUDGET, seed=0, epoch=0))
    unsorted = padding(collate.token_budget_batches(LENGTHS, BUDGET, seed=0, epoch=0, bucket_size=1))
    assert bucketed <= 0.10
    assert unsorted > 3 * bucketed


def test_batches_depend_on_seed_and_epoch_only():
    first = collate.token_budget_batches(LENGTHS, BUDGET, seed=5, epoch=2)
    # Global random state, as a restarted process has it, plays no part.
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert collate.token_budget_batches(LENGTHS, BUDGET, seed=5, epoch=2) == first
    assert collate.token_budget_batches(LENGTHS, BUDGET, seed=5, epoch=3) != first
    assert collate.token_budget_batches(LENGTHS, BUDGET, seed=6, epoch=2) != first


def test_a_resumed_epoch_continues_with_exactly_the_batches_not_yet_taken():
    uninterrupted = collate.token_budget_batches(LENGTHS, BUDGET, seed=1, epoch=4)
    consumed = 17  # the position a checkpoint stores
    np.random.seed(99)  # a new process
    resumed = collate.token_budget_batches(LENGTHS, BUDGET, seed=1, epoch=4)[consumed:]
    assert uninterrupted[:consumed] + resumed == uninterrupted


@pytest.mark.parametrize("world_size", [2, 5])
def test_processes_take_disjoint_batches_and_as_many_steps(world_size):
    single = collate.token_budget_batches(LENGTHS, BUDGET, seed=2, epoch=1)
    assert world_size == 2 or len(single) % world_size, "5 processes must leave a tail of batches out"
    per_rank = [collate.token_budget_batches(LENGTHS, BUDGET, seed=2, epoch=1, rank=rank, world_size=world_size)
                for rank in range(world_size)]

    steps = len(single) // world_size
    assert [len(batches) for batches in per_rank] == [steps] * world_size
    # Round-robin over the one epoch plan: together they take its first steps * world_size batches.
    interleaved = [per_rank[rank][step] for step in range(steps) for rank in range(world_size)]
    assert interleaved == single[: steps * world_size]


def test_the_batches_left_out_for_ddp_change_each_epoch():
    def left_out(epoch):
        single = collate.token_budget_batches(LENGTHS, BUDGET, seed=2, epoch=epoch)
        used = collate.token_budget_batches(LENGTHS, BUDGET, seed=2, epoch=epoch, rank=0, world_size=5)
        return len(single) % 5, single[len(used) * 5 :]

    (count, first), (_, second) = left_out(0), left_out(1)
    assert count > 0 and first != second


def test_a_sample_over_the_budget_is_an_error_naming_it():
    with pytest.raises(ValueError, match="sample 1 takes 900 tokens, over the batch budget of 800"):
        collate.token_budget_batches([100, 900, 200], 800, seed=0, epoch=0)


@pytest.mark.parametrize("rank,world_size,message", [(2, 2, "rank 2 is outside 0..1"), (0, 5, "cannot feed 5")])
def test_impossible_splits_are_an_error(rank, world_size, message):
    with pytest.raises(ValueError, match=message):
        collate.token_budget_batches([100, 200, 300], 400, seed=0, epoch=0, rank=rank, world_size=world_size)
