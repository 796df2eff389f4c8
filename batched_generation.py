"""Many clones per decoding step: our generation loop over the package's model, B prompts at once.

The package's `HiggsAudioModel.generate` takes one prompt (it asserts batch
size 1), and a decoding step on a GPU costs about as much for B rows as for
one. `generate_batch` runs B prompts, left-padded, through the model's own
`forward` (the prompt) and then its own embeddings, decoder layers
(`_forward_core`), norm and audio head, one column per step, keeping for
every row what the package's `generate` keeps for its one:

- the step sequence: `<|audio_out_bos|>` forced, an all-BOS column, then one
  delayed column per step, within `generation.max_new_tokens` steps;
- the delay pattern: codebook k held at BOS for its first k columns; the end
  of the stream: once a codebook emits EOS, it and every lower one stay EOS
  and the rest close one per step;
- the sampling: the same logits processors (the model's own
  `_get_logits_processor`), repetition-aware resampling over the row's last
  `ras_win_len` audio-out columns, and a generator per row seeded as the
  package seeds its one, so a row draws the numbers it would draw alone;
- positions and attention: each row's own positions and a mask that hides
  its padding.

A row whose stream ended leaves the batch (its cache rows are dropped).
`clone_many` clones a list of prompts B at a time and decodes the clips;
with B = 1 it runs the package's `generate` itself (`generation.clone`).
`parity.check_batched_generation` (`python infer.py --parity --checks
batched`) shows greedy codes equal to the package's batch-1 `generate`, row by
row, for prompts of different lengths.

Not covered, so refused here and left to batch 1: `--no-force-audio` (text
before the audio), models without the delay pattern, with audio
self-attention or audio decoder layers. The batched loop always uses the
dynamic KV cache (the package's static buckets and CUDA graphs are built for
batch size 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache

import collate
import generation
import model_utils


def unsupported(config) -> str | None:
    """Why a model cannot be generated in batches here, or None."""
    if not config.use_delay_pattern:
        return "the model does not use the delay pattern"
    if config.use_audio_out_self_attention:
        return "the model has audio self-attention"
    if config.audio_decoder_proj_num_layers:
        return "the model has audio decoder layers"
    return None


@dataclass
class _Stream:
    """One row's audio stream and the package's per-stream state: codebooks released from their BOS delay so
    far (its `num_delay`) and, once a codebook emitted EOS, the codebooks still to close (`num_remaining_delays`)."""

    columns: list[torch.Tensor]
    history: torch.Tensor  # the row's audio-out columns before this stream (the repetition window looks back into them)
    generator: torch.Generator | None
    logprobs: list[torch.Tensor] = field(default_factory=list)  # log p of each column's codes (the model's, temperature 1)
    released: int = 0
    closing: int | None = None
    ended: bool = False

    def recent(self, window: int) -> torch.Tensor:
        columns = torch.stack(self.columns[-window:], dim=1) if self.columns else self.history[:, :0]
        return torch.cat([self.history[:, -window:], columns], dim=1)[:, -window:]


@dataclass
class _Batch:
    """What the decoding steps carry for the rows still generating."""

    cache: DynamicCache
    key_mask: torch.Tensor  # (B, keys) True where a key is a real position, False on padding
    codes_mask: torch.Tensor  # (B, keys) True where a position holds audio codes
    lengths: torch.Tensor  # (B,) real positions so far: the next position's id
    rows: list[int] = field(default_factory=list)  # prompt index of each batch row


def generate_batch(bundle: model_utils.Bundle, prompts: list[ChatMLDatasetSample], sampling: generation.Sampling,
                   seeds: list[int] | None = None, logprobs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The audio stream of each prompt (n_q, columns), as the package's `generate` returns it for that prompt alone
    with `<|audio_out_bos|>` forced: an all-BOS column, the delayed codes, the EOS tail without its last column.

    `seeds`: each row's own sampling seed (default: `sampling.seed` for every row, as the package seeds its one).
    `logprobs`, a list, receives each row's (n_q, columns) log-probabilities of the codes its stream holds under
    the model's own distribution (the audio head's softmax at temperature 1, before any logits processor; 0 in
    the all-BOS column): what `preference.py` records as the sampling model's log-probability of a clip."""
    model, config = bundle.model, bundle.model.config
    problem = unsupported(config)
    if problem:
        raise ValueError(f"batched generation: {problem}; use --batch-size 1")
    device = next(model.parameters()).device
    collator = collate.build_collator(config, collate.whisper_features(config), pad_left=True)
    inputs = collate.batch_to_model_inputs(collate.collate(collator, prompts, config.audio_codebook_size), device)
    processors = _logits_processors(model, sampling, device)
    with torch.inference_mode():
        batch, text_vocab = _prefill(model, inputs)
        seeds = [sampling.seed] * len(prompts) if seeds is None else seeds
        streams = [_Stream([], _audio_out_history(inputs, row, config), _generator(seeds[row], device))
                   for row in range(len(prompts))]
        if not sampling.greedy:
            _draw_forced_token(streams, text_vocab, config.audio_out_bos_token_id, device)
        forced = torch.full((len(prompts), 1), config.audio_out_bos_token_id, device=device)
        hidden = _step(model, model.embed_tokens(forced), batch, audio=False)
        for stream in streams:
            stream.columns.append(torch.full((config.audio_num_codebooks,), config.audio_stream_bos_id, device=device))
            stream.logprobs.append(torch.zeros(config.audio_num_codebooks, device=device))
        for _ in range(generation.max_new_tokens(config, sampling.max_seconds) - 2):
            columns = torch.stack([streams[row].columns[-1] for row in batch.rows], dim=1)
            hidden = _step(model, model._embed_audio_ids(columns)[:, None], batch, audio=True)
            logits = model.audio_decoder_proj.audio_lm_head(hidden[:, -1]).float()
            logits = logits.view(len(batch.rows), config.audio_num_codebooks, -1)
            for index, row in enumerate(batch.rows):
                _next_column(streams[row], logits[index], sampling, processors, config)
            _drop_ended(batch, streams)
            if not batch.rows:
                break
    if logprobs is not None:
        logprobs.extend(torch.stack(stream.logprobs, dim=1).cpu() for stream in streams)
    return [torch.stack(stream.columns, dim=1).cpu() for stream in streams]


