"""Tests of collate.py: the collator built from the model config, collation with sample checks, and token-budget
batching (sample lengths as the model counts them, budget, determinism, DDP, resume)."""

import copy
import dataclasses
import random
import re

import numpy as np
import pytest
import torch

import collate
import data

CODEBOOK_SIZE = 1024
MODEL_RATE = 24000
REF_TEXT = "Hello there, how are you?"
TEXT = "Nice to meet you."
IGNORE = -100


def codes(frames, seed):
    return torch.randint(0, CODEBOOK_SIZE, (8, frames), generator=torch.Generator().manual_seed(seed))


def collator_for(bundle):
    config = bundle.model.config
    return collate.build_collator(config, collate.whisper_features(config))


def delayed(clip, before, eos, after):
    """A clip in the delay pattern, written out: row k is k+1 `before`, the codes, `eos`, then `after`."""
    num_codebooks, frames = clip.shape
    out = torch.full((num_codebooks, frames + num_codebooks + 1), after, dtype=torch.long)
    for k in range(num_codebooks):
        out[k, : k + 1] = before
        out[k, k + 1 : k + 1 + frames] = clip[k]
        out[k, k + 1 + frames] = eos
    return out


@pytest.fixture(scope="module")
def ref_codes(tiny, voice_prompt):
    """Real codes of the real voice prompt (2 s, 50 frames), encoded once."""
    waveform, _ = voice_prompt
    return tiny.audio_tokenizer.encode(waveform, MODEL_RATE).cpu()


@pytest.fixture(scope="module")
def target_codes():
    return codes(7, seed=2)


@pytest.fixture(scope="module")
def collator(tiny):
    return collator_for(tiny)


@pytest.fixture(scope="module")
def whisper_collator(tiny_whisper):
    return collator_for(tiny_whisper)


@pytest.fixture
def sample(tiny, ref_codes, target_codes):
    """A fresh training sample (default layout) per test: some tests collate with a collator that mutates it."""
    return data.build_sample(tiny.tokenizer, REF_TEXT, ref_codes, TEXT, target_codes=target_codes)


@pytest.fixture
def whisper_sample(tiny_whisper, ref_codes, target_codes, voice_prompt):
    """A training sample with the reference in the system message and its waveform for Whisper."""
    waveform, _ = voice_prompt
    return data.build_sample(
        tiny_whisper.tokenizer,
        None,
        ref_codes,
        TEXT,
        target_codes=target_codes,
        layout=data.PromptLayout(ref_in_system=True),
        ref_waveform=waveform,
        sample_rate=MODEL_RATE,
    )


