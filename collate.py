"""Turns samples into batches.

One function builds the package's `HiggsAudioSampleCollator` with every flag
read from the loaded model config (delay pattern, number of codebooks,
Whisper on or off, audio-in tokens, token ids), and one function collates a
list of samples with it; training and inference both use them. Samples are
checked before collation so that a placeholder/clip mismatch or an
out-of-range code is an error naming the sample, never a silent mis-pairing.
A token-budget sampler groups samples of similar length into batches, so that
padding stays small.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Sequence

import numpy as np
import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioBatchInput, HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from boson_multimodal.model.higgs_audio import HiggsAudioConfig
from transformers import WhisperFeatureExtractor

# The collator splits Whisper input into 30 s chunks and duplicates the
# placeholder tokens per chunk, but not the codes: a longer reference would
# desynchronise placeholders and clips.
WHISPER_MAX_SECONDS = 30.0


class SampleError(ValueError):
    """A sample that cannot be collated; the message names it."""


class WhisperFeatures:
    """What the collator reads of a Whisper processor: its `feature_extractor`.

    The collator only ever touches `whisper_processor.feature_extractor`; a
    full `WhisperProcessor` would also need Whisper's text tokenizer files,
    which play no part here. The feature extractor is the real one.
    """

    def __init__(self, feature_extractor: WhisperFeatureExtractor):
        self.feature_extractor = feature_extractor


def uses_whisper(config: HiggsAudioConfig) -> bool:
    """True when the model turns `<|AUDIO|>` clips into Whisper features (a tower exists and is used)."""
    return bool(config.encode_whisper_embed) and not config.skip_audio_tower


def whisper_features(config: HiggsAudioConfig, processor_dir: str | None = None) -> WhisperFeatures | None:
    """The Whisper feature extractor the config calls for, or None when it uses no Whisper.

    From `processor_dir` when given (e.g. a local copy of
    openai/whisper-large-v3-turbo), else the standard extractor with the
    config's number of mel bins (16 kHz in, 30 s chunks).
    """
    if not uses_whisper(config):
        return None
    if processor_dir:
        return WhisperFeatures(WhisperFeatureExtractor.from_pretrained(processor_dir))
    return WhisperFeatures(WhisperFeatureExtractor(feature_size=config.audio_encoder_config.num_mel_bins))


def build_collator(config: HiggsAudioConfig, whisper: WhisperFeatures | None = None,
                   pad_left: bool = False) -> HiggsAudioSampleCollator:
    """The package's collator, configured from the model config alone; `pad_left` pads prompts on the left, as
    generating several at once needs (padding changes nothing else).

    `mask_audio_out_token_label=False`: with the default True the collator
    writes -100 into the caller's `label_ids` in place, so a sample collated
    twice (every epoch of an in-memory dataset) silently loses all its audio
    labels. The model masks audio positions out of its text labels itself, so
    the loss is the same.
    """
    whisper_on = uses_whisper(config)
    if whisper_on and whisper is None:
        raise ValueError("the model config uses Whisper features: pass whisper_features(config)")
    return HiggsAudioSampleCollator(
        whisper_processor=whisper if whisper_on else None,
        audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx,
        audio_stream_bos_id=config.audio_stream_bos_id,
        audio_stream_eos_id=config.audio_stream_eos_id,
        pad_token_id=config.pad_token_id,
        encode_whisper_embed=whisper_on,
        return_audio_in_tokens=config.encode_audio_in_tokens,
        use_delay_pattern=config.use_delay_pattern,
        audio_num_codebooks=config.audio_num_codebooks,
        round_to=1,
        pad_left=pad_left,
        mask_audio_out_token_label=False,
    )


def check_sample(sample: ChatMLDatasetSample, collator: HiggsAudioSampleCollator, codebook_size: int, name: str) -> None:
    """Raise `SampleError` unless placeholders, clips, codes and waveforms agree."""
    placeholders = _placeholder_count(sample.input_ids, collator)
    clips = len(sample.audio_ids_start)
    if placeholders != clips:
        raise SampleError(f"sample {name}: {placeholders} audio placeholders but {clips} audio clips")
    codes = sample.audio_ids_concat
    if clips and codes.shape[0] < collator.audio_num_codebooks:
        raise SampleError(f"sample {name}: {codes.shape[0]} codebooks, the model needs {collator.audio_num_codebooks}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise SampleError(
            f"sample {name}: audio codes span {int(codes.min())}..{int(codes.max())}, outside 0..{codebook_size - 1}"
        )
    if sample.label_ids is not None and len(sample.label_ids) != len(sample.input_ids):
        raise SampleError(f"sample {name}: {len(sample.label_ids)} labels for {len(sample.input_ids)} tokens")
    if collator.encode_whisper_embed:
        _check_whisper_waveforms(sample, collator, name)


def _placeholder_count(input_ids: torch.Tensor, collator: HiggsAudioSampleCollator) -> int:
    return int(((input_ids == collator.audio_in_token_id) | (input_ids == collator.audio_out_token_id)).sum())


def _check_whisper_waveforms(sample: ChatMLDatasetSample, collator: HiggsAudioSampleCollator, name: str) -> None:
    audio_in = int((sample.input_ids == collator.audio_in_token_id).sum())
    waveforms = len(sample.audio_waveforms_start)
    if audio_in != waveforms:
        raise SampleError(f"sample {name}: {audio_in} <|AUDIO|> placeholders but {waveforms} waveforms for Whisper")
    out_positions = (sample.input_ids == collator.audio_out_token_id).nonzero()
    in_positions = (sample.input_ids == collator.audio_in_token_id).nonzero()
    if len(out_positions) and len(in_positions) and out_positions[0] < in_positions[-1]:
        # Package limitation: the Whisper path numbers waveforms by <|AUDIO|>
        # alone and mis-indexes when an <|AUDIO_OUT|> comes first.
        raise SampleError(f"sample {name}: an <|AUDIO_OUT|> precedes an <|AUDIO|>, which the Whisper path mis-indexes")
    bounds = torch.cat([sample.audio_waveforms_start, torch.tensor([len(sample.audio_waveforms_concat)])])
    seconds = bounds.diff().float() / sample.audio_sample_rate.float()
    if audio_in and seconds.max() > WHISPER_MAX_SECONDS:
        raise SampleError(f"sample {name}: a {float(seconds.max()):.1f} s clip for Whisper exceeds {WHISPER_MAX_SECONDS:.0f} s")


def collate(
    collator: HiggsAudioSampleCollator,
    samples: list[ChatMLDatasetSample],
    codebook_size: int,
    names: list[str] | None = None,
) -> HiggsAudioBatchInput:
    """Check every sample, then collate them with the package's collator."""
    names = names or [str(i) for i in range(len(samples))]
    for sample, name in zip(samples, names, strict=True):
        check_sample(sample, collator, codebook_size, name)
    labelled = [name for sample, name in zip(samples, names) if sample.label_ids is not None]
    if labelled and len(labelled) != len(samples):
        unlabelled = [name for name in names if name not in labelled]
        raise SampleError(f"a batch mixes training samples and prompts; unlabelled: {', '.join(unlabelled)}")
    return collator(samples)


