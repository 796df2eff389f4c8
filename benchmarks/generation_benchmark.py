"""Clips per second of generation for batch sizes 1, 4 and 8, on the tiny preset and the released width.

    python benchmarks/generation_benchmark.py                     # both models, B = 1, 4, 8
    python benchmarks/generation_benchmark.py --models tiny --clips 16 --seconds 2 [--voice-prompts DIR]

Each model clones the same `--clips` prompts (references of 1 to 2 s of random
codes, the texts of the shared voice prompts, ../shared/data/voice_prompts) greedily, `--seconds` of
audio at most, in batches of B: B = 1 runs the package's `generate` (what
`--batch-size 1` runs) and, for the overhead of our loop, `generate_batch`
with one row; B > 1 runs `generate_batch`. The package's `generate` also
runs with the serve engine's static KV-cache buckets (no CUDA graphs on the
CPU), for `--kv-cache`'s choice. Generation only: the audio
tokenizer's decoding is not timed. Weights are random, so streams mostly run
to the limit; frames/s is printed beside clips/s. The released width is
bosonai/higgs-audio-v2-generation-3B-base's layout (width 3072, 24/8 heads,
FFN 8192, audio FFN on every layer, 8 codebooks, a 128,256-token text head)
cut to `--layers` decoder layers, fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from boson_multimodal.model.higgs_audio import HiggsAudioModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batched_generation  # noqa: E402
import collate  # noqa: E402
import data  # noqa: E402
import generation  # noqa: E402
import memory_plan  # noqa: E402
import model_utils  # noqa: E402
import voice_prompts  # noqa: E402


def build(model: str, layers: int) -> model_utils.Bundle:
    tokenizer = model_utils.build_tiny_text_tokenizer()
    if model == "tiny":
        return model_utils.Bundle(model_utils.build_tiny_model(tokenizer), tokenizer, None)
    config = model_utils.tiny_model_config(tokenizer, dims=memory_plan.released_dims(layers))
    config.text_config.vocab_size = memory_plan.RELEASED_VOCAB  # the released text head; the tiny tokenizer's ids lie below it
    torch.manual_seed(0)
    return model_utils.Bundle(HiggsAudioModel(config).eval(), tokenizer, None)


def prompts(bundle: model_utils.Bundle, count: int, texts: list[str]) -> list:
    generator = torch.Generator().manual_seed(0)
    made = []
    for index in range(count):
        frames = 25 + (index * 13) % 26  # 1 to 2 s
        codes = torch.randint(0, 1024, (8, frames), generator=generator)
        made.append(data.build_sample(bundle.tokenizer, "A reference transcript.", codes, texts[index % len(texts)]))
    return made


def package_generate(bundle: model_utils.Bundle, samples: list, sampling: generation.Sampling, kv_cache=None) -> int:
    config = bundle.model.config
    collator = collate.build_collator(config)
    frames = 0
    # <|eot_id|> forced once the stream ends stops `generate` where our loop stops a row (a random model would go on
    # in text, and the released-width head draws ids beyond the tiny tokenizer's); the step between, which starts
    # the stream, also reads a text token.
    forced = [config.audio_out_bos_token_id, config.audio_out_token_idx, bundle.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    for sample in samples:
        inputs = collate.batch_to_model_inputs(collate.collate(collator, [sample], config.audio_codebook_size), "cpu")
        with torch.inference_mode():
            _, streams = generation.generate(bundle, inputs, sampling, [generation.ForceTokens(forced)], kv_cache)
        frames += streams[0].shape[1] - config.audio_num_codebooks
    return frames


def batched(bundle: model_utils.Bundle, samples: list, sampling: generation.Sampling, batch_size: int) -> int:
    frames = 0
    for start in range(0, len(samples), batch_size):
        streams = batched_generation.generate_batch(bundle, samples[start : start + batch_size], sampling)
        frames += sum(stream.shape[1] - bundle.model.config.audio_num_codebooks for stream in streams)
    return frames


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generation_benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,released", help="tiny and/or released [tiny,released]")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the released width [2]")
    parser.add_argument("--clips", type=int, default=8, help="prompts cloned per measurement [8]")
    parser.add_argument("--seconds", type=float, default=1.0, help="longest clip [1]")
    voice_prompts.add_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    texts = sorted(path.read_text(encoding="utf-8").strip() for path in voice_prompts.folder(args).glob("*.txt"))
    if not texts:
        print(f"error: no transcripts (NAME.txt) in {args.voice_prompts}: give --voice-prompts DIR", file=sys.stderr)
        return 2
    sampling = generation.Sampling(greedy=True, seed=0, max_seconds=args.seconds)
    print(f"torch threads {torch.get_num_threads()}; {args.clips} clips of at most {args.seconds:g} s, greedy, fp32, CPU")
    for model in args.models.split(","):
        bundle = build(model, args.layers)
        samples = prompts(bundle, args.clips, texts)
        parameters = sum(p.numel() for p in bundle.model.parameters()) / 1e6
        name = model if model == "tiny" else f"released width, {args.layers} layers"
        print(f"\n{name} ({parameters:.0f}M parameters)")
        buckets = generation.StaticCacheBuckets(bundle.model, lengths=(512, 1024))
        runs = [("B=1 package generate", lambda some: package_generate(bundle, some, sampling)),
                ("B=1 package, static KV", lambda some: package_generate(bundle, some, sampling, buckets))]
        runs += [(f"B={size} our loop", lambda some, size=size: batched(bundle, some, sampling, size)) for size in (1, 4, 8)]
        for label, run in runs:
            run(samples[:2])  # warm-up: first calls pay one-time costs
            started = time.perf_counter()
            frames = run(samples)
            seconds = time.perf_counter() - started
            print(f"  {label:<22}{args.clips / seconds:>8.2f} clips/s {frames / seconds:>9.1f} frames/s  ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