def batches_equal(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------
# build_collator
# --------------------------------------------------------------------------


@pytest.mark.parametrize("preset,whisper", [("tiny", False), ("tiny_whisper", True)])
def test_build_collator_takes_every_flag_from_the_config(request, preset, whisper):
    bundle = request.getfixturevalue(preset)
    config, tokenizer = bundle.model.config, bundle.tokenizer
    built = collator_for(bundle)

    assert config.encode_whisper_embed is whisper
    assert built.encode_whisper_embed is whisper
    assert (built.whisper_processor is not None) is whisper
    if whisper:
        assert built.whisper_processor.feature_extractor.feature_size == config.audio_encoder_config.num_mel_bins
    assert built.use_delay_pattern == config.use_delay_pattern
    assert built.audio_num_codebooks == config.audio_num_codebooks == 8
    assert built.return_audio_in_tokens == config.encode_audio_in_tokens
    assert built.audio_in_token_id == config.audio_in_token_idx == tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert built.audio_out_token_id == config.audio_out_token_idx == tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>")
    assert built.audio_stream_bos_id == config.audio_stream_bos_id == CODEBOOK_SIZE
    assert built.audio_stream_eos_id == config.audio_stream_eos_id == CODEBOOK_SIZE + 1
    assert built.pad_token_id == config.pad_token_id == tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert built.mask_audio_out_token_label is False


@pytest.mark.parametrize(
    "config_attr,value,collator_attr",
    [
        ("use_delay_pattern", False, "use_delay_pattern"),
        ("encode_audio_in_tokens", False, "return_audio_in_tokens"),
        ("audio_num_codebooks", 4, "audio_num_codebooks"),
        ("pad_token_id", 3, "pad_token_id"),
        ("audio_stream_eos_id", 1030, "audio_stream_eos_id"),
    ],
)
def test_build_collator_follows_a_changed_config(tiny, config_attr, value, collator_attr):
    config = copy.deepcopy(tiny.model.config)
    assert getattr(config, config_attr) != value
    setattr(config, config_attr, value)
    assert getattr(collate.build_collator(config), collator_attr) == value


def test_whisper_config_without_whisper_features_is_an_error(tiny_whisper):
    with pytest.raises(ValueError, match="uses Whisper features"):
        collate.build_collator(tiny_whisper.model.config)


# --------------------------------------------------------------------------
# collate: audio layout and labels
# --------------------------------------------------------------------------


def test_collate_applies_the_delay_pattern_and_labels_only_the_target(collator, sample, ref_codes, target_codes):
    batch = collate.collate(collator, [sample], CODEBOOK_SIZE)
    bos, eos = collator.audio_stream_bos_id, collator.audio_stream_eos_id
    ref_cols = ref_codes.shape[1] + 8 + 1

    assert batch.audio_out_ids_start.tolist() == [0, ref_cols]
    assert torch.equal(
        batch.audio_out_ids, torch.cat([delayed(ref_codes, bos, eos, eos), delayed(target_codes, bos, eos, eos)], dim=1)
    )
    assert (batch.label_audio_ids[:, :ref_cols] == IGNORE).all()
    # Target labels: -100 first column, the codes on the diagonal, then one EOS per codebook.
    assert torch.equal(batch.label_audio_ids[:, ref_cols:], delayed(target_codes, IGNORE, eos, IGNORE))
    assert torch.equal(batch.label_ids[0], sample.label_ids)


def test_collate_without_delay_pattern_when_the_config_says_so(tiny, sample, ref_codes, target_codes):
    config = copy.deepcopy(tiny.model.config)
    config.use_delay_pattern = False
    batch = collate.collate(collate.build_collator(config), [sample], CODEBOOK_SIZE)

    bos, eos = config.audio_stream_bos_id, config.audio_stream_eos_id
    framed = [
        torch.cat([torch.full((8, 1), bos), clip, torch.full((8, 1), eos)], dim=1) for clip in (ref_codes, target_codes)
    ]
    assert torch.equal(batch.audio_out_ids, torch.cat(framed, dim=1))


def test_collating_a_sample_twice_gives_the_same_batch(collator, sample):
    """Regression: with mask_audio_out_token_label=True the package collator writes -100 into the
    sample's own label_ids, so the second collation of one sample object (every epoch of an
    in-memory dataset) has no trained audio. build_collator turns that flag off."""
    labels_before = sample.label_ids.clone()
    first = collate.collate(collator, [sample], CODEBOOK_SIZE)
    second = collate.collate(collator, [sample], CODEBOOK_SIZE)

    assert batches_equal(first, second)
    assert torch.equal(sample.label_ids, labels_before)
    assert (second.label_audio_ids != IGNORE).any()


def test_package_collator_with_label_masking_loses_audio_labels_on_second_pass(collator, sample, target_codes):
    """The package bug build_collator works around: the same collator with the package default
    mask_audio_out_token_label=True trains the target clip once, then never again. Should the
    package fix this, this test fails and the workaround can be reconsidered."""
    masking = copy.copy(collator)
    masking.mask_audio_out_token_label = True

    first = masking([sample])
    second = masking([sample])

    trained_per_pass = target_codes.numel() + target_codes.shape[0]  # the codes plus one EOS per codebook
    assert int((first.label_audio_ids != IGNORE).sum()) == trained_per_pass
    assert int((second.label_audio_ids != IGNORE).sum()) == 0


# --------------------------------------------------------------------------
# collate: samples that must be rejected
# --------------------------------------------------------------------------


def two_placeholders_one_clip(sample, tokenizer, ref_codes, target_codes):
    return dataclasses.replace(sample, audio_ids_concat=ref_codes, audio_ids_start=torch.tensor([0]))


def one_placeholder_two_clips(sample, tokenizer, ref_codes, target_codes):
    prompt = data.build_sample(tokenizer, REF_TEXT, ref_codes, TEXT)
    return dataclasses.replace(
        prompt,
        audio_ids_concat=torch.cat([ref_codes, target_codes], dim=1),
        audio_ids_start=torch.tensor([0, ref_codes.shape[1]]),
    )


def code_set_to(value):
    def make(sample, tokenizer, ref_codes, target_codes):
        bad = sample.audio_ids_concat.clone()
        bad[3, 10] = value
        return dataclasses.replace(sample, audio_ids_concat=bad)

    return make


def four_codebooks(sample, tokenizer, ref_codes, target_codes):
    return data.build_sample(tokenizer, REF_TEXT, ref_codes[:4], TEXT, target_codes=target_codes[:4])


@pytest.mark.parametrize(
    "make,message",
    [
        (two_placeholders_one_clip, "2 audio placeholders but 1 audio clips"),
        (one_placeholder_two_clips, "1 audio placeholders but 2 audio clips"),
        (code_set_to(CODEBOOK_SIZE), "..1024, outside 0..1023"),
        (code_set_to(-1), "span -1.."),
        (four_codebooks, "4 codebooks, the model needs 8"),
    ],
    ids=["2-placeholders-1-clip", "1-placeholder-2-clips", "code-1024", "code-minus-1", "4-codebooks"],
)
def test_bad_sample_is_an_error_naming_it(collator, tiny, sample, ref_codes, target_codes, make, message):
    bad = make(sample, tiny.tokenizer, ref_codes, target_codes)
    with pytest.raises(collate.SampleError, match=f"^sample row-7: .*{re.escape(message)}"):
        collate.collate(collator, [sample, bad], CODEBOOK_SIZE, names=["row-6", "row-7"])


# --------------------------------------------------------------------------
# collate: the Whisper path
# --------------------------------------------------------------------------


def test_whisper_sample_collates_features_and_reference_codes(
    whisper_collator, whisper_sample, ref_codes, target_codes
):
    batch = collate.collate(whisper_collator, [whisper_sample], CODEBOOK_SIZE)
    bos, eos = whisper_collator.audio_stream_bos_id, whisper_collator.audio_stream_eos_id

    features = batch.audio_features
    assert features.shape == (1, 128, 3000)
    assert features.abs().sum() > 0
    # 2 s resampled to Whisper's 16 kHz fill 200 frames of 10 ms (300 if left at 24 kHz):
    # speech varies there, the zero padding after it gives one constant log-mel floor.
    assert int(batch.audio_feature_attention_mask.sum()) == 200
    assert features[0, :, :200].std() > 0.1
    assert features[0, :, 220:].std() < 1e-3
    assert torch.equal(batch.audio_in_ids, delayed(ref_codes, bos, eos, eos))
    assert batch.audio_in_ids_start.tolist() == [0]
    assert torch.equal(batch.audio_out_ids, delayed(target_codes, bos, eos, eos))
    assert torch.equal(batch.label_audio_ids, delayed(target_codes, IGNORE, eos, IGNORE))


@pytest.mark.parametrize(
    "waveform,message",
    [
        (None, "1 <|AUDIO|> placeholders but 0 waveforms"),
        (np.resize(np.float32([0.1, -0.1]), 31 * MODEL_RATE), "a 31.0 s clip for Whisper exceeds 30 s"),
    ],
    ids=["no-waveform", "31-seconds"],
)
def test_whisper_sample_without_usable_waveform_is_an_error(
    whisper_collator, tiny_whisper, ref_codes, waveform, message
):
    bad = data.build_sample(
        tiny_whisper.tokenizer, None, ref_codes, TEXT, layout=data.PromptLayout(ref_in_system=True), ref_waveform=waveform,
        sample_rate=MODEL_RATE
    )
    with pytest.raises(collate.SampleError, match=f"^sample row-7: .*{re.escape(message)}"):
        collate.collate(whisper_collator, [bad], CODEBOOK_SIZE, names=["row-7"])


# --------------------------------------------------------------------------
# collate: batching
# --------------------------------------------------------------------------


def test_batch_pads_on_the_right_with_the_config_pad_id(collator, tiny, sample, ref_codes, target_codes):
    longer = data.build_sample(
        tiny.tokenizer,
        REF_TEXT,
        ref_codes,
        "A much longer sentence to speak than the other one.",
        target_codes=target_codes,
    )
    short_len, long_len = len(sample.input_ids), len(longer.input_ids)
    assert short_len < long_len

    batch = collate.collate(collator, [sample, longer], CODEBOOK_SIZE)

    pad_id = tiny.model.config.pad_token_id
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, long_len)
    assert torch.equal(batch.input_ids[0, :short_len], sample.input_ids)
    assert (batch.input_ids[0, short_len:] == pad_id).all()
    assert (batch.label_ids[0, short_len:] == IGNORE).all()
    assert batch.attention_mask[0].tolist() == [1] * short_len + [0] * (long_len - short_len)
    assert torch.equal(batch.input_ids[1], longer.input_ids)
    assert (batch.attention_mask[1] == 1).all()


