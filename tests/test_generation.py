"""Generation: how a generated stream ends, the reference it is cloned from, the layout a model is prompted in, and
the package's serve engine prompted as training prompts."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

import collate
import data
import generation
import infer
import model_utils


# ---- how a generated stream ends ------------------------------------------------------------------------


def _delayed_stream(frames: torch.Tensor, ended: bool) -> torch.Tensor:
    """A delay-pattern stream as the package's `generate` leaves it: a BOS column, codebook k shifted by k
    with BOS before, and, when the model ended it, the EOS diagonal without its final all-EOS column."""
    n_q, count = frames.shape
    bos, eos = 1024, 1025
    stream = torch.full((n_q, count + n_q + 1), eos)  # the last column all EOS
    for k in range(n_q):
        stream[k, : k + 1] = bos
        stream[k, k + 1 : k + 1 + count] = frames[k]
    return stream[:, :-1] if ended else stream[:, : count + 1]


def test_a_stream_the_model_ended_is_told_from_one_the_length_limit_cut(capsys):
    frames = torch.randint(0, 1024, (8, 12))
    ended = _delayed_stream(frames, ended=True)
    assert generation.stream_ended(ended, 1024, use_delay_pattern=True)
    assert torch.equal(generation.audio_sequence_to_codes(ended, 1024, True), frames)
    assert capsys.readouterr().err == ""
    cut = _delayed_stream(frames, ended=False)
    assert not generation.stream_ended(cut, 1024, use_delay_pattern=True)
    assert generation.audio_sequence_to_codes(cut, 1024, True).shape[1] == 12 - 7
    assert "reached --max-seconds" in capsys.readouterr().err


def test_codes_outside_the_codebook_are_counted_on_the_clone(tiny, capsys):
    frames = torch.randint(0, 1024, (8, 12))
    frames[2, 5] = 1030  # outside the codebook (0..1023): clamped before decoding
    clone = generation.clip_from_stream(tiny, _delayed_stream(frames, ended=True))
    assert (clone.clamped, clone.stopped) == (1, True)
    assert "1 generated codes outside 0..1023 clamped before decoding" in capsys.readouterr().err
    in_range = _delayed_stream(frames.clamp(0, 1023), ended=True)
    assert generation.out_of_codebook(generation.unclamped_codes(in_range, 1024, True), 1024) == 0


# ---- the frame budget and the KV cache ---------------------------------------------------------------------


def _streams(bundle, reference, sampling, kv_cache=None) -> torch.Tensor:
    config = bundle.model.config
    prompt = generation.build_prompt(bundle, reference, "Hello world, this is a test.")
    inputs = collate.batch_to_model_inputs(collate.collate(collate.build_collator(config), [prompt], 1024), "cpu")
    with torch.inference_mode():
        _, streams = generation.generate(bundle, inputs, sampling, [generation.ForceTokens([config.audio_out_bos_token_id])],
                                         kv_cache)
    return streams[0]


def test_max_seconds_bounds_the_clip_exactly(tiny, ref_audio):
    """--max-seconds 1 gave 1.28 s: the budget was frames + n_q + 8 steps, 7 frames more than asked."""
    reference = generation.encode_reference(tiny, ref_audio, "A reference.", ref_in_system=False)
    clip = generation.clip_from_stream(tiny, _streams(tiny, reference, generation.Sampling(greedy=True, max_seconds=1.0)))
    assert not clip.stopped, "the tiny model runs to the limit here"
    assert len(clip.waveform) == 25 * 960  # 25 frames of 960 samples: 1.00 s
    assert generation.max_frames(0.3) == 7 and generation.max_frames(0.04) == 1


def test_static_and_dynamic_kv_caches_give_the_same_greedy_codes(tiny, ref_audio):
    reference = generation.encode_reference(tiny, ref_audio, "A reference.", ref_in_system=False)
    sampling = generation.Sampling(greedy=True, max_seconds=0.8)
    buckets = generation.StaticCacheBuckets(tiny.model, lengths=(64, 256))
    dynamic, static = _streams(tiny, reference, sampling), _streams(tiny, reference, sampling, buckets)
    assert torch.equal(dynamic, static) and dynamic.shape[1] > 10
    assert torch.equal(_streams(tiny, reference, sampling, buckets), static), "the caches are reset between clips"
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        generation.StaticCacheBuckets(tiny.model, capture_graphs=True)


# ---- the reference ----------------------------------------------------------------------------------------


def test_encode_reference_refuses_a_too_short_clip(tiny, limit_clips):
    with pytest.raises(data.AudioError, match="reference lasts 0.10 s"):
        generation.encode_reference(tiny, str(limit_clips / "tenth.wav"), "hi", ref_in_system=False)


# ---- the layout an export records ------------------------------------------------------------------------


def test_a_model_without_a_record_takes_the_flags(tmp_path):
    assert data.read_prompt_layout(tmp_path) is None
    assert generation.resolve_layout(str(tmp_path), True, "  ") == data.PromptLayout(True, None)
    assert generation.resolve_layout("tiny") == data.PromptLayout(False, None)


def test_infer_takes_the_recorded_layout_and_says_so(export, capsys):
    assert generation.resolve_layout(str(export)) == data.PromptLayout(ref_in_system=True)
    assert generation.resolve_layout(str(export), ref_in_system=True, scene="") == data.PromptLayout(ref_in_system=True)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"layout: reference in the system message, no scene, from {export / data.PROMPT_LAYOUT_FILE}"] * 2


@pytest.mark.parametrize("flags,named", [(dict(ref_in_system=False), "--no-ref-in-system"),
                                         (dict(scene="Audio is recorded from a quiet room."), "--scene")])
def test_a_contradicting_flag_is_refused_unless_overridden(export, capsys, flags, named):
    with pytest.raises(ValueError, match=f"{named}.*contradicts .*--layout-override"):
        generation.resolve_layout(str(export), **flags)
    layout = generation.resolve_layout(str(export), **flags, override=True)
    assert layout == data.PromptLayout(flags.get("ref_in_system", True), flags.get("scene"))
    assert "warning: --layout-override" in capsys.readouterr().err


def test_a_record_of_another_normalisation_is_warned_about(tmp_path, capsys):
    (tmp_path / data.PROMPT_LAYOUT_FILE).write_text(json.dumps(dict(ref_in_system=False, scene=None, normalization="sha256:old")))
    generation.resolve_layout(str(tmp_path))
    assert "trained with text normalisation sha256:old" in capsys.readouterr().err


# ---- the package's serve engine ----------------------------------------------------------------------------


def test_sampling_defaults_are_the_serve_engines():
    defaults = inspect.signature(HiggsAudioServeEngine.generate).parameters
    ours = generation.Sampling()
    assert defaults["top_k"].default is None
    for name in ("temperature", "top_k", "top_p", "ras_win_len", "ras_win_max_num_repeat"):
        assert getattr(ours, name) == defaults[name].default, name
    args = infer.parse_args([])
    assert (args.temperature, args.top_k, args.top_p, args.ras_win_len) == (0.7, None, 0.95, 7)


def _merged(model, inputs) -> torch.Tensor:
    """The merged text-and-audio sequence the model runs on, without the padding its forward adds."""
    with torch.no_grad():
        outputs = model(**{key: value for key, value in inputs.items() if key != "reward"})
    return outputs.expanded_input_ids[0][outputs.attention_mask[0].bool()]


def test_aligned_serve_engine_builds_the_training_sequence(engine, ref_audio):
    """The recipe (align_serve_engine, serve_engine_sample, force_audio_gen=True) gives the training prefix;
    the engine's own collator drops the reference's codes."""
    bundle = model_utils.Bundle(engine.model, engine.tokenizer, engine.audio_tokenizer)
    config = bundle.model.config
    reference = generation.encode_reference(bundle, ref_audio, "", ref_in_system=True)
    sample = data.build_sample(bundle.tokenizer, None, reference.codes, "Hello there.", target_codes=reference.codes,
                               layout=data.PromptLayout(ref_in_system=True))
    batch = collate.collate(collate.build_collator(config), [sample], config.audio_codebook_size)
    training = _merged(bundle.model, collate.batch_to_model_inputs(batch, "cpu"))

    package_collator = engine.collator
    assert package_collator.return_audio_in_tokens is False
    generation.align_serve_engine(engine)
    inputs = engine._prepare_inputs(generation.serve_engine_sample(engine, ref_audio, None, "Hello there."),
                                    force_audio_gen=True)
    aligned = _merged(engine.model, inputs)

    prompt_ids = inputs["input_ids"][0]
    assert prompt_ids[-1] == config.audio_out_bos_token_id
    assert torch.equal(prompt_ids, sample.input_ids[: len(prompt_ids)])
    assert torch.equal(inputs["audio_in_ids"], batch.audio_in_ids)
    assert torch.equal(aligned, training[: len(aligned)])

    prompt = data.build_sample(bundle.tokenizer, None, reference.codes, "Hello there.", layout=data.PromptLayout(ref_in_system=True))
    prompt.input_ids = prompt_ids
    package = _merged(engine.model, collate.batch_to_model_inputs(package_collator([prompt]), "cpu"))
    assert len(package) == len(aligned) - reference.codes.shape[1] - config.audio_num_codebooks - 1
