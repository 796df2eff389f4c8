"""Preference tuning, its inference side: log-probabilities of given codes, rewards from the judge, candidates and pairs.

    python infer.py --candidates M.jsonl --k 4 --out DIR --reward wer:1,sim:1    # K judged clips per row, and pairs

- `label_logprobs` / `clip_logprobs`: the log-probability of each sample's target codes under the training
  forward: the audio logits the loss uses, at the positions the loss labels (`model_utils.compute_loss`), summed
  per sample. DPO and GRPO (objectives.py) differentiate exactly this.
- `sample_clips`: clips from the batched generator (`batched_generation.generate_batch`, each clip its own seed),
  each with the log-probability the sampling model gave its codes, recorded while sampling (the model's own
  distribution, temperature 1, before any logits processor), and `training_logprobs`: the same clips under the
  training forward of the sample `data.build_sample` makes from their codes. On the positions both cover
  (`parity_positions`: the drawn codes before the stream's first BOS/EOS or the builder's first departure from
  it) the two agree: `python infer.py --parity --checks logprobs`.
- `RewardSpec`: a weighted sum of named judge metrics (`wer`, `sim`, `mos`, `stop`, or any numeric column of the
  judge's row) and code-only checks (`low_codes`); a term the judge could not compute for a row (no ASR for its
  language) is left out of that row's reward and counted, never taken as 0.
- `make_candidates`: `--candidates`, rows to clips to scores to pairs, written to DIR.

The training side (the DPO and GRPO steps) is objectives.py; docs/preference-tuning.md has the recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import batched_generation
import collate
import data
import evaluate
import files
import generation
import manifest
import metrics
import model_utils

CANDIDATES_FILE, CLIPS_FILE, PAIRS_FILE, REPORT_FILE = "candidates.pt", "candidates.jsonl", "pairs.jsonl", "report.json"


# --------------------------------------------------------------------------
# Log-probabilities of given codes under the training forward
# --------------------------------------------------------------------------


def clip_owners(batch, audio_out_token: int) -> torch.Tensor:
    """The sample each audio-out clip of a collated batch belongs to: one clip per `<|AUDIO_OUT|>` of its ids.

    Package bug (boson-multimodal 0.1.1, HiggsAudioSampleCollator.__call__): `audio_out_ids_start_group_loc`
    gets one entry per sample, not per clip as its own comment says ([0, 0, 1, 2] for four clips of three
    samples), so with a reference and a target in the assistant turns it is short and its owners are wrong;
    the owners are counted here instead (tests/test_preference.py shows the bug).
    """
    per_sample = (batch.input_ids == audio_out_token).sum(1)
    return torch.repeat_interleave(torch.arange(len(per_sample)), per_sample)


def column_owners(batch, audio_out_token: int) -> torch.Tensor:
    """The sample each audio-out column of a collated batch belongs to (on the host, from the batch's own index data)."""
    starts, owners = batch.audio_out_ids_start.tolist(), clip_owners(batch, audio_out_token).tolist()
    if len(starts) != len(owners):
        raise ValueError(f"the batch has {len(starts)} audio-out clips but {len(owners)} <|AUDIO_OUT|> tokens")
    ends = starts[1:] + [batch.audio_out_ids.shape[1]]
    return torch.cat([torch.full((end - start,), owner, dtype=torch.long) for start, end, owner in zip(starts, ends, owners)])


def label_logprobs(audio_logits: torch.Tensor, label_audio_ids: torch.Tensor) -> torch.Tensor:
    """log p(label) at every audio label position, (n_q, columns), 0 where nothing is labelled: column t's logits
    predict label column t + 1, the loss's shift (`model_utils.compute_loss`)."""
    labels = label_audio_ids[:, 1:].to(audio_logits.device)
    logits = audio_logits[:-1].float()
    picked = logits.gather(-1, labels.T.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return F.pad((picked.T * (labels != model_utils.IGNORE_INDEX)), (1, 0))


def clip_logprobs(audio_logits: torch.Tensor, label_audio_ids: torch.Tensor, owners: torch.Tensor, count: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each of `count` samples' summed log-probability of its labelled codes (`weights`, (n_q, columns), picks positions)."""
    values = label_logprobs(audio_logits, label_audio_ids)
    if weights is not None:
        values = values * weights.to(values.device)
    return values.new_zeros(count).index_add(0, owners.to(values.device), values.sum(0))


def labelled_counts(label_audio_ids: torch.Tensor, owners: torch.Tensor, count: int) -> torch.Tensor:
    """Each sample's number of labelled audio positions (host)."""
    per_column = (label_audio_ids != model_utils.IGNORE_INDEX).sum(0).double()
    return torch.zeros(count, dtype=torch.float64).index_add(0, owners, per_column)


# --------------------------------------------------------------------------
# Prompts and sampled clips
# --------------------------------------------------------------------------


@dataclass
class Prompt:
    """One row to sample for: the reference (transcript, codes, file for SIM), the text, its layout and language."""

    id: str
    ref_text: str
    ref_codes: torch.Tensor
    text: str
    layout: data.PromptLayout = data.PromptLayout()
    language: str | None = None
    ref_audio: str = ""
    ref_waveform: np.ndarray | None = None  # for a Whisper model's system-message reference (not stored with candidates)
    sample_rate: int | None = None

    def sample(self, tokenizer, target_codes: torch.Tensor | None = None):
        """The prompt (no target) or a training sample with `target_codes`, by the one builder."""
        return data.build_sample(tokenizer, self.ref_text, self.ref_codes, self.text, target_codes, layout=self.layout,
                                 ref_waveform=self.ref_waveform, sample_rate=self.sample_rate)

    def record(self) -> dict:
        return {"id": self.id, "ref_text": self.ref_text, "ref_codes": self.ref_codes.short(), "text": self.text,
                "ref_in_system": self.layout.ref_in_system, "scene": self.layout.scene, "language": self.language,
                "ref_audio": self.ref_audio}

    @classmethod
    def restored(cls, record: dict) -> Prompt:
        return cls(record["id"], record["ref_text"], record["ref_codes"].long(), record["text"],
                   data.PromptLayout(record["ref_in_system"], record["scene"]), record["language"], record["ref_audio"])


@dataclass
class SampledClip:
    """A sampled clip: its stream as generated, its codes (None when it has no frame), whether the model ended it,
    the sampling model's log-probability of it over `parity_positions`, and its seed."""

    stream: torch.Tensor
    codes: torch.Tensor | None
    stopped: bool
    seed: int
    stream_logprobs: torch.Tensor  # (n_q, columns): log p of each code of the stream as sampled
    stray: int = 0  # BOS/EOS codes inside the clip, clamped as the package's serve engine does
    sampler_logp: float = math.nan  # over the parity positions
    logp: float = math.nan  # the training forward's, over every labelled position of the builder's sample
    training_logp: float = math.nan  # the training forward's, over the parity positions
    positions: int = 0  # parity positions
    error: str | None = None


def sample_clips(bundle: model_utils.Bundle, prompts: list[Prompt], seeds: list[int], sampling: generation.Sampling) -> list[SampledClip]:
    """One clip per (prompt, seed), all in one batch of the batched generator, each with its recorded log-probabilities."""
    config = bundle.model.config
    recorded: list[torch.Tensor] = []
    streams = batched_generation.generate_batch(bundle, [prompt.sample(bundle.tokenizer) for prompt in prompts], sampling,
                                                seeds=seeds, logprobs=recorded)
    clips = []
    for stream, logprobs, seed in zip(streams, recorded, seeds):
        # as generation.audio_sequence_to_codes makes them, the clamped codes counted here rather than printed per clip
        frames = generation.unclamped_codes(stream, config.audio_codebook_size, config.use_delay_pattern)
        stray = generation.out_of_codebook(frames, config.audio_codebook_size)
        codes = frames.clamp(0, config.audio_codebook_size - 1)
        clip = SampledClip(stream, codes if codes.shape[1] else None, generation.stream_ended(
            stream, config.audio_codebook_size, config.use_delay_pattern), seed, logprobs, stray)
        if clip.codes is None:
            clip.error = "the model ended the clip before producing any frame"
        clips.append(clip)
    return clips


def training_batch(bundle: model_utils.Bundle, prompts: list[Prompt], codes: list[torch.Tensor]):
    """The collated training batch of each prompt with its clip's codes as the target, by the one builder and collator."""
    config = bundle.model.config
    collator = collate.build_collator(config, collate.whisper_features(config))
    samples = [prompt.sample(bundle.tokenizer, target) for prompt, target in zip(prompts, codes)]
    return collate.collate(collator, samples, config.audio_codebook_size)


def target_span(batch, row: int, audio_out_token: int) -> tuple[int, int]:
    """The audio-out columns [start, end) of sample `row`'s target clip (its last clip) in a collated batch."""
    starts = batch.audio_out_ids_start.tolist()
    ends = starts[1:] + [batch.audio_out_ids.shape[1]]
    owners = clip_owners(batch, audio_out_token).tolist()
    return max((start, end) for start, end, owner in zip(starts, ends, owners) if owner == row)


def parity_weights(batch, clips: list[SampledClip], config) -> torch.Tensor:
    """(n_q, columns) of the batch: 1 at each clip's parity positions, the labelled positions of its target before
    the first column where the stream holds a BOS/EOS among its drawn codes or departs from the builder's target
    (the package's ragged stream end, a clamped code); each clip's `positions` is set."""
    weights = torch.zeros(batch.label_audio_ids.shape, dtype=torch.float32)
    for row, clip in enumerate(clips):
        start, _ = target_span(batch, row, config.audio_out_token_idx)
        built = batch.audio_out_ids[:, start : start + clip.stream.shape[1]]
        width = built.shape[1]
        labels = batch.label_audio_ids[:, start : start + width] != model_utils.IGNORE_INDEX
        special = ((clip.stream[:, :width] >= config.audio_codebook_size) & labels).any(0)
        bad = torch.nonzero((built != clip.stream[:, :width]).any(0) | special).flatten()
        end = int(bad[0]) if len(bad) else width
        weights[:, start + 1 : start + end] = labels[:, 1:end].float()
        clip.positions = int(labels[:, 1:end].sum())
    return weights


def sampled_weights(batch, clips: list[SampledClip], config) -> torch.Tensor:
    """(n_q, columns) of the batch: 1 at each clip's labelled positions, less the EOS the builder appends to a clip
    the model did not end (stopped by the length limit): positions the policy never sampled, whose gradient would
    teach it to stop where the limit stopped it."""
    labels = batch.label_audio_ids
    weights = (labels != model_utils.IGNORE_INDEX).float()
    for row, clip in enumerate(clips):
        if not clip.stopped:
            start, end = target_span(batch, row, config.audio_out_token_idx)
            weights[:, start:end] *= (labels[:, start:end] != config.audio_stream_eos_id).float()
    return weights


def training_logprobs(bundle: model_utils.Bundle, prompts: list[Prompt], clips: list[SampledClip]) -> None:
    """Set each clip's training-forward log-probabilities (`logp`, all labels; `training_logp`, parity positions) and
    the sampler's over the same positions (`sampler_logp`), in one forward without gradients."""
    kept = [index for index, clip in enumerate(clips) if clip.codes is not None]
    if not kept:
        return
    batch = training_batch(bundle, [prompts[i] for i in kept], [clips[i].codes for i in kept])
    chosen = [clips[i] for i in kept]
    config = bundle.model.config
    weights = parity_weights(batch, chosen, config)
    owners, device = column_owners(batch, config.audio_out_token_idx), next(bundle.model.parameters()).device
    with torch.no_grad():
        outputs = bundle.model(**collate.batch_to_model_inputs(batch, device))
        full = clip_logprobs(outputs.audio_logits, batch.label_audio_ids, owners, len(kept)).tolist()
        at_parity = clip_logprobs(outputs.audio_logits, batch.label_audio_ids, owners, len(kept), weights).tolist()
    for row, (clip, logp, parity_logp) in enumerate(zip(chosen, full, at_parity)):
        start, _ = target_span(batch, row, config.audio_out_token_idx)
        mask = weights[:, start : start + clip.stream.shape[1]]
        clip.logp, clip.training_logp = logp, parity_logp
        clip.sampler_logp = float((clip.stream_logprobs[:, : mask.shape[1]] * mask).sum())


# --------------------------------------------------------------------------
# Rewards: a weighted sum of named judge metrics
# --------------------------------------------------------------------------

# Names a reward may use for the judge's row columns; each column counts in the direction `metrics.BETTER` gives it
# (`term_value`), so error rates, silences and failure flags are negated and the duration ratio is its distance from 1.
ALIASES = {"wer": "error_rate", "cer": "error_rate", "stop": "stopped"}
# Terms computed from the codes alone, checks that the pipeline learns (the tests' rewards; no listener cares for them):
# the clip's length in frames, and the share of its codes in the lower half of the codebook.
CODE_TERMS = {"frames": lambda codes, size: float(codes.shape[1]),
              "low_codes": lambda codes, size: float((codes < size // 2).double().mean())}


@dataclass(frozen=True)
class RewardSpec:
    """`NAME:WEIGHT,...`: the reward is the sum of WEIGHT x term over the terms a clip has (error rates negated)."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> RewardSpec:
        weights = []
        for part in (part.strip() for part in text.split(",") if part.strip()):
            name, _, weight = part.partition(":")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                value = math.nan
            if not name or not math.isfinite(value) or value == 0:
                raise ValueError(f"--reward {text}: each term is NAME:WEIGHT with a non-zero number, e.g. wer:1,sim:1,mos:0.5")
            weights.append((name.strip(), value))
        if not weights:
            raise ValueError("--reward names no term (e.g. wer:1,sim:1)")
        columns = [ALIASES.get(name, name) for name, _ in weights]
        repeated = next((name for (name, _), column in zip(weights, columns) if columns.count(column) > 1), None)
        if repeated:  # wer and cer are one column, the row's error rate: both would count it twice
            raise ValueError(f"--reward {text}: {repeated} names a term given twice (wer and cer are both the row's error rate)")
        return cls(tuple(weights))

    @property
    def text(self) -> str:
        return ",".join(f"{name}:{weight:g}" for name, weight in self.weights)

    @property
    def needs_judge(self) -> bool:
        return any(name not in CODE_TERMS for name, _ in self.weights)

    def terms(self, record: dict | None, codes: torch.Tensor | None, codebook_size: int) -> dict[str, float | None]:
        """Each term's value, higher better (None: not computed for this clip: no ASR for its language, no score)."""
        values = {}
        for name, _ in self.weights:
            if name in CODE_TERMS:
                values[name] = None if codes is None else CODE_TERMS[name](codes, codebook_size)
                continue
            column = ALIASES.get(name, name)
            if record is not None and column not in record and name not in ALIASES:
                raise ValueError(f"--reward {name}: the judge's rows have no column {column!r} "
                                 f"(numeric ones: {', '.join(k for k, v in record.items() if isinstance(v, (int, float)))})")
            value = None if record is None else record.get(column)
            values[name] = None if value is None or value == "" else term_value(column, float(value))
        return values

    def total(self, terms: dict[str, float | None]) -> float | None:
        """The weighted sum over the terms computed; None when none was."""
        present = [(weight, terms[name]) for name, weight in self.weights if terms.get(name) is not None]
        return sum(weight * value for weight, value in present) if present else None


def term_value(column: str, value: float) -> float:
    """A judge column's value as a reward term, higher better: `metrics.BETTER`'s direction (a column it does not
    name counts as it is)."""
    better = metrics.BETTER.get(column, "higher")
    return {"higher": value, "lower": -value, "near 1": -abs(value - 1.0)}[better]


def choose_pair(rewards: list[float | None]) -> tuple[int, int] | str:
    """(chosen, rejected) of one row's clips by reward, or why there is none: `all_failed` (no two clips with a
    reward) or `tie` (the best and worst rewards equal)."""
    scored = [(reward, index) for index, reward in enumerate(rewards) if reward is not None]
    if len(scored) < 2:
        return "all_failed"
    best, worst = max(scored), min(scored)
    if best[0] - worst[0] <= 1e-9 * max(1.0, abs(best[0])):
        return "tie"
    return best[1], worst[1]


# --------------------------------------------------------------------------
# --candidates: rows to judged clips and pairs
# --------------------------------------------------------------------------


@dataclass
class CandidateCounts:
    rows: int = 0
    clips: int = 0
    pairs: int = 0
    ties: int = 0
    all_failed: int = 0
    failed_clips: int = 0
    excluded_terms: dict[str, int] = field(default_factory=dict)
    parity_worst_per_position: float = 0.0


def judged_record(judge, prompt: Prompt, clip: SampledClip, bundle: model_utils.Bundle, target_audio: str | None) -> dict:
    """The judge's row for one clip (evaluate.score_row: SIM, WER/CER, timing; a failed clip its error)."""
    clone = generation.Clone(None, error=clip.error) if clip.codes is None else \
        generation.Clone(generation.decode_codes(bundle, clip.codes), clip.stopped, clamped=clip.stray)
    pair = manifest.Pair(prompt.id, prompt.ref_audio, prompt.ref_text, target_audio, prompt.text, prompt.layout.scene)
    return evaluate.score_row(judge, pair, prompt.language, clone, bundle.audio_tokenizer.sampling_rate)


def score_clips(clips: list[SampledClip], records: list[dict | None], reward: RewardSpec, codebook_size: int,
                counts: CandidateCounts) -> list[tuple[float | None, dict]]:
    """Each clip's reward and terms; terms not computed and failed clips counted in `counts`."""
    scored = []
    for clip, record in zip(clips, records):
        if clip.codes is None or (record is not None and record.get("error")):
            counts.failed_clips += 1
            scored.append((None, {}))
            continue
        terms = reward.terms(record, clip.codes, codebook_size)
        for name, value in terms.items():
            if value is None:
                counts.excluded_terms[name] = counts.excluded_terms.get(name, 0) + 1
        scored.append((reward.total(terms), terms))
    return scored


def make_candidates(bundle: model_utils.Bundle, judge, rows: list[tuple[Prompt, str | None]], k: int,
                    sampling: generation.Sampling, reward: RewardSpec, out: Path, source: dict) -> CandidateCounts:
    """K clips per row (one batch per row, seeds `sampling.seed` + K x row + i), judged and paired; written to `out`:
    candidates.pt (prompts and codes), candidates.jsonl (one line per clip), pairs.jsonl, report.json (the counts,
    the settings and `source`: the manifest and the sampling model, which a DPO run must start from)."""
    counts, stored, lines, pairs = CandidateCounts(), [], [], []
    size = bundle.model.config.audio_codebook_size
    for number, (prompt, target_audio) in enumerate(tqdm(rows, desc="candidates", dynamic_ncols=True)):
        seeds = [(sampling.seed or 0) + k * number + index for index in range(k)]
        clips = sample_clips(bundle, [prompt] * k, seeds, sampling)
        training_logprobs(bundle, [prompt] * k, clips)
        records = [judged_record(judge, prompt, clip, bundle, target_audio) if judge else None for clip in clips]
        scored = score_clips(clips, records, reward, size, counts)
        counts.rows, counts.clips = counts.rows + 1, counts.clips + k
        for clip in clips:
            if clip.positions:
                counts.parity_worst_per_position = max(counts.parity_worst_per_position,
                                                       abs(clip.sampler_logp - clip.training_logp) / clip.positions)
        lines += [clip_line(prompt.id, index, clip, total, terms, record)
                  for index, (clip, (total, terms), record) in enumerate(zip(clips, scored, records))]
        stored.append({**prompt.record(), "codes": [None if clip.codes is None else clip.codes.short() for clip in clips]})
        choice = choose_pair([total for total, _ in scored])
        if isinstance(choice, str):
            setattr(counts, choice, getattr(counts, choice) + 1)
            continue
        chosen, rejected = choice
        counts.pairs += 1
        pairs.append({"id": prompt.id, "chosen": chosen, "rejected": rejected, "chosen_reward": scored[chosen][0],
                      "rejected_reward": scored[rejected][0], "chosen_logp": clips[chosen].logp,
                      "rejected_logp": clips[rejected].logp})
    write_candidates(out, stored, lines, pairs, counts, {"k": k, "reward": reward.text, "sampling": vars(sampling), **source})
    return counts


def describe_counts(counts: CandidateCounts, out: Path) -> str:
    excluded = ", ".join(f"{name} {count}" for name, count in counts.excluded_terms.items()) or "none"
    return (f"{counts.rows} rows, {counts.clips} clips ({counts.failed_clips} without a clip or score): {counts.pairs} pairs, "
            f"{counts.ties} ties, {counts.all_failed} rows with fewer than two scored clips; reward terms not computed: "
            f"{excluded}; log-probability parity: worst {counts.parity_worst_per_position:.1e} nats a position\n"
            f"wrote {out / PAIRS_FILE}; next: python train.py --objective dpo --pairs {out} ...")


def clip_line(row_id: str, index: int, clip: SampledClip, reward: float | None, terms: dict, record: dict | None) -> dict:
    judged = {} if record is None else {key: value for key, value in record.items() if key not in ("id", "text")}
    return {"id": row_id, "k": index, "seed": clip.seed, "reward": reward, "terms": terms,
            "frames": 0 if clip.codes is None else clip.codes.shape[1], "stopped": clip.stopped, "stray_codes": clip.stray,
            "logp": clip.logp, "sampler_logp": clip.sampler_logp, "training_logp": clip.training_logp,
            "parity_positions": clip.positions, "error": clip.error or "", "judge": judged}


def write_candidates(out: Path, stored: list, lines: list, pairs: list, counts: CandidateCounts, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(out / CANDIDATES_FILE) as handle:
        torch.save({"rows": stored}, handle)
    files.write_text(out / CLIPS_FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    files.write_text(out / PAIRS_FILE, "".join(json.dumps(pair) + "\n" for pair in pairs))
    report = {**vars(counts), **settings}
    files.write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")


def read_pairs(folder: str | Path) -> tuple[dict[str, dict], dict]:
    """A candidates folder's pairs by row id, each {prompt, chosen codes, rejected codes, their reference log-probs},
    and its report; a folder that is not one is a one-line error."""
    folder = Path(folder)
    for name in (CANDIDATES_FILE, PAIRS_FILE, REPORT_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"--pairs {folder}: no {name} (write it with python infer.py --candidates M.jsonl --out {folder})")
    rows = {row["id"]: row for row in torch.load(folder / CANDIDATES_FILE, weights_only=True)["rows"]}
    pairs = {}
    for line in (folder / PAIRS_FILE).read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        row = rows[pair["id"]]
        pairs[pair["id"]] = {"prompt": Prompt.restored(row), "chosen": row["codes"][pair["chosen"]].long(),
                             "rejected": row["codes"][pair["rejected"]].long(),
                             "chosen_ref": pair["chosen_logp"], "rejected_ref": pair["rejected_logp"]}
    return pairs, json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