def test_a_batch_mixing_training_samples_and_prompts_is_an_error(tiny):
    codes = torch.randint(0, 1024, (8, 5))
    sample = data.build_sample(tiny.tokenizer, "Ref.", codes, "Target.", target_codes=codes)
    prompt = data.build_sample(tiny.tokenizer, "Ref.", codes, "Target.")
    collator = collate.build_collator(tiny.model.config)
    with pytest.raises(collate.SampleError, match="unlabelled: b"):
        collate.collate(collator, [sample, prompt], 1024, names=["a", "b"])


def test_describe_batch_rejects_ids_outside_the_vocabulary(tiny):
    codes = torch.randint(0, 1024, (8, 5))
    sample = data.build_sample(tiny.tokenizer, "Ref.", codes, "Target.", target_codes=codes)
    batch = collate.collate(collate.build_collator(tiny.model.config), [sample], 1024)
    assert "(target, trained)" in collate.describe_batch(batch, tiny.tokenizer, tiny.model.config)
    batch.input_ids[0, 3] = len(tiny.tokenizer)
    with pytest.raises(collate.SampleError, match="outside the vocabulary"):
        collate.describe_batch(batch, tiny.tokenizer, tiny.model.config)


# --------------------------------------------------------------------------
# sample_tokens and padding, against the model's own merged sequence
# --------------------------------------------------------------------------


