"""The preference objectives of the one training step: DPO on stored pairs, GRPO on clips sampled within the step.

    objective = objectives.build(config, bundle, sets, world)      # None for --objective sft
    stats = trainable.train_step(model, optimizer, objective.inputs(micro, step), config, world, lr, objective=objective)

Both differentiate `preference.clip_logprobs`: the summed log-probability of
a clip's audio codes at the positions the supervised loss labels, in the
sample `data.build_sample` makes of its codes (the text labels, alike for
every clip of a prompt, are left out). Both end in `trainable.apply_update`
(clipping, the skip of a non-finite step, AdamW), and report through
`ObjectiveStats`, which reads like the supervised step's statistics.

- `DPO` (`--objective dpo --pairs DIR --dpo-beta B`): the pairs `python
  infer.py --candidates` wrote, their reference log-probabilities stored with
  them (the sampling model's, by the training forward), so no second model is
  held: loss = -log sigmoid(B x ((chosen - its reference) - (rejected - its
  reference))). The training rows are those of the candidates' manifest that
  have a pair; their order, epochs and resume are the loader's.
- `GRPO` (`--objective grpo --group G --reward ...`): each prompt of a
  micro-batch (the loader's rows) is sampled G times by the batched generator
  from the model as it is now (temperature 1, no top-p or repetition window:
  the policy itself), each clip scored by `preference.RewardSpec` (the judge
  for its metrics, in a thread beside the next micro-batch's generation),
  rewards normalised within each group, and the step descends
  -sum(advantage x log p) over the clips' sampled positions; with
  `--kl-weight` (LoRA only) plus the KL to the base through disabled adapters
  (`trainable.forgetting_kl`). Each clip's sampling seed is a function of
  (--seed, step, micro-batch, prompt, clip), so a resumed run samples what
  the uninterrupted one did.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import collate
import data
import files
import generation
import loader
import metrics
import model_utils
import parallel
import preference
import trainable
from config import TrainConfig


def build(config: TrainConfig, bundle: model_utils.Bundle, sets: list[loader.TrainingSet], world: parallel.World):
    """The objective of --objective (None for sft); DPO keeps, of the training rows, those with a pair."""
    if config.objective == "dpo":
        return DPO.from_config(config, bundle, sets)
    if config.objective == "grpo":
        return GRPO.from_config(config, bundle, sets, world)
    return None


@dataclass
class ObjectiveStats:
    """What a preference step measured, on the device until `read` (one all-reduce, one transfer), as `trainable.StepStats`."""

    loss: torch.Tensor  # the step's loss, float64
    counts: torch.Tensor  # positions, padded positions, samples (as StepStats.counts)
    grad_norm: torch.Tensor
    skipped: torch.Tensor
    kl: torch.Tensor  # [sum of the KL over the micro-batches that took it, their number]
    panels: dict[str, torch.Tensor | float]  # TensorBoard tag -> value, a mean over processes

    def read(self, world: parallel.World, stop_requested: bool = False) -> trainable.StepValues:
        device = self.loss.device
        names = list(self.panels)
        values = [torch.as_tensor(self.panels[name], dtype=torch.float64, device=device).reshape(1) for name in names]
        stop = torch.full((1,), float(stop_requested), dtype=torch.float64, device=device)
        shared = torch.cat([self.loss.reshape(1).double(), self.counts.double(), self.kl.double(), *values, stop])
        read = torch.cat([parallel.mean_over_processes(shared, world), self.grad_norm.double().reshape(1),
                          self.skipped.double().reshape(1)]).tolist()
        loss, counts, (kl_sum, kl_batches), panels = read[0], read[1:4], read[4:6], read[6 : 6 + len(names)]
        tokens, padded, samples = (value * world.size for value in counts)
        return trainable.StepValues({"total": loss}, tokens, padded, samples, {}, read[-2], bool(read[-1]),
                                    kl_sum / kl_batches if kl_batches else math.nan, read[-3] > 0, dict(zip(names, panels)))


def forward_logprobs(model, batch, config: TrainConfig, world: parallel.World, weights: torch.Tensor | None = None):
    """The training forward of a collated batch of clips: model inputs, outputs and each sample's log p of its codes
    (at the positions `weights` picks; default every labelled one)."""
    model_config = model_utils.higgs_model(parallel.unwrap(model)).config
    inputs = trainable.model_inputs(batch, model_config, config, world.device)
    owners = preference.column_owners(batch, model_config.audio_out_token_idx)
    outputs = model(**inputs)
    logp = preference.clip_logprobs(outputs.audio_logits, inputs["label_audio_ids"], owners, len(batch.input_ids), weights)
    return inputs, outputs, logp


# --------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_ref: torch.Tensor, rejected_ref: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss per pair, -log sigmoid(beta x ((chosen - chosen_ref) - (rejected - rejected_ref))), and the
    implicit rewards beta x (logp - reference) of the chosen and the rejected clips."""
    chosen_reward, rejected_reward = beta * (chosen - chosen_ref), beta * (rejected - rejected_ref)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


