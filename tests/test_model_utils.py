"""The tiny preset mirrors the release, loads round-trip, and the loss is the shifted cross-entropy."""

from __future__ import annotations

import time
import types

import pytest
import torch
import torch.nn.functional as F
from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioDualFFNDecoderLayer

import model_utils


def test_tiny_model_mirrors_the_released_layout(tiny):
    config = tiny.model.config
    assert config.audio_adapter_type == "dual_ffn_fast_forward"
    assert config.audio_dual_ffn_layers == list(range(config.text_config.num_hidden_layers))
    assert (config.audio_num_codebooks, config.audio_codebook_size) == (8, 1024)
    assert (config.audio_stream_bos_id, config.audio_stream_eos_id) == (1024, 1025)
    assert config.use_delay_pattern and config.encode_audio_in_tokens
    assert config.skip_audio_tower and not config.encode_whisper_embed
    assert all(isinstance(layer, HiggsAudioDualFFNDecoderLayer) and not layer.fast_forward for layer in tiny.model.layers)
    assert tiny.model.audio_tower is None


def test_tiny_whisper_model_has_a_tower(tiny_whisper):
    config = tiny_whisper.model.config
    assert config.encode_whisper_embed and not config.skip_audio_tower
    assert tiny_whisper.model.audio_tower is not None


def test_special_tokens_are_single_tokens_with_the_configured_ids(tiny):
    config, tokenizer = tiny.model.config, tiny.tokenizer
    for token, expected in [
        ("<|AUDIO|>", config.audio_in_token_idx),
        ("<|AUDIO_OUT|>", config.audio_out_token_idx),
        ("<|audio_out_bos|>", config.audio_out_bos_token_id),
        ("<|audio_eos|>", config.audio_eos_token_id),
        ("<|end_of_text|>", config.pad_token_id),
    ]:
        assert tokenizer.encode(token, add_special_tokens=False) == [expected]
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    assert tokenizer.decode(header) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert config.text_config.vocab_size == len(tokenizer)


def test_tiny_model_is_deterministic_by_seed(tiny):
    same = model_utils.build_tiny_model(tiny.tokenizer, seed=0).state_dict()
    other = model_utils.build_tiny_model(tiny.tokenizer, seed=1).state_dict()
    reference = tiny.model.state_dict()
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    assert not all(torch.equal(reference[key], other[key]) for key in reference)


def test_tiny_audio_tokenizer_rate_frames_and_determinism(tiny, voice_prompt):
    waveform, _ = voice_prompt
    audio = tiny.audio_tokenizer
    assert audio.sampling_rate == 24000 and audio.tps == 25 and audio.num_codebooks == 8
    codes = audio.encode(waveform, 24000)
    assert codes.shape == (8, 50)
    assert 0 <= int(codes.min()) and int(codes.max()) < 1024
    assert len(set(codes[0].tolist())) > 1, "a random tokenizer that maps speech to one code is useless for tests"
    assert torch.equal(codes, audio.encode(waveform, 24000)), "encode must not rewrite the codebooks (k-means)"
    rebuilt = model_utils.build_tiny_audio_tokenizer(seed=0)
    assert torch.equal(codes, rebuilt.encode(waveform, 24000))
    decoded = audio.decode(codes[None])
    assert decoded.shape[-1] == 50 * 960


def test_audio_tokenizer_saves_and_loads(tmp_path, tiny, voice_prompt):
    waveform, _ = voice_prompt
    model_utils.save_tiny_audio_tokenizer(tmp_path / "audio", seed=0)
    loaded = model_utils.load_audio_tokenizer(str(tmp_path / "audio"))
    assert torch.equal(loaded.encode(waveform, 24000), tiny.audio_tokenizer.encode(waveform, 24000))


def test_audio_tokenizer_with_missing_weights_is_an_error(tmp_path):
    model_utils.save_tiny_audio_tokenizer(tmp_path / "audio", seed=0)
    state = torch.load(tmp_path / "audio" / "model.pth", weights_only=True)
    state = {key: value for key, value in state.items() if not key.startswith("semantic_model.")}
    torch.save(state, tmp_path / "audio" / "model.pth")
    with pytest.raises(ValueError, match="lacks"):
        model_utils.load_audio_tokenizer(str(tmp_path / "audio"))


@pytest.mark.parametrize("kind", ["audio tokenizer", "model"])
def test_missing_directories_are_errors(tmp_path, kind):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not found"):
        if kind == "model":
            model_utils.load_bundle(missing, audio_tokenizer=missing)
        else:
            model_utils.load_audio_tokenizer(missing)


def test_model_directory_round_trip(tmp_path, tiny):
    """A model saved with save_pretrained (plus its tokenizer) loads back through load_bundle unchanged."""
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    model_utils.save_tiny_audio_tokenizer(tmp_path / "audio", seed=0)
    with pytest.raises(ValueError, match="audio-tokenizer"):
        model_utils.load_bundle(str(tmp_path / "model"))
    loaded = model_utils.load_bundle(str(tmp_path / "model"), str(tmp_path / "audio"))
    state = tiny.model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in loaded.model.state_dict().items())
    assert loaded.tokenizer.encode("<|AUDIO_OUT|> hello") == tiny.tokenizer.encode("<|AUDIO_OUT|> hello")


