"""Hugging Face `generate` as the reference, and a client that posts to a server: what the parity
tests share."""

import asyncio

import aiohttp
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from servers import backend_headers


def hf_greedy(model_dir, prompts, max_new_tokens, gguf_file=None, fresh_model_per_prompt=False):
    """[(prompt ids, generated ids, generated text)] of greedy `generate` in float32, one prompt at
    a time. `gguf_file`: read that file in `model_dir`. `fresh_model_per_prompt`: for state HF
    keeps from one generate call to the next (dynamic RoPE)."""
    load = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **load)
    model = None
    results = []
    for prompt in prompts:
        if model is None or fresh_model_per_prompt:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load).eval()
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        generated = out[0, ids.shape[1] :].tolist()
        results.append((ids[0].tolist(), generated, tokenizer.decode(generated, skip_special_tokens=True)))
    return results


async def post_all(url, bodies) -> list[dict]:
    """POSTs every body at once (with the backend's secret); the JSON answers, each must be 200."""
    async with aiohttp.ClientSession(headers=backend_headers()) as session:

        async def post(body):
            async with session.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        return await asyncio.gather(*(post(b) for b in bodies))
