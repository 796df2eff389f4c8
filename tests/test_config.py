"""Training settings: one declaration each, from which the flags, the `--config` reader, the checks and the
resume rules come; every bad flag or file is one line."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import pytest

import config
from conftest import QUICK_FLAGS, error_lines, run_main





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
    (["--best-by", "loss"], "--best-by must be one of val_loss, sim, wer, sim_wer, not loss"),
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
