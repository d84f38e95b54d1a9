"""The Hugging Face baseline: `model.generate` on static, left-padded batches, in this process.

A static batch has no per-request timeline: every request of a batch gets its first token when
the batch's prefill ends and its last when the batch ends. So TTFT is a 1-token run of the same
batch, TPOT is (full run - 1-token run) / (output_len - 1), and throughput counts every batch's
full run; EOS is ignored (min_new_tokens = max_new_tokens) as with `--ignore-eos`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mi.bench.workload import Prompt


def _generate_seconds(model, tokenizer, texts: list[str], output_len: int) -> float:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            pad_token_id=tokenizer.pad_token_id,
        )
    return time.perf_counter() - start


def _stats(values_ms: list[float]) -> dict:
    arr = np.array(values_ms)
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}}


def hf_static(hf_dir, prompts: list[Prompt], batch_size: int) -> dict:
    """A point (as `mi.bench.metrics.summarize` gives, the figures a static batch has) for the
    prompts run `batch_size` at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    output_len = max(p.output_len for p in prompts)
    batches = [[p.text for p in prompts[i : i + batch_size]] for i in range(0, len(prompts), batch_size)]
    _generate_seconds(model, tokenizer, batches[0][:1], 2)  # warm-up
    ttft_ms, tpot_ms, total = [], [], 0.0
    for texts in batches:
        first = _generate_seconds(model, tokenizer, texts, 1)
        full = _generate_seconds(model, tokenizer, texts, output_len)
        total += full
        ttft_ms += [first * 1000.0] * len(texts)
        tpot_ms += [(full - first) * 1000.0 / max(output_len - 1, 1)] * len(texts)
    num_out = output_len * len(prompts)
    num_in = sum(p.prompt_len or 0 for p in prompts)
    none = {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "num_requests": len(prompts),
        "completed": len(prompts),
        "failed": 0,
        "errors": {},
        "duration_s": total,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": len(prompts) / total,
        "output_throughput": num_out / total,
        "total_token_throughput": (num_out + num_in) / total,
        "ttft_ms": _stats(ttft_ms),
        "tpot_ms": _stats(tpot_ms),
        "itl_ms": none,
        "e2el_ms": none,
        "batch_size": batch_size,
    }
