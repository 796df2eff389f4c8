"""Tests of data.py: audio loading, text normalisation, the one sample builder and the prompt layout an export records."""

import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import VOICE_PROMPTS

import data
import parity

MODEL_RATE = 24000
DURATION = 0.5

# --------------------------------------------------------------------------
# load_audio
# --------------------------------------------------------------------------


def tone(t, channel):
    """Channel 0 and 1 carry different tones, so a stereo mix is distinguishable from either channel."""
    freq, amplitude = ((440.0, 0.6), (660.0, 0.2))[channel]
    return amplitude * np.sin(2 * np.pi * freq * t)


def write_tone(path, rate, channels=1, subtype="PCM_16", fmt="WAV"):
    t = np.arange(int(rate * DURATION)) / rate
    samples = np.stack([tone(t, c) for c in range(channels)], axis=1)
    sf.write(str(path), samples.astype(np.float32), rate, subtype=subtype, format=fmt)
    return path


FORMATS = [
    ("WAV", "PCM_16"),
    ("WAV", "PCM_24"),
    ("WAV", "PCM_32"),
    ("WAV", "FLOAT"),
    ("FLAC", "PCM_16"),
    ("FLAC", "PCM_24"),
]


@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
@pytest.mark.parametrize("fmt,subtype", FORMATS, ids=[f"{f}-{s}" for f, s in FORMATS])
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100, 48000])
def test_load_audio_resamples_any_format_to_mono_float32(tmp_path, rate, fmt, subtype, channels):
    path = write_tone(tmp_path / f"tone.{fmt.lower()}", rate, channels, subtype, fmt)

    audio = data.load_audio(path, MODEL_RATE)

    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - DURATION * MODEL_RATE) <= 2
    # Stereo is the mean of the channels; the resampled signal matches the
    # analytic one away from the edges (where the resampling filter rings).
    t = np.arange(len(audio)) / MODEL_RATE
    expected = sum(tone(t, c) for c in range(channels)) / channels
    edge = len(audio) // 10
    np.testing.assert_allclose(audio[edge:-edge], expected[edge:-edge], atol=1e-3)


