"""The naturalness judge and the one-voice segmenter on real speech: what they measure, and what they cost.

    python benchmarks/mos_benchmark.py [--voice-prompts DIR] [--skip-segment]

Prints, on the shared voice prompts (../shared/data/voice_prompts):

* the MOS of each prompt's first 7.68 s (one distillmos window), clean and with white noise at 5 dB SNR,
  clipped (a gain that puts 10% of the samples over full scale) and low-passed at 4 kHz, and the smallest
  drop of each kind (the margins tests/test_metrics.py requires); DNSMOS (speechmos) beside it where that
  package is installed (it is not in requirements.txt: see docs/judging.md);
* clips/s of each judge on this CPU;
* the speaker-change threshold: resemblyzer cosines of neighbouring stretches of one speaker (the VAD's
  stretches, and windows of 1.5, 2.5 and 4 s) against every pair of two speakers' stretches or windows,
  and how many of each `segment.SAME_SPEAKER_COSINE` merges;
* the segmenter with its default settings on four speakers' prompts joined by 1.5 s pauses: the clips, their
  lengths and MOS, and where the cuts fall against the joins.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import metrics  # noqa: E402
import segment  # noqa: E402
import voice_prompts  # noqa: E402

SPEAKERS = ("en_man", "en_woman", "belinda", "chadwick", "vex", "shrek_donkey_es", "zh_man_sichuan")
FOUR_SPEAKERS = ("en_woman", "en_man", "belinda", "chadwick")
RATE = metrics.MOS_RATE
WINDOW_SECONDS = 7.68


def degraded(clean: np.ndarray) -> dict[str, np.ndarray]:
    """The clip as the tests degrade it (tests/test_metrics.py::_degraded)."""
    import scipy.signal

    noise = np.random.default_rng(0).standard_normal(len(clean))
    low_pass = scipy.signal.butter(10, 4000, "low", fs=RATE, output="sos")
    versions = {"clean": clean, "noise 5 dB": clean + noise * np.sqrt(np.mean(clean**2) / 10 ** 0.5),
                "clipped": np.clip(clean / np.quantile(np.abs(clean), 0.9), -1, 1),
                "4 kHz": scipy.signal.sosfiltfilt(low_pass, clean)}
    return {name: version.astype(np.float32) for name, version in versions.items()}


def dnsmos_judge():
    """DNSMOS overall (speechmos), or None with the line saying why it is not measured."""
    try:
        from speechmos import dnsmos
    except ImportError as error:
        print(f"DNSMOS: not measured, speechmos does not import ({error}); it is not in requirements.txt (docs/judging.md)")
        return None
    return lambda samples: dnsmos.run(np.clip(samples, -1, 1), sr=RATE)["ovrl_mos"]


def judges_on_degraded_prompts(prompts: Path) -> None:
    judges = {"distillmos": metrics.mos_predictor().score}
    dnsmos = dnsmos_judge()
    if dnsmos:
        judges["dnsmos"] = lambda samples, rate: dnsmos(samples)
    clips = {name: data.load_audio(prompts / f"{name}.wav", RATE)[: int(WINDOW_SECONDS * RATE)] for name in SPEAKERS}
    for judge_name, score in judges.items():
        score(clips["vex"][:RATE], RATE)  # the first call pays one-time set-up
        scores, seconds = {}, 0.0
        for name, clip in clips.items():
            for kind, version in degraded(clip).items():
                started = time.perf_counter()
                scores[name, kind] = score(version, RATE)
                seconds += time.perf_counter() - started
        kinds = list(degraded(clips["vex"]))
        print(f"\n{judge_name}: MOS of each prompt's first {WINDOW_SECONDS} s")
        print(f"  {'prompt':<16}" + "".join(f"{kind:>12}" for kind in kinds))
        for name in SPEAKERS:
            print(f"  {name:<16}" + "".join(f"{scores[name, kind]:>12.2f}" for kind in kinds))
        clean = [scores[name, "clean"] for name in SPEAKERS]
        print(f"  clean: {min(clean):.2f} to {max(clean):.2f}")
        for kind in kinds[1:]:
            drops = {name: scores[name, "clean"] - scores[name, kind] for name in SPEAKERS}
            low = min(drops, key=drops.get)
            print(f"  {kind}: {min(scores[name, kind] for name in SPEAKERS):.2f} to "
                  f"{max(scores[name, kind] for name in SPEAKERS):.2f}; smallest drop {drops[low]:.2f} ({low})")
        count = len(scores)
        print(f"  speed: {count / seconds:.2f} clips/s ({count} clips of {WINDOW_SECONDS} s, "
              f"{count * WINDOW_SECONDS / seconds:.1f} s of audio per s)")


def speaker_threshold(prompts: Path) -> None:
    """Same-speaker neighbours against different-speaker pairs, for the VAD's stretches and for fixed windows."""
    from silero_vad import get_speech_timestamps, load_silero_vad

    encoder, vad = metrics.speaker_encoder(), load_silero_vad()
    clips = {name: data.load_audio(prompts / f"{name}.wav", RATE) for name in SPEAKERS}
    print(f"\nspeaker change ({encoder.name}); threshold segment.SAME_SPEAKER_COSINE = {segment.SAME_SPEAKER_COSINE}")
    cuts = {"VAD stretches": lambda clip: [(stamp["start"], stamp["end"]) for stamp in get_speech_timestamps(
        torch.from_numpy(clip), vad, sampling_rate=RATE, min_silence_duration_ms=segment.MIN_PAUSE_MS, speech_pad_ms=0)]}
    for seconds in (1.5, 2.5, 4.0):
        size = int(seconds * RATE)
        cuts[f"{seconds} s windows"] = lambda clip, size=size: [(i, i + size) for i in range(0, len(clip) - size + 1, size)]
    for label, cut in cuts.items():
        embedded = {name: [encoder.embed(clip[start:end], RATE) for start, end in cut(clip)] for name, clip in clips.items()}
        same = [metrics.cosine(a, b) for parts in embedded.values() for a, b in zip(parts, parts[1:])]
        different = [(metrics.cosine(a, b), first, second) for (first, one), (second, other)
                     in itertools.combinations(embedded.items(), 2) for a in one for b in other]
        highest = max(different)
        merged = sum(value >= segment.SAME_SPEAKER_COSINE for value, _, _ in different)
        print(f"  {label}: same speaker {len(same)} pairs, {min(same):.3f} to {max(same):.3f} (mean {np.mean(same):.3f}), "
              f"{sum(value >= segment.SAME_SPEAKER_COSINE for value in same)} merged; different speakers "
              f"{len(different)} pairs, highest {highest[0]:.3f} ({highest[1]} / {highest[2]}), {merged} merged")


