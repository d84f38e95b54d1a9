"""A GGUF of every quant type the `gguf` package can write, converted and served: greedy output
equals transformers `generate` on the same file (`from_pretrained(dir, gguf_file=...)`)."""

import asyncio

import gguf
import pytest
from gguf_files import writable_types
from hf_reference import hf_greedy, post_all

from mi.convert import convert
from mi.convert.gguf_source import SUPPORTED_QUANT_TYPES

from servers import start_backend

PROMPTS = ["Hi", "def fibonacci(n):\n    return", "Once upon a time, in a land far away, there lived"]
MAX_TOKENS = 16
# Every writable type on the Llama (q / k rows permuted in the file), one on Qwen2 (biases, tied).
CASES = [("llama", q.name) for q in writable_types(SUPPORTED_QUANT_TYPES)] + [("qwen2", "Q8_0")]


def test_cases_cover_every_writable_quant_type():
    names = {q for _, q in CASES}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} <= names
    assert all(gguf.GGMLQuantizationType[q] in SUPPORTED_QUANT_TYPES for q in names)


@pytest.mark.parametrize("arch,qtype", CASES)
def test_quantized_gguf_served_matches_transformers(arch, qtype, tiny_gguf, tmp_path):
    path = tiny_gguf(arch, qtype)
    expected = hf_greedy(path.parent, PROMPTS, MAX_TOKENS, gguf_file=path.name)
    backend, port = start_backend(convert(path, tmp_path / "mi", 1, progress=False))
    try:
        bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in PROMPTS]
        got = asyncio.run(post_all(f"http://127.0.0.1:{port}/v1/generate", bodies))
    finally:
        assert backend.stop() == 0, backend.output
    for (prompt_ids, ids, _), result, prompt in zip(expected, got, PROMPTS):
        assert result["prompt_ids"] == prompt_ids, prompt
        assert result["ids"] == ids, prompt
    assert any(len(ids) == MAX_TOKENS for _, ids, _ in expected)  # not all cut short by EOS
