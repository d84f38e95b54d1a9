"""Tensor parallelism (gloo on CPU) and data-parallel replicas through the real backend."""

import asyncio

import aiohttp
import pytest
from test_e2e_hf_parity import MAX_TOKENS, PROMPTS, hf_greedy

from servers import backend_headers, start_backend

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


async def _generate_all(port: int, bodies: list[dict]) -> list[dict]:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:

        async def one(body):
            async with session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        return await asyncio.gather(*(one(b) for b in bodies))


async def _get(port: int, path: str) -> dict:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return await resp.json()


def _greedy_bodies(**extra) -> list[dict]:
    return [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, **extra} for p in PROMPTS]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_tp_greedy_matches_hf(arch, tp, tiny_model_dirs, converted):
    expected = hf_greedy(tiny_model_dirs(arch), PROMPTS, MAX_TOKENS)
    backend, port = start_backend(converted(arch, tp), "--device", str(tp))
    try:
        got = asyncio.run(_generate_all(port, _greedy_bodies()))
    finally:
        assert backend.stop() == 0, backend.output
    for (_, ids, _), result, prompt in zip(expected, got, PROMPTS):
        assert result["ids"] == ids, (arch, tp, prompt)


def test_gloo_collectives_match_hf(tiny_model_dirs, converted):
    """The gloo fallback (used for tensors too big for the shared-memory slots) stays exact."""
    expected = hf_greedy(tiny_model_dirs("qwen2"), PROMPTS, MAX_TOKENS)
    backend, port = start_backend(converted("qwen2", 2), "--device", "2", "--gloo-collectives")
    try:
        got = asyncio.run(_generate_all(port, _greedy_bodies()))
    finally:
        assert backend.stop() == 0, backend.output
    assert [r["ids"] for r in got] == [ids for _, ids, _ in expected]


def test_tp2_logprobs_match_tp1(converted):
    bodies = _greedy_bodies(logprobs=5, prompt_logprobs=3)
    results = {}
    for tp in (1, 2):
        backend, port = start_backend(converted("llama", tp), "--device", str(tp))
        try:
            results[tp] = asyncio.run(_generate_all(port, bodies))
        finally:
            backend.stop()
    for one, two in zip(results[1], results[2]):
        assert one["ids"] == two["ids"]
        for a, b in zip(
            one["logprobs"] + one["prompt_logprobs"][1:], two["logprobs"] + two["prompt_logprobs"][1:]
        ):
            assert a["token_id"] == b["token_id"]
            assert abs(a["logprob"] - b["logprob"]) < 1e-4
            assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a["top"], b["top"])) < 1e-4


def test_two_replicas_share_the_load_and_stay_exact(tiny_model_dirs, converted):
    expected = hf_greedy(tiny_model_dirs("llama"), PROMPTS, MAX_TOKENS)
    backend, port = start_backend(converted("llama", 2), "--device", "4")
    try:
        info = asyncio.run(_get(port, "/v1/model"))
        assert info["num_replicas"] == 2 and info["tp"] == 2
        got = asyncio.run(_generate_all(port, _greedy_bodies() * 4))  # 32 concurrent requests
        stats = asyncio.run(_get(port, "/v1/stats"))
    finally:
        assert backend.stop() == 0, backend.output
    for i, result in enumerate(got):
        assert result["ids"] == expected[i % len(PROMPTS)][1]
    routed = [r["requests_routed_total"] for r in stats["replicas"]]
    assert sum(routed) == 32 and min(routed) >= 8, routed


def test_two_backends_on_one_host(converted):
    first, port1 = start_backend(converted("llama", 2))
    second, port2 = start_backend(converted("qwen3", 2))
    try:
        a = asyncio.run(_generate_all(port1, _greedy_bodies()[:2]))
        b = asyncio.run(_generate_all(port2, _greedy_bodies()[:2]))
        assert all(r["finish_reason"] for r in a + b)
    finally:
        assert first.stop() == 0 and second.stop() == 0
