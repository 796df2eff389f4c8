"""The data a run trains on: micro-batches in a resumable order, built ahead of the step by the prefetch thread in
the same order, errors naming the samples; token-budget micro-batches within their budget; mixtures drawn by
weight, each set through its own epochs, resumable and dealt to processes as one process accumulates them."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import collate
import config
import loader
import manifest
import train
from codes import EncodedClips
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
    codes = EncodedClips(tiny.audio_tokenizer)
    return manifest.check_manifest(demo_manifest(tmp_path_factory.mktemp("demo")), codes).kept, codes


def one_set(rows, builder) -> list[loader.TrainingSet]:
    return [loader.TrainingSet("train", 1.0, "demo.jsonl", rows, builder)]


def take(rows, builder, settings, depth, count, position=loader.DataPosition()):
    prefetcher = loader.Prefetcher(loader.micro_batches(one_set(rows, builder), settings, position, World()), depth)
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
    assert len({micro.position.sets["train"].epoch for micro in plain}) >= 2, "the micro-batches cross an epoch boundary"
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
    prefetcher = loader.Prefetcher(loader.micro_batches(one_set(broken, builder), settings, loader.DataPosition(), World()), depth)
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
    codes = EncodedClips(tiny.audio_tokenizer)
    rows = manifest.check_manifest(small_manifest, codes).kept
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


# Mixtures: a draw by weight, each set through its own epochs, resumable
# --------------------------------------------------------------------------


def synthetic_sets(sizes: dict[str, tuple[int, float]]) -> list[loader.TrainingSet]:
    """Sets of paired rows (no clip is read with --batch-size batches): name -> (rows, weight)."""
    sets = []
    for name, (count, weight) in sizes.items():
        rows = [{"id": f"{name}{i}", "ref_audio": "ref.wav", "ref_text": "r", "audio": f"{name}{i}.wav", "text": "t"}
                for i in range(count)]
        sets.append(loader.TrainingSet(name, weight, f"{name}.jsonl", rows, None))
    return sets


DRAWS = 1000  # the shares are tested over this many micro-batches, within 1/DRAWS (one micro-batch)


def test_a_mixture_draws_each_set_by_its_weight_and_repeats_a_small_set():
    sets = synthetic_sets({"vi": (60, 0.6), "en": (8, 0.3), "zh": (3, 0.1)})
    settings = config.TrainConfig(batch_size=2)
    drawn = list(itertools.islice(loader.micro_batches(sets, settings, loader.DataPosition(), World()), DRAWS))
    counts = {training_set.name: 0 for training_set in sets}
    bound = 1 - 1 / (2 * len(sets) - 2)  # Tijdeman's bound for `loader.next_set`
    for n, micro in enumerate(drawn, start=1):
        counts[micro.set.name] += 1
        assert all(abs(counts[each.name] - n * each.weight) <= bound for each in sets), (n, counts)  # every stretch
    panels = loader.mixture_panels(drawn[-1].position)
    for training_set in sets:
        assert abs(counts[training_set.name] / DRAWS - training_set.weight) <= 1 / DRAWS
        assert panels[f"mixture/{training_set.name}/share"] == counts[training_set.name] / DRAWS
        # each set through its own epochs, of 2 pairs a micro-batch: vi (30 an epoch) has done 20, zh (2) 50
        per_epoch = -(-len(training_set.rows) // 2)
        assert drawn[-1].position.sets[training_set.name].epoch == counts[training_set.name] // per_epoch
        assert all(set(pair.id for pair in micro.pairs) <= {row["id"] for row in training_set.rows}
                   for micro in drawn if micro.set is training_set)
    en = [pair.id for micro in drawn if micro.set.name == "en" for pair in micro.pairs]
    assert sorted(en[:8]) == sorted(en[8:16]) == [f"en{i}" for i in range(8)], "an epoch takes every row once"


def test_one_process_accumulating_sees_what_several_processes_see_and_a_position_resumes_exactly():
    sets = synthetic_sets({"vi": (9, 0.7), "en": (5, 0.3)})
    settings = config.TrainConfig(batch_size=2)
    one = [micro.pairs for micro in itertools.islice(loader.micro_batches(sets, settings, loader.DataPosition(), World()), 40)]
    ranks = [list(itertools.islice(loader.micro_batches(sets, settings, loader.DataPosition(), World(rank, 2, rank)), 20))
             for rank in (0, 1)]
    assert [micro.pairs for pair in zip(*ranks) for micro in pair] == one
    assert ranks[0][-1].position == ranks[1][-1].position, "every process knows where the whole mixture stands"
    middle = ranks[0][6].position  # after 14 draws
    saved = torch.load(_saved(dataclasses.asdict(middle)), weights_only=True)
    resumed = loader.micro_batches(sets, settings, loader.DataPosition.restored(saved), World())
    assert [micro.pairs for micro in itertools.islice(resumed, 26)] == one[14:]


def _saved(position: dict):
    buffer = io.BytesIO()
    torch.save(position, buffer)
    buffer.seek(0)
    return buffer


def test_a_position_saved_before_mixtures_resumes_as_the_lone_set():
    [training_set] = synthetic_sets({"train": (7, 1.0)})
    settings = config.TrainConfig(batch_size=2)
    straight = [micro.pairs for micro in itertools.islice(loader.micro_batches([training_set], settings, loader.DataPosition(), World()), 10)]
    old = loader.DataPosition.restored({"epoch": 1, "index": 2})  # 4 micro-batches an epoch: 6 taken
    assert [micro.pairs for micro in itertools.islice(loader.micro_batches([training_set], settings, old, World()), 4)] == straight[6:]
    with pytest.raises(ValueError, match=r"the data position is of sets \['train'\], this run trains on \['vi'\]"):
        next(loader.micro_batches(synthetic_sets({"vi": (7, 1.0)}), settings, old, World()))


def test_token_budget_micro_batches_are_bucketed_within_each_set_of_a_mixture(tiny, demo):
    rows, codes = demo
    settings = config.TrainConfig(batch_tokens=700, device="cpu")
    builder = loader.BatchBuilder(tiny, settings, codes)
    sets = [loader.TrainingSet(speaker, 0.5, speaker, [row for row in rows if row["speaker"] == speaker], builder)
            for speaker in ("en_male", "en_female")]
    drawn = list(itertools.islice(loader.micro_batches(sets, settings, loader.DataPosition(), World()), 12))
    for micro in drawn:
        at = micro.position.sets[micro.set.name]
        epoch = at.epoch - (at.index == 0)  # the epoch this micro-batch came from
        buckets = loader.epoch_batches(micro.set.rows, settings, epoch, builder)
        assert micro.pairs in buckets, "a micro-batch is one of its own set's token-budget buckets"
        pairs = manifest.training_pairs(micro.set.rows, settings.seed, epoch)[0]
        lengths = dict(zip([pair.id for pair in pairs], builder.lengths(pairs, micro.set.rows)))
        assert collate.padded_tokens([lengths[pair.id] for pair in micro.pairs]) <= 700
    assert {micro.set.name for micro in drawn} == {"en_male", "en_female"} and max(len(micro.pairs) for micro in drawn) > 1
