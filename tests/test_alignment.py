"""Alignment at the edges: the official normalisation, the layout an export records, the serve engine, infer's limits."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
from transformers import HubertConfig

import collate
import data
import infer
import manifest
import model_utils
import prepare
import train
from conftest import DEMO_DIR

DEMO_CLIP = DEMO_DIR / "en_male_0.flac"


@pytest.fixture(scope="module")
def ref_audio(tmp_path_factory):
    """The first 1.2 s of a demo clip: a reference just over the minimum keeps the audio tokenizer's work small."""
    samples, rate = sf.read(DEMO_CLIP)
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    sf.write(path, samples[: int(1.2 * rate)], rate)
    return str(path)


# ---- normalisation: the official example's, held to a table of its outputs ------------------------------


def test_normalisation_gives_the_official_outputs():
    assert infer.official_normalisation_differences() == []
    assert data.normalize_text("[humming start] la la") == "<SE_s>[Humming]</SE_s> la la."


def test_the_official_table_covers_every_mapping_and_closing_mark():
    inputs = "".join(text for text, _ in infer.OFFICIAL_NORMALISATION)
    for table in (data._CHINESE_PUNCTUATION, data._SYMBOLS, data._EVENT_TAGS):
        assert [key for key in table if key not in inputs] == []
    outputs = [expected for _, expected in infer.OFFICIAL_NORMALISATION]
    assert [mark for mark in data._CLOSING_MARKS if not any(out.endswith(mark) for out in outputs)] == []


def test_the_old_humming_tag_is_a_normalisation_difference(monkeypatch):
    monkeypatch.setitem(data._EVENT_TAGS, "[humming start]", "<SE>[Humming]</SE>")
    differences = infer.official_normalisation_differences()
    assert len(differences) == 1 and "[humming start]" in differences[0]


def test_text_without_a_letter_or_digit_is_not_speakable(tiny, tmp_path):
    codes = torch.randint(0, 1024, (8, 5))
    with pytest.raises(ValueError, match="no letter or digit"):
        data.build_sample(tiny.tokenizer, "Reference.", codes, "😀 🎉 !!")
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text(json.dumps({"id": "a", "ref_audio": "r.wav", "ref_text": "hi", "audio": "t.wav", "text": "😀"}) + "\n")
    result = manifest.validate_manifest(manifest_path, prepare.EncodedClips(tiny.audio_tokenizer))
    assert result.counts() == {"empty_text": 1}


# ---- the layout an export records ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny):
    """A tiny-preset export of a model trained with the reference in the system message (weights: the preset's)."""
    out = tmp_path_factory.mktemp("run") / "export"
    config = train.TrainConfig(ref_in_system=True, device="cpu")
    return train.export_model(tiny.model, config, tiny, train.Dist(), out)


def test_export_records_its_layout(export):
    recorded = data.read_prompt_layout(export)
    assert recorded == data.RecordedLayout(data.PromptLayout(ref_in_system=True, scene=None), data.normalization_version())


def test_a_model_without_a_record_takes_the_flags(tmp_path):
    assert data.read_prompt_layout(tmp_path) is None
    assert infer.resolve_layout(str(tmp_path), True, "  ") == data.PromptLayout(True, None)
    assert infer.resolve_layout("tiny") == data.PromptLayout(False, None)


def test_a_broken_record_is_an_error(tmp_path):
    (tmp_path / data.PROMPT_LAYOUT_FILE).write_text('{"ref_in_system": "yes"}')
    with pytest.raises(ValueError, match="prompt_layout.json: needs ref_in_system"):
        data.read_prompt_layout(tmp_path)


def test_infer_takes_the_recorded_layout_and_says_so(export, capsys):
    assert infer.resolve_layout(str(export)) == data.PromptLayout(ref_in_system=True)
    assert infer.resolve_layout(str(export), ref_in_system=True, scene="") == data.PromptLayout(ref_in_system=True)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"layout: reference in the system message, no scene, from {export / data.PROMPT_LAYOUT_FILE}"] * 2


@pytest.mark.parametrize("flags,named", [(dict(ref_in_system=False), "--no-ref-in-system"),
                                         (dict(scene="Audio is recorded from a quiet room."), "--scene")])
def test_a_contradicting_flag_is_refused_unless_overridden(export, capsys, flags, named):
    with pytest.raises(ValueError, match=f"{named}.*contradicts .*--layout-override"):
        infer.resolve_layout(str(export), **flags)
    layout = infer.resolve_layout(str(export), **flags, override=True)
    assert layout == data.PromptLayout(flags.get("ref_in_system", True), flags.get("scene"))
    assert "warning: --layout-override" in capsys.readouterr().err


def test_a_record_of_another_normalisation_is_warned_about(tmp_path, capsys):
    (tmp_path / data.PROMPT_LAYOUT_FILE).write_text(json.dumps(dict(ref_in_system=False, scene=None, normalization="sha256:old")))
    infer.resolve_layout(str(tmp_path))
    assert "trained with text normalisation sha256:old" in capsys.readouterr().err


