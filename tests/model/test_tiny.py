"""The tiny random-weight HF models: loadable by transformers, deterministic, real tokenizer.

Models come from conftest's session-scoped `tiny_model_dirs` (each arch built once per session).
"""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from mi.models.tiny import ARCHS, BOS, END, EOS, PAD, build_tiny_model

TEXTS = [
    "hello, my name is",
    "Say this is a test",
    "def f(x):\n    return x  # comment\n\n\tindented",
    "Héllo wörld, naïve café — “quotes”",
    "日本語のテキスト。Привет, мир! Ελληνικά 🙂👍🏽 ✓",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    cache = {}

    def get(arch):
        if arch not in cache:
            path = tiny_model_dirs(arch)
            cache[arch] = (
                AutoModelForCausalLM.from_pretrained(path).eval(),
                AutoTokenizer.from_pretrained(path),
            )
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_transformers(arch, loaded):
    model, tok = loaded(arch)
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.vocab_size == len(tok) == 500
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads in (2, 4)
    assert cfg.num_hidden_layers == 2 and cfg.max_position_embeddings == 2048
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert cfg.intermediate_size % 8 == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert model.dtype == torch.float32
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    tied = arch in ("qwen2", "qwen3")
    assert cfg.tie_word_embeddings == tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    if arch == "qwen3":
        assert head_dim != cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        logits = model(torch.tensor([tok("hello").input_ids])).logits
    assert logits.shape[-1] == 500 and torch.isfinite(logits).all()


def test_qwen2_has_nonzero_qkv_bias_and_random_norms(tiny_model_dirs):
    with safe_open(str(tiny_model_dirs("qwen2") / "model.safetensors"), "pt") as f:
        for proj in "qkv":
            assert f.get_tensor(f"model.layers.0.self_attn.{proj}_proj.bias").abs().min() > 0
        assert not torch.all(f.get_tensor("model.norm.weight") == 1)


def test_generation_config(tiny_model_dirs):
    path = tiny_model_dirs("llama")
    gen = GenerationConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert gen.bos_token_id == tok.bos_token_id
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids(END)]


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dirs, tmp_path):
    first = tiny_model_dirs("qwen3")
    again = build_tiny_model(tmp_path / "again", "qwen3", seed=0)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", "qwen3", seed=1)
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", "llama")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_and_adds_bos(arch, loaded):
    _, tok = loaded(arch)
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[0]) == BOS
        assert tok.bos_token_id not in ids[1:]
        plain = tok(text, add_special_tokens=False).input_ids
        assert plain == ids[1:]
        assert max(plain) < len(tok)
        assert tok.decode(plain) == text
        assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = "hello, my name is"
    assert len(tok(prompt, add_special_tokens=False).input_ids) < len(prompt)  # merges happen


def test_special_tokens(loaded):
    _, tok = loaded("llama")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", END):
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chat_template(arch, loaded):
    _, tok = loaded(arch)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ñ"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi ñ<|end|>\n<|assistant|>\n"
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text


def test_cli(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "mi.models.tiny", "--arch", "mistral", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "mistral"


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_model(tmp_path, "gpt2")
