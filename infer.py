"""The inference command line: clone a voice, measure clones of a manifest (--eval), compare two such measures
(--compare), prove parity (--parity).

Clone a voice (the newest export under runs/, else the tiny preset; a real model with
--model/--audio-tokenizer, a training checkpoint with --checkpoint):

    python infer.py --ref-audio R.wav --ref-text "what R says" --text "new words" --out out.wav
    python infer.py --checkpoint runs/NAME/checkpoints/best.pt --text "new words"

Read a long text in one voice (chunked at sentence ends; one clip, and a JSON of its chunks beside it):

    python infer.py --ref-audio R.wav --ref-text "what R says" --text-file chapter.txt --out chapter.wav

Prove that training and inference build the same thing:

    python infer.py --parity

Measure clones of every row of a held-out manifest or a Seed-TTS-eval list (SIM, WER/CER, timing; see metrics.py):

    python infer.py --eval held_out.jsonl --out eval/base [--batch-size 8] [--resume]

Compare two --eval runs of the same list row by row (paired; no model is loaded; see compare.py):

    python infer.py --compare eval/base eval/tuned

Sample K clips per row, judge them, and pair the best with the worst for DPO (see docs/preference-tuning.md):

    python infer.py --candidates train.jsonl --k 4 --out pairs/ --reward wer:1,sim:1

This file reads the flags, checks them and loads the model; generation.py
generates the clips, parity.py holds the parity suite, evaluate.py judges
the clones, compare.py compares two evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import commands  # light: it must catch a Ctrl-C while the rest loads

if __name__ == "__main__":
    commands.quiet_ctrl_c_while_loading()

import soundfile as sf
import torch

import codes
import compare
import data
import eval_dir
import evaluate
import files
import generation
import longform
import manifest
import metrics
import model_utils
import parity
import preference
import score_cache

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("what to say and where")
    io.add_argument("--ref-audio", help="reference clip (WAV/FLAC, any rate 8-48 kHz); default: a demo clip")
    io.add_argument("--ref-text", help="transcript of the reference clip (default: the demo clip's)")
    io.add_argument("--text", help="text to speak in the reference voice")
    io.add_argument("--text-file", help="a UTF-8 text file: one long text spoken into one clip when --out names an "
                    "audio file (.wav, .flac, .ogg, .mp3), else one text per line, one wav per line written into --out as a directory")
    io.add_argument("--out", help="output wav (or directory with --text-file) [out.wav]; with --eval, the results' "
                    "directory; with --compare, the comparison's [A_vs_B beside B]")
    io.add_argument("--chunk-chars", type=int, default=longform.DEFAULT_CHUNK_CHARS,
                    help="a text longer than this is spoken in chunks of whole sentences of at most this many characters "
                    f"(a CJK one counts 3), here and for --eval's rows; {longform.MIN_CHUNK_CHARS} to "
                    f"{data.LIMITS.max_text_chars} [{longform.DEFAULT_CHUNK_CHARS}, about 20 s of speech]")
    io.add_argument("--context-chunks", type=int, default=longform.DEFAULT_CONTEXT_CHUNKS,
                    help="chunks said before that prompt the next one, after the reference (upstream's "
                    f"generation_chunk_buffer_size); 0 = the reference alone [{longform.DEFAULT_CONTEXT_CHUNKS}]")
    io.add_argument("--scene", help="scene description for the system message; '' for none "
                    "[the model's prompt_layout.json, else none]")
    io.add_argument("--ref-in-system", action=argparse.BooleanOptionalAction, default=None,
                    help="put the reference in the system message (--no-ref-in-system: in an assistant turn) "
                    "[the model's prompt_layout.json, else an assistant turn]")
    io.add_argument("--layout-override", action="store_true",
                    help="prompt with --ref-in-system/--scene even where they contradict the model's prompt_layout.json")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="model directory, or a preset: tiny, tiny-whisper "
                       "[the newest runs/*/export of train.py, else tiny]")
    model.add_argument("--checkpoint", metavar="CKPT", help="clone with a train.py checkpoint instead of --model "
                       "(RUN/checkpoints/best.pt, step_N.pt, or a .dcp folder): its weights on the model its settings name, "
                       "LoRA merged, prompted in the layout it was trained with; its content is checked against its SHA-256")
    model.add_argument("--audio-tokenizer", help="audio tokenizer directory (config.json + model.pth); required with a model directory")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device [cuda if present, else cpu]")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                       help="model weights dtype; auto = bfloat16 on CUDA (the serve engine's), float32 on the CPU; "
                       "float32 on CUDA for exactness [auto]")
    model.add_argument("--kv-cache", choices=["auto", "dynamic", "static"], default="auto",
                       help="KV cache of batch-1 generation: static = the serve engine's static buckets (with CUDA graphs on "
                       "CUDA), dynamic = grown step by step; auto = static on CUDA, dynamic on the CPU, where it is faster "
                       "[auto]; batches of more than 1 always use the dynamic cache")
    model.add_argument("--batch-size", type=int, default=1,
                       help="clips generated together per decoding step, for --eval and --text-file; > 1 runs our batched "
                       "loop (greedy codes proven equal to the package's, see --parity --checks batched) [1]")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=generation.Sampling.temperature,
                          help="> 0; --greedy for argmax [0.7, the serve engine's]")
    sampling.add_argument("--top-k", type=int, default=generation.Sampling.top_k,
                          help="sample among the k likeliest codes, k >= 1 [off, as in the serve engine]")
    sampling.add_argument("--top-p", type=float, default=generation.Sampling.top_p, help="nucleus mass, in (0, 1] [0.95, the serve engine's]")
    sampling.add_argument("--ras-win-len", type=int, default=generation.Sampling.ras_win_len,
                          help="repetition-aware sampling window, 0 = off [7, the serve engine's]")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding, repetition-aware sampling off")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    sampling.add_argument("--max-seconds", type=float, default=generation.Sampling.max_seconds, help="longest clip to generate, > 0 [20]")
    sampling.add_argument("--no-force-audio", dest="force_audio", action="store_false",
                          help="let the model choose its first token instead of forcing <|audio_out_bos|>")
    suite = parser.add_argument_group("parity")
    suite.add_argument("--parity", action="store_true", help="run the training/inference parity suite and exit")
    suite.add_argument("--checks", default=",".join(parity.ALL_CHECKS), help=f"comma-separated parity checks [{','.join(parity.ALL_CHECKS)}]")
    add_evaluation_flags(parser)
    return parser.parse_args(argv)


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of --eval, --compare and --candidates."""
    evaluation = parser.add_argument_group("evaluation (--eval)")
    evaluation.add_argument("--eval", metavar="MANIFEST", help="clone every row of a paired or speaker-grouped manifest "
                            "(speaker pairing fixed by --seed) and measure SIM, WER/CER and timing; --out is a directory")
    evaluation.add_argument("--asr-model", metavar="DIR", help="local Whisper directory for WER/CER in any language "
                            "[pocketsphinx en-us: English rows only, other languages n/a]")
    evaluation.add_argument("--speaker-model", metavar="DIR", help="local WavLMForXVector directory for SIM [resemblyzer GE2E]")
    evaluation.add_argument("--language", help="language of rows that have no language field (e.g. en; a Seed-TTS-eval list "
                            "has none) [none: Whisper detects it, pocketsphinx leaves their WER n/a]")
    evaluation.add_argument("--resume", action="store_true", help="continue the --eval run in a non-empty --out (same flags): "
                            "rows in its rows.csv are kept, the rest are made")
    evaluation.add_argument("--codes-cache", metavar="CACHE", help="a prepared code cache (python prepare.py) to read the "
                            "references' codes from [none: each distinct reference is encoded once]")
    evaluation.add_argument("--ref-codes-cache", default=str(codes.REFERENCE_CACHE_DIR), metavar="DIR",
                            help="folder of the references' audio codes, by file content and audio tokenizer, so a second "
                            f"--eval encodes none again; '' = no cache [{codes.REFERENCE_CACHE_DIR}]")
    evaluation.add_argument("--score-cache", default=str(score_cache.DEFAULT_DIR), metavar="DIR",
                            help=f"folder of the real targets' cached scores; '' = no cache [{score_cache.DEFAULT_DIR}]")
    evaluation.add_argument("--compare", nargs=2, metavar=("EVAL_DIR_A", "EVAL_DIR_B"),
                            help="compare two --eval directories of the same list, judge and sampling row by row: per metric "
                            "B - A with a paired bootstrap 95%% interval, a verdict where it excludes 0; writes compare.json "
                            "and differences.png into --out; loads no model")
    candidates = parser.add_argument_group("preference candidates (--candidates)")
    candidates.add_argument("--candidates", metavar="MANIFEST", help="sample --k clips per row of a manifest, judge each, "
                            "and pair the best with the worst by --reward for train.py --objective dpo; --out is a new directory")
    candidates.add_argument("--k", type=int, default=4, help="clips sampled per row, one batch each (>= 2) [4]")
    candidates.add_argument("--reward", default="wer:1,sim:1", help="NAME:WEIGHT,... over the judge's metrics (wer, cer, "
                            "silences and fail_* negated, duration_ratio as its distance from 1; sim, mos, stop; any numeric column of "
                            "--eval's rows) and frames / low_codes, "
                            "code-only checks (docs/preference-tuning.md) [wer:1,sim:1]")


