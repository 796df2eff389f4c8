"""The data a run trains on: micro-batches in a resumable order, built ahead of the step by the prefetch thread in
the same order, errors naming the samples; token-budget micro-batches within their budget."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import collate
import config
import loader
import manifest
import prepare
import train
from conftest import DEMO_DIR, train_config
from parallel import World


def demo_manifest(folder, count=6):
    """The demo manifest's first `count` rows (two English speakers), with absolute paths."""
    rows = [json.loads(line) for line in (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()][:count]
    path = folder / "demo.jsonl"
    path.write_text("".join(json.dumps(dict(row, audio=str(DEMO_DIR / row["audio"]))) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def demo(tiny, tmp_path_factory):
    """Six demo rows, validated and encoded."""
    codes = prepare.EncodedClips(tiny.audio_tokenizer)
    return manifest.validate_manifest(demo_manifest(tmp_path_factory.mktemp("demo")), codes).kept, codes


def take(rows, builder, settings, depth, count, position=loader.DataPosition()):
    prefetcher = loader.Prefetcher(loader.micro_batches(rows, settings, position, World(), builder), builder, depth)
    items = [next(prefetcher) for _ in range(count)]
    prefetcher.close()
    return items


def same_batch(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(vars(a).values(), vars(b).values()))


@pytest.mark.parametrize("batch_tokens", [0, 700], ids=["batch-size", "batch-tokens"])
def test_prefetched_micro_batches_are_the_plain_ones_in_the_same_order(tiny, demo, batch_tokens):
    rows, codes = demo
    manifest.add_text_token_counts(rows, tiny.tokenizer)
    settings = config.TrainConfig(batch_size=3, batch_tokens=batch_tokens, device="cpu")
    builder = loader.BatchBuilder(tiny, settings, codes)
    count = 14  # over two epochs
    plain, ahead = take(rows, builder, settings, 0, count), take(rows, builder, settings, 3, count)
    assert [micro.position for micro in ahead] == [micro.position for micro in plain]
    assert len({micro.position.epoch for micro in plain}) >= 2, "the micro-batches cross an epoch boundary"
    assert [micro.pairs for micro in ahead] == [micro.pairs for micro in plain]
    assert all(same_batch(a.batch, b.batch) for a, b in zip(ahead, plain))
    # Resuming at a position continues with exactly the micro-batches after it.
    position = plain[4].position
    assert [micro.pairs for micro in take(rows, builder, settings, 2, 5, position)] == [micro.pairs for micro in plain[5:10]]


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_building_a_batch_is_raised_in_the_loop_naming_its_samples(tiny, demo, depth):
    rows, codes = demo
    broken = [dict(row, text="( )") if row["id"] == "en_male_1" else row for row in rows]  # normalises to nothing
    settings = config.TrainConfig(batch_size=6, device="cpu")
    builder = loader.BatchBuilder(tiny, settings, codes)
    prefetcher = loader.Prefetcher(loader.micro_batches(broken, settings, loader.DataPosition(), World(), builder), builder, depth)
    with pytest.raises(loader.BatchError, match=r"micro-batch of .*en_male_1.*: the text to speak is empty"):
        next(prefetcher)
    prefetcher.close()


def test_training_with_prefetch_gives_the_same_losses_and_logs_the_data_wait(tmp_path):
    manifest_path = demo_manifest(tmp_path)
    losses = {}
    for depth in (0, 2):
        run = train.train(config.TrainConfig(train_manifest=str(manifest_path), val_manifest="", out_dir=str(tmp_path), run_name=f"p{depth}",
                                            device="cpu", precision="fp32", max_steps=3, save_every=100, prefetch=depth))
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        losses[depth] = [event.value for event in events.Scalars("loss/total")]
        waits = [event.value for event in events.Scalars("train/data_wait_fraction")]
        assert len(waits) == 3 and all(0 <= wait < 1 for wait in waits)
    assert losses[0] == losses[2]


def test_token_budget_micro_batches_stay_within_the_budget(tmp_path, small_manifest, tiny):
    settings = train_config(tmp_path, small_manifest, batch_tokens=500)
    codes = prepare.EncodedClips(tiny.audio_tokenizer)
    rows = manifest.validate_manifest(small_manifest, codes).kept
    maker = loader.BatchBuilder(tiny, settings, codes)
    batches = loader.epoch_batches(rows, settings, 0, maker)
    assert sum(len(pairs) for pairs in batches) == len(rows) and max(len(pairs) for pairs in batches) > 1
    with torch.no_grad():
        for pairs in batches:
            outputs = tiny.model(**collate.batch_to_model_inputs(maker.batch(pairs), "cpu"))
            assert outputs.attention_mask.numel() <= 500


# --------------------------------------------------------------------------
# Train/val overlap (issue 18 #9)
# --------------------------------------------------------------------------


def test_training_reports_train_val_overlap_and_strict_overlap_refuses_it(tmp_path):
    from conftest import error_lines, run_main

    both = demo_manifest(tmp_path, count=2)
    flags = ["--train-manifest", str(both), "--val-manifest", str(both), "--out-dir", str(tmp_path / "runs"),
             "--device", "cpu", "--precision", "fp32", "--eval-every", "0"]
    status, out, _ = run_main(*flags, "--inspect")
    assert status == 0
    assert ("data: train/val overlap: 1 speaker(s) (en_male) and 2 validation row(s) whose clip is a training clip "
            "(en_male_0, en_male_1): validation scores are inflated") in out
    status, _, err = run_main(*flags, "--strict-overlap", "--run-name", "strict")
    assert status == 2 and len(error_lines(err)) == 1
    assert "--strict-overlap refuses it" in error_lines(err)[0]
