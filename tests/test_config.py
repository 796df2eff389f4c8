"""Training settings: one declaration each, from which the flags, the `--config` reader, the checks and the
resume rules come; every bad flag or file is one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import asdict

import pytest

import config
import model_utils
from conftest import QUICK_FLAGS, ROOT, error_lines, run_main


@pytest.mark.parametrize("flag, value, message", [
    ("--save-every", "0", "--save-every must be at least 1, not 0"),
    ("--log-every", "0", "--log-every must be at least 1, not 0"),
    ("--grad-accum", "0", "--grad-accum must be at least 1, not 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
    ("--batch-size", "-2", "--batch-size must be at least 1, not -2"),
    ("--batch-tokens", "-1", "--batch-tokens must be at least 0, not -1"),
    ("--max-steps", "0", "--max-steps must be at least 1, not 0"),
    ("--epochs", "-1", "--epochs must be at least 0, not -1.0"),
    ("--lr", "0", "--lr must be positive, not 0.0"),
    ("--lr", "nan", "--lr must be positive, not nan"),
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0, not -1"),
    ("--keep-last", "-1", "--keep-last must be at least 1, not -1"),
    ("--keep-last", "0", "--keep-last must be at least 1, not 0"),
    ("--eval-every", "-5", "--eval-every must be at least 0, not -5"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must be in [0, 1], not 2.0"),
    ("--lora-dropout", "1", "--lora-dropout must be in [0, 1), not 1.0"),
    ("--seed", "-1", "--seed must be in [0, 4294967295], not -1"),
    ("--batch-size", "two", "argument --batch-size: invalid int value: 'two' (see --help)"),
])
def test_every_numeric_flag_is_checked_at_parse_time(tmp_path, flag, value, message):
    status, out, err = run_main("--out-dir", str(tmp_path), *QUICK_FLAGS, flag, value)
    assert status == 2 and error_lines(err) == [f"error: {message}"] and not out
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_every_numeric_field_has_a_limit():
    numeric = {name for name, value in asdict(config.TrainConfig()).items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numeric == {name for name, declared in config.DECLARED.items() if declared["limit"] is not None}


def test_eval_every_zero_means_never_and_is_valid():
    assert config.parse_config(["--eval-every", "0"]).eval_every == 0


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "No such file or directory"),
    ("bad.json", '{"lr": 0.001,}', "invalid JSON at line 1"),
    ("bad.yaml", "lr: [0.001\nseed: 2\n", "invalid YAML at line 2"),
    ("unknown.yaml", "lr: 0.001\nbatchsize: 4\n", "unknown keys ['batchsize']"),
    ("type.json", '{"batch_size": "4"}', "batch_size must be int, not '4'"),
    ("bool.json", '{"max_steps": true}', "max_steps must be int, not True"),
    ("list.yaml", "- lr\n", "expected a mapping of field names to values, not list"),
    ("range.json", '{"save_every": 0}', "--save-every must be at least 1, not 0"),
])
def test_config_file_problems_are_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    status, _, err = run_main("--config", str(path), "--out-dir", str(tmp_path / "runs"), *QUICK_FLAGS)
    assert status == 2
    [line] = error_lines(err)
    assert message in line and (name in line or name == "range.json")


def test_config_file_values_apply_and_flags_override_them(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lr: 1\nbatch_size: 3\nrun_name: null\n")
    parsed = config.parse_config(["--config", str(path), "--batch-size", "4"])
    assert (parsed.lr, parsed.batch_size, parsed.run_name) == (1, 4, None)


def test_a_negative_depth_is_refused_when_the_flags_are_parsed():
    with pytest.raises(config.ConfigError, match="--prefetch must be at least 0, not -1"):
        config.parse_config(["--prefetch", "-1"])


@pytest.mark.parametrize("flags, message", [
    (["--best-by", "loss"], "--best-by must be one of val_loss, sim, wer, sim_wer, mos, not loss"),
    (["--patience", "-1"], "--patience must be at least 0, not -1"),
    (["--best-by", "sim", "--val-manifest", ""], "evaluations: set --val-manifest"),
    (["--patience", "3", "--eval-every", "0"], "evaluations: set --val-manifest"),
    (["--best-by", "wer", "--eval-prompts", "0"], "--eval-prompts to 1 or more"),
])
def test_bad_selection_flags_are_one_line_errors(flags, message):
    with pytest.raises(config.ConfigError) as error:
        config.parse_config(flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_setting_is_declared_once_with_help_a_resume_rule_and_valid_defaults(capsys):
    for name, declared in config.DECLARED.items():
        assert declared["help"].strip(), name
        assert isinstance(declared["resume"], bool) or callable(declared["resume"]), name
        if declared["choices"]:
            assert config.DEFAULTS[name] in declared["choices"], name
    config.check_config(config.TrainConfig())  # the defaults pass their own checks
    with pytest.raises(SystemExit):
        config.parse_config(["--help"])
    shown = capsys.readouterr().out
    assert all(config.flag(name) in shown for name in config.DECLARED)
    assert "--no-verify-cache" in shown and "[on]" in shown
    assert "auto: cuda where a GPU is visible, else cpu [auto]" in " ".join(shown.split())


def test_the_settings_import_no_model_code_and_no_torch():
    """So that `train.py --help` answers at once, and no default depends on the machine it runs on."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, config; print(sorted({'torch', 'model_utils'} & set(sys.modules)))"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    assert config.DEFAULTS["model"] == model_utils.TINY_PRESET


