"""Tests of segment.py on a long recording the test makes: shared voice prompts joined by pauses of known position
and length. The cuts lie in the pauses, no clip crosses a join, pocketsphinx's transcripts of the English clips
score under a measured WER, every filter counts its rejections, and a stopped run resumes without redoing the
recordings it finished."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import librosa
import numpy as np
import pytest
import soundfile as sf

import manifest
import metrics
import segment
from benchmarks import voice_prompts
from conftest import ROOT, VOICE_PROMPTS

RATE = 24000
# (prompt, pause after it in seconds): pauses of several lengths, as between a podcast's sentences
JOINED = (("en_woman", 1.0), ("en_man", 1.4), ("vex", 0.0))
# A cut may fall this far outside the inserted pause: into the prompts' own leading or trailing silence.
CUT_BOUND = 0.15
# Measured on these clips (pocketsphinx 5.1.1, en-us): en_woman 0.12, en_man 0.07 (vex, a cartoon voice: 0.83).
WER_BOUND = 0.2


def true_spans():
    """(start, end, prompt) of each prompt in the joined recording, in seconds."""
    spans, position = [], 0.0
    for name, pause in JOINED:
        seconds = round(sf.info(str(VOICE_PROMPTS / f"{name}.wav")).duration * RATE) / RATE
        spans.append((position, position + seconds, name))
        position += seconds + pause
    return spans


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    """`alice/long.wav` (about 22 s at 24 kHz), segmented into `out` with pocketsphinx; returns (out, result)."""
    folder = tmp_path_factory.mktemp("recordings")
    parts = []
    for name, pause in JOINED:
        samples, rate = sf.read(VOICE_PROMPTS / f"{name}.wav", dtype="float32")
        parts += [librosa.resample(samples, orig_sr=rate, target_sr=RATE) if rate != RATE else samples,
                  np.zeros(round(pause * RATE), dtype=np.float32)]
    (folder / "alice").mkdir()
    sf.write(folder / "alice" / "long.wav", np.concatenate(parts), RATE)
    out = folder / "out"
    return folder, out, segment.segment([str(folder / "alice")], out, segment.Settings(1.0, 10.0, "en"))


def cut_errors(clips: list[tuple[float, float]]) -> list[float]:
    """For each cut (the middle of the gap between two clips), its distance to the inserted pause it should lie
    in; 0 inside it."""
    pauses = [(left[1], right[0]) for left, right in zip(true_spans(), true_spans()[1:])]
    cuts = [(left[1] + right[0]) / 2 for left, right in zip(clips, clips[1:])]
    return [min(max(start - cut, cut - end, 0.0) for start, end in pauses) for cut in cuts]


def test_every_cut_lies_in_a_pause_and_no_clip_crosses_a_join(joined):
    _, _, result = joined
    clips = [(row["start"], row["end"]) for row in result.rows]
    assert len(clips) == len(JOINED), result.rows
    for (start, end), (true_start, true_end, name) in zip(clips, true_spans()):
        assert true_start - CUT_BOUND <= start < end <= true_end + CUT_BOUND, (name, start, end)
    errors = cut_errors(clips)
    assert len(errors) == len(JOINED) - 1 and max(errors) <= CUT_BOUND, errors


def test_pocketsphinx_transcripts_of_the_english_clips_are_under_the_measured_wer(joined):
    _, _, result = joined
    for row, (name, _) in zip(result.rows, JOINED):
        if name == "vex":
            continue
        truth = (VOICE_PROMPTS / f"{name}.txt").read_text(encoding="utf-8")
        assert metrics.error_rate(truth, row["text"], "en") < WER_BOUND, (name, row["text"])


def test_the_manifest_is_one_prepare_takes_as_it_is(joined):
    _, out, result = joined
    rows = manifest.rows_before_audio(out / "manifest.jsonl")
    assert [row["id"] for row in rows] == [f"alice/long/{index:04d}" for index in range(len(JOINED))]
    assert {row["speaker"] for row in rows} == {"alice"} and {row["language"] for row in rows} == {"en"}
    for row, kept in zip(rows, result.rows):
        samples, rate = sf.read(row["audio"], dtype="float32")
        assert rate == RATE and len(samples) == round(kept["end"] * RATE) - round(kept["start"] * RATE)
    assert (out / "report.jsonl").read_text() == ""


def test_a_stopped_run_resumes_without_redoing_finished_recordings(joined, tmp_path):
    folder, out, first = joined
    resumed_out = tmp_path / "out"
    shutil.copytree(out, resumed_out)
    (folder / "bob").mkdir(exist_ok=True)
    shutil.copy(VOICE_PROMPTS / "en_man.wav", folder / "bob" / "talk.wav")

    class StoppedOnce(metrics.PocketsphinxTranscriber):
        """pocketsphinx, interrupted the first time it is asked for a transcript (as Ctrl-C would)."""
        calls, stop = 0, True

        def transcribe(self, waveform, rate, language="en"):
            StoppedOnce.calls += 1
            if StoppedOnce.stop:
                StoppedOnce.stop = False
                raise KeyboardInterrupt
            return super().transcribe(waveform, rate, language)

    inputs = [str(folder / "alice"), str(folder / "bob")]
    with pytest.raises(KeyboardInterrupt):
        segment.segment(inputs, resumed_out, segment.Settings(1.0, 10.0, "en"), asr=StoppedOnce())
    resumed = segment.segment(inputs, resumed_out, segment.Settings(1.0, 10.0, "en"), asr=StoppedOnce())
    assert (resumed.redone, resumed.reused) == (1, 1)
    assert StoppedOnce.calls == 2, "only bob's one clip was transcribed: alice's recording was not redone"
    assert resumed.rows[: len(first.rows)] == first.rows and resumed.rows[-1]["speaker"] == "bob"
    lines = (resumed_out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines][-1] == "bob/talk/0000"


def test_a_recording_changed_since_gets_clips_of_its_new_audio(tmp_path):
    """The clip ids stay (speaker/stem/index), but a clip of the replaced recording is not the old clip's file."""
    recording = tmp_path / "in" / "carol" / "talk.wav"
    recording.parent.mkdir(parents=True)
    shutil.copy(VOICE_PROMPTS / "en_man.wav", recording)
    settings, out = segment.Settings(1.0, 10.0, "en"), tmp_path / "out"
    first = segment.segment([str(recording)], out, settings)
    shutil.copy(VOICE_PROMPTS / "en_woman.wav", recording)
    again = segment.segment([str(recording)], out, settings)
    assert (again.redone, again.rows[0]["id"]) == (1, first.rows[0]["id"])
    new_clip, _ = sf.read(out / again.rows[0]["audio"], dtype="float32")
    source, rate = sf.read(recording, dtype="float32")
    start = round(again.rows[0]["start"] * rate)
    assert np.allclose(new_clip, source[start: start + len(new_clip)], atol=1e-6)


