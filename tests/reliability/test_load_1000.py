"""Load (issue 10): 1,000 concurrent short streaming completions through a real frontend and
backend: no errors, no truncated stream (each ends with its finish_reason and [DONE]), and every
greedy output identical to the same prompt's sent alone.

What lets 1,000 in at once: the backend admits --max-num-seqs running plus --max-queued-requests
(default 1,024) waiting per replica before answering 503; neither aiohttp server limits its
connections; the frontend's backend client has no connection limit either. Each stream holds a
file descriptor in the frontend for the client, one in the frontend and one in the backend for
the backend call: the servers inherit this test's soft RLIMIT_NOFILE, raised for them if low.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time

import aiohttp
import pytest

from servers import start_backend, start_frontend

NUM_REQUESTS = 1000
PROMPTS = [
    f"{subject} {verb} the {thing}"
    for subject, verb, thing in zip(
        ["the cat", "a dog", "my friend", "the old man", "a robot"] * 4,
        ["sees", "wants", "finds", "likes"] * 5,
        ["river", "moon", "garden", "city", "song", "door", "sea", "road", "tree", "book"] * 2,
    )
]
BODY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
FDS_NEEDED = 4 * NUM_REQUESTS + 1024


@pytest.fixture(scope="module")
def servers(converted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
            pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} is below the {FDS_NEEDED} descriptors this needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))
    backend, port = start_backend(converted("llama", 1), "--max-queued-requests", str(NUM_REQUESTS))
    try:
        frontend, url = start_frontend(port)
    except Exception:
        backend.stop()
        raise
    yield url
    frontend.stop()
    backend.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def stream_text(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[str, str]:
    """The text of one streamed completion and its finish_reason; AssertionError when the stream
    failed or was cut short."""
    async with session.post(url + "/v1/completions", json={"prompt": prompt, **BODY}) as resp:
        assert resp.status == 200, await resp.text()
        events = [line.strip() async for line in resp.content if line.strip()]
    assert events and events[-1] == b"data: [DONE]", f"truncated: {events[-3:]}"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks[-1]
    finish_reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finish_reasons == ["length"], finish_reasons
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks), finish_reasons[0]


def test_1000_concurrent_streams_all_finish_with_the_outputs_of_one_at_a_time(servers):
    async def run() -> tuple[dict, list, float]:
        timeout = aiohttp.ClientTimeout(total=600, sock_read=120)
        connector = aiohttp.TCPConnector(limit=NUM_REQUESTS)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            alone = {prompt: await stream_text(session, servers, prompt) for prompt in PROMPTS}
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(NUM_REQUESTS)]
            start = time.monotonic()
            results = await asyncio.gather(
                *(stream_text(session, servers, p) for p in prompts), return_exceptions=True
            )
            elapsed = time.monotonic() - start
        return alone, list(zip(prompts, results)), elapsed

    alone, results, elapsed = asyncio.run(run())
    print(f"{NUM_REQUESTS} concurrent streams in {elapsed:.1f} s")
    errors = [
        f"{prompt!r}: {result!r:.300}" for prompt, result in results if isinstance(result, BaseException)
    ]
    assert not errors, f"{len(errors)} failed, e.g.\n" + "\n".join(errors[:5])
    assert all(text for text, _ in alone.values())
    differ = [(prompt, result, alone[prompt]) for prompt, result in results if result != alone[prompt]]
    assert not differ, f"{len(differ)} differ from the prompt sent alone, e.g. {differ[:3]}"
