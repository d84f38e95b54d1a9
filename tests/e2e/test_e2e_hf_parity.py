"""Greedy output through the real servers equals Hugging Face `generate`, token for token."""

import asyncio

import pytest
from hf_reference import hf_greedy, post_all

from servers import start_backend, start_frontend

PROMPTS = [
    "Hi",
    "Say this is a test",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def fibonacci(n):\n    return",
    "Once upon a time, in a land far away, there lived",
    "Numbers: " + ", ".join(str(i) for i in range(40)),
    "Ünïcödé text — ok? ",
    "A long prompt that spans many KV blocks. " * 30,
]
MAX_TOKENS = 24


def _check(hf_dir, backend_url, frontend_url):
    expected = hf_greedy(hf_dir, PROMPTS, MAX_TOKENS)
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in PROMPTS]
    backend = asyncio.run(post_all(backend_url + "/v1/generate", bodies))
    for (prompt_ids, ids, text), got, prompt in zip(expected, backend, PROMPTS):
        assert got["prompt_ids"] == prompt_ids, prompt
        assert got["ids"] == ids, prompt
        assert got["text"] == text, prompt
    frontend = asyncio.run(post_all(frontend_url + "/v1/completions", bodies))
    for (_, ids, text), got in zip(expected, frontend):
        assert got["choices"][0]["text"] == text
        assert got["usage"]["completion_tokens"] == len(ids)


def test_llama_matches_hf(served_model):
    _check(served_model.hf_dir, served_model.backend_url, served_model.frontend_url)


@pytest.mark.parametrize("arch", ["qwen3"])
def test_other_arch_matches_hf_with_chunked_prefill(arch, tiny_model_dirs, converted):
    # A small token budget forces long prompts to be prefilled in chunks beside running decodes.
    backend, port = start_backend(converted(arch, 1), "--max-num-batched-tokens", "64")
    try:
        frontend, url = start_frontend(port)
        try:
            _check(tiny_model_dirs(arch), f"http://127.0.0.1:{port}", url)
        finally:
            assert frontend.stop() == 0
    finally:
        assert backend.stop() == 0, backend.output
