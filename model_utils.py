"""Builds and loads models, and computes the training loss.

Four things live here:

* loading the released Higgs Audio v2 pieces (model, text tokenizer, audio
  tokenizer) from local directories, or from the hub where a network exists,
  into a `Bundle`; a `train.py` export names the audio tokenizer it was
  trained with in `audio_tokenizer.json`, written and read here, and
  `newest_export` finds the newest whole export for `infer.py` (checkpoints.py
  writes exports, this module reads them);
* the **tiny preset**: a small random model, text tokenizer and audio
  tokenizer built offline and deterministically from a seed out of the
  package's real classes, laid out like the release (dual-FFN on every layer,
  8 codebooks of 1024, delay pattern, no Whisper; optionally with a Whisper
  tower), so that every test and the demo run on a CPU with no hub;
* the loss: shifted text cross-entropy plus per-codebook shifted audio
  cross-entropy (the package's forward computes no loss at all);
* reaching the `HiggsAudioModel` and its decoder layers inside a peft wrapper.

Finding a run's newest whole export is `checkpoints.py`'s; what training
changes in the model (text logits only at labels, frozen weights in bf16) is
`trainable.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from boson_multimodal.audio_processing import higgs_audio_tokenizer as tokenizer_module
from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from transformers import AutoTokenizer, HubertConfig, HubertModel, PreTrainedTokenizerFast

import files

IGNORE_INDEX = -100
TINY_PRESET = "tiny"
TINY_WHISPER_PRESET = "tiny-whisper"
PRESETS = (TINY_PRESET, TINY_WHISPER_PRESET)

# Special tokens of the released text tokenizer that the ChatML layout uses.
# Llama-3 header tokens first, then the Higgs audio tokens; the tiny tokenizer
# gives them ids in this order.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|recipient|>",
)
HIGGS_AUDIO_TOKENS = (
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|audio_out_bos|>",
    "<|AUDIO|>",
    "<|AUDIO_OUT|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
)
PAD_TOKEN = "<|end_of_text|>"

# Text the tiny BPE is trained on: enough of each script the demo speaks for
# merges to form; anything else still encodes byte by byte.
_TINY_BPE_CORPUS = (
    "Generate audio following instruction.",
    "Audio is recorded from a quiet room.",
    "The quick brown fox jumps over the lazy dog, and then it rests.",
    "Hello, how are you today? I am fine, thank you very much!",
    "Voice cloning speaks new text in the voice of a short reference clip.",
    "مرحبا، كيف حالك اليوم؟ أنا بخير، شكرا جزيلا.",
    "هذا مثال قصير للكلام باللغة العربية.",
    "Hola, ¿cómo estás? Muy bien, gracias.",
    "你好，今天天气很好。我们一起去公园吧。",
    "<SE>[Laughter]</SE> degrees Celsius degrees Fahrenheit SPEAKER0:",
)


@dataclass
class TinyDims:
    """Sizes of a model of the released layout: by default the tiny preset's, small enough for a CPU test
    (`memory_plan` gives the release's own and a mid-size model's)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    bpe_vocab_size: int = 600
    audio_num_codebooks: int = 8
    audio_codebook_size: int = 1024


# --------------------------------------------------------------------------
# Text tokenizer
# --------------------------------------------------------------------------