def insert_chunk_after_fmt(wav, chunk_id, payload):
    """A copy of a RIFF/WAVE file with one more chunk right after 'fmt ', the RIFF size fixed."""
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    offset = 12
    while True:
        name, size = wav[offset : offset + 4], struct.unpack("<I", wav[offset + 4 : offset + 8])[0]
        offset += 8 + size + (size % 2)
        if name == b"fmt ":
            break
    chunk = chunk_id + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)
    body = wav[8:offset] + chunk + wav[offset:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_load_audio_skips_an_extra_riff_chunk(tmp_path):
    """Editors add LIST/INFO chunks between 'fmt ' and 'data'; the samples must be read unchanged."""
    plain = write_tone(tmp_path / "plain.wav", 16000)
    info = b"INFO" + b"ISFT" + struct.pack("<I", 8) + b"pytest\0\0"
    tagged = tmp_path / "tagged.wav"
    tagged.write_bytes(insert_chunk_after_fmt(plain.read_bytes(), b"LIST", info))
    assert b"LIST" in tagged.read_bytes()[:64]

    np.testing.assert_array_equal(data.load_audio(tagged, MODEL_RATE), data.load_audio(plain, MODEL_RATE))


def write_samples(samples, rate=16000, subtype="PCM_16"):
    def write(path):
        sf.write(str(path), samples, rate, subtype=subtype)

    return write


def tone_with(value):
    samples = tone(np.arange(8000) / 16000, 0)
    samples[100] = value
    return samples


def cancelling_stereo():
    """int16 samples (written as is): libsndfile's float-to-int conversion is off by one LSB for -x."""
    left = (tone(np.arange(8000) / 16000, 0) * 32767).astype(np.int16)
    return np.stack([left, -left], axis=1)


BAD_AUDIO = {
    "missing": (lambda path: None, "no such audio file"),
    "garbage": (lambda path: path.write_bytes(bytes(range(256)) * 16), "unreadable audio"),
    "zero-length": (write_samples(np.zeros(0)), "zero-length"),
    "all-zero": (write_samples(np.zeros(8000)), "all silence"),
    "stereo-cancelling": (write_samples(cancelling_stereo()), "all silence"),
    "nan": (write_samples(tone_with(np.nan), subtype="FLOAT"), "NaN or infinite"),
    "inf": (write_samples(tone_with(np.inf), subtype="FLOAT"), "NaN or infinite"),
    "96kHz": (write_samples(tone(np.arange(9600) / 96000, 0), rate=96000), "outside 8000-48000 Hz"),
    "4kHz": (write_samples(tone(np.arange(4000) / 4000, 0), rate=4000), "outside 8000-48000 Hz"),
}


@pytest.mark.parametrize("case", list(BAD_AUDIO))
def test_load_audio_rejects_bad_files_naming_them(tmp_path, case):
    write, reason = BAD_AUDIO[case]
    path = tmp_path / f"{case}.wav"
    write(path)

    with pytest.raises(data.AudioError) as error:
        data.load_audio(path, MODEL_RATE)

    assert str(path) in str(error.value)
    assert reason in str(error.value)


def test_voice_prompt_fixture_is_real_speech(voice_prompt):
    waveform, transcript = voice_prompt
    assert waveform.dtype == np.float32 and waveform.shape == (2 * MODEL_RATE,)
    assert np.isfinite(waveform).all()
    assert 0.05 < np.abs(waveform).max() <= 1.0
    assert transcript


@pytest.mark.parametrize("name,native_rate", [("belinda.wav", 44100), ("chadwick.wav", 22050)])
def test_load_audio_resamples_real_speech(name, native_rate):
    path = VOICE_PROMPTS / name
    native, rate = sf.read(str(path), dtype="float32")
    assert rate == native_rate and native.ndim == 1

    audio = data.load_audio(path, MODEL_RATE)

    assert abs(len(audio) - len(native) * MODEL_RATE / native_rate) <= 2
    # Speech energy lies well below both Nyquist rates: resampling keeps its level.
    assert rms(audio) == pytest.approx(rms(native), rel=0.02)


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


# --------------------------------------------------------------------------
# normalize_text (expected strings follow examples/generation.py by hand, after its "se fix")
# --------------------------------------------------------------------------

# Cases beyond parity.OFFICIAL_NORMALISATION (the parity check's table, tested here too).
NORMALISED = [
    ("你好，", "你好,"),
    ("“引号”和‘单引号’", "\"引号\"和'单引号'"),
    ("等等……", "等等......"),
    ("破折号——结束", "破折号--结束."),
    ("「直角」『双直角』", '"直角""双直角"'),
    ("one\r\ntwo", "one\ntwo."),
    ("", ""),
    ("  \n\t \n ", ""),
]


@pytest.mark.parametrize("text,expected", parity.OFFICIAL_NORMALISATION + NORMALISED)
def test_normalize_text(text, expected):
    assert data.normalize_text(text) == expected


# --------------------------------------------------------------------------
# build_sample
# --------------------------------------------------------------------------

BOT = "<|begin_of_text|>"
EOT = "<|eot_id|>"
AUDIO_IN = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AUDIO_OUT = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
INSTRUCTION = "Generate audio following instruction.\n\n"
REF_TEXT = "Hello there, how are you?"
TEXT = "  Nice to   meet\nyou "
NORMALISED_TEXT = "Nice to meet\nyou."
SCENE = "Audio is recorded from a quiet room."


def header(role):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def turn(role, content):
    return header(role) + content + EOT


# The inference prompts of the official example, written out by hand.
LAYOUTS = {
    "default": (
        dict(),
        BOT
        + turn("user", REF_TEXT)
        + turn("assistant", AUDIO_OUT)
        + turn("user", NORMALISED_TEXT)
        + header("assistant"),
    ),
    "scene": (
        dict(layout=data.PromptLayout(scene=SCENE)),
        BOT
        + turn("system", f"{INSTRUCTION}<|scene_desc_start|>\n{SCENE}\n<|scene_desc_end|>")
        + turn("user", REF_TEXT)
        + turn("assistant", AUDIO_OUT)
        + turn("user", NORMALISED_TEXT)
        + header("assistant"),
    ),
    "system": (
        dict(layout=data.PromptLayout(ref_in_system=True)),
        BOT
        + turn("system", f"{INSTRUCTION}<|scene_desc_start|>\nSPEAKER0: {AUDIO_IN}\n<|scene_desc_end|>")
        + turn("user", NORMALISED_TEXT)
        + header("assistant"),
    ),
    "system-scene": (
        dict(layout=data.PromptLayout(ref_in_system=True, scene=SCENE)),
        BOT
        + turn("system", f"{INSTRUCTION}<|scene_desc_start|>\n{SCENE}\n\nSPEAKER0: {AUDIO_IN}\n<|scene_desc_end|>")
        + turn("user", NORMALISED_TEXT)
        + header("assistant"),
    ),
}


def codes(frames, seed):
    return torch.randint(0, 1024, (8, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ref():
    return codes(5, seed=1)


@pytest.fixture(scope="module")
def target():
    return codes(7, seed=2)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_prompt_layout(tiny, ref, layout):
    kwargs, expected = LAYOUTS[layout]
    prompt = data.build_sample(tiny.tokenizer, REF_TEXT, ref, TEXT, **kwargs)

    assert decode(tiny.tokenizer, prompt.input_ids) == expected
    assert prompt.label_ids is None
    generation_prefix = tiny.tokenizer.encode(data.GENERATION_PREFIX, add_special_tokens=False)
    assert prompt.input_ids[-len(generation_prefix) :].tolist() == generation_prefix
    assert torch.equal(prompt.audio_ids_concat, ref)
    assert prompt.audio_ids_start.tolist() == [0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_sample_layout_and_labels(tiny, ref, target, layout):
    kwargs, expected_prompt = LAYOUTS[layout]
    prompt = data.build_sample(tiny.tokenizer, REF_TEXT, ref, TEXT, **kwargs)
    sample = data.build_sample(tiny.tokenizer, REF_TEXT, ref, TEXT, target_codes=target, **kwargs)

    assert decode(tiny.tokenizer, sample.input_ids) == expected_prompt + AUDIO_OUT + EOT
    # The inference prompt is exactly the training input up to where generation starts.
    assert torch.equal(sample.input_ids[: len(prompt.input_ids)], prompt.input_ids)

    # Only the final assistant turn's audio tokens and <|eot_id|> are labelled, with their own ids.
    labelled = (sample.label_ids != -100).nonzero().flatten().tolist()
    n = len(sample.input_ids)
    assert labelled == list(range(n - 4, n))
    assert torch.equal(sample.label_ids[labelled], sample.input_ids[labelled])
    assert decode(tiny.tokenizer, sample.label_ids[labelled]) == AUDIO_OUT + EOT

    assert torch.equal(sample.audio_ids_concat, torch.cat([ref, target], dim=1))
    assert sample.audio_ids_start.tolist() == [0, ref.shape[1]]


@pytest.mark.parametrize("layout", ["system", "system-scene"])
def test_reference_in_system_drops_the_transcript_turn(tiny, ref, layout):
    kwargs, _ = LAYOUTS[layout]
    prompt = data.build_sample(tiny.tokenizer, "a transcript that must not appear", ref, TEXT, **kwargs)
    decoded = decode(tiny.tokenizer, prompt.input_ids)
    assert "a transcript that must not appear" not in decoded
    assert decoded.count(header("user")) == 1
    assert AUDIO_OUT not in decoded


def test_builder_normalises_the_text_to_speak(tiny, ref):
    prompt = data.build_sample(tiny.tokenizer, REF_TEXT, ref, "[laugh] hello")
    assert turn("user", "<SE>[Laughter]</SE> hello.") in decode(tiny.tokenizer, prompt.input_ids)


def test_reference_waveform_enters_with_the_system_reference(tiny, ref):
    waveform = np.linspace(-0.5, 0.5, 4800, dtype=np.float32)
    sample = data.build_sample(
        tiny.tokenizer, None, ref, TEXT, layout=data.PromptLayout(ref_in_system=True), ref_waveform=waveform,
        sample_rate=MODEL_RATE
    )
    assert torch.equal(sample.audio_waveforms_concat, torch.from_numpy(waveform))
    assert sample.audio_waveforms_start.tolist() == [0]
    assert sample.audio_sample_rate.tolist() == [MODEL_RATE]


def test_no_waveform_leaves_the_waveform_fields_empty(tiny, ref):
    sample = data.build_sample(tiny.tokenizer, None, ref, TEXT, layout=data.PromptLayout(ref_in_system=True))
    assert len(sample.audio_waveforms_concat) == len(sample.audio_waveforms_start) == len(sample.audio_sample_rate) == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(ref_waveform=np.ones(100, np.float32), sample_rate=MODEL_RATE),
            "only enters with the reference in the system",
        ),
        (dict(layout=data.PromptLayout(ref_in_system=True), ref_waveform=np.ones(100, np.float32)), "needs its sample_rate"),
    ],
    ids=["waveform-without-system-reference", "waveform-without-rate"],
)
def test_reference_waveform_misuse_is_an_error(tiny, ref, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.build_sample(tiny.tokenizer, REF_TEXT, ref, TEXT, **kwargs)


BAD_CODES = {
    "rank-1": torch.zeros(8, dtype=torch.long),
    "rank-3": torch.zeros(1, 8, 5, dtype=torch.long),
    "zero-frames": torch.zeros(8, 0, dtype=torch.long),
    "numpy": np.zeros((8, 5), dtype=np.int64),
}


@pytest.mark.parametrize("role", ["reference", "target"])
@pytest.mark.parametrize("bad", list(BAD_CODES))
def test_malformed_codes_are_an_error(tiny, ref, target, role, bad):
    clips = dict(reference=(BAD_CODES[bad], target), target=(ref, BAD_CODES[bad]))[role]
    with pytest.raises(ValueError, match=f"{role} codes must be a non-empty"):
        data.build_sample(tiny.tokenizer, REF_TEXT, clips[0], TEXT, target_codes=clips[1])


@pytest.mark.parametrize(
    "ref_text,text,message",
    [
        (REF_TEXT, "", "text to speak is empty"),
        (REF_TEXT, " \n\t ", "text to speak is empty"),
        ("", TEXT, "reference transcript is empty"),
        ("  \n ", TEXT, "reference transcript is empty"),
        (None, TEXT, "reference transcript is empty"),
    ],
)
def test_empty_texts_are_an_error(tiny, ref, target, ref_text, text, message):
    with pytest.raises(ValueError, match=message):
        data.build_sample(tiny.tokenizer, ref_text, ref, text, target_codes=target)


def test_text_without_a_letter_or_digit_is_not_speakable(tiny):
    codes = torch.randint(0, 1024, (8, 5))
    with pytest.raises(ValueError, match="no letter or digit"):
        data.build_sample(tiny.tokenizer, "Reference.", codes, "😀 🎉 !!")


@pytest.mark.parametrize("field", ["text", "ref_text", "scene"])
def test_control_tokens_spelled_in_text_are_rejected(tiny, field):
    values = {"text": "Say this.", "ref_text": "Reference.", "scene": None}
    values[field] = "say <|eot_id|> now"
    codes = torch.randint(0, 1024, (8, 4))
    with pytest.raises(ValueError, match="control token <\\|eot_id\\|>"):
        data.build_sample(tiny.tokenizer, values["ref_text"], codes, values["text"],
                          layout=data.PromptLayout(scene=values["scene"]))


# --------------------------------------------------------------------------
# prompt_layout.json
# --------------------------------------------------------------------------


def test_a_broken_record_is_an_error(tmp_path):
    (tmp_path / data.PROMPT_LAYOUT_FILE).write_text('{"ref_in_system": "yes"}')
    with pytest.raises(ValueError, match="prompt_layout.json: needs ref_in_system"):
        data.read_prompt_layout(tmp_path)
