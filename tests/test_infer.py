"""The command line: cloning works end to end, an export is prompted in its recorded layout, every bad input is one
line and exit status 2 before the model loads, and --parity prints one line per check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import soundfile as sf
import torch

import collate
import data
import infer
import manifest
import model_utils
from conftest import ROOT, VOICE_PROMPTS, fill


# ---- the clone command ---------------------------------------------------------------------


def test_clone_writes_a_playable_24khz_wav(tmp_path, capsys):
    out = tmp_path / "clone.wav"
    code = infer.main([
        "--model", "tiny", "--ref-audio", str(VOICE_PROMPTS / "belinda.wav"),
        "--ref-text", (VOICE_PROMPTS / "belinda.txt").read_text(encoding="utf-8"),
        "--text", "Hello from the tiny model.", "--out", str(out), "--max-seconds", "1", "--seed", "3",
    ])
    assert code == 0, capsys.readouterr().err
    waveform, rate = sf.read(out)
    assert rate == 24000
    assert 0 < len(waveform) <= 24000 + 960
    assert torch.isfinite(torch.as_tensor(waveform)).all()


def test_clone_is_repeatable_greedy(tmp_path):
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for path in paths:
        assert infer.main(["--model", "tiny", "--text", "Same words.", "--greedy", "--max-seconds", "0.5", "--out", str(path)]) == 0
    first, second = (sf.read(path)[0] for path in paths)
    assert len(first) > 0 and (first == second).all()


def test_text_file_gives_one_wav_per_line(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line.\n", encoding="utf-8")
    assert infer.main(["--model", "tiny", "--text-file", str(lines), "--out", str(tmp_path / "wavs"), "--max-seconds", "0.4",
                       "--batch-size", "2"]) == 0
    assert sorted(path.name for path in (tmp_path / "wavs").iterdir()) == ["0000.wav", "0001.wav"]


def test_a_line_that_yields_no_clip_is_named_and_the_other_lines_still_run(tmp_path, capsys):
    # Without forced audio the random tiny model answers every line in text: each line is named, none stops the rest.
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\nSecond line.\n", encoding="utf-8")
    assert infer.main(["--model", "tiny", "--text-file", str(lines), "--out", str(tmp_path / "wavs"), "--max-seconds", "0.2",
                       "--no-force-audio"]) == 1
    errors = capsys.readouterr().err.splitlines()
    for number, text in enumerate(["First line.", "Second line."]):
        assert (f"error: {tmp_path / 'wavs' / f'{number:04d}.wav'} not written: the model produced no audio (it answered "
                f"in text); leave out --no-force-audio: {text}") in errors, errors


def test_weights_are_bf16_on_cuda_and_fp32_on_the_cpu_by_default():
    assert infer.parse_args([]).dtype == "auto"
    assert infer.resolve_dtype("auto", "cuda") == torch.bfloat16 and infer.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert infer.resolve_dtype("auto", "cpu") == torch.float32
    assert infer.resolve_dtype("float32", "cuda") == torch.float32  # exactness on a GPU, when asked


def test_the_static_kv_cache_is_cudas_default_for_batch_1_only():
    assert infer.static_kv_cache("auto", "cuda", batch_size=1) and not infer.static_kv_cache("auto", "cpu", batch_size=1)
    assert not infer.static_kv_cache("auto", "cuda", batch_size=4)  # batches run our loop, on the dynamic cache
    assert infer.static_kv_cache("static", "cpu", batch_size=1) and not infer.static_kv_cache("dynamic", "cuda", batch_size=1)


def test_clone_command_prompts_an_export_in_its_recorded_layout(export, engine, ref_audio, tmp_path, capsys, monkeypatch):
    """The export was trained with the reference in the system message: no --ref-text needed, no flag repeated."""
    monkeypatch.setattr(infer, "_load", lambda args: model_utils.Bundle(engine.model, engine.tokenizer, engine.audio_tokenizer))
    out = tmp_path / "clone.wav"
    assert infer.main(["--model", str(export), "--ref-audio", ref_audio, "--text", "Hello.", "--greedy",
                       "--max-seconds", "0.3", "--out", str(out)]) == 0
    assert "layout: reference in the system message" in capsys.readouterr().out and out.is_file()
    assert infer.main(["--model", str(export), "--no-ref-in-system", "--ref-text", "x"]) == 2
    assert "contradicts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ref-audio", "missing.wav", "--ref-text", "hi", "--text", "x"], "no such audio file"),
        (["--text", "   "], "--text is empty"),
        (["--model", "/nonexistent/model", "--audio-tokenizer", "/nonexistent/audio"], "model directory not found"),
        (["--ref-audio", str(ROOT / "requirements.txt"), "--ref-text", "hi"], "unreadable audio"),
        (["--parity", "--checks", "prefix,bogus"], "unknown parity checks"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
    assert infer.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "--ref-audio", str(tmp_path / "none.wav"), "--ref-text", "x"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no such audio file" in result.stderr


def test_a_truncated_checkpoint_is_named_damaged_with_the_checkpoints_beside_it(tmp_path, capsys, monkeypatch):
    """Issue 25 item 12: `--checkpoint` on a truncated file was `error: dmg.pt: [Errno 22] Invalid argument`."""
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("refused before the model loads"))
    damaged = tmp_path / "checkpoints" / "step_00000004.pt"
    damaged.parent.mkdir()
    torch.save({"model": torch.zeros(4096)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"")
    assert infer.main(["--checkpoint", str(damaged), "--text", "Hello."]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {damaged}: damaged or truncated, not a loadable checkpoint (") and line.endswith(
        "; beside it: best.pt"), line


def test_a_clone_on_a_full_disk_is_one_line_saying_so_and_leaves_no_file(small_disk, capsys):
    out = small_disk(1)
    fill(out)
    assert infer.main(["--model", "tiny", "--text", "Hello.", "--out", str(out / "clone.wav")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot write {out / 'clone.wav'}: No space left on device"
    assert sorted(path.name for path in out.iterdir()) == ["filler"]


def test_parity_command_prints_one_line_per_check(capsys):
    assert infer.main(["--parity", "--checks", "prefix,official,collated"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 6 and all(line.startswith("PASS") for line in lines)


# ---- infer.py: input limits those of training, every bad value one line and exit status 2 ------------------


BAD_INPUTS = {
    "1-sample reference": (["--ref-audio", "{clips}/one-sample.wav", "--ref-text", "hi"], "reference lasts 0.00 s"),
    "0.1 s reference": (["--ref-audio", "{clips}/tenth.wav", "--ref-text", "hi"], "reference lasts 0.10 s; a voice prompt must last 1 to 30 s"),
    "31 s reference": (["--ref-audio", "{clips}/long.wav", "--ref-text", "hi"], "reference lasts 31.00 s"),
    "--max-seconds 0": (["--max-seconds", "0"], "--max-seconds must be a positive number"),
    "--max-seconds -5": (["--max-seconds", "-5"], "--max-seconds must be a positive number"),
    "--max-seconds 0.01": (["--max-seconds", "0.01"], "--max-seconds 0.01 is under one frame of audio (0.04 s)"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "emoji-only text": (["--text", "😀 🎉"], "--text has no letter or digit to speak"),
    "emoji-only line": (["--text-file", "{clips}/lines.txt", "--out", "{clips}/wavs"], "lines.txt:2 has no letter or digit to speak"),
    "latin-1 text file": (["--text-file", "{clips}/latin1.txt", "--out", "{clips}/long.wav"],
                          "latin1.txt is not UTF-8 text (invalid continuation byte at byte 3)"),
    "--out a folder": (["--out", "{clips}"], "is a folder: give an audio file (out.wav)"),
    "--out clip.txt": (["--out", "{clips}/clip.txt"], "clip.txt: .txt is not an audio format libsndfile writes"),
    "--chunk-chars 10": (["--text", "a" * 5000, "--chunk-chars", "10"], "--chunk-chars must lie in 20 to 1000"),
    "--chunk-chars 5000": (["--chunk-chars", "5000"], "--chunk-chars must lie in 20 to 1000 (the longest text training accepts)"),
    "--context-chunks -1": (["--context-chunks", "-1"], "--context-chunks must be >= 0"),
    "--temperature 0": (["--temperature", "0"], "--temperature must be > 0"),
    "--temperature -1": (["--temperature", "-1"], "--temperature must be > 0"),
    "--top-p 0": (["--top-p", "0"], "--top-p must lie in (0, 1]"),
    "--top-p 1.5": (["--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    "--top-k 0": (["--top-k", "0"], "--top-k must be at least 1"),
    "--ras-win-len -1": (["--ras-win-len", "-1"], "--ras-win-len must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_status_2(limit_clips, capsys, monkeypatch, case):
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("a bad input must be refused before the model loads"))
    args, message = BAD_INPUTS[case]
    assert infer.main(["--model", "tiny"] + [arg.format(clips=limit_clips) for arg in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_the_limits_are_trainings():
    assert manifest.Filters.max_text_chars == data.LIMITS.max_text_chars == 1000
    assert (data.LIMITS.min_reference_seconds, data.LIMITS.max_reference_seconds) == (1.0, collate.WHISPER_MAX_SECONDS)


def test_a_text_file_to_any_audio_format_is_one_clip():
    # An mp3 --out was a folder of one wav per line, though --text writes it as an mp3.
    for out, one_clip in (("chapter.mp3", True), ("chapter.ogg", True), ("chapter.FLAC", True), ("wavs", False)):
        assert infer.one_clip_out(infer.parse_args(["--text-file", "t.txt", "--out", out])) == one_clip, out