def build_tiny_text_tokenizer(vocab_size: int = TinyDims.bpe_vocab_size) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds, carrying the Llama-3 and Higgs special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = list(LLAMA3_SPECIAL_TOKENS + HIGGS_AUDIO_TOKENS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_BPE_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=PAD_TOKEN,
    )


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the tokens the model config must name; an unknown token is an error, not a guess."""
    ids = {}
    for token in ("<|AUDIO|>", "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>", PAD_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"text tokenizer has no {token} token; it is not a Higgs Audio tokenizer")
        ids[token] = token_id
    return ids


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def tiny_model_config(tokenizer, whisper: bool = False, dims: TinyDims = TinyDims()) -> HiggsAudioConfig:
    """A small `HiggsAudioConfig` with the released layout, the ids of `tokenizer`'s special tokens, and a small
    Whisper tower (built with `whisper` only)."""
    ids = special_token_ids(tokenizer)
    encoder_config = dict(
        num_mel_bins=128,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        max_source_positions=1500,
        pad_token_id=ids[PAD_TOKEN],
    )
    return layout_config(ids, len(tokenizer), dims, whisper=whisper, encoder_config=encoder_config)


def layout_config(ids: dict[str, int], vocab_size: int, dims: TinyDims, whisper: bool = False,
                  encoder_config: dict | None = None, **text_options) -> HiggsAudioConfig:
    """A `HiggsAudioConfig` with the released layout at `dims`: a Llama text model, the dual FFN on every layer,
    the delay pattern; every flag set, no default relied on.

    `ids` maps the special tokens of `special_token_ids` to their ids;
    `encoder_config` is the Whisper tower's, built with `whisper` only (None:
    the package's default); `text_options` set more of the Llama config (the
    release's RoPE) or replace its values here.
    """
    text_config = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=ids[PAD_TOKEN],
    )
    config = HiggsAudioConfig(
        text_config={**text_config, **text_options},
        audio_encoder_config=encoder_config,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_ffn_hidden_size=dims.hidden_size,
        audio_ffn_intermediate_size=dims.intermediate_size,
        audio_dual_ffn_layers=list(range(dims.num_layers)),
        audio_decoder_proj_num_layers=0,
        use_audio_out_self_attention=False,
        audio_num_codebooks=dims.audio_num_codebooks,
        audio_codebook_size=dims.audio_codebook_size,
        audio_stream_bos_id=dims.audio_codebook_size,
        audio_stream_eos_id=dims.audio_codebook_size + 1,
        use_delay_pattern=True,
        skip_audio_tower=not whisper,
        encode_whisper_embed=whisper,
        encode_audio_in_tokens=True,
        audio_in_token_idx=ids["<|AUDIO|>"],
        audio_out_token_idx=ids["<|AUDIO_OUT|>"],
        audio_out_bos_token_id=ids["<|audio_out_bos|>"],
        audio_eos_token_id=ids["<|audio_eos|>"],
        pad_token_id=ids[PAD_TOKEN],
    )
    # sdpa keeps the CPU logits of training and cached generation identical
    # to ~1e-6; the package reads this private field to pick its attention.
    config._attn_implementation = "sdpa"
    return config


def build_tiny_model(tokenizer, seed: int = 0, whisper: bool = False) -> HiggsAudioModel:
    """A random `HiggsAudioModel` in fp32, the same for the same seed on any machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiggsAudioModel(tiny_model_config(tokenizer, whisper=whisper))
    return model.eval()


# --------------------------------------------------------------------------
# Audio tokenizer
# --------------------------------------------------------------------------

# Layout of the released bosonai/higgs-audio-v2-tokenizer: 24 kHz in, hop 960
# (25 frames/s), 8 codebooks of 1024, HuBERT-base semantic teacher at 16 kHz.
TINY_AUDIO_TOKENIZER_CONFIG = dict(
    n_filters=32,
    D=8,
    target_bandwidths=[0.5, 1, 1.5, 2],
    ratios=[8, 5, 4, 2, 3],
    sample_rate=24000,
    bins=1024,
    n_q=8,
    codebook_dim=8,
    semantic_techer="hubert_base_general",
    last_layer_semantic=True,
    merge_mode="concat",
    downsample_mode="step_down",
    semantic_mode="classic",
    vq_scale=1,
    semantic_sample_rate=16000,
)

# HuBERT's hidden size of 768 is hard-coded in HiggsAudioTokenizer; the rest
# of the tiny teacher is shrunk.
_TINY_HUBERT = dict(
    hidden_size=768,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32, 32, 32, 32, 32, 32, 32),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


@contextlib.contextmanager
def _offline_semantic_teacher(hubert_config: HubertConfig) -> Iterator[None]:
    """Build `HiggsAudioTokenizer` without the hub.

    Package limitation: `HiggsAudioTokenizer.__init__` always calls
    `AutoModel.from_pretrained("bosonai/hubert_base")`, a hub download, even
    when the weights are about to be loaded from a local `model.pth` that
    holds the teacher too. For the duration of the constructor this swaps the
    module's `AutoModel` for one that builds a randomly initialised
    `HubertModel` from `hubert_config`; the caller then loads (or, for the
    tiny preset, deliberately keeps) the weights. Nothing else is touched.
    """

    class _RandomHubert:
        @staticmethod
        def from_pretrained(*_args, **_kwargs) -> HubertModel:
            return HubertModel(hubert_config)

    original = tokenizer_module.AutoModel
    tokenizer_module.AutoModel = _RandomHubert
    try:
        yield
    finally:
        tokenizer_module.AutoModel = original


