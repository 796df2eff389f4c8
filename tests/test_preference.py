"""Preference tuning: the log-probability parity, rewards and pairs, DPO against a hand computation, GRPO learning a
reward the tiny model can learn (and unlearning it with the sign flipped), and exact resume of both objectives."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import collate
import config
import generation
import infer
import manifest
import metrics
import model_utils
import objectives
import preference
import trainable
from conftest import QUICK_FLAGS, logged, run_main
from parallel import World


def prompt_of(case) -> preference.Prompt:
    return preference.Prompt("p", case.ref_text, case.ref_codes, case.text, case.layout)


def test_the_sampler_records_the_log_probabilities_the_training_forward_computes(tiny, parity_case):
    """Two clips sampled in one batch: the sampler's log-probability equals the training forward's within the parity
    tolerance; a training forward whose audio head is scaled by 1.05 does not (the check can fail)."""
    prompts = [prompt_of(parity_case)] * 2
    clips = preference.sample_clips(tiny, prompts, [0, 1], generation.Sampling(seed=0, max_seconds=1.0))
    preference.training_logprobs(tiny, prompts, clips)
    tolerance = 1e-4  # parity.ParityTolerance.logprob_per_position
    for clip in clips:
        assert clip.positions > 20
        assert abs(clip.sampler_logp - clip.training_logp) <= tolerance * clip.positions
    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        other.audio_decoder_proj.audio_lm_head.weight.mul_(1.05)
    preference.training_logprobs(model_utils.Bundle(other, tiny.tokenizer, tiny.audio_tokenizer), prompts, clips)
    assert all(abs(clip.sampler_logp - clip.training_logp) > tolerance * clip.positions for clip in clips)


def test_clip_owners_are_counted_since_the_package_gives_one_group_location_per_sample(tiny, parity_case):
    prompt = prompt_of(parity_case)
    batch = preference.training_batch(tiny, [prompt, prompt], [parity_case.target_codes[:, :10], parity_case.target_codes[:, :20]])
    assert len(batch.audio_out_ids_start) == 4 and batch.audio_out_ids_start_group_loc.tolist() == [0, 1]  # the bug
    token = tiny.model.config.audio_out_token_idx
    assert preference.clip_owners(batch, token).tolist() == [0, 0, 1, 1]
    owners = preference.column_owners(batch, token)
    assert [preference.target_span(batch, row, token) for row in (0, 1)] == [
        (int(batch.audio_out_ids_start[1]), int(batch.audio_out_ids_start[2])), (int(batch.audio_out_ids_start[3]), len(owners))]


def test_a_reward_is_a_weighted_sum_of_the_terms_a_clip_has_and_pairs_count_ties_and_failures():
    spec = preference.RewardSpec.parse("wer:1,sim:2,mos:0.5")
    english = {"error_rate": 0.25, "sim": 0.5, "mos": 3.0, "stopped": True}
    assert spec.terms(english, None, 1024) == {"wer": -0.25, "sim": 0.5, "mos": 3.0}
    assert spec.total(spec.terms(english, None, 1024)) == pytest.approx(-0.25 + 1.0 + 1.5)
    no_asr = {"error_rate": None, "sim": 0.5, "mos": 3.0}
    counts = preference.CandidateCounts()
    clip = preference.SampledClip(torch.zeros(8, 3), torch.zeros(8, 1, dtype=torch.long), True, 0, torch.zeros(8, 3))
    [(total, terms)] = preference.score_clips([clip], [no_asr], spec, 1024, counts)
    assert terms["wer"] is None and total == pytest.approx(1.0 + 1.5) and counts.excluded_terms == {"wer": 1}
    with pytest.raises(ValueError, match="NAME:WEIGHT"):
        preference.RewardSpec.parse("wer:x")
    for repeated in ("wer:1,cer:1", "sim:1,sim:2"):  # one column counted twice
        with pytest.raises(ValueError, match="given twice"):
            preference.RewardSpec.parse(repeated)
    with pytest.raises(ValueError, match="no column 'pesq'"):
        preference.RewardSpec.parse("pesq:1").terms(english, None, 1024)
    assert preference.choose_pair([0.1, None, 0.7, 0.3]) == (2, 0)
    assert preference.choose_pair([0.5, 0.5, None]) == "tie"
    assert preference.choose_pair([None, 0.5, None]) == "all_failed"


def hand_logp(model, tiny, prompt, codes) -> float:
    """log p of a clip's labelled audio codes, one sample alone, written out from the logits."""
    batch = preference.training_batch(tiny, [prompt], [codes])
    with torch.no_grad():
        outputs = model(**collate.batch_to_model_inputs(batch, "cpu"))
    labels = batch.label_audio_ids[:, 1:]
    logp = F.log_softmax(outputs.audio_logits[:-1].float(), -1)  # (columns - 1, n_q, classes)
    total = 0.0
    for k in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[k, t] != model_utils.IGNORE_INDEX:
                total += float(logp[t, k, labels[k, t]])
    return total


