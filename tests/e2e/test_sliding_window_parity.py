"""Sliding-window attention through the backend equals Hugging Face `generate`, with windows
smaller than the prompt: Mistral (every layer) and Qwen2's per-layer pattern, whole and chunked
prefill (tiny random-weight models)."""

import asyncio

import aiohttp
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mi.convert import convert
from mi.models.tiny import build_tiny_model

from servers import backend_headers, start_backend

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


def _hf_greedy(hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    results = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS
            )
        results.append((ids[0].tolist(), out[0, ids.shape[1] :].tolist()))
    return results


async def _generate_all(port):
    async with aiohttp.ClientSession(headers=backend_headers()) as session:

        async def one(prompt):
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            async with session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        return await asyncio.gather(*(one(p) for p in PROMPTS))


@pytest.mark.parametrize("flags", [(), ("--max-num-batched-tokens", "16")], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_hf_beyond_the_window(name, flags, tmp_path):
    arch, overrides = MODELS[name]
    hf_dir = build_tiny_model(tmp_path / "hf", arch=arch, overrides=overrides)
    mi_dir = convert(hf_dir, tmp_path / "mi", 1)
    expected = _hf_greedy(hf_dir)
    assert max(len(ids) for ids, _ in expected) > 3 * WINDOW
    proc, port = start_backend(mi_dir, *flags)
    try:
        for (prompt_ids, ids), got, prompt in zip(expected, asyncio.run(_generate_all(port)), PROMPTS):
            assert got["prompt_ids"] == prompt_ids
            assert got["ids"] == ids, (name, prompt)
    finally:
        assert proc.stop() == 0, proc.output