def _outputs(logits, audio_logits, expanded_labels):
    return types.SimpleNamespace(logits=logits, audio_logits=audio_logits, expanded_labels=expanded_labels)


def test_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 7]])
    audio_logits = torch.randn(5, 2, 9)
    audio_labels = torch.tensor([[-100, 1, 2, 3, 8], [-100, -100, 5, 6, 7]])
    loss = model_utils.compute_loss(_outputs(logits, audio_logits, labels), audio_labels)

    text = torch.stack([F.cross_entropy(logits[0, i - 1 : i], labels[0, i : i + 1]) for i in (2, 3, 5)]).mean()
    per_codebook = [
        torch.stack([F.cross_entropy(audio_logits[t - 1, k : k + 1], audio_labels[k, t : t + 1]) for t in columns]).mean()
        for k, columns in [(0, (1, 2, 3, 4)), (1, (2, 3, 4))]
    ]
    assert torch.allclose(loss.text, text)
    assert torch.allclose(loss.per_codebook, torch.stack(per_codebook))
    assert torch.allclose(loss.total, text + torch.stack(per_codebook).mean())
    assert (int(loss.text_tokens), int(loss.audio_tokens)) == (3, 7)


def test_loss_is_zero_only_when_the_next_token_is_predicted():
    labels = torch.tensor([[-100, 2, 3, 1]])
    next_token = F.one_hot(torch.tensor([[2, 3, 1, 0]]), 4).float() * 50
    same_token = F.one_hot(torch.tensor([[0, 2, 3, 1]]), 4).float() * 50
    audio_labels = torch.tensor([[-100, 2, 3]])
    audio_next = F.one_hot(torch.tensor([[2], [3], [0]]), 4).float() * 50
    shifted = model_utils.compute_loss(_outputs(next_token, audio_next, labels), audio_labels)
    copying = model_utils.compute_loss(_outputs(same_token, audio_next, labels), audio_labels)
    assert float(shifted.total) < 1e-6
    assert float(copying.text) > 10


def test_loss_backpropagates_through_the_tiny_model(tiny, parity_case):
    import collate
    import data

    case = parity_case
    sample = data.build_sample(tiny.tokenizer, case.ref_text, case.ref_codes, case.text, target_codes=case.target_codes)
    batch = collate.collate(collate.build_collator(tiny.model.config), [sample], 1024)
    model = model_utils.build_tiny_model(tiny.tokenizer, seed=0).train()
    loss = model_utils.compute_loss(model(**collate.batch_to_model_inputs(batch, "cpu")), batch.label_audio_ids)
    loss.total.backward()
    assert int(loss.audio_tokens) == 8 * (case.target_codes.shape[1] + 1)
    assert int(loss.text_tokens) == 3
    assert model.audio_codebook_embeddings.weight.grad.abs().sum() > 0
    assert model.layers[0].audio_mlp.gate_proj.weight.grad.abs().sum() > 0


def test_a_part_without_labels_adds_zero_without_asking_the_host():
    labels = torch.full((1, 4), -100)
    audio_labels = torch.tensor([[-100, -100, -100], [-100, 1, 2]])
    loss = model_utils.compute_loss(_outputs(torch.randn(1, 4, 5, requires_grad=True), torch.randn(3, 2, 9), labels), audio_labels)
    assert float(loss.text) == 0.0 and float(loss.per_codebook[0]) == 0.0 and float(loss.per_codebook[1]) > 0
    assert (int(loss.text_tokens), int(loss.audio_tokens)) == (0, 2)


def test_newest_export_skips_an_export_cut_short(tmp_path, capsys):
    from safetensors.torch import save_file

    for name in ("old", "new", "newer"):
        export = tmp_path / name / "export"
        (export / "audio_tokenizer").mkdir(parents=True)
        (export / "config.json").write_text("{}")
        save_file({"weight": torch.zeros(64)}, export / "model.safetensors")
        torch.save({"weight": torch.zeros(64)}, export / "audio_tokenizer" / "model.pth")
        time.sleep(0.01)
    assert model_utils.newest_export(str(tmp_path)) == str(tmp_path / "newer" / "export")
    weights = tmp_path / "newer" / "export" / "audio_tokenizer" / "model.pth"
    weights.write_bytes(weights.read_bytes()[:300])
    tensors = tmp_path / "new" / "export" / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])
    (tmp_path / "newest" / "export.tmp-1234").mkdir(parents=True)
    (tmp_path / "newest" / "export.tmp-1234" / "config.json").write_text("{}")
    assert model_utils.newest_export(str(tmp_path)) == str(tmp_path / "old" / "export")
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'newer' / 'export'}: audio_tokenizer/model.pth is truncated" in err
    assert f"skipping {tmp_path / 'new' / 'export'}: model.safetensors is truncated" in err