def _logits_processors(model, sampling: generation.Sampling, device) -> LogitsProcessorList:
    """The processors the package's `generate` applies to audio logits for these sampling settings, built by the
    model's own generation machinery (temperature, top-k, top-p and whatever the model's generation config adds)."""
    config, _ = model._prepare_generation_config(None, **sampling.generate_kwargs())
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=device)
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=0, encoder_input_ids=None,
                                       prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=device)


def _generator(seed: int | None, device) -> torch.Generator | None:
    """A row's sampling generator, seeded as the package's `generate` seeds its one (None: the global one)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _prefill(model, inputs: dict) -> tuple[_Batch, int]:
    """The prompts through the model's `forward` (it merges the audio in and pads left); the batch state and the
    text vocabulary size."""
    outputs = model(**inputs, use_cache=True, past_key_values=DynamicCache(), return_dict=True)
    key_mask = outputs.attention_mask.bool()
    codes_mask = outputs.audio_in_discrete_codes_mask | outputs.audio_out_mask
    batch = _Batch(outputs.past_key_values, key_mask, codes_mask, key_mask.sum(1), list(range(key_mask.shape[0])))
    return batch, outputs.logits.shape[-1]


def _audio_out_history(inputs: dict, row: int, config) -> torch.Tensor:
    """The prompt's audio-out columns of one row (a reference given as an assistant turn), which the package's
    repetition window sees before the new stream's first columns."""
    ids, starts = inputs.get("audio_out_ids"), inputs.get("audio_out_ids_start")
    empty = torch.zeros((config.audio_num_codebooks, 0), dtype=torch.long, device=inputs["input_ids"].device)
    if ids is None or starts is None or not len(starts):
        return empty
    owners = inputs["audio_out_ids_start_group_loc"]
    ends = torch.cat([starts[1:], torch.tensor([ids.shape[1]], device=starts.device)])
    clips = [ids[:, start:end] for start, end, owner in zip(starts.tolist(), ends.tolist(), owners.tolist()) if owner == row]
    return torch.cat(clips, dim=1) if clips else empty


def _draw_forced_token(streams: list[_Stream], text_vocab: int, token: int, device) -> None:
    """Each generator's draw for the forced `<|audio_out_bos|>`: the package samples it (from a distribution with
    all its mass on that token), so a row's later draws line up with the package's only after the same draw."""
    certain = torch.zeros((1, text_vocab), device=device)
    certain[0, token] = 1.0
    for stream in streams:
        torch.multinomial(certain, 1, generator=stream.generator)


