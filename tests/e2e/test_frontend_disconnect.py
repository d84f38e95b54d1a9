"""Clients that go away have their requests aborted in the backend.

200 streaming requests (and 20 non-streaming ones) are cancelled by a 0.5 s client timeout while
running or still queued; then a new request must complete within 5 s and the backend's
/v1/stats must report no running request and no KV block in use. Uses `served_model`.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from servers import backend_headers

NUM_STREAMS, NUM_PLAIN = 200, 20


async def _give_up_after(session: aiohttp.ClientSession, url: str, body: dict, seconds: float) -> str:
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
            await resp.read()
            return f"finished {resp.status}"
    except asyncio.TimeoutError:
        return "timed out"


async def _stats(session: aiohttp.ClientSession, backend_url: str) -> dict:
    async with session.get(backend_url + "/v1/stats", headers=backend_headers()) as resp:
        assert resp.status == 200, await resp.text()
        return orjson.loads(await resp.read())


def test_disconnects_abort_and_free_everything(served_model):
    url = served_model.frontend_url + "/v1/completions"
    body = {"prompt": "hello, my name is", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}

    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            outcomes = await asyncio.gather(
                *(_give_up_after(session, url, {**body, "stream": True}, 0.5) for _ in range(NUM_STREAMS)),
                *(_give_up_after(session, url, body, 0.5) for _ in range(NUM_PLAIN)),
            )
            assert outcomes.count("timed out") == NUM_STREAMS + NUM_PLAIN, set(outcomes)
            start = time.monotonic()
            async with session.post(
                url,
                json={"prompt": "hello", "max_tokens": 8, "temperature": 0},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                assert resp.status == 200 and orjson.loads(await resp.read())["choices"]
            assert time.monotonic() - start < 5
            deadline = time.monotonic() + 5
            while True:
                stats = await _stats(session, served_model.backend_url)
                if stats["num_requests_running"] == 0 and stats["num_kv_blocks_used"] == 0:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.1)
            assert stats["num_requests_waiting"] == 0

    asyncio.run(run())
