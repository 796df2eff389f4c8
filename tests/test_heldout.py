"""The training loop's held-out sets (heldout.py): their losses and judged clones per named set, best.pt by
--best-by with --patience, and the --guard bounds."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import config
import data
import heldout
import infer
import manifest
import model_utils
import train
from conftest import DEMO_DIR, logged, write_jsonl
from parallel import World


@pytest.fixture(scope="module")
def patient_run(demo_clips, tmp_path_factory):
    """--best-by sim --patience 2 with an evaluation every step on the tiny preset."""
    rows = [demo_clips[row_id] for row_id in ("en_female_0", "en_female_1", "ar_male_0", "ar_male_2")]
    manifest_path = write_jsonl(tmp_path_factory.mktemp("data") / "small.jsonl", rows)
    settings = config.TrainConfig(
        train_manifest=str(manifest_path), val_manifest=str(manifest_path), out_dir=str(tmp_path_factory.mktemp("runs")), run_name="run",
        device="cpu", precision="fp32", batch_size=2, max_steps=8, warmup_steps=2, save_every=100, eval_every=1,
        eval_prompts=2, eval_batch_size=2, eval_max_seconds=0.5, best_by="sim", patience=2,
    )
    return train.train(settings)


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return events


def test_in_loop_evaluation_writes_quality_and_accuracy_scalars_and_a_table(patient_run):
    events = _events(patient_run)
    scalars = set(events.Tags()["scalars"])
    quality = {f"quality/{name}" for name in ("sim", "error_rate", "duration_ratio", "stopped", "lead_silence", "trail_silence",
                                              "target_sim", "target_error_rate", "mos", "target_mos", "fail_runaway",
                                              "fail_silent", "fail_short", "fail_clamped", "fail_any")}
    accuracy = {f"accuracy/codebook_{k}" for k in range(8)} | {"accuracy/all", "accuracy/eos"}
    assert quality <= scalars and accuracy <= scalars
    assert all(0 <= event.value <= 1 for tag in accuracy for event in events.Scalars(tag))
    tables = events.Tensors("quality/table/text_summary")
    assert len(tables) == len(events.Scalars("quality/sim"))
    table = tables[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| id | SIM | WER/CER | MOS") and "en_female_0" in table
    assert table.endswith("judged by speaker encoder resemblyzer, ASR pocketsphinx-en-us, MOS predictor distillmos-0.9.1")
    assert all(1 <= event.value <= 5 for event in events.Scalars("quality/mos"))
    mel = events.Images("mel/en_female_0")  # plots.mel_figure: three stacked panels, 10 x 7.4 inches at 100 dpi
    assert len(mel) == len(tables) and (mel[-1].width, mel[-1].height) == (1000, 740)


def test_best_by_sim_keeps_the_highest_sim_and_patience_stops_with_a_checkpoint_and_the_best_exported(patient_run):
    sims = {event.step: event.value for event in _events(patient_run).Scalars("quality/sim")}
    best_step, best, stale, stop_step = None, -np.inf, 0, None
    for step in sorted(sims):  # the documented rule, replayed on the logged values
        stale = 0 if sims[step] > best else stale + 1
        if sims[step] > best:
            best_step, best = step, sims[step]
        if stale == 2:
            stop_step = step
            break
    assert stop_step is not None and stop_step < 8, sims  # the run stopped early
    assert max(sims) == stop_step
    state = torch.load(patient_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["step"] == best_step and state["best_score"] == pytest.approx(-best)
    stopped = torch.load(patient_run / "checkpoints" / f"step_{stop_step:08d}.pt", map_location="cpu", weights_only=True)
    assert stopped["stale_evals"] == 2, "the patience counter is saved, so --resume does not reset it"
    assert train.LoopState.restored(checkpoints.CheckpointRecord.from_dict(stopped)).best.stale == 2
    exported = model_utils.load_bundle(str(patient_run / "export")).model.state_dict()
    assert all(torch.equal(exported[name], value) for name, value in state["model"].items()), "the export holds best.pt's weights"


def test_export_from_writes_a_checkpoints_export_beside_the_runs(patient_run, capsys):
    best = patient_run / "checkpoints" / "best.pt"
    assert train.main(["--export-from", str(best)]) == 0
    export = patient_run / "export-best"
    assert f"exported {best} to {export}" in capsys.readouterr().out
    weights = torch.load(best, map_location="cpu", weights_only=True)["model"]
    exported = model_utils.load_bundle(str(export)).model.state_dict()
    assert all(torch.equal(exported[name], value) for name, value in weights.items())
    assert data.read_prompt_layout(export) is not None


def test_infer_clones_with_a_checkpoint_exactly_as_with_its_export(patient_run, tmp_path, capsys):
    """The run stopped by --patience exported best.pt's weights, so both commands must write the same clip."""
    best, reference = patient_run / "checkpoints" / "best.pt", str(DEMO_DIR / "en_female_0.flac")
    common = ["--ref-audio", reference, "--ref-text", "ref", "--text", "Hello there.", "--greedy", "--max-seconds", "0.4"]
    assert infer.main(["--checkpoint", str(best), *common, "--out", str(tmp_path / "from_checkpoint.wav")]) == 0
    assert f"from {best}'s training settings" in capsys.readouterr().out
    assert infer.main(["--model", str(patient_run / "export"), *common, "--out", str(tmp_path / "from_export.wav")]) == 0
    from_checkpoint, from_export = (sf.read(tmp_path / f"{name}.wav")[0] for name in ("from_checkpoint", "from_export"))
    assert len(from_checkpoint) > 0 and np.array_equal(from_checkpoint, from_export)
    assert infer.main(["--checkpoint", str(best), "--model", "tiny", *common]) == 2
    assert "leave --model and --audio-tokenizer out" in capsys.readouterr().err


