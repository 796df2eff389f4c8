"""Where a GRPO step's time goes, on the tiny preset: sampling, scoring, update.

    python benchmarks/grpo_benchmark.py                        # 6 steps, 2 prompts x G = 4 clips of at most 2 s, wer:1,sim:1
    python benchmarks/grpo_benchmark.py --reward low_codes:1 --group 8 --steps 4 [--voice-prompts DIR]

Runs `trainable.train_step` with the GRPO objective (objectives.GRPO), as
`train.py --objective grpo` does, on the tiny preset (full scope, fp32, the
CPU): each step samples `--group` clips for each of `--prompts` prompts with
the batched generator, scores them with the judge (`--reward`: resemblyzer
SIM and pocketsphinx WER, English; a code-only reward needs no judge), and
takes the update. The references and texts are the shared voice prompts
(../shared/data/voice_prompts, cut to 3 s). Printed: each step's seconds by
phase (the step's own `time/*` panels: generation, the wait for the scoring
thread, the update; and the scoring thread's own time, which overlaps the
next micro-batch's generation when there is one) and their shares over the
steps after the first (which pays for warm-up), with the mean reward. Weights are random,
so most clips run to `--max-seconds`; on a shared machine, quote the shares,
not the seconds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config  # noqa: E402
import data  # noqa: E402
import manifest  # noqa: E402
import metrics  # noqa: E402
import model_utils  # noqa: E402
import objectives  # noqa: E402
import preference  # noqa: E402
import trainable  # noqa: E402
import voice_prompts  # noqa: E402
from codes import EncodedClips  # noqa: E402
from parallel import World  # noqa: E402

PHASES = ("generation", "scoring_wait", "update")  # what the step's time is made of; scoring runs in a thread


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps [6]")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step [2]")
    parser.add_argument("--group", type=int, default=4, help="clips per prompt, G [4]")
    parser.add_argument("--max-seconds", type=float, default=2.0, help="longest sampled clip [2]")
    parser.add_argument("--reward", default="wer:1,sim:1", help="the reward, as train.py's --reward [wer:1,sim:1]")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate [1e-3]")
    voice_prompts.add_flag(parser)
    return parser


def reference_pairs(folder: Path, count: int, scratch: Path) -> list[manifest.Pair]:
    """`count` prompts: a shared voice prompt's first 3 s as the reference, the next prompt's transcript as the text."""
    speakers = sorted(path.stem for path in folder.glob("*.wav") if (folder / f"{path.stem}.txt").is_file())
    if not speakers:
        raise SystemExit(f"error: {folder} holds no NAME.wav with its NAME.txt")
    pairs = []
    for index in range(count):
        name, other = speakers[index % len(speakers)], speakers[(index + 1) % len(speakers)]
        clip = scratch / f"{name}.wav"
        sf.write(clip, data.load_audio(folder / f"{name}.wav", 24000)[: 3 * 24000], 24000)
        pairs.append(manifest.Pair(f"p{index}", str(clip), (folder / f"{name}.txt").read_text(encoding="utf-8").strip(),
                                   "", (folder / f"{other}.txt").read_text(encoding="utf-8").strip()[:200]))
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = voice_prompts.folder(args)
    tiny = model_utils.load_bundle(model_utils.TINY_PRESET)
    settings = config.TrainConfig(device="cpu", precision="fp32", val_manifest=(), lr=args.lr, objective="grpo",
                                  group=args.group, reward=args.reward, sample_max_seconds=args.max_seconds)
    model = trainable.prepare_model(copy.deepcopy(tiny.model), settings, World())
    optimizer = trainable.build_optimizer(model, settings, "cpu")
    reward = preference.RewardSpec.parse(args.reward)
    judge = metrics.build_judge(language="en") if reward.needs_judge else None
    with tempfile.TemporaryDirectory() as scratch:
        pairs = reference_pairs(folder, args.prompts, Path(scratch))
        grpo = objectives.GRPO(model_utils.Bundle(model, tiny.tokenizer, tiny.audio_tokenizer), reward, args.group,
                               settings.seed, EncodedClips(tiny.audio_tokenizer), {pair.id: "en" for pair in pairs},
                               data.PromptLayout(), args.max_seconds, judge)
        rows = []
        print(f"GRPO on the tiny preset: {args.prompts} prompts x G = {args.group} clips of at most {args.max_seconds:g} s, "
              f"reward {reward.text}")
        for step in range(args.steps):
            started = time.perf_counter()
            stats = trainable.train_step(model, optimizer, grpo.inputs([Micro(pairs)], step), settings, World(), args.lr,
                                         objective=grpo)
            values = stats.read(World())
            seconds = time.perf_counter() - started
            row = {phase: values.panels[f"time/{phase}_s"] for phase in (*PHASES, "scoring")}
            rows.append({**row, "step": seconds, "reward": values.panels["grpo/reward"], "frames": values.panels["grpo/frames"]})
            print(f"step {step}: {seconds:.2f} s = " + ", ".join(f"{phase} {row[phase]:.2f}" for phase in PHASES)
                  + f" (scoring thread {row['scoring']:.2f})" + f"; reward {rows[-1]['reward']:.3f}, mean frames {rows[-1]['frames']:.1f}")
    later = rows[1:] or rows
    total = sum(row["step"] for row in later)
    shares = {phase: sum(row[phase] for row in later) / total for phase in PHASES}
    print("share of a step (steps after the first): " + ", ".join(f"{phase} {share:.0%}" for phase, share in shares.items())
          + f", other {1 - sum(shares.values()):.0%}; mean step {total / len(later):.2f} s")
    return 0


class Micro:
    """A micro-batch as the loader gives one, its prompts only (what GRPO takes of it)."""

    def __init__(self, pairs: list[manifest.Pair]):
        self.pairs = pairs


if __name__ == "__main__":
    sys.exit(main())