def test_clone_command_prompts_an_export_in_its_recorded_layout(export, engine, ref_audio, tmp_path, capsys, monkeypatch):
    """The export was trained with the reference in the system message: no --ref-text needed, no flag repeated."""
    monkeypatch.setattr(infer, "_load", lambda args: model_utils.Bundle(engine.model, engine.tokenizer, engine.audio_tokenizer))
    out = tmp_path / "clone.wav"
    assert infer.main(["--model", str(export), "--ref-audio", ref_audio, "--text", "Hello.", "--greedy",
                       "--max-seconds", "0.3", "--out", str(out)]) == 0
    assert "layout: reference in the system message" in capsys.readouterr().out and out.is_file()
    assert infer.main(["--model", str(export), "--no-ref-in-system", "--ref-text", "x"]) == 2
    assert "contradicts" in capsys.readouterr().err


# ---- the package's serve engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(export):
    teacher = HubertConfig.from_pretrained(export / "audio_tokenizer" / "semantic_teacher")
    with model_utils._offline_semantic_teacher(teacher):
        return HiggsAudioServeEngine(str(export), str(export / "audio_tokenizer"), device="cpu",
                                     torch_dtype=torch.float32, kv_cache_lengths=[512])


def test_sampling_defaults_are_the_serve_engines():
    defaults = inspect.signature(HiggsAudioServeEngine.generate).parameters
    ours = infer.Sampling()
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
    reference = infer.encode_reference(bundle, ref_audio, "", ref_in_system=True)
    sample = data.build_sample(bundle.tokenizer, None, reference.codes, "Hello there.", target_codes=reference.codes,
                               ref_in_system=True)
    batch = collate.collate(collate.build_collator(config), [sample], config.audio_codebook_size)
    training = _merged(bundle.model, collate.batch_to_model_inputs(batch, "cpu"))

    package_collator = engine.collator
    assert package_collator.return_audio_in_tokens is False
    infer.align_serve_engine(engine)
    inputs = engine._prepare_inputs(infer.serve_engine_sample(engine, ref_audio, None, "Hello there."),
                                    force_audio_gen=True)
    aligned = _merged(engine.model, inputs)

    prompt_ids = inputs["input_ids"][0]
    assert prompt_ids[-1] == config.audio_out_bos_token_id
    assert torch.equal(prompt_ids, sample.input_ids[: len(prompt_ids)])
    assert torch.equal(inputs["audio_in_ids"], batch.audio_in_ids)
    assert torch.equal(aligned, training[: len(aligned)])

    prompt = data.build_sample(bundle.tokenizer, None, reference.codes, "Hello there.", ref_in_system=True)
    prompt.input_ids = prompt_ids
    package = _merged(engine.model, collate.batch_to_model_inputs(package_collator([prompt]), "cpu"))
    assert len(package) == len(aligned) - reference.codes.shape[1] - config.audio_num_codebooks - 1


# ---- infer.py: input limits those of training, every bad value one line and exit status 2 ------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, 8000 * 31).astype(np.float32)
    for name, seconds in (("one-sample", 1 / 8000), ("tenth", 0.1), ("long", 31.0)):
        sf.write(folder / f"{name}.wav", noise[: max(1, int(seconds * 8000))], 8000)
    (folder / "lines.txt").write_text("Fine words.\n😀 🎉\n", encoding="utf-8")
    return folder


BAD_INPUTS = {
    "1-sample reference": (["--ref-audio", "{clips}/one-sample.wav", "--ref-text", "hi"], "reference lasts 0.00 s"),
    "0.1 s reference": (["--ref-audio", "{clips}/tenth.wav", "--ref-text", "hi"], "reference lasts 0.10 s; a voice prompt must last 1 to 30 s"),
    "31 s reference": (["--ref-audio", "{clips}/long.wav", "--ref-text", "hi"], "reference lasts 31.00 s"),
    "--max-seconds 0": (["--max-seconds", "0"], "--max-seconds must be a positive number"),
    "--max-seconds -5": (["--max-seconds", "-5"], "--max-seconds must be a positive number"),
    "emoji-only text": (["--text", "😀 🎉"], "--text has no letter or digit to speak"),
    "emoji-only line": (["--text-file", "{clips}/lines.txt"], "lines.txt:2 has no letter or digit to speak"),
    "5000-character text": (["--text", "a" * 5000], "--text has 5000 characters, over the 1000 training accepts"),
    "--temperature 0": (["--temperature", "0"], "--temperature must be > 0"),
    "--temperature -1": (["--temperature", "-1"], "--temperature must be > 0"),
    "--top-p 0": (["--top-p", "0"], "--top-p must lie in (0, 1]"),
    "--top-p 1.5": (["--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    "--top-k 0": (["--top-k", "0"], "--top-k must be at least 1"),
    "--ras-win-len -1": (["--ras-win-len", "-1"], "--ras-win-len must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_status_2(clips, capsys, monkeypatch, case):
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("a bad input must be refused before the model loads"))
    args, message = BAD_INPUTS[case]
    assert infer.main(["--model", "tiny"] + [arg.format(clips=clips) for arg in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_the_limits_are_trainings():
    assert manifest.Filters.max_text_chars == 1000
    assert (data.MIN_REFERENCE_SECONDS, data.MAX_REFERENCE_SECONDS) == (1.0, collate.WHISPER_MAX_SECONDS)


def test_encode_reference_refuses_a_too_short_clip(tiny, clips):
    with pytest.raises(data.AudioError, match="reference lasts 0.10 s"):
        infer.encode_reference(tiny, str(clips / "tenth.wav"), "hi", ref_in_system=False)
