"""Greedy output through the backend equals Hugging Face `generate` for each length-aware RoPE
variant, on prompts that run past the original context (tiny random-weight Llama models)."""

import asyncio

import pytest
from hf_reference import hf_greedy, post_all

from mi.convert import convert
from mi.models.tiny import build_tiny_model

from servers import start_backend

HALF_HEAD_DIM = 8  # the tiny Llama's head_dim is 16
ROPES = {
    # name: (rope parameters, max_position_embeddings, extra mi-backend flags)
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 2048, ()),
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(HALF_HEAD_DIM)],
            "long_factor": [1.5 + 0.4 * i for i in range(HALF_HEAD_DIM)],
            "original_max_position_embeddings": 32,
        },
        2048,
        (),
    ),
    # Dynamic NTK serves past max_position_embeddings: the backend accepts a longer --max-model-len.
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 32, ("--max-model-len", "256")),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        2048,
        (),
    ),
}
PROMPTS = [
    "Short, within the original context.",  # longrope: short factors throughout prefill
    "The quick brown fox jumps over the lazy dog. " * 6,  # past the original context
]
MAX_TOKENS = 24


@pytest.mark.parametrize("name", list(ROPES))
def test_greedy_matches_hf_past_the_original_context(name, tmp_path):
    params, max_positions, flags = ROPES[name]
    overrides = {"rope_parameters": params, "max_position_embeddings": max_positions}
    hf_dir = build_tiny_model(tmp_path / "hf", overrides=overrides)
    mi_dir = convert(hf_dir, tmp_path / "mi", 1)
    # A fresh model per prompt: HF keeps dynamic RoPE state from one generate call to the next.
    expected = hf_greedy(hf_dir, PROMPTS, MAX_TOKENS, fresh_model_per_prompt=True)
    assert len(expected[1][0]) + MAX_TOKENS > 32 + 16, "the long prompt must outgrow the original context"
    proc, port = start_backend(mi_dir, *flags)
    try:
        for prompt, (prompt_ids, ids, _) in zip(PROMPTS, expected):
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            [got] = asyncio.run(post_all(f"http://127.0.0.1:{port}/v1/generate", [body]))
            assert got["prompt_ids"] == prompt_ids
            assert got["ids"] == ids, (name, prompt)
    finally:
        assert proc.stop() == 0, proc.output
