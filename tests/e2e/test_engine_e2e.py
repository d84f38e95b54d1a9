"""Scheduler and sampler behaviour through the real backend (token-level API)."""

import asyncio
import time

import aiohttp
import pytest
import torch
from test_e2e_hf_parity import PROMPTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from servers import backend_headers, start_backend


def _run(coro):
    return asyncio.run(coro)


async def _generate(port: int, bodies: list[dict], expect_status: int = 200) -> list[dict]:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:

        async def one(body):
            async with session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as resp:
                assert resp.status == expect_status, await resp.text()
                return await resp.json()

        return await asyncio.gather(*(one(b) for b in bodies))


async def _stats(port: int) -> dict:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/stats") as resp:
            return await resp.json()


@pytest.fixture(scope="module")
def backend(converted):
    proc, port = start_backend(converted("llama", 1), "--debug-invariants")
    yield port
    proc.stop()


@pytest.fixture(scope="module")
def hf(tiny_model_dirs):
    hf_dir = tiny_model_dirs("llama")
    return (
        AutoTokenizer.from_pretrained(hf_dir),
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(),
    )


def test_kv_pressure_preempts_and_outputs_stay_exact(backend, converted):
    bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True} for p in PROMPTS * 4]
    unpressured = _run(_generate(backend, bodies))
    # 64 blocks of 16 tokens fit the longest request (48 blocks) but not 32 at once: it must preempt.
    proc, port = start_backend(
        converted("llama", 1), "--num-kv-blocks", "64", "--no-prefix-caching", "--debug-invariants"
    )
    try:
        pressured = _run(_generate(port, bodies))
        stats = _run(_stats(port))
    finally:
        assert proc.stop() == 0, proc.output
    assert [r["ids"] for r in pressured] == [r["ids"] for r in unpressured]
    assert stats["num_preemptions"] > 0
    assert stats["num_kv_blocks"] == 64


def test_request_that_can_never_fit_is_rejected(converted):
    proc, port = start_backend(converted("llama", 1), "--num-kv-blocks", "4")
    try:
        [error] = _run(_generate(port, [{"prompt_ids": [5] * 60, "max_tokens": 10}], 400))
        assert "KV-cache blocks" in error["error"]["message"]
        [ok] = _run(_generate(port, [{"prompt_ids": [5] * 20, "max_tokens": 10, "ignore_eos": True}]))
        assert len(ok["ids"]) == 10
    finally:
        proc.stop()