def batch_to_model_inputs(batch: HiggsAudioBatchInput, device: torch.device | str) -> dict:
    """The batch as `model(**inputs)` keyword arguments, tensors on `device`.

    The copies are `non_blocking`: from a `pinned` batch the host queues them
    and goes on (from pageable memory CUDA copies synchronously anyway).
    """
    return {key: value.contiguous().to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in _fields(batch).items() if key != "reward"}


def pinned(batch: HiggsAudioBatchInput) -> HiggsAudioBatchInput:
    """The batch with its tensors contiguous in pinned (page-locked) host memory, from which a copy to the
    GPU does not make the host wait; the loader pins each batch in its prefetch thread."""
    return HiggsAudioBatchInput(**{key: value.contiguous().pin_memory() if isinstance(value, torch.Tensor) else value
                                   for key, value in _fields(batch).items()})


def _fields(batch: HiggsAudioBatchInput) -> dict:
    """The batch's fields, the tensors themselves (`dataclasses.asdict` would deep-copy each one)."""
    return {field.name: getattr(batch, field.name) for field in fields(batch)}


def text_label_count(batch: HiggsAudioBatchInput, config: HiggsAudioConfig) -> int:
    """Positions of the model's merged sequence whose next token carries a text label, counted on the host.

    The model's merge keeps the labels of text tokens (every token but the
    audio placeholders, whose columns get -100) and the loss shifts by one,
    so that the label of a row's first position is never predicted: a batch
    labelling a first token is refused (a voice-cloning sample never does:
    it starts with `<|begin_of_text|>`). Counted with numpy on the CPU batch,
    so the count never asks the device (`model_utils.labelled_positions`).
    """
    input_ids, labels = batch.input_ids.numpy(), batch.label_ids.numpy()
    text = (input_ids != config.audio_in_token_idx) & (input_ids != config.audio_out_token_idx)
    labelled = (labels != -100) & text
    if labelled[:, 0].any():
        raise SampleError(f"batch samples {np.flatnonzero(labelled[:, 0]).tolist()} label their first token, which no position predicts")
    return int(labelled.sum())