class DPO:
    """`--objective dpo`: chosen over rejected clips of `--pairs`, against their stored reference log-probabilities."""

    def __init__(self, bundle: model_utils.Bundle, pairs: dict[str, dict], beta: float, source: str = ""):
        self.bundle, self.pairs, self.beta, self.source = bundle, pairs, beta, source

    @classmethod
    def from_config(cls, config: TrainConfig, bundle: model_utils.Bundle, sets: list[loader.TrainingSet]) -> DPO:
        """The pairs of --pairs, checked against the run; of the training rows, those with a pair are kept (in `sets`)."""
        pairs, report = preference.read_pairs(config.pairs)
        cls.check_source(config, report)
        sets[:] = [replace(training_set, rows=[row for row in training_set.rows if row["id"] in pairs]) for training_set in sets]
        rows = sum(len(training_set.rows) for training_set in sets)
        print(f"--pairs {config.pairs}: {len(pairs)} pairs; {rows} training rows have one "
              f"({report['ties']} ties and {report['all_failed']} rows with fewer than two scored clips have none)")
        if not rows:
            raise ValueError(f"--pairs {config.pairs}: no training row has a pair (its ids are not those of --train-manifest)")
        return cls(bundle, pairs, config.dpo_beta, config.pairs)

    @staticmethod
    def check_source(config: TrainConfig, report: dict) -> None:
        """The pairs were sampled from this manifest by this model (DPO's reference is that model)."""
        manifests = list(config.train_manifest)
        if config.cache or len(manifests) != 1 or not os.path.exists(manifests[0]) \
                or not os.path.samefile(manifests[0], report["manifest"]):
            raise ValueError(f"--pairs {config.pairs} was sampled from {report['manifest']}: give it as the one --train-manifest")
        sampled = report["checkpoint"] or report["model"]
        same = sampled == config.model or (os.path.exists(sampled) and os.path.exists(config.model)
                                           and os.path.samefile(sampled, config.model))
        if not same:
            raise ValueError(f"--pairs {config.pairs} was sampled by {sampled}, whose log-probabilities are its reference: "
                             f"start DPO from that model (--model), not {config.model}")
        # a tiny preset is drawn from --seed (model_utils.load_bundle): the same name with another seed is another model
        sampled_seed = report.get("sampling", {}).get("seed")
        if sampled in (model_utils.TINY_PRESET, model_utils.TINY_WHISPER_PRESET) and sampled_seed != config.seed:
            raise ValueError(f"--pairs {config.pairs} was sampled by the {sampled} preset drawn with --seed {sampled_seed}, "
                             f"whose log-probabilities are its reference: train with --seed {sampled_seed}, not {config.seed}")

    def fingerprints(self, config: TrainConfig) -> dict[str, str]:
        """The pairs' content, which a resume must match as it matches the data's."""
        return {"pairs": files.sha256(Path(self.source) / preference.PAIRS_FILE)}

    def inputs(self, micro: list[loader.MicroBatch], step: int) -> list[list[dict]]:
        return [[self.pairs[pair.id] for pair in each.pairs] for each in micro]

    def step(self, model, optimizer, inputs: list[list[dict]], config: TrainConfig, world: parallel.World) -> ObjectiveStats:
        device = world.device
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, chosen, rejected, margin, accuracy, chosen reward
        counts = torch.zeros(3, dtype=torch.float64, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        total = sum(len(pairs) for pairs in inputs)
        for index, pairs in enumerate(inputs):
            prompts = [pair["prompt"] for pair in pairs] * 2
            codes = [pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs]
            batch = preference.training_batch(self.bundle, prompts, codes)
            references = torch.tensor([pair["chosen_ref"] for pair in pairs] + [pair["rejected_ref"] for pair in pairs],
                                      dtype=torch.float32, device=device)
            with trainable.sync_context(model, index == len(inputs) - 1), trainable.autocast(config.precision, device):
                _, outputs, logp = forward_logprobs(model, batch, config, world)
                n = len(pairs)
                losses, chosen_reward, rejected_reward = dpo_loss(logp[:n], logp[n:], references[:n], references[n:], self.beta)
                (losses.sum() / total).backward()
            finite = finite & torch.isfinite(losses.detach()).all()
            margin = (chosen_reward - rejected_reward).detach()
            sums += torch.stack([losses.detach().sum(), logp[:n].detach().sum(), logp[n:].detach().sum(), margin.sum(),
                                 (margin > 0).sum(), chosen_reward.detach().sum()]).double()
            counts += trainable.batch_counts(outputs, 2 * n)
        grad_norm, skipped = trainable.apply_update(model, optimizer, finite, config, world)
        means = sums / total
        panels = {"dpo/loss": means[0], "dpo/chosen_logp": means[1], "dpo/rejected_logp": means[2], "dpo/margin": means[3],
                  "dpo/accuracy": means[4], "dpo/chosen_reward": means[5], "dpo/rejected_reward": means[5] - means[3]}
        return ObjectiveStats(means[0], counts, grad_norm, skipped, torch.zeros(2, device=device), panels)


# --------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------


def group_advantages(rewards: list[float | None], group: int) -> tuple[list[float | None], int]:
    """Each clip's reward normalised within its group of `group` ((r - mean) / std over the group's scored clips;
    None for a clip without a reward or in a group whose rewards are all equal), and the number of such flat groups."""
    advantages, flat = [], 0
    for start in range(0, len(rewards), group):
        scored = [reward for reward in rewards[start : start + group] if reward is not None]
        spread = float(np.std(scored)) if len(scored) > 1 else 0.0
        if spread <= 1e-9:
            flat += 1
            advantages += [None] * len(rewards[start : start + group])
            continue
        mean = float(np.mean(scored))
        advantages += [None if reward is None else (reward - mean) / spread for reward in rewards[start : start + group]]
    return advantages, flat


def clip_seed(seed: int, step: int, micro: int, row: int, clip: int) -> int:
    """A clip's sampling seed, a function of where it is sampled: a resumed run draws what the first one would have."""
    return int(np.random.SeedSequence([seed, step, micro, row, clip]).generate_state(1)[0])


@dataclass
class GroupInput:
    """One micro-batch of a GRPO step: its prompts, and where it is (for the clips' seeds)."""

    pairs: list
    step: int
    index: int


class GRPO:
    """`--objective grpo`: G clips per prompt sampled in the step, scored, their group-normalised advantages."""

    def __init__(self, bundle: model_utils.Bundle, reward: preference.RewardSpec, group: int, seed: int, codes,
                 languages: dict[str, str | None], layout: data.PromptLayout, max_seconds: float, judge=None):
        self.bundle, self.reward, self.group, self.seed, self.codes = bundle, reward, group, seed, codes
        self.languages, self.layout, self.judge = languages, layout, judge
        self.warned_untrained = False
        self.whisper = layout.ref_in_system and collate.uses_whisper(bundle.model.config)
        self.sampling = generation.Sampling(temperature=1.0, top_k=None, top_p=1.0, ras_win_len=None, seed=None,
                                            max_seconds=max_seconds)

    @classmethod
    def from_config(cls, config: TrainConfig, bundle: model_utils.Bundle, sets: list[loader.TrainingSet],
                    world: parallel.World) -> GRPO:
        """Prompts from the training rows (the first set's codes), the judge of --speaker-model / --asr-model where
        the reward needs one."""
        if world.distributed:
            raise ValueError("--objective grpo runs on one process (its sampling is not sharded across processes yet)")
        reward = preference.RewardSpec.parse(config.reward)
        needs_target = [name for name, _ in reward.weights if name == "duration_ratio" or name.startswith("target_")]
        if needs_target:  # GRPO judges each clip without the row's target clip, so these columns would be None for all
            raise ValueError(f"--reward {needs_target[0]}: GRPO scores its clips without the training row's target clip, "
                             "so the target's columns and duration_ratio are not computed; use terms of the clip alone")
        judge = metrics.build_judge(config.speaker_model or None, config.asr_model or None, config.eval_language or None,
                                    world.device) if reward.needs_judge else None
        languages = {row["id"]: row.get("language") for training_set in sets for row in training_set.rows}
        return cls(bundle, reward, config.group, config.seed, sets[0].builder.codes, languages,
                   data.PromptLayout(config.ref_in_system), config.sample_max_seconds, judge)

    def fingerprints(self, config: TrainConfig) -> dict[str, str]:
        return {}

    def inputs(self, micro: list[loader.MicroBatch], step: int) -> list[GroupInput]:
        return [GroupInput(each.pairs, step, index) for index, each in enumerate(micro)]

    def prompts(self, pairs) -> list[preference.Prompt]:
        rate = self.codes.sampling_rate
        return [preference.Prompt(pair.id, pair.ref_text, self.codes(pair.ref_audio), pair.text,
                                  data.PromptLayout(self.layout.ref_in_system, pair.scene), self.languages.get(pair.id),
                                  pair.ref_audio, data.load_audio(pair.ref_audio, rate) if self.whisper else None, rate)
                for pair in pairs]

    def sample(self, model, group: GroupInput, timings: dict) -> tuple[list, list, model_utils.Bundle]:
        """The group's prompts (each G times), their clips from the model as it is now, and the bundle that sampled."""
        prompts = [prompt for prompt in self.prompts(group.pairs) for _ in range(self.group)]
        seeds = [clip_seed(self.seed, group.step, group.index, row, clip) for row in range(len(group.pairs))
                 for clip in range(self.group)]
        live = model_utils.Bundle(model_utils.higgs_model(parallel.unwrap(model)), self.bundle.tokenizer,
                                  self.bundle.audio_tokenizer)
        started = time.perf_counter()
        model.eval()
        clips = preference.sample_clips(live, prompts, seeds, self.sampling)
        model.train()
        timings["generation"] += time.perf_counter() - started
        return prompts, clips, live

    def score(self, prompts: list, clips: list, live: model_utils.Bundle, timings: dict) -> tuple[list, dict]:
        """Each clip with its (reward, terms), and the counts of failed clips and terms not computed."""
        started = time.perf_counter()
        records = [preference.judged_record(self.judge, prompt, clip, live, None) if self.judge else None
                   for prompt, clip in zip(prompts, clips)]
        counts = preference.CandidateCounts()
        scored = preference.score_clips(clips, records, self.reward, live.model.config.audio_codebook_size, counts)
        timings["scoring"] += time.perf_counter() - started
        return list(zip(clips, scored)), vars(counts)

    def step(self, model, optimizer, inputs: list[GroupInput], config: TrainConfig, world: parallel.World) -> ObjectiveStats:
        """Every micro-batch sampled first (the weights change only at the step's end), each scored in a thread
        beside the next one's generation, as --eval scores; then each one's update, once its scores are in."""
        device = world.device
        timings = dict.fromkeys(("generation", "scoring", "scoring_wait", "update"), 0.0)
        loss_sum, kl = torch.zeros((), dtype=torch.float64, device=device), torch.zeros(2, dtype=torch.float64, device=device)
        counts = torch.zeros(3, dtype=torch.float64, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        seen = GroupRecord()
        with ThreadPoolExecutor(max_workers=1) as scorer:
            sampled = []
            for group in inputs:
                prompts, clips, live = self.sample(model, group, timings)
                sampled.append((prompts, scorer.submit(self.score, prompts, clips, live, timings)))
            for index, (prompts, scoring) in enumerate(sampled):
                waited = time.perf_counter()
                clips, reward_counts = scoring.result()
                timings["scoring_wait"] += time.perf_counter() - waited
                advantages, flat = group_advantages([total for _, (total, _) in clips], self.group)
                seen.add(clips, flat, reward_counts, self.group)
                seen.trained += sum(advantage is not None for advantage in advantages)
                trained = [i for i, advantage in enumerate(advantages) if advantage is not None]
                started = time.perf_counter()
                if trained:
                    last = index == len(inputs) - 1
                    total, outputs, divergence = self.update(model, prompts, clips, advantages, trained, config, world, last,
                                                             len(inputs))
                    if divergence is not None:
                        kl += torch.stack([divergence.double(), kl.new_ones(())])
                    finite = finite & torch.isfinite(total)
                    loss_sum += total.double() / len(inputs)
                    counts += trainable.batch_counts(outputs, len(trained))
                timings["update"] += time.perf_counter() - started
        if not seen.trained and not self.warned_untrained:
            self.warned_untrained = True
            print(f"warning: GRPO step {inputs[0].step + 1} trained no clip: {seen.describe()} (said once; the "
                  "grpo/ panels count each step)", file=sys.stderr)
        started = time.perf_counter()
        grad_norm, skipped = trainable.apply_update(model, optimizer, finite, config, world)
        timings["update"] += time.perf_counter() - started
        return ObjectiveStats(loss_sum, counts, grad_norm, skipped, kl,
                              {**seen.panels(), **{f"time/{name}_s": seconds for name, seconds in timings.items()}})

    def update(self, model, prompts: list, clips: list, advantages: list, trained: list[int], config: TrainConfig,
               world: parallel.World, last: bool, micro_batches: int):
        """One micro-batch's backward of -sum(A x logp) / positions (+ the KL term): its loss, outputs and KL, detached."""
        device = world.device
        batch = preference.training_batch(self.bundle, [prompts[i] for i in trained], [clips[i][0].codes for i in trained])
        advantage = torch.tensor([advantages[i] for i in trained], dtype=torch.float32, device=device)
        sampled = preference.sampled_weights(batch, [clips[i][0] for i in trained], self.bundle.model.config)
        divergence = None
        with trainable.sync_context(model, last), trainable.autocast(config.precision, device):
            inputs, outputs, logp = forward_logprobs(model, batch, config, world, sampled)
            total = -(advantage * logp).sum() / float(sampled.sum())
            if config.kl_weight:
                divergence = trainable.forgetting_kl(model, inputs, outputs.audio_logits, inputs["label_audio_ids"])
                total = total + config.kl_weight * divergence
            (total / micro_batches).backward()
        return total.detach(), outputs, None if divergence is None else divergence.detach()


class GroupRecord:
    """A GRPO step's rewards and terms over its groups, for the panels."""

    def __init__(self):
        self.rewards, self.terms, self.spreads, self.frames = [], {}, [], []
        self.flat = self.failed = self.trained = 0
        self.excluded: dict[str, int] = {}

    def add(self, clips: list, flat: int, reward_counts: dict, group: int) -> None:
        totals = [total for _, (total, _) in clips]
        self.rewards += [total for total in totals if total is not None]
        for start in range(0, len(totals), group):
            scored = [total for total in totals[start : start + group] if total is not None]
            self.spreads.append(float(np.std(scored)) if scored else 0.0)
        for _, (_, terms) in clips:
            for name, value in terms.items():
                if value is not None:
                    self.terms.setdefault(name, []).append(value)
        self.frames += [0 if clip.codes is None else clip.codes.shape[1] for clip, _ in clips]
        self.flat, self.failed = self.flat + flat, self.failed + reward_counts["failed_clips"]
        for name, count in reward_counts["excluded_terms"].items():
            self.excluded[name] = self.excluded.get(name, 0) + count

    def describe(self) -> str:
        """Why a step trained nothing, in words."""
        excluded = ", ".join(f"{name} {count}" for name, count in self.excluded.items()) or "none"
        return (f"{self.flat} group(s) whose rewards were all equal or missing, {self.failed} clip(s) without a clip or "
                f"score; reward terms not computed: {excluded} (no ASR for the language: --asr-model)")

    def panels(self) -> dict[str, float]:
        panels = {"grpo/reward": float(np.mean(self.rewards)) if self.rewards else math.nan,
                  "grpo/reward_spread": float(np.mean(self.spreads)), "grpo/flat_groups": self.flat,
                  "grpo/failed_clips": self.failed, "grpo/frames": float(np.mean(self.frames))}
        for name, values in self.terms.items():
            panels[f"grpo/term/{name}"] = float(np.mean(values))
            panels[f"grpo/term_spread/{name}"] = float(np.std(values))
        for name, count in self.excluded.items():
            panels[f"grpo/excluded/{name}"] = count
        return panels