def _step(model, embedded: torch.Tensor, batch: _Batch, audio: bool) -> torch.Tensor:
    """One position per row through the decoder layers: the last hidden states after the final norm, (B, 1, D)."""
    rows = embedded.shape[0]
    past = batch.cache.get_seq_length()
    batch.key_mask = torch.cat([batch.key_mask, batch.key_mask.new_ones((rows, 1))], dim=1)
    batch.codes_mask = torch.cat([batch.codes_mask, batch.codes_mask.new_full((rows, 1), audio)], dim=1)
    hidden = embedded
    blocked = torch.finfo(hidden.dtype).min
    mask = torch.zeros((rows, 1, 1, past + 1), dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill(~batch.key_mask[:, None, None, :], blocked)
    # The model adds cache_position[0] (the padded length) to position ids; each row's own position is its real length.
    positions = (batch.lengths - past)[:, None]
    hidden, _, _ = model._forward_core(
        hidden_states=hidden, causal_mask=mask, position_ids=positions, audio_discrete_codes_mask=batch.codes_mask,
        cache_position=torch.tensor([past], device=hidden.device), past_key_values=batch.cache, use_cache=True,
        audio_attention_mask=None, fast_forward_attention_mask=None, output_attentions=False, output_hidden_states=False,
    )
    batch.lengths = batch.lengths + 1
    return model.norm(hidden)


def _next_column(stream: _Stream, logits: torch.Tensor, sampling: generation.Sampling, processors, config) -> None:
    """Draw one row's next column from its audio logits (n_q, classes) as the package draws its one, then hold it
    to the delay pattern and the end of the stream."""
    scores = processors(None, logits.clone())
    if sampling.greedy:
        column = scores.argmax(-1)
    else:
        column = torch.multinomial(scores.softmax(-1), 1, generator=stream.generator).squeeze(1)
        if sampling.ras_win_len:
            repeats = (stream.recent(sampling.ras_win_len) == column[:, None]).sum(1)
            repeated = torch.nonzero(repeats >= sampling.ras_win_max_num_repeat).squeeze(1)
            # Repeated codebooks are drawn again from the raw logits, without temperature or top-p.
            column[repeated] = logits[repeated].softmax(-1).multinomial(1, replacement=True, generator=stream.generator).squeeze(1)
    _hold_to_delay_pattern(stream, column, config)
    stream.columns.append(column)
    stream.logprobs.append(logits.log_softmax(-1).gather(1, column[:, None]).squeeze(1))


def _hold_to_delay_pattern(stream: _Stream, column: torch.Tensor, config) -> None:
    codebooks, bos, eos = config.audio_num_codebooks, config.audio_stream_bos_id, config.audio_stream_eos_id
    if stream.released + 1 < codebooks:
        column[stream.released + 1 :] = bos
        stream.released += 1
    if stream.closing is not None:
        column[: codebooks - stream.closing] = eos
        stream.closing -= 1
    else:
        ended = torch.nonzero(column == eos).flatten()
        if len(ended):
            first = int(ended[0])
            column[:first] = eos
            stream.closing = codebooks - first - 1
    if stream.closing is not None and stream.closing <= 0:
        stream.ended = True


def _drop_ended(batch: _Batch, streams: list[_Stream]) -> None:
    """Rows whose stream ended leave the batch: their cache rows, masks and positions are dropped."""
    keep = [index for index, row in enumerate(batch.rows) if not streams[row].ended]
    if len(keep) == len(batch.rows):
        return
    batch.rows = [batch.rows[index] for index in keep]
    if not keep:
        return
    kept = torch.tensor(keep, device=batch.key_mask.device)
    batch.cache.batch_select_indices(kept)
    batch.key_mask, batch.codes_mask, batch.lengths = batch.key_mask[kept], batch.codes_mask[kept], batch.lengths[kept]


# --------------------------------------------------------------------------
# Cloning a list of prompts
# --------------------------------------------------------------------------


@dataclass
class Job:
    """One clone to make: the reference, the text, the row's own scene (None: the layout's) and the chunks said
    before it (a long text's, longform.py)."""

    reference: generation.Reference
    text: str
    scene: str | None = None
    context: tuple = ()


def clone_many(bundle: model_utils.Bundle, jobs: list[Job], sampling: generation.Sampling, layout,
               force_audio: bool = True, batch_size: int = 1,
               kv_cache: generation.StaticCacheBuckets | None = None) -> Iterator[generation.Clone]:
    """Each job's clip, in order, `batch_size` prompts per decoding step; a job that yields no clip is a `Clone`
    holding its RuntimeError's message (yielded, not raised, so one bad row never ends a run). Batch 1 is the
    package's own `generate`."""
    if batch_size > 1 and not force_audio:
        raise ValueError("--batch-size > 1 forces <|audio_out_bos|>; --no-force-audio runs with --batch-size 1")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        if batch_size == 1:
            job = chunk[0]
            yield _attempt(lambda: generation.clone(bundle, job.reference, job.text, sampling, job.scene or layout.scene,
                                                    layout.ref_in_system, force_audio, kv_cache, job.context))
            continue
        prompts = [generation.build_prompt(bundle, job.reference, job.text, job.scene or layout.scene, layout.ref_in_system,
                                           job.context) for job in chunk]
        for stream in generate_batch(bundle, prompts, sampling):
            yield _attempt(lambda: generation.clip_from_stream(bundle, stream))


def _attempt(make) -> generation.Clone:
    try:
        return make()
    except RuntimeError as error:
        return generation.Clone(None, error=str(error))