def _construct_audio_tokenizer(config: dict, hubert_config: HubertConfig, device: str) -> HiggsAudioTokenizer:
    with _offline_semantic_teacher(hubert_config):
        return HiggsAudioTokenizer(**config, device=device)


def build_tiny_audio_tokenizer(seed: int = 0, device: str = "cpu") -> HiggsAudioTokenizer:
    """A random `HiggsAudioTokenizer` (24 kHz, 25 frames/s, 8 x 1024) whose encode is a pure function.

    A fresh tokenizer would run k-means on its first encode and rewrite its
    codebooks, so two encodes of one clip could differ; the codebooks are
    instead drawn from the seed and marked initialised.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _construct_audio_tokenizer(TINY_AUDIO_TOKENIZER_CONFIG, HubertConfig(**_TINY_HUBERT), device)
        for codebook in _codebooks(tokenizer):
            codebook.embed.copy_(torch.randn_like(codebook.embed))
            codebook.embed_avg.copy_(codebook.embed)
            codebook.inited.fill_(1.0)
    return tokenizer.to(device).eval()


def _codebooks(tokenizer: HiggsAudioTokenizer) -> list[torch.nn.Module]:
    return [layer._codebook for layer in tokenizer.quantizer.vq.layers]


def save_audio_tokenizer(tokenizer: HiggsAudioTokenizer, config: dict, hubert_config: HubertConfig, path: Path) -> None:
    """Write `config.json` + `model.pth` (what `load_higgs_audio_tokenizer` reads) and the teacher's config."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hubert_config.save_pretrained(path / "semantic_teacher")
    torch.save(tokenizer.state_dict(), path / "model.pth")


def save_tiny_audio_tokenizer(path: Path, seed: int = 0) -> None:
    save_audio_tokenizer(
        build_tiny_audio_tokenizer(seed), TINY_AUDIO_TOKENIZER_CONFIG, HubertConfig(**_TINY_HUBERT), Path(path)
    )


def load_audio_tokenizer(name_or_dir: str, device: str = "cpu", seed: int = 0) -> HiggsAudioTokenizer:
    """Load an audio tokenizer from a local directory (`config.json` + `model.pth`), or the hub; a preset name
    (`tiny`, `tiny-whisper`) builds the tiny audio tokenizer of `seed`.

    Offline, the HuBERT teacher is built from `semantic_teacher/config.json`
    beside the weights when present, else from HuBERT-base's configuration,
    and its weights must come from `model.pth`: a missing key is an error.
    """
    if name_or_dir in PRESETS:
        return build_tiny_audio_tokenizer(seed, device)
    if not os.path.isdir(name_or_dir):
        if os.path.exists(name_or_dir) or name_or_dir.startswith((".", "/")):
            raise FileNotFoundError(f"audio tokenizer directory not found: {name_or_dir}")
        return tokenizer_module.load_higgs_audio_tokenizer(name_or_dir, device=device)
    path = Path(name_or_dir)
    for required in ("config.json", "model.pth"):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path} is not an audio tokenizer directory: no {required}")
    teacher_dir = path / "semantic_teacher"
    hubert_config = HubertConfig.from_pretrained(teacher_dir) if teacher_dir.is_dir() else HubertConfig()
    config = json.loads((path / "config.json").read_text())
    tokenizer = _construct_audio_tokenizer(config, hubert_config, device)
    state = torch.load(path / "model.pth", map_location=device, weights_only=True)
    missing, unexpected = tokenizer.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}/model.pth lacks {len(missing)} audio tokenizer weights, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{path}/model.pth has {len(unexpected)} unknown weights, e.g. {unexpected[:3]}")
    return tokenizer.to(device).eval()


# --------------------------------------------------------------------------
# Loading a released or fine-tuned model
# --------------------------------------------------------------------------


