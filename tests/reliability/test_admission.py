"""Admission of long prompts: tokenizing never runs on the backend's or the frontend's event loop
(their /health keeps answering while a 2 MiB prompt is tokenized), a prompt too long to fit is
refused by its size before it is tokenized, and the frontend tokenizes each prompt once (n=64).

Real processes: the tiny Llama (a byte-level BPE of 500 entries: a 2 MiB prompt is 1.4 M
tokens, about 3 s of tokenizer work on this machine) on two backends, one with the automatic
size bound and one with `--max-prompt-bytes 8MiB` (so the prompt is tokenized), each with a
frontend that accepts 4 MiB bodies.
"""

import asyncio
import time

import aiohttp
import pytest

from servers import backend_headers, start_backend, start_frontend

TWO_MIB_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 50000)[: 2 << 20]
# The loop may stall this long at most while the prompt is tokenized (the GIL-held conversion of
# the ids to a list takes ~0.1 s); on the loop, the tokenizer held it for seconds.
HEALTH_SLACK_S = 0.75


@pytest.fixture(scope="module")
def servers(converted):
    procs = []
    try:
        bounded, bounded_port = start_backend(converted("llama", 1))
        procs.append(bounded)
        unbounded, unbounded_port = start_backend(converted("llama", 1), "--max-prompt-bytes", "8MiB")
        procs.append(unbounded)
        bounded_fe, bounded_url = start_frontend(bounded_port, "--max-body-bytes", "4MiB")
        procs.append(bounded_fe)
        unbounded_fe, unbounded_url = start_frontend(unbounded_port, "--max-body-bytes", "4MiB")
        procs.append(unbounded_fe)
        yield {
            "bounded": (f"http://127.0.0.1:{bounded_port}", bounded_url),
            "unbounded": (f"http://127.0.0.1:{unbounded_port}", unbounded_url),
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


async def _health_latencies(session: aiohttp.ClientSession, url: str, seen: list[float]) -> None:
    while True:
        started = time.monotonic()
        async with session.get(url + "/health") as resp:
            assert resp.status == 200
        seen.append(time.monotonic() - started)
        await asyncio.sleep(0.02)


def _post_watching_health(url: str, body: dict, health_urls: list[str], headers=None):
    """POSTs `body` while polling each /health; (status, body, seconds, worst /health latency)."""

    async def run():
        async with aiohttp.ClientSession(headers=headers) as session:
            latencies: list[list[float]] = [[] for _ in health_urls]
            watchers = [
                asyncio.create_task(_health_latencies(session, u, seen))
                for u, seen in zip(health_urls, latencies)
            ]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            async with session.post(url, json=body) as resp:
                answer = await resp.json(content_type=None)
                elapsed = time.monotonic() - started
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            return resp.status, answer, elapsed, max(max(seen) for seen in latencies)

    return asyncio.run(run())


@pytest.mark.timeout(300)
def test_a_long_prompt_is_tokenized_off_the_backends_loop(servers):
    backend_url, _ = servers["unbounded"]
    status, answer, elapsed, worst_health = _post_watching_health(
        backend_url + "/v1/generate",
        {"prompt": TWO_MIB_PROMPT, "max_tokens": 4},
        [backend_url],
        backend_headers(),
    )
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert "in the prompt, 4 for the completion" in answer["error"]["message"]  # it was tokenized
    # Before: /health waited for the whole tokenization (seconds) behind the loop.
    assert worst_health < HEALTH_SLACK_S, (worst_health, elapsed)


@pytest.mark.timeout(300)
def test_the_frontend_tokenizes_a_prompt_once_for_n_64_off_its_loop(servers):
    backend_url, frontend_url = servers["unbounded"]
    body = {"model": _model_name(frontend_url), "prompt": TWO_MIB_PROMPT, "max_tokens": 4, "n": 64}
    status, answer, elapsed, worst_health = _post_watching_health(
        frontend_url + "/v1/completions", body, [frontend_url]
    )
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert answer["error"]["param"] == "prompt"
    # One tokenization is ~3 s here; before, the backend tokenized the prompt 64 times (minutes).
    assert elapsed < 30, elapsed
    assert worst_health < HEALTH_SLACK_S, (worst_health, elapsed)


@pytest.mark.timeout(120)
def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(servers):
    backend_url, frontend_url = servers["bounded"]

    async def model_info():
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            async with session.get(backend_url + "/v1/model") as resp:
                return await resp.json()

    limit = asyncio.run(model_info())["max_prompt_bytes"]
    # 2048 positions x the vocabulary's longest entry (38 UTF-8 bytes) x 4 (normalizer slack).
    assert 0 < limit < len(TWO_MIB_PROMPT), limit
    for url, body, health, headers in (
        (backend_url + "/v1/generate", {"prompt": TWO_MIB_PROMPT}, backend_url, backend_headers()),
        (
            frontend_url + "/v1/completions",
            {"model": _model_name(frontend_url), "prompt": TWO_MIB_PROMPT, "max_tokens": 4, "n": 64},
            frontend_url,
            None,
        ),
        (
            frontend_url + "/v1/chat/completions",
            {"model": _model_name(frontend_url), "messages": [{"role": "user", "content": TWO_MIB_PROMPT}]},
            frontend_url,
            None,
        ),
    ):
        status, answer, elapsed, worst_health = _post_watching_health(url, body, [health], headers)
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", (url, answer)
        # The bytes, not the tokens: it never reached the tokenizer (~3 s for this prompt).
        assert f"more than the {limit} bytes" in answer["error"]["message"], answer
        assert elapsed < 1.5, (url, elapsed)
        assert worst_health < HEALTH_SLACK_S, (url, worst_health)


def test_a_prompt_within_the_bound_is_served_as_before(servers):
    backend_url, frontend_url = servers["bounded"]
    prompt = "the quick brown fox jumps over the lazy dog"

    async def run():
        async with aiohttp.ClientSession() as session:
            counts = []
            for text in (prompt, prompt + "!"):
                async with session.post(
                    frontend_url + "/tokenize", json={"model": _model_name(frontend_url), "prompt": text}
                ) as resp:
                    counts.append((await resp.json())["tokens"])
            tokens = counts[0]
            body = {"model": _model_name(frontend_url), "prompt": [prompt, prompt + "!"], "max_tokens": 3}
            async with session.post(frontend_url + "/v1/completions", json={**body, "n": 4}) as resp:
                assert resp.status == 200, await resp.text()
                completion = await resp.json()
            async with session.post(
                backend_url + "/v1/generate",
                json={"prompt": prompt, "max_tokens": 3},
                headers=backend_headers(),
            ) as resp:
                generated = await resp.json()
            return tokens, len(counts[1]), completion, generated

    tokens, second_len, completion, generated = asyncio.run(run())
    assert len(completion["choices"]) == 8
    assert list(generated["prompt_ids"]) == tokens  # the backend still takes text prompts
    # Each prompt counted once; the frontend's ids are the backend's.
    assert completion["usage"]["prompt_tokens"] == len(tokens) + second_len


_NAMES: dict[str, str] = {}


def _model_name(frontend_url: str) -> str:
    if frontend_url not in _NAMES:

        async def get():
            async with aiohttp.ClientSession() as session:
                async with session.get(frontend_url + "/v1/models") as resp:
                    return (await resp.json())["data"][0]["id"]

        _NAMES[frontend_url] = asyncio.run(get())
    return _NAMES[frontend_url]
