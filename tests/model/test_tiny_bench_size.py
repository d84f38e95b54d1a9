"""`python -m mi.models.tiny --size bench-125m`: issue 9's benchmark shape. Building its ~500 MB of
weights takes ~20 s on this machine's 2 cores, so the tests check the config (weights on the
meta device: no memory, no time) and the trained tokenizer (~5 s), and the CLI's refusals."""

import pytest
import torch
from transformers import LlamaForCausalLM

from mi.models.tiny import SIZES, build_tokenizer, main, tiny_config


def test_bench_125m_config_is_the_issue_9_shape():
    config = tiny_config("llama", size="bench-125m")
    shape = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 2048,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "dtype": torch.float32,
    }
    assert {name: getattr(config, name) for name in shape} == shape
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 124_668_672


def test_bench_125m_tokenizer_has_exactly_32000_entries_and_is_deterministic():
    from mi.models.tiny import _trained_tokenizer_json

    tokenizer = build_tokenizer("bench-125m")
    assert len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens(list(range(8))) == [
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
        "<|unk|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    ids = tokenizer("def main(argv=None):\n    return 0").input_ids
    assert ids[0] == 0 and len(ids) < 12  # BOS, then a vocabulary that knows Python
    assert tokenizer.decode(ids, skip_special_tokens=True) == "def main(argv=None):\n    return 0"
    _trained_tokenizer_json.cache_clear()  # train again: the same merges
    assert build_tokenizer("bench-125m").backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_the_tiny_preset_is_the_default():
    assert tiny_config("qwen2").to_dict() == tiny_config("qwen2", size="tiny").to_dict()
    assert tiny_config("qwen2").vocab_size == SIZES["tiny"].vocab_size == 500


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "bench-125m", "--arch", "qwen2"], "size 'bench-125m' is built for llama only"),
        (["--size", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_the_cli_refuses_what_it_cannot_build(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