@dataclass
class Bundle:
    """Everything generation and training need: model, text tokenizer, audio tokenizer."""

    model: HiggsAudioModel
    tokenizer: PreTrainedTokenizerFast
    audio_tokenizer: HiggsAudioTokenizer


def load_bundle(
    model: str = TINY_PRESET,
    audio_tokenizer: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Bundle:
    """The tiny preset (`tiny`, `tiny-whisper`) or a model directory with its text tokenizer.

    A preset brings its own audio tokenizer unless one is given; a model
    directory needs `audio_tokenizer` (a directory or hub id).
    """
    if model in PRESETS:
        tokenizer = build_tiny_text_tokenizer()
        higgs = build_tiny_model(tokenizer, seed=seed, whisper=model == TINY_WHISPER_PRESET)
        audio = load_audio_tokenizer(audio_tokenizer, device) if audio_tokenizer else build_tiny_audio_tokenizer(seed, device)
        return Bundle(higgs.to(device=device, dtype=dtype), tokenizer, audio)
    if not os.path.isdir(model) and (os.path.exists(model) or model.startswith((".", "/"))):
        raise FileNotFoundError(f"model directory not found: {model}")
    audio_tokenizer, seed = (audio_tokenizer, seed) if audio_tokenizer else exported_audio_tokenizer(model)
    if audio_tokenizer is None:
        raise ValueError("a model directory needs --audio-tokenizer DIR (e.g. bosonai/higgs-audio-v2-tokenizer)")
    changed = files.digest_problem(Path(model)) if os.path.isdir(model) else None
    if changed:  # an export lists its files' SHA-256 (files.atomic_directory); a released checkpoint lists none
        raise ValueError(f"{model}: {changed}")
    higgs = HiggsAudioModel.from_pretrained(model, torch_dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    special_token_ids(tokenizer)
    return Bundle(higgs, tokenizer, load_audio_tokenizer(audio_tokenizer, device, seed))


AUDIO_TOKENIZER_POINTER = "audio_tokenizer.json"


def write_audio_tokenizer_pointer(model_dir: Path, audio_tokenizer: str | None, model: str, seed: int) -> None:
    """Name, beside an export, the audio tokenizer it was trained with: a directory or hub id, or for a preset
    model the tiny audio tokenizer and its seed (rebuilt from them when loaded: its 424 MB of random weights
    are not written into every export)."""
    pointer = {"audio_tokenizer": audio_tokenizer} if audio_tokenizer else {"audio_tokenizer": model, "seed": seed}
    (Path(model_dir) / AUDIO_TOKENIZER_POINTER).write_text(json.dumps(pointer))


def exported_audio_tokenizer(model_dir: str) -> tuple[str | None, int]:
    """The audio tokenizer a `train.py` export names (None if none) and the seed of a tiny one: its
    `audio_tokenizer.json`, or the `audio_tokenizer/` folder that exports before it held."""
    path = Path(model_dir)
    if (path / AUDIO_TOKENIZER_POINTER).is_file():
        pointer = json.loads((path / AUDIO_TOKENIZER_POINTER).read_text())
        return pointer["audio_tokenizer"], pointer.get("seed", 0)
    if (path / "audio_tokenizer").is_dir():
        return str(path / "audio_tokenizer"), 0
    return None, 0


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


@dataclass
class LossBreakdown:
    """Total loss and its parts; the counts (device tensors) say how many positions each mean covers."""

    total: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor
    per_codebook: torch.Tensor
    text_tokens: torch.Tensor
    audio_tokens: torch.Tensor


def compute_loss(outputs, label_audio_ids: torch.Tensor | None) -> LossBreakdown:
    """Next-token cross-entropy over text and each audio codebook.

    Text: `logits[:, :-1]` predicts `expanded_labels[:, 1:]` (the model
    returns labels aligned to its inputs, unshifted); logits of shape (N,
    vocab) come from `trainable.text_logits_at_labels` and hold the N labelled
    positions only, in row-major order. Audio: `audio_logits[:-1, k]`
    predicts `label_audio_ids[k, 1:]`; shifting across clip boundaries is
    safe because each clip's first label column is -100. The total is the sum
    of the text mean and the mean of the per-codebook means; a part with no
    labelled position contributes 0 and says so with a count of 0.

    Nothing here branches on the data or reads a tensor on the host, so the
    step never waits for the GPU on the loss's account (`syncs.py` counts).
    """
    logits = outputs.logits.float()
    shifted = outputs.expanded_labels[:, 1:]
    if logits.dim() == 2:  # `trainable.text_logits_at_labels`: its row count is known on the host
        text_labels = shifted.reshape(-1).index_select(0, labelled_positions(outputs.expanded_labels, logits.shape[0]))
    else:
        logits, text_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1)
    text, text_tokens = _mean_cross_entropy(logits, text_labels)

    audio_logits = outputs.audio_logits
    if audio_logits is None or label_audio_ids is None or label_audio_ids.numel() == 0:
        per_codebook, audio, audio_tokens = logits.new_zeros(0), logits.sum() * 0.0, text_tokens * 0
    else:
        audio_labels = label_audio_ids[:, 1:].to(audio_logits.device, non_blocking=True)
        means, counts = zip(*(_mean_cross_entropy(audio_logits[:-1, k].float(), audio_labels[k])
                              for k in range(audio_labels.shape[0])))
        per_codebook, audio_tokens = torch.stack(means), torch.stack(counts).sum()
        audio = per_codebook.mean()
    return LossBreakdown(text + audio, text, audio, per_codebook, text_tokens, audio_tokens)


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean cross-entropy over labelled positions (0 where none is) and their count.

    The sum over labelled positions divided by their count, at least 1: the
    same arithmetic as `F.cross_entropy`'s mean (bit for bit, in value and
    gradient), without the branch that a part with no label would need.
    """
    count = (labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / count.clamp(min=1), count


def labelled_positions(expanded_labels: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices into `expanded_labels[:, 1:]` of its `count` labelled positions, in row-major order.

    `count` comes from the host (`collate.text_label_count`), so the device
    never reports a size back (`nonzero_static`, where `nonzero` would wait).
    Were `count` too large, the padding index is out of range and the lookup
    fails loudly; `--debug-checks` compares it with the device's count.
    """
    labelled = (expanded_labels[:, 1:] != IGNORE_INDEX).reshape(-1)
    return torch.nonzero_static(labelled, size=count, fill_value=labelled.numel()).reshape(-1)