def test_dpo_loss_equals_a_hand_computation_on_two_fixed_pairs_and_its_accuracy_rises(tiny, parity_case):
    settings = config.TrainConfig(device="cpu", precision="fp32", val_manifest=(), lr=1e-3)
    model = trainable.prepare_model(copy.deepcopy(tiny.model), settings, World())
    optimizer = trainable.build_optimizer(model, settings, "cpu")
    prompt, target = prompt_of(parity_case), parity_case.target_codes
    spans = [((0, 20), (20, 35)), ((40, 55), (60, 80))]
    pairs, beta = [], 0.5
    for (c0, c1), (r0, r1) in spans:
        chosen, rejected = target[:, c0:c1], target[:, r0:r1]
        # references set off by hand: the implicit reward starts against the chosen clip (accuracy 0)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "chosen_ref": hand_logp(model, tiny, prompt, chosen) + 0.3,
                      "rejected_ref": hand_logp(model, tiny, prompt, rejected) - 0.3})
    expected = sum(-F.logsigmoid(torch.tensor(beta * ((hand_logp(model, tiny, prompt, p["chosen"]) - p["chosen_ref"])
                                                      - (hand_logp(model, tiny, prompt, p["rejected"]) - p["rejected_ref"]))))
                   for p in pairs) / 2
    dpo = objectives.DPO(model_utils.Bundle(model, tiny.tokenizer, tiny.audio_tokenizer), {}, beta)
    curve = []
    for _ in range(5):
        values = trainable.train_step(model, optimizer, [pairs[:1], pairs[1:]], settings, World(), 1e-3, objective=dpo).read(World())
        curve.append((values.losses["total"], values.panels["dpo/accuracy"], values.panels["dpo/margin"]))
    print("DPO (loss, accuracy, margin) by step:", [tuple(round(v, 4) for v in step) for step in curve])
    assert curve[0][0] == pytest.approx(float(expected), abs=1e-4)
    assert curve[0][1] == 0.0 and curve[-1][1] == 1.0 and curve[-1][2] > curve[0][2] + 0.5


class OneReference:
    """Codes of every reference: the parity case's (a codes source as loader's, by path)."""

    sampling_rate = 24000

    def __init__(self, codes):
        self.codes = codes

    def __call__(self, path):
        return self.codes


def grpo_frames(tiny, parity_case, weight: float, steps: int) -> list[float]:
    """Mean frames of the clips of each GRPO step, rewarded by `weight` x frames."""
    settings = config.TrainConfig(device="cpu", precision="fp32", val_manifest=(), lr=1e-2)
    model = trainable.prepare_model(copy.deepcopy(tiny.model), settings, World())
    optimizer = trainable.build_optimizer(model, settings, "cpu")
    grpo = objectives.GRPO(model_utils.Bundle(model, tiny.tokenizer, tiny.audio_tokenizer),
                           preference.RewardSpec.parse(f"frames:{weight}"), 8, 0, OneReference(parity_case.ref_codes), {},
                           parity_case.layout, 2.0)
    pair = manifest.Pair("p", "ref", parity_case.ref_text, "", parity_case.text)
    frames = []
    for step in range(steps):
        stats = trainable.train_step(model, optimizer, grpo.inputs([_Micro([pair])], step), settings, World(), 1e-2, objective=grpo)
        frames.append(stats.read(World()).panels["grpo/frames"])
    return frames


