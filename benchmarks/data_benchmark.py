"""Data benchmark: training samples per second from the prepared cache vs encoding on the fly, the padding
of token-budget batches with length buckets vs without, the time to plan an epoch of token-budget batches for
100k and 1M rows, and the share of a training step spent waiting for data with and without prefetching.

    python benchmarks/data_benchmark.py [--epochs 50] [--batch-tokens 8192] [--samples 20000]
                                        [--plan-rows 100000 1000000] [--steps 40]

Samples/s: the demo manifest (12 clips of 2-4 s) through `prepare.prepare`, then
epochs of training samples (`training_pairs` + `pair_to_sample`) built from
the cache, and built by encoding on the fly: a fresh `EncodedClips` each epoch,
as a data loader that encodes in `__getitem__` does (each clip still encoded
only once per epoch). Both give identical samples, which is checked.

Padding: a synthetic LibriTTS-like length mix (the demo's 12 samples are all
of one length class): per sample two clips of log-normal duration, median
6 s, clipped to 1-20 s, at 25 frames/s plus 9 stream/delay columns, 3.5 text
tokens per second of speech and 30 template tokens.

Planning: `loader.epoch_batches` with --batch-tokens over synthetic rows of
that length mix (speakers of 50 utterances, so each epoch draws new
references), from the frames and text token counts the rows carry; beside
it, the former way (building every sample to measure it) timed on 2,000
pairs and scaled up.

Data wait: the tiny preset trained for --steps steps from the demo cache
with --prefetch 2 and --prefetch 0; the mean of `train/data_wait_fraction`
(seconds the loop waited for its micro-batches / step seconds), steps 2 on.

Prints what it measured, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import collate  # noqa: E402
import loader  # noqa: E402
import manifest  # noqa: E402
import model_utils  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from codes import EncodedClips, audio_tokenizer_id, read_prepared, verify_shard  # noqa: E402
from config import TrainConfig  # noqa: E402

DEMO_MANIFEST = ROOT / "demo" / "data" / "manifest.jsonl"


def epoch_samples(rows: list[dict], codes, tokenizer, epoch: int) -> list:
    pairs, _ = manifest.training_pairs(rows, seed=0, epoch=epoch)
    return [manifest.pair_to_sample(pair, tokenizer, codes) for pair in pairs]


def samples_per_second(rows: list[dict], make_codes, tokenizer, epochs: int) -> tuple[float, list]:
    """Samples/s over `epochs` epochs, `make_codes()` called at the start of each; and epoch 0's samples."""
    built, first = 0, []
    started = time.perf_counter()
    for epoch in range(epochs):
        samples = epoch_samples(rows, make_codes(), tokenizer, epoch)
        first = first or samples
        built += len(samples)
    return built / (time.perf_counter() - started), first


def same_samples(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.audio_ids_concat, y.audio_ids_concat) for x, y in zip(a, b)
    )


def benchmark_cache(bundle: model_utils.Bundle, epochs: int, cache: str) -> None:
    started = time.perf_counter()
    result = prepare.prepare(DEMO_MANIFEST, cache, bundle.audio_tokenizer, bundle.tokenizer)
    prepare_s = time.perf_counter() - started
    audio_s = sum(row["seconds"] for row in result.checked.kept)
    print(f"prepare: {result.checked.summary()}; {result.encoded} clips, {audio_s:.1f} s of audio, "
          f"encoded in {prepare_s:.1f} s ({audio_s / prepare_s:.1f} s of audio per s)")
    started = time.perf_counter()
    again = prepare.prepare(DEMO_MANIFEST, cache, bundle.audio_tokenizer, bundle.tokenizer)
    print(f"prepare again: {again.encoded} encoded, {again.reused} reused, in {time.perf_counter() - started:.2f} s")

    prepared = read_prepared(cache, audio_tokenizer_id(bundle.audio_tokenizer))
    codes = prepared.codes
    print(f"checksums: {codes.verified_shards} shard(s), {codes.verified_bytes / 1e3:.1f} kB, verified in "
          f"{1000 * codes.verify_seconds:.1f} ms")
    cached_rate, cached = samples_per_second(prepared.rows, lambda: prepared.codes, bundle.tokenizer, epochs)
    fly_rate, on_the_fly = samples_per_second(prepared.rows, lambda: EncodedClips(bundle.audio_tokenizer),
                                              bundle.tokenizer, 1)
    if not same_samples(cached, on_the_fly):
        raise SystemExit("error: cached and on-the-fly samples differ")
    print(f"samples/s, on the fly (tiny audio tokenizer, CPU): {fly_rate:8.1f}  (1 epoch of {len(on_the_fly)})")
    print(f"samples/s, from the cache:                        {cached_rate:8.1f}  ({epochs} epochs of {len(cached)})")
    print(f"cache speed-up: {cached_rate / fly_rate:.0f}x; samples identical: yes")