# --------------------------------------------------------------------------
# The HiggsAudioModel inside a peft wrapper
# --------------------------------------------------------------------------


def higgs_model(model: torch.nn.Module) -> HiggsAudioModel:
    """The `HiggsAudioModel` inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a `HiggsAudioModel`, inside a peft wrapper or not."""
    return higgs_model(model).layers


# --------------------------------------------------------------------------
# Finding an export: the newest whole one, for infer.py without --model
# --------------------------------------------------------------------------


def newest_export(runs_dir: str = "runs") -> str | None:
    """The most recently written whole `runs/*/export` model, if any.

    `train.py` writes an export into `export.tmp-XXXX` and renames it into
    place once whole; an `export` that is not whole (cut short while written
    in place, or damaged since) is skipped with a note naming it. Exports
    are checked newest first, so older ones are never read."""
    for path in sorted(Path(runs_dir).glob("*/export"), key=lambda path: path.stat().st_mtime, reverse=True):
        problem = export_problem(path)
        if not problem:
            return str(path)
        print(f"note: skipping {path}: {problem}", file=sys.stderr)
    return None


def export_problem(path: Path) -> str | None:
    """What makes an export directory not whole: no `config.json`, a weights file cut short (a safetensors
    file shorter than its header says, a torch zip file without its closing directory); None if whole."""
    if not (path / "config.json").is_file():
        return "no config.json"
    changed = files.digest_problem(path)
    if changed:
        return changed
    for weights in sorted(path.rglob("*.safetensors")):
        if not _safetensors_whole(weights):
            return f"{weights.relative_to(path)} is truncated"
    for weights in sorted(path.rglob("*.pth")):
        if not zipfile.is_zipfile(weights):
            return f"{weights.relative_to(path)} is truncated"
    return None


def _safetensors_whole(path: Path) -> bool:
    """A safetensors file is an 8-byte header size, a JSON header, then the tensors up to the last end offset."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return False
        size = int.from_bytes(head, "little")
        try:
            header = json.loads(handle.read(size))
        except ValueError:
            return False
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return path.stat().st_size == 8 + size + end
