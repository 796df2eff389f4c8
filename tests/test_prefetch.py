"""train.Prefetcher: micro-batches built ahead of the step in a thread, in the same order, errors naming the samples."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import manifest
import prepare
import train
from conftest import DEMO_DIR


def demo_manifest(folder, count=6):
    """The demo manifest's first `count` rows (two English speakers), with absolute paths."""
    rows = [json.loads(line) for line in (DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()][:count]
    manifest = folder / "demo.jsonl"
    manifest.write_text("".join(json.dumps(dict(row, audio=str(DEMO_DIR / row["audio"]))) + "\n" for row in rows))
    return manifest


@pytest.fixture(scope="module")
def demo(tiny, tmp_path_factory):
    """Six demo rows, validated and encoded."""
    codes = prepare.EncodedClips(tiny.audio_tokenizer)
    return manifest.validate_manifest(demo_manifest(tmp_path_factory.mktemp("demo")), codes).kept, codes


def take(rows, maker, config, depth, count, position=train.DataPosition()):
    prefetcher = train.Prefetcher(train.micro_batches(rows, config, position, train.Dist(), maker), maker, depth)
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
    config = train.TrainConfig(batch_size=3, batch_tokens=batch_tokens, device="cpu")
    maker = train.SampleMaker(tiny, config, codes)
    count = 14  # over two epochs
    plain, ahead = take(rows, maker, config, 0, count), take(rows, maker, config, 3, count)
    assert [position for position, _, _ in ahead] == [position for position, _, _ in plain]
    assert len({position.epoch for position, _, _ in plain}) >= 2, "the micro-batches cross an epoch boundary"
    assert [pairs for _, pairs, _ in ahead] == [pairs for _, pairs, _ in plain]
    assert all(same_batch(a, b) for (_, _, a), (_, _, b) in zip(ahead, plain))
    # Resuming at a position continues with exactly the micro-batches after it.
    position = plain[4][0]
    assert [pairs for _, pairs, _ in take(rows, maker, config, 2, 5, position)] == [pairs for _, pairs, _ in plain[5:10]]


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_building_a_batch_is_raised_in_the_loop_naming_its_samples(tiny, demo, depth):
    rows, codes = demo
    broken = [dict(row, text="( )") if row["id"] == "en_male_1" else row for row in rows]  # normalises to nothing
    config = train.TrainConfig(batch_size=6, device="cpu")
    maker = train.SampleMaker(tiny, config, codes)
    prefetcher = train.Prefetcher(train.micro_batches(broken, config, train.DataPosition(), train.Dist(), maker), maker, depth)
    with pytest.raises(train.BatchError, match=r"micro-batch of .*en_male_1.*: the text to speak is empty"):
        next(prefetcher)
    prefetcher.close()


def test_a_negative_depth_is_refused_when_the_flags_are_parsed():
    with pytest.raises(train.ConfigError, match="--prefetch must be at least 0, not -1"):
        train.parse_config(["--prefetch", "-1"])


def test_training_with_prefetch_gives_the_same_losses_and_logs_the_data_wait(tmp_path):
    manifest = demo_manifest(tmp_path)
    losses = {}
    for depth in (0, 2):
        run = train.train(train.TrainConfig(train_manifest=str(manifest), val_manifest="", out_dir=str(tmp_path), run_name=f"p{depth}",
                                            device="cpu", precision="fp32", max_steps=3, save_every=100, prefetch=depth))
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        losses[depth] = [event.value for event in events.Scalars("loss/total")]
        waits = [event.value for event in events.Scalars("train/data_wait_fraction")]
        assert len(waits) == 3 and all(0 <= wait < 1 for wait in waits)
    assert losses[0] == losses[2]