def benchmark_verification(megabytes: int) -> None:
    """Seconds to check shards against their checksums, per GB (a synthetic shard of random codes)."""
    with tempfile.TemporaryDirectory() as folder:
        shards = Path(folder) / "shards"
        shards.mkdir()
        codes = np.random.default_rng(0).integers(0, 1024, size=(8, megabytes * 2**20 // 16), dtype=np.uint16)
        np.save(shards / "big.npy", codes)
        digest = hashlib.sha256((shards / "big.npy").read_bytes()).hexdigest()
        (shards / "big.json").write_text(json.dumps({"codes_sha256": digest, "codes_shape": list(codes.shape), "entries": {}}))
        started = time.perf_counter()
        size = verify_shard(shards / "big.json")
        seconds = time.perf_counter() - started
    print(f"checksums: {size / 1e6:.0f} MB verified in {seconds:.2f} s: {seconds / size * 1e9:.1f} s per GB "
          f"(1M utterances of 6 s are about {1e6 * 6 * 25 * 8 * 2 / 1e9:.1f} GB of codes)")


def length_mix(count: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.5, size=(count, 2)), 1.0, 20.0)
    return [int(30 + sum(25 * s + 9 + 3.5 * s for s in pair)) for pair in seconds]


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    per_batch = [[lengths[i] for i in batch] for batch in batches]
    return 1 - sum(map(sum, per_batch)) / sum(map(collate.padded_tokens, per_batch))


def benchmark_padding(count: int, budget: int) -> None:
    lengths = length_mix(count)
    print(f"padding, {count} samples of {min(lengths)}-{max(lengths)} tokens (median {int(np.median(lengths))}), "
          f"budget {budget} tokens per batch:")
    started = time.perf_counter()
    bucketed = collate.token_budget_batches(lengths, budget, seed=0, epoch=0)
    plan_ms = 1000 * (time.perf_counter() - started)
    unsorted = collate.token_budget_batches(lengths, budget, seed=0, epoch=0, bucket_size=1)
    size = round(len(lengths) / len(bucketed))
    order = np.random.default_rng(0).permutation(len(lengths)).tolist()
    fixed = [order[start : start + size] for start in range(0, len(order), size)]
    for name, batches in (("bucketed (bucket_size 1024)", bucketed), ("random, same token budget", unsorted),
                          (f"random, fixed {size} per batch", fixed)):
        print(f"  {name:30s} {100 * padding(batches, lengths):5.1f}% padding, {len(batches)} batches, "
              f"{len(lengths) / len(batches):.1f} samples per batch")
    print(f"  planning one epoch of {count} samples: {plan_ms:.0f} ms")


class BlankCodes:
    """Codes of the rows' frame counts, all zero: what the former planning needed to build each sample."""

    sampling_rate = 24000

    def __init__(self, rows: list[dict]):
        self.frames = {row["audio"]: row["frames"] for row in rows}

    def __call__(self, path: str) -> torch.Tensor:
        return torch.zeros(8, self.frames[path], dtype=torch.long)


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    """Speaker rows (50 utterances per speaker) of the length mix above, with the counts prepare stores."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.5, size=count), 1.0, 20.0)
    frames, tokens = (25 * seconds).astype(int).tolist(), (3.5 * seconds + 1).astype(int).tolist()
    return [{"id": f"u{i}", "audio": f"/synthetic/{i}.flac", "text": f"utterance {i}", "speaker": f"s{i // 50}",
             "frames": frames[i], "text_tokens": tokens[i], "transcript_tokens": tokens[i]} for i in range(count)]


def benchmark_planning(bundle: model_utils.Bundle, counts: list[int], budget: int) -> None:
    config = TrainConfig(batch_tokens=budget, device="cpu")
    maker = loader.BatchBuilder(bundle, config, codes=None)
    print(f"planning an epoch of token-budget batches ({budget} tokens), from the rows' stored lengths:")
    for count in counts:
        rows = synthetic_rows(count)
        started = time.perf_counter()
        batches = loader.epoch_batches(rows, config, 1, maker)
        seconds = time.perf_counter() - started
        print(f"  {count:>9,} rows: {seconds:6.2f} s  ({len(batches):,} batches)")
        del rows, batches
    rows = synthetic_rows(2000)
    pairs, _ = manifest.training_pairs(rows, config.seed, 1)
    builder = loader.BatchBuilder(bundle, config, BlankCodes(rows))
    started = time.perf_counter()
    [collate.sample_tokens(sample, 8) for sample in builder.samples(pairs)]
    per_sample = (time.perf_counter() - started) / len(pairs)
    print(f"  building every sample instead (the former planning): {1000 * per_sample:.2f} ms per sample, "
          + ", ".join(f"{count * per_sample:,.0f} s for {count:,}" for count in counts))


def benchmark_data_wait(cache: str, steps: int) -> None:
    """Mean train/data_wait_fraction and tokens/s of a short tiny-preset run from the cache, prefetch on and off."""
    print(f"data wait, tiny preset from the demo cache, {steps} steps of 4 samples (steps 2 on):")
    for depth in (2, 0):
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(cache=cache, val_manifest="", out_dir=out, run_name="run", device="cpu",
                                       precision="fp32", max_steps=steps, save_every=10**6, batch_size=4, prefetch=depth)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run = train.train(config)
            events = EventAccumulator(str(run / "tensorboard"))
            events.Reload()
            wait = np.mean([event.value for event in events.Scalars("train/data_wait_fraction")][1:])
            tokens = np.mean([event.value for event in events.Scalars("train/tokens_per_s")][1:])
        print(f"  --prefetch {depth}: {100 * wait:5.2f}% of the step waiting for data, {tokens:,.0f} tokens/s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50, help="epochs of samples read from the cache [50]")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="token budget per batch [8192]")
    parser.add_argument("--samples", type=int, default=20000, help="samples in the synthetic length mix [20000]")
    parser.add_argument("--plan-rows", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="synthetic rows whose epoch is planned [100000 1000000]")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the data-wait runs [40]")
    parser.add_argument("--verify-mb", type=int, default=256, help="MB of shard codes checked against their checksum [256]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bundle = model_utils.load_bundle(model_utils.TINY_PRESET)
    with tempfile.TemporaryDirectory() as cache:
        benchmark_cache(bundle, args.epochs, cache)
        benchmark_data_wait(cache, args.steps)
    benchmark_verification(args.verify_mb)
    benchmark_padding(args.samples, args.batch_tokens)
    benchmark_planning(bundle, args.plan_rows, args.batch_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