def samples(tokenizer, ref_in_system):
    texts = ["Hi.", "A somewhat longer sentence to speak, with more words in it.", "Medium length text here."]
    return [
        data.build_sample(tokenizer, "Reference words.", codes(5 + 7 * i, i), text, target_codes=codes(20 - 6 * i, 9 + i),
                          layout=data.PromptLayout(ref_in_system=ref_in_system))
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


@pytest.mark.parametrize("ref_in_system", [False, True], ids=["reference-turn", "reference-in-system"])
def test_text_label_count_is_what_the_model_merges_counted_on_the_host(tiny, ref_in_system):
    """The training step passes this count, so that the labelled text positions never ask the device for a size."""
    batch_samples = samples(tiny.tokenizer, ref_in_system)
    for group in (batch_samples[:1], batch_samples):  # left-padded by the model alone, right-padded together
        batch = collate.collate(collate.build_collator(tiny.model.config), group, tiny.model.config.audio_codebook_size)
        with torch.no_grad():
            merged = tiny.model(**collate.batch_to_model_inputs(batch, "cpu")).expanded_labels
        assert collate.text_label_count(batch, tiny.model.config) == int((merged[:, 1:] != -100).sum()) > 0
    batch.label_ids[1, 0] = batch.input_ids[1, 0]
    with pytest.raises(collate.SampleError, match=r"batch samples \[1\] label their first token"):
        collate.text_label_count(batch, tiny.model.config)


def test_a_pinned_batch_holds_every_field_contiguous_and_pinned(tiny, monkeypatch):
    """What the loader hands a CUDA run (pinning itself needs a GPU here, so it is marked instead)."""
    batch = collate.collate(collate.build_collator(tiny.model.config), samples(tiny.tokenizer, False), 1024)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor) or tensor)
    result = collate.pinned(batch)
    for field in dataclasses.fields(batch):
        value, original = getattr(result, field.name), getattr(batch, field.name)
        assert (value is None and original is None) or (torch.equal(value, original) and any(value is p for p in pinned))
    assert all(tensor.is_contiguous() for tensor in pinned)


def test_sample_tokens_refuses_a_sample_with_whisper_features(tiny):
    sample = data.build_sample(tiny.tokenizer, None, codes(5, 0), "Hi.", layout=data.PromptLayout(ref_in_system=True),
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
