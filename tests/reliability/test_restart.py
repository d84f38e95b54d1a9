"""`--on-failure restart`: a killed worker fails the requests in flight (503 backend_failed),
/health is 503 and new requests get 503 + Retry-After while no replica serves, then a fresh
replica (new processes) serves the same greedy text, /v1/stats counts the restart; the fourth
failure within 10 minutes is the backend's (exit 1, nothing left behind).

Real processes: the tiny Llama on a backend of its own (this test ends it).
"""

import asyncio
import json
import time

import aiohttp
import pytest
from proc_tree import alive, by_kind, kill_leftovers, run_dirs, shm_names, tree, wait_gone

from servers import backend_headers, start_backend

GREEDY = {"prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0}
LONG = {"prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}


async def _health(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url + "/health") as resp:
            return resp.status
    except aiohttp.ClientError:
        return None


async def _wait_health(session, url: str, status: int | None, timeout: float) -> float:
    started = time.monotonic()
    while (await _health(session, url)) != status:
        assert time.monotonic() - started < timeout, f"/health not {status} after {timeout} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _greedy_text(session, url: str) -> str:
    async with session.post(url + "/v1/generate", json=GREEDY) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["text"]


async def _last_line(resp: aiohttp.ClientResponse) -> dict:
    return json.loads([line async for line in resp.content if line.strip()][-1])


@pytest.mark.timeout(300)
def test_a_killed_worker_is_replaced_until_the_restart_budget_is_spent(converted):
    backend, port = start_backend(converted("llama", 1), "--on-failure", "restart")
    url = f"http://127.0.0.1:{port}"
    shm_before = shm_names()
    every_proc = tree(backend.proc.pid)

    async def run() -> None:
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            reference = await _greedy_text(session, url)
            for failure in range(1, 5):
                old = by_kind(backend.proc.pid)
                streams = [await session.post(url + "/v1/generate", json=LONG) for _ in range(4)]
                for resp in streams:
                    assert resp.status == 200
                    await resp.content.readline()  # the start line: it runs
                old["worker0"].kill()
                killed_at = time.monotonic()
                lines = await asyncio.wait_for(asyncio.gather(*map(_last_line, streams)), 5)
                assert all(line["error"]["code"] == "backend_failed" for line in lines), lines
                if failure == 4:  # the budget (3 in 10 minutes) is spent: the backend's failure
                    assert await asyncio.to_thread(backend.proc.wait, 10) == 1, backend.output
                    return
                await _wait_health(session, url, 503, 2)
                async with session.post(url + "/v1/generate", json=GREEDY) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "1", await resp.text()
                    assert (await resp.json())["error"]["code"] == "backend_unavailable"
                # The old replica's children are killed and reaped before the new one starts.
                assert not alive([p for kind, p in old.items() if kind != "supervisor"])
                # Backoff 1 s, 2 s, 4 s, then the tiny model's load.
                waited = await _wait_health(session, url, 200, 60)
                assert time.monotonic() - killed_at >= 2 ** (failure - 1), waited
                new = by_kind(backend.proc.pid)
                assert {p.pid for p in new.values()}.isdisjoint(
                    p.pid for k, p in old.items() if k != "supervisor"
                )
                every_proc.extend(p for k, p in new.items() if k != "supervisor")
                assert await _greedy_text(session, url) == reference
                async with session.get(url + "/v1/stats") as resp:
                    stats = await resp.json()
                assert stats["replica_restarts_total"] == failure, stats
                assert stats["num_requests_running"] == 0 and stats["num_kv_blocks_used"] == 0, stats

    try:
        asyncio.run(run())
        assert "the restart budget is spent: 3 restarts in 600 s" in backend.output
        assert not wait_gone(every_proc, 5)
        assert shm_names() <= shm_before
        assert not run_dirs([backend.proc.pid])
    finally:
        backend.stop()
        kill_leftovers(every_proc)
