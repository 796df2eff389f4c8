"""Data benchmark: training samples per second from the prepared cache vs encoding on the fly, and the padding
of token-budget batches with length buckets vs without, on the same data in one run.

    python benchmarks/data_benchmark.py [--epochs 50] [--batch-tokens 8192] [--samples 20000]

Samples/s: the demo manifest (12 clips of 2-4 s) through `data.prepare`, then
epochs of training samples (`training_pairs` + `pair_to_sample`) built from
the cache, and built by encoding on the fly: a fresh `CodeCache` each epoch,
as a data loader that encodes in `__getitem__` does (each clip still encoded
only once per epoch). Both give identical samples, which is checked.

Padding: a synthetic LibriTTS-like length mix (the demo's 12 samples are all
of one length class): per sample two clips of log-normal duration, median
6 s, clipped to 1-20 s, at 25 frames/s plus 9 stream/delay columns, 3.5 text
tokens per second of speech and 30 template tokens. Prints what it measured,
asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import collate  # noqa: E402
import data  # noqa: E402
import model_utils  # noqa: E402

DEMO_MANIFEST = ROOT / "demo" / "data" / "manifest.jsonl"


def epoch_samples(rows: list[dict], codes, tokenizer, epoch: int) -> list:
    pairs, _ = data.training_pairs(rows, seed=0, epoch=epoch)
    return [data.pair_to_sample(pair, tokenizer, codes) for pair in pairs]


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


def benchmark_cache(bundle: model_utils.Bundle, epochs: int) -> None:
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        result = data.prepare(DEMO_MANIFEST, cache, bundle.audio_tokenizer)
        prepare_s = time.perf_counter() - started
        audio_s = sum(row["seconds"] for row in result.validation.kept)
        print(f"prepare: {result.validation.summary()}; {result.encoded} clips, {audio_s:.1f} s of audio, "
              f"encoded in {prepare_s:.1f} s ({audio_s / prepare_s:.1f} s of audio per s)")
        started = time.perf_counter()
        again = data.prepare(DEMO_MANIFEST, cache, bundle.audio_tokenizer)
        print(f"prepare again: {again.encoded} encoded, {again.reused} reused, in {time.perf_counter() - started:.2f} s")

        prepared = data.read_prepared(cache, data.audio_tokenizer_id(bundle.audio_tokenizer))
        cached_rate, cached = samples_per_second(prepared.rows, lambda: prepared.codes, bundle.tokenizer, epochs)
        fly_rate, on_the_fly = samples_per_second(prepared.rows, lambda: data.CodeCache(bundle.audio_tokenizer),
                                                  bundle.tokenizer, 1)
    if not same_samples(cached, on_the_fly):
        raise SystemExit("error: cached and on-the-fly samples differ")
    print(f"samples/s, on the fly (tiny audio tokenizer, CPU): {fly_rate:8.1f}  (1 epoch of {len(on_the_fly)})")
    print(f"samples/s, from the cache:                        {cached_rate:8.1f}  ({epochs} epochs of {len(cached)})")
    print(f"cache speed-up: {cached_rate / fly_rate:.0f}x; samples identical: yes")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50, help="epochs of samples read from the cache [50]")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="token budget per batch [8192]")
    parser.add_argument("--samples", type=int, default=20000, help="samples in the synthetic length mix [20000]")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    benchmark_cache(model_utils.load_bundle(model_utils.TINY_PRESET), args.epochs)
    benchmark_padding(args.samples, args.batch_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