def test_clip_metrics_cannot_choose_checkpoints_where_nothing_is_generated():
    pairs = [manifest.Pair("ar_male_1", "ref.wav", "ref", "target.wav", "text")]

    def one_set(rows, name=None):
        return [heldout.Validation(name, rows, pairs, None)]

    with pytest.raises(ValueError, match="--best-by sim needs generated validation clips, which FSDP does not make"):
        heldout.attach_judges(one_set([]), config.TrainConfig(best_by="sim", parallel="fsdp"), World(0, 2, 0))
    with pytest.raises(ValueError, match="--guard wer@ar<=0.5 needs generated validation clips"):
        heldout.attach_judges(one_set([], "ar"), config.TrainConfig(val_manifest="ar=ar.jsonl", guard=("wer@ar<=0.5",),
                                                                     parallel="fsdp"), World(0, 2, 0))
    with pytest.raises(ValueError, match="no ASR"):
        heldout.attach_judges(one_set([{"id": "ar_male_1", "language": "ar"}]), config.TrainConfig(best_by="wer"), World())
    validations = one_set([{"id": "ar_male_1"}])
    heldout.attach_judges(validations, config.TrainConfig(best_by="wer", eval_language="en"), World())
    [validation] = validations
    assert validation.judge.intelligibility_available(validation.languages["ar_male_1"])


def test_selection_score_orders_each_metric_so_lower_is_better():
    val = {"total": 2.0}
    assert heldout.selection_score("val_loss", val, {}) == 2.0
    assert heldout.selection_score("sim", val, {"sim": 0.8}) < heldout.selection_score("sim", val, {"sim": 0.6})
    assert heldout.selection_score("wer", val, {"error_rate": 0.1}) < heldout.selection_score("wer", val, {"error_rate": 0.3})
    assert heldout.selection_score("sim_wer", val, {"sim": 0.8, "error_rate": 0.2}) == pytest.approx(-0.6)
    assert heldout.selection_score("sim", val, {}) == float("inf")  # unavailable never counts as a new best
    assert heldout.Best(-0.8).value("sim") == 0.8
    assert heldout.selection_score("mos", val, {"mos": 4.1}) < heldout.selection_score("mos", val, {"mos": 3.2})
    assert heldout.Best(-4.1).value("mos") == 4.1 and heldout.selection_score("mos", val, {}) == float("inf")
    assert heldout.metric_value("fail_silent", val, {"fail_silent": 0.25}) == 0.25


# --------------------------------------------------------------------------
# Named validation sets, --best-by METRIC@SET, --guard
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_run(demo_clips, tmp_path_factory):
    """LoRA on Arabic, validated on two named sets (Arabic, English), one clip each per evaluation, best.pt by
    val_loss@ar."""
    folder = tmp_path_factory.mktemp("named")
    arabic = write_jsonl(folder / "ar.jsonl", [demo_clips[row_id] for row_id in ("ar_male_0", "ar_male_2")])
    english = write_jsonl(folder / "en.jsonl", [demo_clips[row_id] for row_id in ("en_female_0", "en_female_1")])
    settings = config.TrainConfig(
        train_manifest=str(arabic), val_manifest=(f"ar={arabic}", f"en={english}"), out_dir=str(folder / "runs"),
        run_name="run", device="cpu", precision="fp32", scope="lora", lora_rank=4, lr=0.05, batch_size=2, max_steps=2,
        warmup_steps=1, save_every=100, eval_every=2, eval_prompts=1, eval_max_seconds=0.3, best_by="val_loss@ar")
    return train.train(settings)


