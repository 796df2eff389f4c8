"""Judging clones (evaluate.py): `infer.py --eval` on a manifest, and the same metrics in the training loop with --best-by/--patience."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoints
import config
import data
import evaluate
import generation
import infer
import manifest
import metrics
import model_utils
import prepare
import train
from conftest import DEMO_DIR, ROOT, logged
from parallel import World


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, dict]:
    """Demo rows whose clips are cut to their first second (to keep encoding and ASR quick), by id."""
    folder = tmp_path_factory.mktemp("clips")
    rows = {}
    for row in map(json.loads, (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()):
        waveform = data.load_audio(DEMO_DIR / row["audio"], 24000)[:24000]
        path = folder / f"{row['id']}.wav"
        sf.write(path, waveform, 24000)
        rows[row["id"]] = {**row, "audio": str(path)}
    return rows


def _write(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def judge() -> metrics.Judge:
    return metrics.build_judge()


# --------------------------------------------------------------------------
# python infer.py --eval
# --------------------------------------------------------------------------


def _rows(out) -> dict[str, dict]:
    with (out / "rows.csv").open(encoding="utf-8") as file:
        return {row["id"]: row for row in csv.DictReader(file)}


def test_eval_writes_wavs_rows_and_summary_and_counts_the_bad_row(clips, tmp_path, capsys, monkeypatch):
    demo = clips
    arabic = {"id": "ar_pair", "ref_audio": demo["ar_male_0"]["audio"], "ref_text": demo["ar_male_0"]["text"],
              "audio": demo["ar_male_1"]["audio"], "text": demo["ar_male_1"]["text"], "language": "ar"}
    missing = {"id": "gone", "audio": str(tmp_path / "nowhere.wav"), "text": "Not here.", "speaker": "en_female", "language": "en"}
    manifest_path = _write(tmp_path / "eval.jsonl", [demo["en_female_0"], missing, demo["en_female_1"], arabic])
    encoded = []
    encode = data.encode_clip
    monkeypatch.setattr(data, "encode_clip", lambda tokenizer, waveform: encoded.append(len(waveform)) or encode(tokenizer, waveform))
    out = tmp_path / "eval"
    assert infer.main(["--eval", str(manifest_path), "--out", str(out), "--model", "tiny", "--max-seconds", "0.5", "--greedy",
                       "--batch-size", "2", "--score-cache", str(tmp_path / "scores")]) == 0

    rows = _rows(out)
    assert sorted(rows) == ["ar_pair", "en_female_0", "en_female_1"]
    assert len(encoded) == 3, "each of the three references encoded once, no target encoded"
    english, arabic_row = rows["en_female_0"], rows["ar_pair"]
    assert english["metric"] == "wer" and float(english["error_rate"]) >= 0 and float(english["target_error_rate"]) >= 0
    assert 0 < float(english["duration_ratio"]) and english["stopped"] in ("True", "False")
    assert -1 <= float(english["sim"]) <= 1 and -1 <= float(english["target_sim"]) <= 1
    assert float(english["wer_seedtts"]) >= 0
    # no ASR for Arabic offline: unavailable, never 0
    assert arabic_row["error_rate"] == "n/a" and arabic_row["target_error_rate"] == "n/a" and arabic_row["transcript"] == "n/a"

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["rows_read"], summary["kept"], summary["rejected"], summary["evaluated"]) == (4, 3, 1, 3)
    assert summary["rejected_by_reason"] == {"missing_audio": 1}
    assert summary["metrics"]["sim"]["n"] == 3 and summary["metrics"]["error_rate"]["n"] == 2
    assert summary["corpus"]["error_rate"]["n"] == 2 and summary["seedtts"]["sim"]["n"] == 3
    assert summary["target_score_cache"] == {"folder": str(tmp_path / "scores"), "hits": 0, "misses": 3}
    low, high = summary["metrics"]["duration_ratio"]["ci95"]
    assert low <= summary["metrics"]["duration_ratio"]["mean"] <= high
    assert len(list((out / "wavs").glob("*.wav"))) == 3
    rejections = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    assert [(r["row"], r["id"], r["reason"]) for r in rejections] == [(2, "gone", "missing_audio")]
    captured = capsys.readouterr()
    assert "rows read 4 = kept 3 + rejected 1 (missing_audio 1)" in captured.out and "Seed-TTS-eval" in captured.out
    assert "1 rows in ar: pocketsphinx-en-us cannot transcribe them" in captured.err


def test_eval_refuses_a_used_output_directory_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "_load", lambda args: pytest.fail("refused before the model loads"))
    assert infer.main(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--out", str(tmp_path / "x.wav")]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    (tmp_path / "used" / "wavs").mkdir(parents=True)
    (tmp_path / "used" / "wavs" / "0000_old.wav").write_bytes(b"RIFF")
    assert infer.main(["--eval", str(DEMO_DIR / "manifest.jsonl"), "--out", str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "is not empty (wavs/): add --resume" in err and "\n" not in err


def test_eval_where_every_row_is_rejected_fails_in_one_line(tmp_path, capsys):
    rows = [{"id": f"r{i}", "ref_audio": str(tmp_path / "none.wav"), "ref_text": "x", "audio": str(tmp_path / "none.wav"),
             "text": "Words."} for i in range(2)]
    listed = _write(tmp_path / "bad.jsonl", rows)
    assert infer.main(["--eval", str(listed), "--out", str(tmp_path / "eval"), "--model", "tiny", "--score-cache", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no row of") and "rejected 2 (missing_audio 2)" in err[-1]
    assert len((tmp_path / "eval" / "rejections.jsonl").read_text().splitlines()) == 2


def test_rows_without_a_language_say_which_flag_gives_them_a_wer(judge, capsys):
    pairs = [manifest.Pair(f"r{i}", "ref.wav", "ref", "target.wav", "text") for i in range(3)]
    evaluate.warn_about_languages(judge, pairs, {"r0": None, "r1": None, "r2": "en"})
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: 2 rows have no language") and "--language" in err and "\n" not in err
    evaluate.warn_about_languages(metrics.Judge(judge.encoder, judge.asr, default_language="en"), pairs, {"r0": None, "r1": None, "r2": "en"})
    assert capsys.readouterr().err == ""


def test_ctrl_c_mid_eval_keeps_the_scored_rows_and_the_printed_command_finishes_the_run(clips, tmp_path):
    rows = [{"id": f"row{i}", "ref_audio": clips["en_female_0"]["audio"], "ref_text": clips["en_female_0"]["text"],
             "audio": clips["en_female_1"]["audio"], "text": clips["en_female_1"]["text"], "language": "en"} for i in range(3)]
    listed, out = _write(tmp_path / "three.jsonl", rows), tmp_path / "eval"
    args = ["--eval", str(listed), "--out", str(out), "--model", "tiny", "--max-seconds", "0.2", "--greedy",
            "--score-cache", str(tmp_path / "scores")]
    process = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (out / "rows.csv").is_file() and len((out / "rows.csv").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert process.returncode == 130 and "Traceback" not in err, err
    scored = len(_rows(out))
    assert 1 <= scored < 3 and last.startswith(f"interrupted: {scored} of 3 rows scored, kept in {out / 'rows.csv'}")
    command = last.split("continue with: ")[1]
    assert command.endswith("--resume")
    kept = _rows(out)
    assert infer.main(shlex.split(command)[2:]) == 0
    finished = _rows(out)
    assert sorted(finished) == [f"row{i}" for i in range(3)]
    assert all(finished[row_id] == kept[row_id] for row_id in kept)  # the rows scored before Ctrl-C are kept as they were
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == 3 and summary["clips_made_this_run"] == 3 - scored
    assert summary["target_score_cache"]["misses"] == 0, "the real target was scored once, in the first run"


def test_eval_reads_a_seedtts_list_and_references_from_a_prepared_cache(clips, tmp_path, monkeypatch, capsys):
    manifest_path = _write(tmp_path / "refs.jsonl", [clips["en_female_0"], clips["en_female_1"]])
    prepare.prepare(str(manifest_path), tmp_path / "cache", model_utils.build_tiny_audio_tokenizer(), None)
    folder = tmp_path / "list"
    folder.mkdir()
    (folder / "meta.lst").write_text(
        f"u1|{clips['en_female_0']['text']}|{clips['en_female_0']['audio']}|{clips['en_female_1']['text']}|{clips['en_female_1']['audio']}\n"
        f"u2|{clips['en_female_1']['text']}|{clips['en_female_1']['audio']}|Something else to say.\n", encoding="utf-8")
    monkeypatch.setattr(data, "encode_clip", lambda *_: pytest.fail("every reference is in the cache"))
    out = tmp_path / "eval"
    assert infer.main(["--eval", str(folder / "meta.lst"), "--out", str(out), "--model", "tiny", "--max-seconds", "0.2",
                       "--greedy", "--language", "en", "--codes-cache", str(tmp_path / "cache"), "--score-cache", ""]) == 0
    rows = _rows(out)
    assert rows["u1"]["target_sim"] != "n/a" and rows["u2"]["target_sim"] == "n/a"  # u2's line names no real recording
    assert rows["u2"]["wer_seedtts"] != "n/a"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seedtts"]["wer"]["n"] == 2 and summary["seedtts"]["target_wer"]["n"] == 1
    assert "references: 2 read from" in capsys.readouterr().out


def test_speaker_rows_are_paired_as_in_training_by_the_seed():
    clips = evaluate.CheckedClips(24000, 8)
    validated, by_zero, _ = evaluate.read_eval_rows(str(DEMO_DIR / "manifest.jsonl"), clips, seed=0)
    _, by_one, _ = evaluate.read_eval_rows(str(DEMO_DIR / "manifest.jsonl"), clips, seed=1)
    assert by_one == manifest.training_pairs(validated.kept, 1, 0)[0]
    assert [pair.ref_audio for pair in by_zero] != [pair.ref_audio for pair in by_one]


def test_clones_are_deterministic_with_a_seed(clips, tiny, judge):
    pair = manifest.Pair("en_female_1", clips["en_female_0"]["audio"], "ref", clips["en_female_1"]["audio"], "Please bring me a cup of tea.")
    codes = prepare.EncodedClips(tiny.audio_tokenizer)
    settings = evaluate.CloneSettings(generation.Sampling(seed=3, max_seconds=0.3), data.PromptLayout())  # sampled, not greedy
    first, second = (list(evaluate.clones_of(tiny, [pair], codes, settings))[0][1] for _ in range(2))
    assert np.array_equal(first.waveform, second.waveform)
    assert evaluate.score_row(judge, pair, "en", first, 24000) == evaluate.score_row(judge, pair, "en", second, 24000)


# --------------------------------------------------------------------------
# In the training loop
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patient_run(clips, tmp_path_factory):
    """--best-by sim --patience 2 with an evaluation every step on the tiny preset."""
    rows = [clips[row_id] for row_id in ("en_female_0", "en_female_1", "ar_male_0", "ar_male_2")]
    manifest_path = _write(tmp_path_factory.mktemp("data") / "small.jsonl", rows)
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
                                              "target_sim", "target_error_rate")}
    accuracy = {f"accuracy/codebook_{k}" for k in range(8)} | {"accuracy/all", "accuracy/eos"}
    assert quality <= scalars and accuracy <= scalars
    assert all(0 <= event.value <= 1 for tag in accuracy for event in events.Scalars(tag))
    tables = events.Tensors("quality/table/text_summary")
    assert len(tables) == len(events.Scalars("quality/sim"))
    table = tables[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| id | SIM") and "en_female_0" in table


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
    assert state["step"] == best_step and state["best_score"] == pytest.approx(-best), "--best-by sim keeps -SIM"
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


def test_clip_metrics_cannot_choose_checkpoints_where_nothing_is_generated(judge):
    pairs = [manifest.Pair("ar_male_1", "ref.wav", "ref", "target.wav", "text")]

    def one_set(rows, name=None):
        return [evaluate.Validation(name, rows, pairs, None)]

    with pytest.raises(ValueError, match="--best-by sim needs generated validation clips, which FSDP does not make"):
        evaluate.attach_judges(one_set([]), config.TrainConfig(best_by="sim", parallel="fsdp"), World(0, 2, 0), "cpu")
    with pytest.raises(ValueError, match="--guard wer@ar<=0.5 needs generated validation clips"):
        evaluate.attach_judges(one_set([], "ar"), config.TrainConfig(val_manifest="ar=ar.jsonl", guard=("wer@ar<=0.5",),
                                                                     parallel="fsdp"), World(0, 2, 0), "cpu")
    with pytest.raises(ValueError, match="no ASR"):
        evaluate.attach_judges(one_set([{"id": "ar_male_1", "language": "ar"}]), config.TrainConfig(best_by="wer"), World(), "cpu")
    validations = one_set([{"id": "ar_male_1"}])
    evaluate.attach_judges(validations, config.TrainConfig(best_by="wer", eval_language="en"), World(), "cpu")
    clones = validations[0].clones
    assert clones.judge.intelligibility_available(clones.languages["ar_male_1"])


def test_selection_score_orders_each_metric_so_lower_is_better():
    val = {"total": 2.0}
    assert evaluate.selection_score("val_loss", val, {}) == 2.0
    assert evaluate.selection_score("sim", val, {"sim": 0.8}) < evaluate.selection_score("sim", val, {"sim": 0.6})
    assert evaluate.selection_score("wer", val, {"error_rate": 0.1}) < evaluate.selection_score("wer", val, {"error_rate": 0.3})
    assert evaluate.selection_score("sim_wer", val, {"sim": 0.8, "error_rate": 0.2}) == pytest.approx(-0.6)
    assert evaluate.selection_score("sim", val, {}) == float("inf")  # unavailable never counts as a new best
    assert evaluate.Best(-0.8).value("sim") == 0.8


# --------------------------------------------------------------------------
# Named validation sets, --best-by METRIC@SET, --guard
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_run(clips, tmp_path_factory):
    """LoRA on Arabic, validated on two named sets (Arabic, English), one clip each per evaluation, best.pt by
    val_loss@ar."""
    folder = tmp_path_factory.mktemp("named")
    arabic = _write(folder / "ar.jsonl", [clips[row_id] for row_id in ("ar_male_0", "ar_male_2")])
    english = _write(folder / "en.jsonl", [clips[row_id] for row_id in ("en_female_0", "en_female_1")])
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
        assert {f"val/{name}/total", f"val/{name}/audio", f"val/{name}/kl", f"quality/{name}/sim"} <= scalars
        assert any(tag.startswith(f"generated/{name}/") for tag in events.Tags()["audio"])
    assert not {"val/total", "quality/sim"} & scalars, "a named set never writes the unnamed panels"
    [arabic], [english] = events.Scalars("val/ar/total"), events.Scalars("val/en/total")
    assert arabic.step == english.step == 2 and arabic.value != english.value
    assert events.Scalars("val/en/kl")[0].value > 0, "LoRA runs log how far each set has moved from the base"
    state = torch.load(named_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["best_score"] == pytest.approx(arabic.value), "val_loss@ar, not en's"


def test_a_breached_guard_vetoes_the_evaluation_and_can_stop_the_run(clips, tmp_path, capsys):
    arabic = _write(tmp_path / "ar.jsonl", [clips[row_id] for row_id in ("ar_male_0", "ar_male_2")])
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


def test_guards_veto_breached_and_unmeasured_evaluations_against_their_first_value():
    rules = config.guard_rules(config.TrainConfig(val_manifest=("vi=v", "en=e"), eval_prompts=1,
                                                  guard=("wer@en<=+0.05", "sim@vi>=0.5")))
    guards = evaluate.Guards(rules, action="stop")
    scores = lambda wer, sim: {"en": evaluate.Scores({"total": 1.0}, {"error_rate": wer}),  # noqa: E731
                               "vi": evaluate.Scores({"total": 1.0}, {"sim": sim})}
    guards.record_first(scores(0.30, 0.9))
    assert guards.first == {"wer@en<=+0.05": 0.30} and not guards.needs_first()
    assert guards.judge(scores(0.35, 0.9)) == [] and not guards.stop
    assert guards.judge(scores(float("nan"), 0.9)) == ["--guard wer@en<=+0.05: wer could not be measured, so this evaluation cannot be best"]
    assert not guards.stop, "what cannot be measured vetoes, but does not stop"
    [line] = guards.judge(scores(0.31, 0.4))
    assert line == "--guard sim@vi>=0.5 breached: sim 0.4000 < 0.5000" and guards.stop