class _Micro:
    def __init__(self, pairs):
        self.pairs = pairs


def test_grpo_raises_a_reward_the_tiny_model_can_learn_and_lowers_it_with_the_sign_flipped(tiny, parity_case):
    """The clip's length (frames, at most 50 in 2 s), 8 clips of one prompt a step, 7 steps: the mean of the last
    three steps is 5 frames above the first step's with the reward, 5 below with its sign flipped."""
    longer, shorter = grpo_frames(tiny, parity_case, 1.0, 7), grpo_frames(tiny, parity_case, -1.0, 7)
    print("GRPO mean frames by step, frames:1", [round(v, 1) for v in longer], "frames:-1", [round(v, 1) for v in shorter])
    assert longer[0] == shorter[0]  # the same model, the same seeds
    assert sum(longer[-3:]) / 3 >= longer[0] + 5
    assert sum(shorter[-3:]) / 3 <= shorter[0] - 5


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, short_manifest):
    """Candidates and pairs of the short manifest by the tiny model, rewarded by a code-only term (no judge)."""
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    assert infer.main(["--candidates", str(short_manifest), "--k", "3", "--out", str(out), "--model", "tiny",
                       "--max-seconds", "0.4", "--reward", "low_codes:1"]) == 0
    return out


def test_candidates_hold_codes_scores_log_probabilities_and_pairs(pairs_dir):
    report = json.loads((pairs_dir / "report.json").read_text())
    assert report["rows"] == 4 and report["clips"] == 12 and report["pairs"] + report["ties"] + report["all_failed"] == 4
    assert report["parity_worst_per_position"] <= 1e-4
    lines = [json.loads(line) for line in (pairs_dir / "candidates.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(line["terms"]["low_codes"] is not None and line["logp"] < 0 for line in lines)
    pairs, _ = preference.read_pairs(pairs_dir)
    assert len(pairs) == report["pairs"] and all(pair["chosen"].shape[0] == 8 for pair in pairs.values())


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_each_objective_resumes_exactly(tmp_path, short_manifest, pairs_dir, objective):
    """A run of 3 steps with a checkpoint after each; its copy cut back to step 1's checkpoint (as an interruption
    leaves it) and resumed logs what the run logged at steps 2 and 3: data order, optimizer and sampling seeds."""
    flags = ["--objective", objective, "--train-manifest", str(short_manifest), *QUICK_FLAGS, "--batch-size", "1",
             "--max-steps", "3", "--save-every", "1", "--keep-last", "3", "--out-dir", str(tmp_path), "--lr", "1e-2"]
    flags += ["--pairs", str(pairs_dir)] if objective == "dpo" else ["--group", "2", "--reward", "low_codes:1",
                                                                     "--sample-max-seconds", "0.4"]
    assert run_main(*flags, "--run-name", "straight")[0] == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "cut", ignore=shutil.ignore_patterns("export", "step_00000002*",
                                                                                             "step_00000003*"))
    assert run_main(*flags, "--run-name", "cut", "--resume")[0] == 0
    for tag in ("loss/total", "dpo/margin" if objective == "dpo" else "grpo/reward"):
        straight, resumed = logged(tmp_path / "straight", tag), logged(tmp_path / "cut", tag)
        assert sorted(resumed) == [1, 2, 3] and resumed == straight, tag


def test_the_objectives_flags_are_checked_together():
    with pytest.raises(config.ConfigError, match="--objective dpo trains on --pairs"):
        config.parse_config(["--objective", "dpo"])
    with pytest.raises(config.ConfigError, match="--objective dpo trains on --pairs"):
        config.parse_config(["--pairs", "somewhere"])
    with pytest.raises(config.ConfigError, match="--kl-weight with --objective dpo"):
        config.parse_config(["--objective", "dpo", "--pairs", "x", "--kl-weight", "1", "--scope", "lora"])
    # a preference setting another objective would silently ignore is refused
    for flags in (["--reward", "sim:1"], ["--group", "8"], ["--objective", "dpo", "--pairs", "x", "--sample-max-seconds", "2"],
                  ["--objective", "grpo", "--dpo-beta", "0.5"]):
        with pytest.raises(config.ConfigError, match="is a setting of --objective"):
            config.parse_config(flags)
    config.parse_config(["--objective", "grpo", "--group", "8", "--reward", "sim:1"])


def test_candidates_refuse_a_k_under_two_and_an_output_folder_in_use(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    for flags, said in ((["--k", "1", "--out", str(tmp_path / "new")], "--k must be at least 2"),
                        (["--out", str(tmp_path / "used")], "is not an empty directory")):
        assert infer.main(["--candidates", "demo/data/manifest.jsonl", "--model", "tiny", *flags]) == 2
        assert said in capsys.readouterr().err


def test_dpo_refuses_pairs_sampled_by_the_tiny_preset_drawn_from_another_seed():
    """The tiny preset is drawn from --seed: pairs sampled with --seed 0 have another model's references under --seed 1
    (the first step's loss was 1.675, not log 2, with no error)."""
    report = {"manifest": str(config.DEMO_MANIFEST), "model": "tiny", "checkpoint": None, "sampling": {"seed": 0}}
    settings = config.TrainConfig(model="tiny", pairs="pairs", seed=0)
    objectives.DPO.check_source(settings, report)
    with pytest.raises(ValueError, match="train with --seed 0, not 1"):
        objectives.DPO.check_source(replace(settings, seed=1), report)


def test_a_judged_clip_is_flagged_clamped_by_its_stray_codes(tiny, parity_case):
    """`fail_clamped` (a documented reward term, and part of `fail_any`) comes from the clip's stray codes; it was
    never passed to the judge, so the term was None for every clip and excluded from every reward."""
    prompt = preference.Prompt("p", parity_case.ref_text, parity_case.ref_codes, parity_case.text, parity_case.layout,
                               "en", "demo/data/en_male_0.flac")
    clip = preference.sample_clips(tiny, [prompt], [0], generation.Sampling(seed=0, max_seconds=0.4))[0]
    judge = metrics.build_judge()
    for stray, flagged in ((0, False), (3, True)):
        clip.stray = stray
        record = preference.judged_record(judge, prompt, clip, tiny, None)
        assert record["fail_clamped"] is flagged and preference.RewardSpec.parse("fail_clamped:1").terms(
            record, clip.codes, 1024)["fail_clamped"] == (-1.0 if flagged else 0.0)


def test_grpo_refuses_a_reward_that_needs_the_target_clip(tiny):
    """GRPO judges its clips without the row's target: a duration_ratio reward was None for every clip, so every group
    was flat and nothing was learnt (counted, but never said); it is now a one-line error."""
    settings = config.TrainConfig(objective="grpo", reward="sim:1,duration_ratio:1", device="cpu")
    with pytest.raises(ValueError, match="--reward duration_ratio: GRPO scores its clips without"):
        objectives.GRPO.from_config(settings, tiny, [], World())


def test_a_grpo_step_that_trains_no_clip_says_why_once(tiny, parity_case, capsys):
    """Clips of at most one frame all get the same frames reward: every group is flat and nothing is trained. Such a
    run (e.g. --reward wer:1 on Arabic rows without --asr-model) ended with 'final train loss 0.000' and no word."""
    settings = config.TrainConfig(device="cpu", precision="fp32", val_manifest=(), lr=1e-2)
    model = trainable.prepare_model(copy.deepcopy(tiny.model), settings, World())
    optimizer = trainable.build_optimizer(model, settings, "cpu")
    grpo = objectives.GRPO(model_utils.Bundle(model, tiny.tokenizer, tiny.audio_tokenizer),
                           preference.RewardSpec.parse("frames:1"), 2, 0, OneReference(parity_case.ref_codes), {},
                           parity_case.layout, 0.04)
    pair = manifest.Pair("p", "ref", parity_case.ref_text, "", parity_case.text)
    for step in range(2):
        trainable.train_step(model, optimizer, grpo.inputs([_Micro([pair])], step), settings, World(), 1e-2, objective=grpo)
    said = capsys.readouterr().err
    assert said.count("trained no clip") == 1 and "1 group(s) whose rewards were all equal or missing" in said