def test_auto_settles_to_the_machines_device_and_precision_and_a_given_value_stays():
    assert (config.DEFAULTS["device"], config.DEFAULTS["precision"]) == ("auto", "auto")
    gpu, cpu = (config.settle_auto(config.TrainConfig(), cuda) for cuda in (True, False))
    assert (gpu.device, gpu.precision, cpu.device, cpu.precision) == ("cuda", "bf16", "cpu", "fp32")
    given = config.TrainConfig(device="cuda:1", precision="fp32")
    assert config.settle_auto(given, True) == given == config.settle_auto(given, False)


def test_a_parsed_config_is_never_written_to():
    parsed = config.parse_config(["--epochs", "2"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.max_steps = 7


def test_resume_rules_come_from_the_declarations(tmp_path):
    saved = asdict(config.TrainConfig(max_steps=8, epochs=2.0))
    checkpoint = tmp_path / "step_00000003.pt"
    config.check_resume(saved, config.TrainConfig(epochs=2.0, save_every=5, device="cpu"), checkpoint)  # --epochs sets the length
    with pytest.raises(ValueError, match=r"--max-steps 8 \(now 60\)"):
        config.check_resume(saved, config.TrainConfig(), checkpoint)
    with pytest.raises(ValueError, match=r"--scope 'full' \(now 'lora'\), --lr 0.003 \(now 0.1\)"):
        config.check_resume(saved, config.TrainConfig(max_steps=8, epochs=2.0, lr=0.1, scope="lora"), checkpoint)
    with pytest.raises(ValueError, match=r"--optimizer 'adamw' \(now 'adamw8bit'\)"):
        config.check_resume(saved, config.TrainConfig(max_steps=8, epochs=2.0, optimizer="adamw8bit"), checkpoint)
    faster = config.TrainConfig(max_steps=8, epochs=2.0, compile=True, compile_scope="model", debug_checks=True)
    config.check_resume(saved, faster, checkpoint)  # how the step computes may change
    older = {name: value for name, value in saved.items() if name != "prefetch"}  # a setting added since
    assert config.config_changes(older, config.TrainConfig(max_steps=8, epochs=2.0)) == {}


# --------------------------------------------------------------------------
# Repeatable settings: training mixtures, named validation sets, guards
# --------------------------------------------------------------------------


def test_a_set_is_a_path_or_a_named_weighted_path_and_a_colon_stays_in_a_path(tmp_path, monkeypatch):
    parse = config.parse_set
    assert parse("data:v2/vi.jsonl", "--train-manifest") == config.SetSpec(None, None, "data:v2/vi.jsonl")
    assert parse("runs/a=b.jsonl", "--train-manifest") == config.SetSpec(None, None, "runs/a=b.jsonl")
    assert parse("vi:0.8=data/vi:2.jsonl", "--train-manifest") == config.SetSpec("vi", 0.8, "data/vi:2.jsonl")
    assert parse("en=caches/en", "--cache") == config.SetSpec("en", None, "caches/en")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a=b.jsonl").write_text("")
    with pytest.raises(config.ConfigError, match=r"a=b.jsonl: a file of that name exists.*write ./a=b.jsonl for the file"):
        parse("a=b.jsonl", "--train-manifest")
    assert parse("./a=b.jsonl", "--train-manifest").path == "./a=b.jsonl"


def test_a_mixture_normalises_its_weights_and_the_single_spellings_work_as_before(tmp_path):
    mixed = config.parse_config(["--train-manifest", "vi:3=vi.jsonl", "--train-manifest", "en:1=en.jsonl",
                                 "--val-manifest", "vi=vi_val.jsonl", "--val-manifest", "en=en_val.jsonl"])
    assert [(spec.name, spec.weight) for spec in config.training_specs(mixed)] == [("vi", 0.75), ("en", 0.25)]
    assert [spec.name for spec in config.validation_specs(mixed)] == ["vi", "en"]
    single = config.parse_config(["--train-manifest", "m.jsonl", "--val-manifest", ""])
    assert (single.train_manifest, single.val_manifest, single.cache) == (("m.jsonl",), (), ())
    assert config.training_specs(single) == [config.SetSpec("train", 1.0, "m.jsonl")]
    assert config.validation_specs(config.TrainConfig(val_manifest="v.jsonl")) == [config.SetSpec(None, None, "v.jsonl")]
    assert config.training_specs(config.TrainConfig(cache="cache/train"))[0].path == "cache/train", "--cache wins, as before"
    for parsed in (mixed, single):  # the command a stopped run prints gives its config back
        assert config.parse_config(config.as_flags(parsed)) == parsed
    path = tmp_path / "mixture.yaml"
    path.write_text("train_manifest: [vi:0.8=vi.jsonl, en:0.2=en.jsonl]\nval_manifest: ''\ncache: ''\n")
    assert config.parse_config(["--config", str(path)]).train_manifest == ("vi:0.8=vi.jsonl", "en:0.2=en.jsonl")
    assert config.parse_config(["--config", str(path), "--train-manifest", "x.jsonl"]).train_manifest == ("x.jsonl",)
    path.write_text("val_manifest: [1, 2]\n")
    with pytest.raises(config.ConfigError, match="val_manifest must be a string or a list of strings, not"):
        config.parse_config(["--config", str(path)])


def test_a_checkpoint_whose_config_holds_strings_resumes(tmp_path):
    """Before mixtures, train_manifest, val_manifest and cache were strings ('' = none)."""
    manifest_path = tmp_path / "m.jsonl"
    manifest_path.write_text("")
    old = {**asdict(config.TrainConfig()), "train_manifest": str(manifest_path), "val_manifest": "", "cache": ""}
    now = config.TrainConfig(train_manifest=str(tmp_path / "." / "m.jsonl"), val_manifest="")
    assert config.config_changes(old, now) == {}
    config.check_resume(old, now, tmp_path / "step_00000002.pt")
    with pytest.raises(ValueError, match=r"--train-manifest \(.*\) \(now \('vi:1=.*', 'en:1=x'\)\)"):
        config.check_resume(old, config.TrainConfig(train_manifest=(f"vi:1={manifest_path}", "en:1=x"), val_manifest=""),
                            tmp_path / "step_00000002.pt")


@pytest.mark.parametrize("flags, message", [
    (["--train-manifest", "a.jsonl", "--train-manifest", "b.jsonl"], "a mixture names each set and its weight, NAME:WEIGHT=PATH"),
    (["--train-manifest", "vi:0=a.jsonl"], "vi:0=a.jsonl: the weight after ':' must be a positive number, not '0'"),
    (["--train-manifest", "vi:1=a", "--train-manifest", "vi:1=b"], "--train-manifest: each set needs its own name"),
    # issue 25 item 11: weights that each parse but whose sum overflows, or whose share is lost beside the others'
    (["--train-manifest", "vi:1e308=a", "--train-manifest", "en:1e308=b"],
     "--train-manifest: the weights 1e+308, 1e+308 add up to more than a float holds: give them smaller, e.g. vi:0.8=PATH"),
    (["--train-manifest", "vi:1e-300=a", "--train-manifest", "en:1e300=b"],
     "--train-manifest: the weight of vi, 1e-300, is lost beside the others' (its share rounds to 0)"),
    (["--train-manifest", ""], "--train-manifest: give a training set"),
    (["--val-manifest", "en:0.5=e.jsonl"], "a validation set has no weight: NAME=PATH"),
    (["--val-manifest", "a.jsonl", "--val-manifest", "b.jsonl"], "name each of several validation sets, NAME=PATH"),
    (["--val-manifest", "", "--val-manifest", "b.jsonl"], "--val-manifest '' (none) cannot be given with other sets"),
    (["--train-manifest", "vi:1=a", "--train-manifest", "en:1=b", "--epochs", "2"], "--epochs is ambiguous for a mixture"),
    (["--best-by", "sim@vi", "--eval-prompts", "1"], "--best-by sim@vi: no validation set named vi"),
    (["--guard", "wer@en<0.3"], "--guard wer@en<0.3: expected METRIC@SET<=+X"),
    (["--guard", "loss<=1"], "--guard loss<=1: the metric must be one of val_loss, sim, wer, sim_wer, mos, kl, fail_runaway, "
                             "fail_silent, fail_short, fail_clamped, fail_any"),
    (["--best-by", "fail_any"], "--best-by must be one of val_loss, sim, wer, sim_wer, mos, not fail_any"),
    (["--guard", "fail_silent<=0.1", "--eval-prompts", "0"], "--best-by or --guard fail_silent measures generated clips"),
    (["--guard", "val_loss<=+1", "--eval-every", "0"], "--guard val_loss<=+1 needs evaluations"),
    (["--guard", "kl<=0.1"], "--guard kl measures KL to the base, which only LoRA has"),
    (["--scope", "lora", "--kl-replay", "en"], "--kl-replay names where the --kl-weight term is taken: set --kl-weight"),
    (["--scope", "lora", "--kl-weight", "1", "--kl-replay", "en"], "--kl-replay en: no training set of that name (sets: train)"),
    (["--scope", "lora", "--kl-weight", "1", "--train-manifest", "vi:1=a", "--train-manifest", "en:1=b", "--kl-replay", "en",
      "--parallel", "fsdp"], "--kl-replay with --parallel fsdp"),
    (["--kl-weight", "-1", "--scope", "lora"], "--kl-weight must be at least 0, not -1.0"),
])
def test_bad_mixture_validation_and_guard_flags_are_one_line_errors(flags, message):
    with pytest.raises(config.ConfigError) as error:
        config.parse_config(flags)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("scope", ["audio", "full"])
def test_kl_weight_is_refused_where_no_disabled_adapter_base_exists(tmp_path, scope):
    status, out, err = run_main("--out-dir", str(tmp_path), *QUICK_FLAGS, "--scope", scope, "--kl-weight", "0.1")
    [line] = error_lines(err)
    assert status == 2 and not out and not any(tmp_path.iterdir())
    assert line.startswith(f"error: --kl-weight needs --scope lora: its base is the model with the adapters disabled, and --scope {scope}")
    assert "mix the old kind of data back in instead, e.g. --train-manifest new:0.8=new.jsonl --train-manifest old:0.2=old.jsonl" in line


def test_best_by_and_guards_name_a_validation_set_or_take_the_first():
    named = ["--val-manifest", "vi=vi.jsonl", "--val-manifest", "en=en.jsonl", "--eval-prompts", "1"]
    assert config.selection(config.parse_config(named + ["--best-by", "sim@en"])) == ("sim", "en")
    assert config.selection(config.parse_config(named)) == ("val_loss", "vi")
    assert config.selection(config.TrainConfig()) == ("val_loss", None), "a lone unnamed set"
    rules = config.guard_rules(config.parse_config(named + ["--guard", "wer@en<=+0.05", "--guard", "sim>=0.6"]))
    assert [(rule.metric, rule.set_name, rule.upper, rule.bound, rule.relative) for rule in rules] == [
        ("wer", "en", True, 0.05, True), ("sim", "vi", False, 0.6, False)]
    assert rules[0].breached(0.36, first=0.3) and not rules[0].breached(0.35, first=0.3)
    assert rules[1].breached(0.59, first=None) and not rules[1].breached(0.6, first=None)
    assert config.selection(config.parse_config(named + ["--best-by", "mos@en"])) == ("mos", "en")
    rules = config.guard_rules(config.parse_config(named + ["--guard", "fail_any@en<=0.1", "--guard", "mos>=-0.2"]))
    assert [(rule.metric, rule.set_name, rule.relative) for rule in rules] == [("fail_any", "en", False), ("mos", "vi", True)]