def describe_batch(batch: HiggsAudioBatchInput, tokenizer, config: HiggsAudioConfig, index: int = 0) -> str:
    """A readable view of one sample of a collated batch, for checking what training sees.

    The prompt decoded with its special tokens, each audio segment with its
    role and length, and the tokens that carry labels. Ids outside the
    vocabulary are an error; -100 is never decoded.
    """
    real = batch.attention_mask[index].bool()
    ids = batch.input_ids[index][real]
    vocab = len(tokenizer)
    outside = ids[(ids < 0) | (ids >= vocab)]
    if len(outside):
        raise SampleError(f"batch sample {index}: token ids {outside.tolist()[:5]} outside the vocabulary of {vocab}")
    lines = [f"--- batch sample {index} of {batch.input_ids.shape[0]}: {len(ids)} tokens", tokenizer.decode(ids), "--- audio"]
    lines += _describe_clips("audio in", batch.audio_in_ids, batch.audio_in_ids_start, None,
                             _clips_before(batch.input_ids, config.audio_in_token_idx, index), ids, config.audio_in_token_idx)
    lines += _describe_clips("audio out", batch.audio_out_ids, batch.audio_out_ids_start, batch.label_audio_ids,
                             _clips_before(batch.input_ids, config.audio_out_token_idx, index), ids, config.audio_out_token_idx)
    if batch.label_ids is not None:
        labels = batch.label_ids[index][real]
        labelled = labels[labels != -100]
        lines.append(f"--- text labels on {len(labelled)} of {len(ids)} tokens: {tokenizer.decode(labelled)}")
    return "\n".join(lines)


def _clips_before(input_ids: torch.Tensor, token_id: int, index: int) -> int:
    return int((input_ids[:index] == token_id).sum())


def _describe_clips(kind, codes, starts, labels, first, ids, token_id) -> list[str]:
    if codes is None or starts is None:
        return []
    count = int((ids == token_id).sum())
    bounds = torch.cat([starts, torch.tensor([codes.shape[1]])])
    lines = []
    for clip in range(first, first + count):
        begin, end = int(bounds[clip]), int(bounds[clip + 1])
        trained = labels is not None and bool((labels[:, begin:end] != -100).any())
        role = "target, trained" if trained else "context, not trained"
        lines.append(f"{kind} clip {clip}: {end - begin} columns ({role})")
    return lines


# --------------------------------------------------------------------------
# Batching by token budget
# --------------------------------------------------------------------------

# In training the model pads its merged text-and-audio sequence to a multiple
# of 8 (`round_to = 1 if use_cache else 8` in HiggsAudioModel.forward).
MODEL_ROUND_TO = 8


def sample_tokens(sample: ChatMLDatasetSample, num_codebooks: int, delay_pattern: bool = True) -> int:
    """Positions of `sample` in the model's merged sequence: what its attention-mask row sums to in training.

    Each audio placeholder becomes its clip's columns: the frames, the stream
    BOS and EOS and, with the delay pattern, `num_codebooks - 1` more. A sample
    carrying a waveform for Whisper is refused: Whisper features add
    positions this count does not know.
    """
    if len(sample.audio_waveforms_start):
        raise ValueError("sample_tokens does not count Whisper features")
    clips = len(sample.audio_ids_start)
    frames = sample.audio_ids_concat.shape[1] if clips else 0
    per_clip = 2 + (num_codebooks - 1 if delay_pattern else 0)
    return len(sample.input_ids) - clips + frames + clips * per_clip


def padded_tokens(lengths: Sequence[int]) -> int:
    """Positions a batch of samples of these lengths occupies once the model pads it."""
    return len(lengths) * _round_up(max(lengths))


def padding_fraction(lengths: Sequence[int]) -> float:
    """The share of a batch's positions that is padding."""
    return 1.0 - sum(lengths) / padded_tokens(lengths)


def _round_up(length: int) -> int:
    return -(-length // MODEL_ROUND_TO) * MODEL_ROUND_TO


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    bucket_size: int = 1024,
) -> list[list[int]]:
    """This process's batches of sample indices for one epoch, each within `max_tokens` padded positions.

    The epoch's samples are shuffled, each run of `bucket_size` of them sorted
    by length, the sequence cut greedily into batches and the batches
    shuffled, so that a batch holds samples of similar length (little
    padding) while batches change every epoch; `bucket_size=1` sorts nothing
    (random batches under the same budget).
    Deterministic in (seed, epoch) alone, so a resumed run takes the same list
    and skips the batches it consumed. Every process computes the same list
    and takes every `world_size`-th batch from `rank`; the last
    `len % world_size` batches (others each epoch) are left out so that every
    process takes as many steps.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    for start in range(0, len(order), bucket_size):
        bucket = order[start : start + bucket_size]
        order[start : start + bucket_size] = bucket[np.argsort([lengths[i] for i in bucket], kind="stable")]
    batches = _pack([int(i) for i in order], lengths, max_tokens)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    usable = len(batches) - len(batches) % world_size
    if usable == 0:
        raise ValueError(f"{len(batches)} batches per epoch cannot feed {world_size} processes")
    return batches[rank:usable:world_size]


def _pack(indices: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Batches of consecutive `indices`, each as large as the budget allows."""
    batches, batch, longest = [], [], 0
    for index in indices:
        if _round_up(lengths[index]) > max_tokens:
            raise ValueError(f"sample {index} takes {lengths[index]} tokens, over the batch budget of {max_tokens}")
        if batch and (len(batch) + 1) * _round_up(max(longest, lengths[index])) > max_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, lengths[index])
    if batch:
        batches.append(batch)
    return batches