def test_each_validation_set_is_logged_under_its_name_and_best_by_names_the_set(named_run):
    events = EventAccumulator(str(named_run / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("ar", "en"):
        assert {f"val/{name}/total", f"val/{name}/audio", f"val/{name}/kl", f"quality/{name}/sim", f"quality/{name}/mos",
                f"quality/{name}/fail_any"} <= scalars
        assert any(tag.startswith(f"generated/{name}/") for tag in events.Tags()["audio"])
    assert not {"val/total", "quality/sim"} & scalars, "a named set never writes the unnamed panels"
    [arabic], [english] = events.Scalars("val/ar/total"), events.Scalars("val/en/total")
    assert arabic.step == english.step == 2 and arabic.value != english.value
    assert events.Scalars("val/en/kl")[0].value > 0, "LoRA runs log how far each set has moved from the base"
    state = torch.load(named_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["best_score"] == pytest.approx(arabic.value), "val_loss@ar, not en's"


def test_a_breached_guard_vetoes_the_evaluation_and_can_stop_the_run(demo_clips, tmp_path, capsys):
    arabic = write_jsonl(tmp_path / "ar.jsonl", [demo_clips[row_id] for row_id in ("ar_male_0", "ar_male_2")])
    settings = config.TrainConfig(
        train_manifest=str(arabic), val_manifest=f"ar={arabic}", out_dir=str(tmp_path / "runs"), run_name="run",
        device="cpu", precision="fp32", batch_size=2, max_steps=4, warmup_steps=1, save_every=100, eval_every=1,
        eval_prompts=0, guard=("val_loss@ar<=-100",), guard_action="stop")
    run = train.train(settings)
    out = capsys.readouterr().out
    first = logged(run, "val/ar/total")
    assert sorted(first) == [0, 1], "a relative guard's first evaluation is made before the first step"
    assert f"--guard bounds measured from: val_loss@ar<=-100 {first[0]:.4f}" in out
    assert f"step 1: --guard val_loss@ar<=-100 breached: val_loss {first[1]:.4f} > {first[0] - 100:.4f} (first evaluation" in out
    assert "stopped at step 1: a --guard was breached (--guard-action stop); no evaluation gave a score to keep" in out
    assert sorted(path.name for path in (run / "checkpoints").glob("*.pt")) == ["step_00000001.pt"], "a checkpoint, no best.pt"
    assert torch.load(run / "checkpoints" / "step_00000001.pt", weights_only=True)["guard_first"] == {"val_loss@ar<=-100": first[0]}
    assert logged(run, "guard/breaches") == {1: 1.0}


def test_a_run_whose_every_evaluation_was_vetoed_says_its_export_holds_the_last_weights(demo_clips, tmp_path, capsys):
    arabic = write_jsonl(tmp_path / "ar.jsonl", [demo_clips[row_id] for row_id in ("ar_male_0", "ar_male_2")])
    settings = config.TrainConfig(
        train_manifest=str(arabic), val_manifest=f"ar={arabic}", out_dir=str(tmp_path / "runs"), run_name="run",
        device="cpu", precision="fp32", batch_size=2, max_steps=2, warmup_steps=1, save_every=100, eval_every=1,
        eval_prompts=0, guard=("val_loss@ar<=0.001",))
    run = train.train(settings)
    assert "no evaluation gave a score to keep (no best.pt), so the export holds the last weights" in capsys.readouterr().out
    assert not (run / "checkpoints" / "best.pt").exists() and (run / "export").is_dir()


def test_guards_veto_breached_and_unmeasured_evaluations_against_their_first_value():
    rules = config.guard_rules(config.TrainConfig(val_manifest=("vi=v", "en=e"), eval_prompts=1,
                                                  guard=("wer@en<=+0.05", "sim@vi>=0.5")))
    guards = heldout.Guards(rules, action="stop")
    scores = lambda wer, sim: {"en": heldout.Scores({"total": 1.0}, {"error_rate": wer}),  # noqa: E731
                               "vi": heldout.Scores({"total": 1.0}, {"sim": sim})}
    guards.record_first(scores(0.30, 0.9))
    assert guards.first == {"wer@en<=+0.05": 0.30} and not guards.needs_first()
    assert guards.breaches(scores(0.35, 0.9)) == [] and not guards.stop
    assert guards.breaches(scores(float("nan"), 0.9)) == ["--guard wer@en<=+0.05: wer could not be measured, so this evaluation cannot be best"]
    assert not guards.stop, "what cannot be measured vetoes, but does not stop"
    [line] = guards.breaches(scores(0.31, 0.4))
    assert line == "--guard sim@vi>=0.5 breached: sim 0.4000 < 0.5000" and guards.stop
