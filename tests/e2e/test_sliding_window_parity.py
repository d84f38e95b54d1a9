"""Sliding-window attention through the backend equals Hugging Face `generate`, with windows
smaller than the prompt: Mistral (every layer) and Qwen2's per-layer pattern, whole and chunked
prefill (tiny random-weight models)."""

import asyncio

import pytest
from hf_reference import hf_greedy, post_all

from mi.convert import convert
from mi.models.tiny import build_tiny_model

from servers import start_backend

WINDOW = 12
MODELS = {
    # name: (arch, config overrides)
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    # Qwen2: layers from max_window_layers on use the window, the first stays full.
    "qwen2_per_layer": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
}
PROMPTS = [
    "Hi",  # within the window
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Numbers: " + ", ".join(str(i) for i in range(30)),
]
MAX_TOKENS = 24


@pytest.mark.parametrize("flags", [(), ("--max-num-batched-tokens", "16")], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_hf_beyond_the_window(name, flags, tmp_path):
    arch, overrides = MODELS[name]
    hf_dir = build_tiny_model(tmp_path / "hf", arch=arch, overrides=overrides)
    mi_dir = convert(hf_dir, tmp_path / "mi", 1)
    expected = hf_greedy(hf_dir, PROMPTS, MAX_TOKENS)
    assert max(len(ids) for ids, _, _ in expected) > 3 * WINDOW
    proc, port = start_backend(mi_dir, *flags)
    try:
        bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in PROMPTS]
        answers = asyncio.run(post_all(f"http://127.0.0.1:{port}/v1/generate", bodies))
        for (prompt_ids, ids, _), got, prompt in zip(expected, answers, PROMPTS):
            assert got["prompt_ids"] == prompt_ids
            assert got["ids"] == ids, (name, prompt)
    finally:
        assert proc.stop() == 0, proc.output


def test_a_cache_smaller_than_one_request_serves_it_when_every_layer_is_windowed(tmp_path):
    """Mistral (every layer windowed): the blocks behind the window are freed as a request runs,
    so 4 blocks of 16 serve requests that need 6 whole (3 at a time: window 12 + a 16-token
    chunk), still equal to Hugging Face; the scheduler checks its invariants whenever it idles."""
    hf_dir = build_tiny_model(tmp_path / "hf", arch="mistral", overrides={"sliding_window": WINDOW})
    mi_dir = convert(hf_dir, tmp_path / "mi", 1)
    expected = hf_greedy(hf_dir, PROMPTS, MAX_TOKENS)
    longest = max(len(prompt_ids) + len(ids) for prompt_ids, ids, _ in expected)
    assert -(-longest // 16) > 4
    flags = ("--max-num-batched-tokens", "16", "--num-kv-blocks", "4", "--debug-invariants")
    proc, port = start_backend(mi_dir, *flags)
    try:
        bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in PROMPTS]
        answers = asyncio.run(post_all(f"http://127.0.0.1:{port}/v1/generate", bodies))
        assert [got["ids"] for got in answers] == [ids for _, ids, _ in expected]
    finally:
        assert proc.stop() == 0, proc.output
