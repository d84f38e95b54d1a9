"""Tiny random-weight Hugging Face models for tests and the demo.

`build_tiny_model(out_dir, arch)` writes a directory that `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load: float32 safetensors weights, config.json,
generation_config.json and a real byte-level BPE tokenizer (trained here, on source files that
ship with Python) with a chat template. `size` names a preset (`SIZES`): "tiny" (the tests' models)
or "bench-125m" (issue 9's benchmark shape: the 125M-parameter Llama with a 32000-entry BPE).

Invariants:
- Same arch + seed + Python/transformers versions -> byte-identical files.
- Weights use a large initializer range, random (non-zero) qkv biases and random norm weights:
  greedy logits are well separated (HF is compared to `mi` token for token) and a misplaced
  tensor changes the output.
- Every tiny arch is GQA with 8 query heads (tp 1/2/4/8 divide them) and a power-of-two head_dim >= 16.
- The global torch RNG is left untouched (weights are drawn inside `torch.random.fork_rng`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import pathlib
import sysconfig
from dataclasses import dataclass, field

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, SYSTEM, USER, ASSISTANT, END]  # ids 0..7, in this order
VOCAB_SIZE = 500  # not a multiple of 64: converted checkpoints exercise vocab padding

# The rendered prompt starts with BOS: tokenize it with add_special_tokens=False
# (apply_chat_template(tokenize=True) does), or BOS appears twice.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split (the GPT-4 style regex). transformers always loads a qwen2
# checkpoint's tokenizer with Qwen2Tokenizer, which rebuilds the normalizer and pre-tokenizer
# as NFC + this split; using the same pipeline for every arch makes AutoTokenizer give the same
# ids whether it loads the HF directory or a converted one (which has no config.json).
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Stdlib modules whose source trains the BPE (fixed order; read by file, never imported).
_CORPUS_MODULES = [
    "argparse",
    "textwrap",
    "difflib",
    "string",
    "json.decoder",
    "json.encoder",
    "csv",
    "enum",
    "functools",
    "dataclasses",
    "calendar",
    "shlex",
]
_EXTRA_TEXT = "Héllo wörld, naïve café. 日本語のテキスト。Ελληνικά. Привет, мир! 🙂 ✓ — “quotes”.\n"

_ARCHS = {
    # arch: (config class, model class, dims and arch-specific config fields)
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(
            hidden_size=128,
            intermediate_size=192,
            num_attention_heads=8,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=128,
            intermediate_size=320,
            num_attention_heads=8,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
    # head_dim 16 != 256 / 8. (With tied embeddings a narrower qwen3 greedily repeats one token.)
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(
            hidden_size=256,
            intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    ),
}
ARCHS = tuple(_ARCHS)


def _tiny_corpus() -> list[str]:
    texts = []
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            texts.append(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    texts.append(_EXTRA_TEXT * 20)
    return texts


def _stdlib_corpus() -> list[str]:
    """Every .py file of the standard library (~11 MB, enough pairs for 32000 entries), in sorted
    path order; the test suites are left out (some of their files are deliberately not UTF-8)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests"}
    paths = sorted(p for p in root.rglob("*.py") if not skipped & set(p.relative_to(root).parts))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    texts.append(_EXTRA_TEXT * 20)
    return texts


@dataclass(frozen=True)
class Size:
    """A named model preset: its tokenizer (vocabulary size, training corpus) and config dims."""

    vocab_size: int
    corpus: str  # a key of _CORPORA
    archs: tuple[str, ...] = ARCHS
    overrides: dict = field(default_factory=dict)  # replaces the arch's dims


_CORPORA = {"tiny": _tiny_corpus, "stdlib": _stdlib_corpus}

SIZES = {
    "tiny": Size(vocab_size=VOCAB_SIZE, corpus="tiny"),
    # Issue 9's benchmark model: 12 layers, 12 query / 4 KV heads of 64, untied lm_head
    # (~120M parameters, ~380 MB of float32 weights read per decoded token).
    "bench-125m": Size(
        vocab_size=32000,
        corpus="stdlib",
        archs=("llama",),
        overrides=dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
        ),
    ),
}


@functools.lru_cache(maxsize=2)
def _trained_tokenizer_json(vocab_size: int = VOCAB_SIZE, corpus: str = "tiny") -> str:
    """Train the BPE once per process and preset; return it serialized (callers rebuild a fresh
    copy). The trainer is deterministic for a fixed corpus order."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPORA[corpus](), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the {corpus} corpus gives {tok.get_vocab_size()} BPE entries, not {vocab_size}")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str()


def build_tokenizer(size: str = "tiny") -> PreTrainedTokenizerFast:
    """A fresh HF tokenizer around the (cached) trained BPE of preset `size`."""
    preset = _size(size)
    tok = Tokenizer.from_str(_trained_tokenizer_json(preset.vocab_size, preset.corpus))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def _randomize(model: torch.nn.Module, std: float) -> None:
    """Give biases and norm weights random values (HF initializes them to 0 and 1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif name.endswith("norm.weight"):
                param.normal_(1.0, std)


def _size(name: str) -> Size:
    if name not in SIZES:
        raise ValueError(f"unknown size {name!r}; expected one of {', '.join(SIZES)}")
    return SIZES[name]


def tiny_config(arch: str = "llama", size: str = "tiny", overrides: dict | None = None):
    """The HF config of a random `arch` model of preset `size` (no tokenizer training, no weights:
    the special tokens are ids 0..7 and the vocabulary is the preset's, as the trainer checks)."""
    preset = _size(size)
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if arch not in preset.archs:
        raise ValueError(f"size {size!r} is built for {', '.join(preset.archs)} only, not {arch!r}")
    config_cls, _, dims = _ARCHS[arch]
    dims = {"num_hidden_layers": 2, **dims, **preset.overrides, **(overrides or {})}
    rope_theta = dims.pop("rope_theta")
    rope_parameters = {"rope_type": "default", **dims.pop("rope_parameters", {}), "rope_theta": rope_theta}
    return config_cls(
        vocab_size=preset.vocab_size,
        max_position_embeddings=dims.pop("max_position_embeddings", 2048),
        initializer_range=0.1,
        rope_parameters=rope_parameters,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        dtype="float32",
        **dims,
    )


def build_tiny_model(
    out_dir, arch: str = "llama", seed: int = 0, overrides: dict | None = None, size: str = "tiny"
) -> pathlib.Path:
    """Write a random `arch` model of preset `size` with its tokenizer to `out_dir`; return the
    path. `overrides` replaces config fields (e.g. hidden_size, num_hidden_layers) on top of the
    preset's."""
    config = tiny_config(arch, size, overrides)
    tokenizer = build_tokenizer(size)
    bos_id, eos_id, pad_id = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD))
    end_id = tokenizer.convert_tokens_to_ids(END)
    if (len(tokenizer), bos_id, eos_id, pad_id) != (
        config.vocab_size,
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    ):
        raise RuntimeError("the trained tokenizer does not match the preset's vocabulary")
    model_cls = _ARCHS[arch][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
        _randomize(model, config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, end_id], pad_token_id=pad_id
    )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mi.models.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="tiny",
        help="tiny: the tests' models; bench-125m: the 125M Llama shape of docs/benchmarks.md (llama only)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        print(build_tiny_model(args.out, args.arch, args.seed, size=args.size))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