def test_repeated_prompt_hits_the_prefix_cache(backend):
    prompt = "A long shared system prompt that fills several KV blocks. " * 8
    (first,) = _run(_generate(backend, [{"prompt": prompt, "max_tokens": 4, "temperature": 0}]))
    (second,) = _run(_generate(backend, [{"prompt": prompt, "max_tokens": 4, "temperature": 0}]))
    assert first["usage"]["cached_tokens"] == 0
    assert second["usage"]["cached_tokens"] >= 16 * ((first["usage"]["prompt_tokens"] - 1) // 16)
    assert second["ids"] == first["ids"]
    deadline = time.monotonic() + 5  # stats are snapshots the scheduler sends when it goes idle
    while _run(_stats(backend))["prefix_cache_hit_tokens"] < second["usage"]["cached_tokens"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_seed_gives_the_same_tokens_alone_and_in_a_crowd(backend):
    body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "seed": 1234}
    (alone,) = _run(_generate(backend, [body]))
    crowd = [
        {"prompt": p, "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": i}
        for i, p in enumerate(PROMPTS * 2)
    ]
    results = _run(_generate(backend, crowd[:7] + [body] + crowd[7:]))
    assert results[7]["ids"] == alone["ids"]
    (other,) = _run(_generate(backend, [{**body, "seed": 4321}]))
    assert other["ids"] != alone["ids"]


def test_logprobs_equal_hf_log_softmax(backend, hf):
    tokenizer, model = hf
    prompt = "The quick brown fox jumps over"
    (result,) = _run(
        _generate(
            backend,
            [{"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 5, "prompt_logprobs": 2}],
        )
    )
    ids = torch.tensor([result["prompt_ids"] + result["ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    num_prompt = len(result["prompt_ids"])
    assert result["prompt_logprobs"][0] is None
    for pos, entry in enumerate(result["prompt_logprobs"][1:], start=1):
        assert entry["token_id"] == result["prompt_ids"][pos]
        assert abs(entry["logprob"] - logprobs[pos - 1, entry["token_id"]].item()) < 1e-4
        assert len(entry["top"]) == 2
    for i, entry in enumerate(result["logprobs"]):
        row = logprobs[num_prompt - 1 + i]
        assert entry["token_id"] == result["ids"][i] == row.argmax().item()
        assert abs(entry["logprob"] - row[entry["token_id"]].item()) < 1e-4
        top = row.topk(5)
        assert [t for t, _ in entry["top"]] == top.indices.tolist()
        assert max(abs(lp - ref) for (_, lp), ref in zip(entry["top"], top.values.tolist())) < 1e-4


def test_prompt_only_scoring_with_max_tokens_zero(backend):
    (result,) = _run(
        _generate(backend, [{"prompt": "score me please", "max_tokens": 0, "prompt_logprobs": 0}])
    )
    assert result["ids"] == [] and result["finish_reason"] == "length"
    assert len(result["prompt_logprobs"]) == len(result["prompt_ids"])
    assert all(e["top"] == [] for e in result["prompt_logprobs"][1:])


def test_logit_bias_forces_a_token_and_min_tokens_bans_eos(backend):
    (forced,) = _run(
        _generate(backend, [{"prompt": "hi", "max_tokens": 5, "temperature": 0, "logit_bias": {"42": 100}}])
    )
    assert forced["ids"] == [42] * 5
    # With EOS pushed to the top, the request still has to produce min_tokens first.
    eos = 1
    (result,) = _run(
        _generate(
            backend,
            [
                {
                    "prompt": "hi",
                    "max_tokens": 20,
                    "temperature": 0,
                    "logit_bias": {str(eos): 50},
                    "min_tokens": 7,
                }
            ],
        )
    )
    assert result["ids"][-1] == eos and len(result["ids"]) == 8
    assert eos not in result["ids"][:7]


def test_stop_strings_and_stop_ids(backend):
    (free,) = _run(
        _generate(
            backend,
            [{"prompt": "Say this is a test", "max_tokens": 24, "temperature": 0, "ignore_eos": True}],
        )
    )
    stop = free["text"][5:8]
    (cut,) = _run(
        _generate(
            backend,
            [
                {
                    "prompt": "Say this is a test",
                    "max_tokens": 24,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stop": [stop],
                }
            ],
        )
    )
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == free["text"][: free["text"].index(stop)]
    (kept,) = _run(
        _generate(
            backend,
            [
                {
                    "prompt": "Say this is a test",
                    "max_tokens": 24,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stop": [stop],
                    "include_stop_str_in_output": True,
                }
            ],
        )
    )
    assert kept["text"] == cut["text"] + stop
    stop_id = free["ids"][3]
    (by_id,) = _run(
        _generate(
            backend,
            [
                {
                    "prompt": "Say this is a test",
                    "max_tokens": 24,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stop_token_ids": [stop_id],
                }
            ],
        )
    )
    assert by_id["ids"] == free["ids"][: free["ids"].index(stop_id) + 1]
    assert by_id["finish_reason"] == "stop"


def test_repetition_penalty_changes_greedy_output(backend):
    body = {"prompt": "Numbers: 1, 2, 3", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    (plain,) = _run(_generate(backend, [body]))
    (penalized,) = _run(_generate(backend, [{**body, "repetition_penalty": 5.0}]))
    assert len(set(penalized["ids"])) > len(set(plain["ids"]))


def test_aborted_requests_free_everything(backend):
    async def scenario():
        async with aiohttp.ClientSession(headers=backend_headers()) as session:

            async def cancelled(i):
                body = {"prompt": f"story {i}", "max_tokens": 1500, "ignore_eos": True, "stream": True}
                try:
                    async with session.post(
                        f"http://127.0.0.1:{backend}/v1/generate",
                        json=body,
                        timeout=aiohttp.ClientTimeout(total=0.5),
                    ) as r:
                        async for _ in r.content:
                            pass
                except asyncio.TimeoutError:
                    pass

            await asyncio.gather(*(cancelled(i) for i in range(16)))

    _run(scenario())
    deadline = time.monotonic() + 5
    while True:
        stats = _run(_stats(backend))
        if stats["num_requests_running"] == 0 and stats["num_kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats["requests_finished_total"]["abort"] >= 16


def test_queue_limit_answers_503(converted):
    proc, port = start_backend(converted("llama", 1), "--max-num-seqs", "2", "--max-queued-requests", "2")
    try:
        bodies = [{"prompt": "x", "max_tokens": 1500, "ignore_eos": True}] * 4

        async def scenario():
            async with aiohttp.ClientSession(headers=backend_headers()) as session:
                url = f"http://127.0.0.1:{port}/v1/generate"
                running = [asyncio.create_task(session.post(url, json=b)) for b in bodies]
                await asyncio.sleep(0.3)
                async with session.post(url, json=bodies[0]) as resp:
                    status, retry = resp.status, resp.headers.get("Retry-After")
                    body = await resp.json()
                for task in running:
                    (await task).release()
                return status, retry, body

        status, retry, body = _run(scenario())
        assert status == 503 and retry == "1"
        assert body["error"]["code"] == "overloaded"
    finally:
        proc.stop()


def test_identical_prompts_sent_together_share_blocks(backend):
    """n > 1 fans out into identical prompts: all but one reuse the first one's prompt blocks."""
    prompt = "Identical prompts arriving together. " * 10 + "unique tail 7"
    bodies = [{"prompt": prompt, "max_tokens": 4, "temperature": 0}] * 4
    results = _run(_generate(backend, bodies))
    cached = sorted(r["usage"]["cached_tokens"] for r in results)
    assert cached[0] == 0 and all(c >= 16 for c in cached[1:]), cached
    assert len({tuple(r["ids"]) for r in results}) == 1