def check_sampling_args(args: argparse.Namespace) -> None:
    """Sampling values the package would reject with its own messages, or take silently (`--max-seconds 0`)."""
    if not args.max_seconds > 0 or not math.isfinite(args.max_seconds):
        raise ValueError(f"--max-seconds must be a positive number of seconds, got {args.max_seconds:g}")
    if generation.max_frames(args.max_seconds) < 1:
        raise ValueError(f"--max-seconds {args.max_seconds:g} is under one frame of audio ({1 / generation.FRAMES_PER_SECOND:g} s)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.batch_size > 1 and not args.force_audio:
        raise ValueError("--batch-size > 1 forces <|audio_out_bos|>; --no-force-audio runs with --batch-size 1")
    if not args.temperature > 0 or not math.isfinite(args.temperature):
        raise ValueError(f"--temperature must be > 0, got {args.temperature:g} (--greedy decodes by argmax)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p:g}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k} (leave it out for no top-k)")
    if args.ras_win_len < 0:
        raise ValueError(f"--ras-win-len must be >= 0 (0 turns it off), got {args.ras_win_len}")
    if not longform.MIN_CHUNK_CHARS <= args.chunk_chars <= data.LIMITS.max_text_chars:
        raise ValueError(f"--chunk-chars must lie in {longform.MIN_CHUNK_CHARS} to {data.LIMITS.max_text_chars} "
                         f"(the longest text training accepts), got {args.chunk_chars}")
    if args.context_chunks < 0:
        raise ValueError(f"--context-chunks must be >= 0 (0: the reference alone), got {args.context_chunks}")


def check_text(text: str, name: str) -> None:
    """A text with something to speak (a long one is spoken in chunks of at most --chunk-chars)."""
    spoken = data.normalize_text(text)
    if not data.is_speakable(spoken):
        raise ValueError(f"{name} has no letter or digit to speak once normalised ({spoken!r})")


def clone_out(args: argparse.Namespace) -> Path:
    """Where a clone goes: --out, else out.wav (--eval and --compare read --out as a directory instead)."""
    return Path(args.out or "out.wav")


def one_clip_out(args: argparse.Namespace) -> bool:
    """Whether --out names one audio file (a format libsndfile writes: .wav, .flac, .ogg, .mp3, ...), so that
    --text-file is one long text rather than one text per line."""
    return clone_out(args).suffix[1:].upper() in sf.available_formats()


def check_clip_out(args: argparse.Namespace) -> None:
    """An --out a clip can be written to, refused before the model loads: not a folder, an audio format."""
    out = clone_out(args)
    if args.text_file and not one_clip_out(args):
        return  # a folder of one wav per line
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give an audio file (out.wav), or --text-file for one wav per line in it")
    if out.suffix and not one_clip_out(args):
        raise ValueError(f"--out {out}: {out.suffix} is not an audio format libsndfile writes (.wav, .flac, .ogg, .mp3)")


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:  # its message names no file
            raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8") from None
        if one_clip_out(args):
            text = content.strip()
            check_text(text, str(path))
            return [text]
        numbered = [(n, line.strip()) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
        if not numbered:
            raise ValueError(f"{path} has no non-empty line")
        for number, line in numbered:
            check_text(line, f"{path}:{number}")
        return [line for _, line in numbered]
    if args.text is None:
        return ["This voice was cloned from a few seconds of speech."]
    if not args.text.strip():
        raise ValueError("--text is empty")
    check_text(args.text, "--text")
    return [args.text]


def _reference_paths(args: argparse.Namespace, layout: data.PromptLayout) -> tuple[str, str]:
    if args.ref_audio:
        if not Path(args.ref_audio).is_file():
            raise data.AudioError(f"{args.ref_audio}: no such audio file")
        if args.ref_text is None and not layout.ref_in_system:
            raise ValueError("--ref-audio needs --ref-text (its transcript)")
        if args.ref_text is not None and len(args.ref_text) > data.LIMITS.max_text_chars:
            raise ValueError(f"--ref-text has {len(args.ref_text)} characters, over the {data.LIMITS.max_text_chars} training accepts")
        _check_reference_file(args.ref_audio)
        return args.ref_audio, args.ref_text or ""
    row = json.loads((DEMO_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return str(DEMO_DIR / row["audio"]), row["text"]


def _check_reference_file(path: str) -> None:
    """The reference's duration, from its header, before the model loads (encode_reference checks the clip itself)."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError):
        return  # data.load_audio reports it unreadable
    data.check_reference_seconds(info.frames / info.samplerate, path)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`--dtype`: auto is bfloat16 on CUDA (as the package's serve engine loads the released weights) and float32
    elsewhere (the CPU has no fast bf16 path here)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def static_kv_cache(kv_cache: str, device: str, batch_size: int) -> bool:
    """`--kv-cache`: whether batch-1 generation uses the serve engine's static buckets (auto: on CUDA). Batches
    always run our loop on the dynamic cache, so for them no buckets are built or graphs captured."""
    if batch_size > 1:
        return False
    return torch.device(device).type == "cuda" if kv_cache == "auto" else kv_cache == "static"


def _load(args: argparse.Namespace) -> model_utils.Bundle:
    dtype = resolve_dtype(args.dtype, args.device)
    if args.checkpoint:
        import checkpoints  # the training stack (LoRA, its settings), loaded only for a checkpoint

        bundle, _ = checkpoints.model_from_checkpoint(Path(args.checkpoint), args.device)
        return model_utils.Bundle(bundle.model.to(dtype), bundle.tokenizer, bundle.audio_tokenizer)
    return model_utils.load_bundle(args.model, args.audio_tokenizer, seed=args.seed, device=args.device, dtype=dtype)


def choose_model(args: argparse.Namespace) -> None:
    """Fill in --model where neither it nor --checkpoint is given, saying which model that is and why."""
    if args.checkpoint:
        if args.model or args.audio_tokenizer:
            raise ValueError("--checkpoint brings its own model and audio tokenizer (named in its settings); "
                             "leave --model and --audio-tokenizer out")
        return
    if args.model is not None:
        return
    if args.parity:
        args.model = model_utils.TINY_PRESET
        return
    export = model_utils.newest_export()
    if export is None:
        args.model = model_utils.TINY_PRESET
        print("model: tiny (the random tiny preset: no export under runs/ yet; --model or --checkpoint chooses one)")
        return
    args.model = export
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(export).stat().st_mtime))
    print(f"model: {export} (the newest export under runs/, written {written}; --model or --checkpoint chooses another)")


def _kv_cache(args: argparse.Namespace, bundle: model_utils.Bundle) -> generation.StaticCacheBuckets | None:
    if not static_kv_cache(args.kv_cache, args.device, args.batch_size):
        return None
    return generation.StaticCacheBuckets(bundle.model, capture_graphs=torch.device(args.device).type == "cuda")


def run_parity_cli(args: argparse.Namespace) -> int:
    """`--parity`: the tiny preset in both reference placements (Whisper on for the system one), another model in its layout."""
    checks = tuple(name.strip() for name in args.checks.split(",") if name.strip())
    unknown = set(checks) - set(parity.ALL_CHECKS)
    if unknown:
        raise ValueError(f"unknown parity checks: {', '.join(sorted(unknown))}; known: {', '.join(parity.ALL_CHECKS)}")
    if args.model == model_utils.TINY_PRESET:
        layouts = [(args.model, False), (model_utils.TINY_WHISPER_PRESET, True)]
        scene = args.scene or None
    else:
        layout = layout_from_args(args)
        layouts, scene = [(args.checkpoint or args.model, layout.ref_in_system)], layout.scene
    return parity.run_and_report(layouts, scene, checks, lambda model_name: _load(replace_namespace(args, model=model_name)))


def replace_namespace(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def layout_from_args(args: argparse.Namespace) -> data.PromptLayout:
    """`generation.resolve_layout` from infer.py's flags: --model or --checkpoint (whose settings give the layout
    it was trained with), --ref-in-system, --scene, --layout-override."""
    if not args.checkpoint:
        return generation.resolve_layout(args.model, args.ref_in_system, args.scene, args.layout_override)
    import checkpoints  # the training stack (its settings), loaded only for a checkpoint

    trained = checkpoints.trained_config(Path(args.checkpoint))
    recorded = data.RecordedLayout(data.PromptLayout(trained.ref_in_system), data.normalization_version())
    return generation.resolve_layout(args.checkpoint, args.ref_in_system, args.scene, args.layout_override, recorded)


def sampling_from_args(args: argparse.Namespace) -> generation.Sampling:
    return generation.Sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, ras_win_len=args.ras_win_len or None,
        greedy=args.greedy, seed=args.seed, max_seconds=args.max_seconds,
    )


def run_clone_cli(args: argparse.Namespace) -> int:
    """Each text's clip; a text over --chunk-chars in chunks, with a JSON of them beside its clip. Exit status 1
    when a chunk failed (named; the clip holds the rest)."""
    check_sampling_args(args)
    check_clip_out(args)
    texts = _texts(args)
    layout = layout_from_args(args)
    ref_audio, ref_text = _reference_paths(args, layout)
    bundle = _load(args)
    reference = generation.encode_reference(bundle, ref_audio, ref_text, layout.ref_in_system)
    out, rate = clone_out(args), bundle.audio_tokenizer.sampling_rate
    one_per_line = args.text_file and not one_clip_out(args)
    targets = [out / f"{index:04d}.wav" for index in range(len(texts))] if one_per_line else [out]
    documents = [longform.Document(reference, longform.chunk_text(text, args.chunk_chars)) for text in texts]
    chunked = [len(document.chunks) for document in documents if len(document.chunks) > 1]
    if chunked:
        # A text under --chunk-chars with several paragraphs is chunked too (a paragraph starts a chunk).
        context = f"the last {args.context_chunks} said" if args.context_chunks else "the reference alone"
        print(f"{len(chunked)} text(s) spoken in {sum(chunked)} chunks (at paragraphs, and at sentence ends within "
              f"--chunk-chars {args.chunk_chars}), each after {context}")
    clips = longform.speak_documents(bundle, documents, sampling_from_args(args), layout, args.context_chunks,
                                     args.force_audio, args.batch_size, _kv_cache(args, bundle))
    failed = sum(_write_clip(args, texts[index], targets[index], clip, rate) for index, clip in clips)
    return 1 if failed else 0


def _write_clip(args: argparse.Namespace, text: str, target: Path, clip: longform.LongClone, rate: int) -> int:
    """One text's clip (and, when chunked, its JSON); the number of its chunks that failed, each named."""
    if len(clip.chunks) == 1 and clip.error is not None:
        if not (args.text_file and not one_clip_out(args)):
            raise RuntimeError(clip.error)
        # One line of many: named, and the other lines still come out (exit status 1), as a failed chunk is.
        print(f"error: {target} not written: {clip.error}: {text}", file=sys.stderr)
        return 1
    failures = [chunk for chunk in clip.chunks if chunk.failure]
    for chunk in failures:
        print(f"warning: {target}: chunk {chunk.index} left out ({chunk.failure}): {chunk.text}", file=sys.stderr)
    if clip.error is not None:
        print(f"error: {target} not written: {clip.error}", file=sys.stderr)
        return len(failures)
    target.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(target) as handle:  # whole or absent; a full disk is one line naming it
        sf.write(handle, clip.waveform, rate, format=target.suffix[1:] or "WAV")
    if len(clip.chunks) == 1:
        print(f"wrote {target} ({len(clip.waveform) / rate:.2f} s at {rate} Hz): {text}")
        return 0
    settings = {"chunk_chars": args.chunk_chars, "context_chunks": args.context_chunks}
    longform.write_chunk_json(target.with_suffix(".json"), clip, rate, settings)
    print(f"wrote {target} ({len(clip.waveform) / rate:.2f} s at {rate} Hz) from {len(clip.chunks) - len(failures)} of "
          f"{len(clip.chunks)} chunks, each listed in {target.with_suffix('.json')}")
    return len(failures)


def run_eval_cli(args: argparse.Namespace) -> int:
    """`--eval LIST --out DIR`: wavs/, rows.csv, summary.json and rejections.jsonl in DIR, and a printed summary."""
    check_sampling_args(args)
    if args.eval and not Path(args.eval).is_file():
        raise FileNotFoundError(f"no such manifest or list: {args.eval}")
    if args.language is not None:
        try:
            manifest.canonical_language(args.language)  # a tag no ASR knows would leave every WER n/a
        except ValueError as error:
            raise ValueError(f"--language {error}") from None
    layout = layout_from_args(args)
    if not args.out:
        raise eval_dir.EvalDirError("--eval writes a directory of results: give --out DIR")
    out = eval_dir.EvalDir(args.out, eval_run_record(args, layout), args.resume)
    bundle = _load(args)
    judge = metrics.build_judge(args.speaker_model, args.asr_model, args.language, args.device, args.score_cache or None)
    settings = evaluate.CloneSettings(sampling_from_args(args), layout, args.force_audio, args.batch_size, _kv_cache(args, bundle),
                                      args.chunk_chars, args.context_chunks)
    evaluate.evaluate_list(bundle, judge, args.eval, out, settings, args.codes_cache, args.ref_codes_cache or None)
    return 0


def run_candidates_cli(args: argparse.Namespace) -> int:
    """`--candidates M --k K --out DIR`: K judged clips per row (codes, scores, log-probabilities) and the pairs."""
    check_sampling_args(args)
    if args.k < 2:
        raise ValueError(f"--k must be at least 2 (a pair needs two clips), got {args.k}")
    reward = preference.RewardSpec.parse(args.reward)
    if not args.out:
        raise ValueError("--candidates writes into a new directory: give --out DIR")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; candidates go to a new one")
    layout = layout_from_args(args)
    bundle = _load(args)
    judge = metrics.build_judge(args.speaker_model, args.asr_model, args.language, args.device, args.score_cache or None) \
        if reward.needs_judge else None
    _, pairs, languages = evaluate.read_eval_rows(args.candidates, evaluate.CheckedClips(
        bundle.audio_tokenizer.sampling_rate, bundle.model.config.audio_num_codebooks), args.seed)
    codes = evaluate.reference_codes(bundle, args.codes_cache, [pair.ref_audio for pair in pairs], args.ref_codes_cache or None)
    rows = [(preference.Prompt(pair.id, pair.ref_text, codes(pair.ref_audio), pair.text,
                               data.PromptLayout(layout.ref_in_system, pair.scene or layout.scene),
                               languages.get(pair.id) or args.language, pair.ref_audio), pair.audio) for pair in pairs]
    counts = preference.make_candidates(bundle, judge, rows, args.k, sampling_from_args(args), reward, out,
                                        {"manifest": str(Path(args.candidates).resolve()), "model": args.model,
                                         "checkpoint": args.checkpoint, "dtype": str(resolve_dtype(args.dtype, args.device))})
    print(preference.describe_counts(counts, out))
    return 0


def eval_run_record(args: argparse.Namespace, layout: data.PromptLayout) -> dict:
    """What makes two --eval runs comparable, recorded in DIR/run.json: a --resume with other values is refused."""
    return {"list": str(Path(args.eval).resolve()), "list_sha256": files.sha256(args.eval), "model": args.model,
            "checkpoint": args.checkpoint,
            "audio_tokenizer": args.audio_tokenizer, "dtype": str(resolve_dtype(args.dtype, args.device)),
            "device": torch.device(args.device).type, "sampling": vars(sampling_from_args(args)), "scene": layout.scene,
            "ref_in_system": layout.ref_in_system, "force_audio": args.force_audio, "language": args.language,
            "asr_model": args.asr_model, "speaker_model": args.speaker_model, "mos_model": metrics.mos_identity(),
            "chunk_chars": args.chunk_chars, "context_chunks": args.context_chunks}


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (--parity: 1 when a check fails), 2 an error (one line), 130 interrupted by Ctrl-C (one
    line: what was kept and, for --eval, the command that continues)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return commands.run(lambda: run_command(args, argv), interrupted=lambda _: report_interrupted(args, argv, None))


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """What the flags ask for: --compare, --parity, --eval or a clone."""
    if args.compare:
        if args.eval or args.parity:
            raise ValueError("--compare reads two finished --eval directories: give it without --eval or --parity")
        return compare.run_cli(*args.compare, args.out)
    choose_model(args)
    if args.parity:
        return run_parity_cli(args)
    if args.candidates:
        return run_candidates_cli(args)
    if not args.eval:
        return run_clone_cli(args)
    try:
        return run_eval_cli(args)
    except evaluate.EvalInterrupted as error:  # the Ctrl-C of --eval, with what it kept
        return report_interrupted(args, argv, error)


def report_interrupted(args: argparse.Namespace, argv: list[str], error: evaluate.EvalInterrupted | None) -> int:
    """The one line Ctrl-C prints, what was kept and, for --eval, the command that continues; the status 130."""
    if error is None:
        return commands.interrupted("stopped before it finished; run the same command again")
    command = shlex.join(["python", "infer.py", *argv] + ([] if args.resume else ["--resume"]))
    return commands.interrupted(f"{error.scored} of {error.total} rows scored, kept in {error.out / eval_dir.ROWS_FILE} and "
                                f"{error.out / 'wavs'}; continue with: {command}")


if __name__ == "__main__":
    commands.loaded()
    sys.exit(main())