def four_speakers(prompts: Path) -> None:
    """`python segment.py` with its defaults (and --language en for pocketsphinx) on four speakers' prompts joined
    by 1.5 s pauses."""
    rate, pause = 24000, 1.5
    recording, stretches = voice_prompts.joined_with_pauses(prompts, FOUR_SPEAKERS, rate, pause)
    folder = Path(tempfile.mkdtemp())
    try:
        (folder / "in" / "cast").mkdir(parents=True)
        data_file = folder / "in" / "cast" / "show.wav"
        import soundfile as sf

        sf.write(data_file, recording, rate)
        started = time.perf_counter()
        result = segment.segment([str(folder / "in")], folder / "out", segment.Settings(language="en"))
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(folder)
    print(f"\nsegment.py defaults on {' + '.join(FOUR_SPEAKERS)} joined by {pause} s pauses ({len(recording) / rate:.1f} s, "
          f"segmented in {seconds:.1f} s): {result.summary()}")
    print("  speakers' stretches: " + ", ".join(f"{name} {start:.2f}-{end:.2f}" for start, end, name in stretches))
    for row in result.rows:
        inside = [name for start, end, name in stretches if start - 0.15 <= row["start"] < row["end"] <= end + 0.15]
        print(f"  clip {row['start']:.3f}-{row['end']:.3f} s ({row['end'] - row['start']:.2f} s), MOS {row['mos']:.2f}, "
              f"within {' and '.join(inside) or 'NO ONE SPEAKER'}: {row['text'][:50]!r}")
    for rejection in result.rejections:
        print(f"  rejected {rejection.where()}: {rejection.reason}: {rejection.detail}")
    for (_, start, _), (end, _, _) in zip(stretches, stretches[1:]):  # each 1.5 s join: the clips on either side
        before = max((row["end"] for row in result.rows if row["end"] <= end), default=None)
        after = min((row["start"] for row in result.rows if row["start"] >= start), default=None)
        if before is None or after is None:
            print(f"  join {start:.2f}-{end:.2f} s: no clip on one side")
            continue
        cut = (before + after) / 2
        print(f"  join {start:.2f}-{end:.2f} s: a clip ends at {before:.3f} ({1000 * (before - start):+.0f} ms from the "
              f"join's start), the next starts at {after:.3f} ({1000 * (after - end):+.0f} ms from its end); "
              f"cut at {cut:.3f}, {'inside' if start <= cut <= end else 'OUTSIDE'} the join")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mos_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    voice_prompts.add_flag(parser)
    parser.add_argument("--skip-segment", action="store_true", help="leave out the four-speaker segmentation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = voice_prompts.folder(args)
    judges_on_degraded_prompts(prompts)
    speaker_threshold(prompts)
    if not args.skip_segment:
        four_speakers(prompts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