def test_other_settings_for_a_begun_output_are_refused(joined, capsys):
    folder, out, _ = joined
    assert segment.main([str(folder / "alice"), "--out", str(out), "--language", "EN", "--max-seconds", "12"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {out} was segmented with max_seconds 10.0 (now 12.0): "
                                               "use the same settings to resume, or another --out")


# Four different speakers, one after another, 1.5 s apart: as a podcast's turns, or an audiobook's cast.
FOUR_SPEAKERS = ("en_woman", "en_man", "belinda", "chadwick")
TURN_PAUSE = 1.5


def test_four_speakers_segmented_with_default_settings_give_clips_that_each_hold_one_voice(tmp_path):
    """With the defaults (--max-seconds 30) these became 2 clips of 25 and 28 s holding two or three voices each:
    the 1.5 s pauses were merged over and a cut fell inside a speaker's speech. Now a clip ends at every pause
    over segment.MAX_MERGE_PAUSE and never joins two voices."""
    recording, stretches = voice_prompts.joined_with_pauses(VOICE_PROMPTS, FOUR_SPEAKERS, RATE, TURN_PAUSE)
    (tmp_path / "in" / "cast").mkdir(parents=True)
    sf.write(tmp_path / "in" / "cast" / "show.wav", recording, RATE)
    assert segment.main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--language", "en"]) == 0
    rows = manifest.rows_before_audio(tmp_path / "out" / "manifest.jsonl")
    holders = []
    for row in rows:
        inside = [name for start, end, name in stretches if start - CUT_BOUND <= row["start"] < row["end"] <= end + CUT_BOUND]
        assert len(inside) == 1, (row["start"], row["end"], stretches)
        assert row["text"].strip() and row["mos"] >= segment.DEFAULT_MIN_MOS, row
        holders += inside
    assert set(holders) == set(FOUR_SPEAKERS), "every speaker's speech gave at least one clip"


def test_clips_are_planned_at_pauses_within_max_seconds():
    spans = [(0.5, 2.0), (2.3, 4.0), (6.0, 9.5), (9.8, 10.0), (20.0, 31.0)]
    clips = segment.plan_clips(spans, duration=40.0, max_seconds=6.0, pad=0.1)
    # 0.5-4.0 merge (3.7 s with pads); 6.0-10.0 merge; a stretch longer than the limit stays whole (silero splits those).
    assert clips == [(0.4, 4.1), (5.9, 10.1), (19.9, 31.1)]
    assert segment.plan_clips([(1.0, 2.0), (2.1, 3.0)], duration=3.05, max_seconds=9, pad=0.2) == [(0.8, 3.05)]


def test_a_clip_is_merged_only_across_a_short_pause_and_one_speaker():
    spans = [(0.0, 2.0), (2.5, 4.0), (5.0, 6.0), (6.2, 7.0)]  # pauses 0.5, 1.0, 0.2 s
    assert segment.plan_clips(spans, 8.0, 30.0, pad=0.1, max_pause=0.8) == [(0.0, 4.1), (4.9, 7.1)]
    asked = []

    def same_speaker(clip: list[int], index: int) -> bool:
        asked.append((list(clip), index))
        return index != 3  # the last stretch is another voice

    clips = segment.plan_clips(spans, 8.0, 30.0, pad=0.1, max_pause=0.8, same_speaker=same_speaker)
    assert np.allclose(clips, [(0.0, 4.1), (4.9, 6.1), (6.1, 7.1)]), clips
    assert asked == [([0], 1), ([2], 3)], "only stretches within the pause bound are compared"


@pytest.mark.parametrize("case,expected", [
    ("short", "too_short"), ("long", "too_long"), ("clipped", "clipped"), ("quiet", "too_quiet"),
    ("no words", "empty_transcript"), ("too few words", "implausible_rate"), ("too many words", "implausible_rate"),
    ("fine", None)])
def test_each_filter_names_its_reason(case, expected):
    rate = 16000
    speech = 0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * rate) / rate).astype(np.float32)
    samples, text = {
        "short": (speech[: rate // 2], "hello"),
        "long": (np.tile(speech, 5), "hello " * 40),
        "clipped": (np.clip(speech * 10, -1, 1), "a few words that fit three seconds"),
        "quiet": (speech * 1e-3, "a few words that fit three seconds"),
        "no words": (speech, " ... "),
        "too few words": (speech, "hi"),
        "too many words": (speech, "word " * 30),
        "fine": (speech, "a few words that fit three seconds"),
    }[case]
    problem = segment.clip_problem(samples, rate, text, segment.Settings(1.0, 10.0))
    assert (problem[0] if problem else None) == expected, problem


def test_a_whisper_directory_transcribes_what_pocketsphinx_cannot(tmp_path, capsys):
    from test_metrics import _tiny_whisper_directory

    (tmp_path / "whisper").mkdir()
    _tiny_whisper_directory(tmp_path / "whisper")
    (tmp_path / "rec" / "zaid").mkdir(parents=True)
    shutil.copy(VOICE_PROMPTS / "vex.wav", tmp_path / "rec" / "zaid" / "one.wav")
    assert segment.main([str(tmp_path / "rec"), "--out", str(tmp_path / "out"), "--language", "ar"]) == 2
    assert "pocketsphinx-en-us does not transcribe language 'ar'" in capsys.readouterr().err
    # The corrected command in the same --out: the refused run wrote no clip, so its settings do not bind.
    result = segment.segment([str(tmp_path / "rec")], tmp_path / "out",
                             segment.Settings(1.0, 10.0, "ar", asr=str(tmp_path / "whisper")))
    # A random Whisper says random things: each clip is kept with its words or rejected under a filter's reason.
    assert len(result.rows) + len(result.rejections) >= 1
    assert {r.reason for r in result.rejections} <= {"empty_transcript", "implausible_rate"}
    assert all(row["language"] == "ar" and row["speaker"] == "zaid" for row in result.rows)


def test_a_recording_with_no_speech_is_a_reported_rejection(tmp_path):
    recording = tmp_path / "in" / "dan" / "noise.wav"
    recording.parent.mkdir(parents=True)
    sf.write(recording, 0.1 * np.random.default_rng(0).standard_normal(5 * RATE).astype(np.float32), RATE)
    result = segment.segment([str(recording.parent)], tmp_path / "out", segment.Settings(1.0, 10.0, "en"))
    assert result.rows == [] and [(r.recording, r.start, r.end, r.reason) for r in result.rejections] == [
        (str(recording), None, None, "no_speech")]
    assert [json.loads(line)["reason"] for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()] == ["no_speech"]
    assert result.summary() == "rows read 1 = kept 0 + rejected 1 (no_speech 1)"


def test_a_rejection_of_a_whole_recording_is_listed_without_a_time_span(tmp_path, capsys):
    recording = tmp_path / "in" / "erin" / "broken.wav"
    recording.parent.mkdir(parents=True)
    recording.write_bytes(b"RIFF but not a wave file at all")
    segment.main([str(recording), "--out", str(tmp_path / "out"), "--language", "en"])
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "unreadable_audio" in line]
    assert len(listed) == 1 and listed[0].startswith(f"  {recording}: unreadable_audio: ") and "None" not in listed[0], listed


def test_a_changed_recording_leaves_none_of_its_old_clips(tmp_path):
    folder, out, settings = tmp_path / "in" / "carol", tmp_path / "out", segment.Settings(1.0, 10.0, "en")
    folder.mkdir(parents=True)
    shutil.copy(VOICE_PROMPTS / "en_man.wav", folder / "talk.wav")
    shutil.copy(VOICE_PROMPTS / "en_woman.wav", folder / "other.wav")
    first = segment.segment([str(folder)], out, settings)
    (out / "clips" / "carol" / "notes.txt").write_text("not the segmenter's")
    shutil.copy(VOICE_PROMPTS / "en_woman.wav", folder / "talk.wav")
    again = segment.segment([str(folder)], out, settings)
    assert (again.redone, again.reused) == (1, 1) and {row["source"] for row in first.rows} == {str(folder / "talk.wav"), str(folder / "other.wav")}
    left = sorted(str(path.relative_to(out)) for path in (out / "clips").rglob("*") if path.is_file())
    assert left == sorted([row["audio"] for row in again.rows] + ["clips/carol/notes.txt"]), "talk's old clips are removed, nothing else"
    assert len(list((out / "done").iterdir())) == 2, "one record per recording: talk's old one is removed with its clips"


def test_no_recording_or_no_clip_kept_is_an_error_and_prints_no_next_command(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert segment.main([str(tmp_path / "empty"), "--out", str(out), "--language", "en"]) == 2
    printed = capsys.readouterr()
    assert printed.err == f"error: nothing usable found in {tmp_path / 'empty'}: no recording (WAV, FLAC, OGG, MP3)\n"
    assert "next:" not in printed.out and not out.exists(), "refused before the output folder is made"
    noise = tmp_path / "noise" / "dan" / "noise.wav"
    noise.parent.mkdir(parents=True)
    sf.write(noise, 0.1 * np.random.default_rng(0).standard_normal(5 * RATE).astype(np.float32), RATE)
    assert segment.main([str(noise.parent), "--out", str(out), "--language", "en"]) == 2
    printed = capsys.readouterr()
    assert "rows read 1 = kept 0 + rejected 1 (no_speech 1)" in printed.out and "next:" not in printed.out
    assert printed.err.endswith(f"error: nothing usable found in {noise.parent}: no clip kept; report: {out / 'report.jsonl'}\n")


def test_ctrl_c_is_one_line_and_status_130_and_the_run_resumes(tmp_path):
    """A real Ctrl-C (SIGINT to the command) while it transcribes a long recording, after a short one finished."""
    (tmp_path / "in" / "bob").mkdir(parents=True)
    (tmp_path / "in" / "carol").mkdir()
    shutil.copy(VOICE_PROMPTS / "en_man.wav", tmp_path / "in" / "bob" / "short.wav")
    speech = [sf.read(VOICE_PROMPTS / f"{name}.wav", dtype="float32")[0] for name in ("en_woman", "en_man")]
    pause = np.zeros(RATE, dtype=np.float32)
    sf.write(tmp_path / "in" / "carol" / "long.wav", np.concatenate([part for clip in speech for part in (clip, pause)]), RATE)
    inputs, out = [str(tmp_path / "in" / "bob"), str(tmp_path / "in" / "carol")], tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(ROOT / "segment.py"), *inputs, "--out", str(out), "--language", "en"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not list((out / "done").glob("*.json")):  # the short recording is done
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert process.returncode == 130 and "Traceback" not in err, err
    assert last.startswith("interrupted: ") and "the same command" in last, last
    resumed = segment.segment(inputs, out, segment.Settings(1.0, 30.0, "en"))
    assert (resumed.redone, resumed.reused) == (1, 1) and {row["speaker"] for row in resumed.rows} == {"bob", "carol"}


def test_min_mos_outside_the_mos_scale_is_one_line(tmp_path, capsys):
    assert segment.main([str(tmp_path), "--out", str(tmp_path / "out"), "--language", "en", "--min-mos", "7"]) == 2
    assert capsys.readouterr().err == "error: --min-mos 7 must lie in 0-5 (0 = off; MOS runs 1-5)\n"
    assert not (tmp_path / "out").exists()
