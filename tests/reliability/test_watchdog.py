"""A worker that hangs without dying (SIGSTOP) is a dead replica after --step-timeout: every
request in flight gets an error, /health turns 503, the backend exits 1 and leaves no process.

Real processes: the tiny Llama on a backend of its own (this test ends it).
"""

import asyncio
import json
import time

import aiohttp
import psutil
import pytest

from servers import backend_headers, start_backend

STEP_TIMEOUT = 2.0
LONG = {"prompt": "the quick brown fox", "max_tokens": 2000, "ignore_eos": True}


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait(10)
        except psutil.NoSuchProcess:
            pass


async def _watch_health(session: aiohttp.ClientSession, url: str, seen: list) -> None:
    """Records /health's answers (status, or None once nothing listens) as fast as it answers."""
    while True:
        try:
            async with session.get(url + "/health") as resp:
                seen.append(resp.status)
        except aiohttp.ClientError:
            seen.append(None)
            return
        await asyncio.sleep(0.005)


async def _wait_running(session: aiohttp.ClientSession, url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        async with session.get(url + "/v1/stats") as resp:
            if (await resp.json())["num_requests_running"] >= count:
                return
        assert time.monotonic() < deadline, "the requests did not start"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(300)
def test_a_stopped_worker_fails_every_request_and_the_backend_exits(converted):
    backend, port = start_backend(converted("llama", 1), "--step-timeout", str(STEP_TIMEOUT))
    url = f"http://127.0.0.1:{port}"
    tree = psutil.Process(backend.proc.pid).children(recursive=True)
    worker = next(p for p in tree if "mi.actors.worker" in " ".join(p.cmdline()))

    async def run() -> tuple[float, list[bytes], tuple[int, dict], list]:
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            streams = [
                await session.post(url + "/v1/generate", json={**LONG, "stream": True}) for _ in range(3)
            ]
            for resp in streams:
                assert resp.status == 200
                await resp.content.readline()  # the start line
            plain = asyncio.ensure_future(session.post(url + "/v1/generate", json=LONG))
            await _wait_running(session, url, 4)
            worker.suspend()
            stopped_at = time.monotonic()
            health: list = []
            watcher = asyncio.create_task(_watch_health(session, url, health))

            async def last_line(resp) -> bytes:
                return [line async for line in resp.content if line.strip()][-1]

            async def answer_of(pending) -> tuple[int, dict]:
                resp = await pending
                return resp.status, await resp.json()

            # Before the watchdog, these waited for ever.
            *last_lines, answer = await asyncio.wait_for(
                asyncio.gather(*map(last_line, streams), answer_of(plain)), STEP_TIMEOUT + 30
            )
            waited = time.monotonic() - stopped_at
            await asyncio.wait_for(watcher, 30)
            return waited, last_lines, answer, health

    try:
        waited, last_lines, (status, body), health = asyncio.run(run())
        assert waited < STEP_TIMEOUT + 5, waited
        for line in last_lines:
            error = json.loads(line)["error"]
            assert (error["type"], error["code"]) == ("server_error", "backend_failed"), line
        assert status == 503 and body["error"]["code"] == "backend_failed", body
        # Healthy while the step timeout runs, then 503 (for a second, the children gone)
        # until the backend stops listening.
        assert health[0] == 200 and health[-1] is None, health
        first_503 = health.index(503)
        assert set(health[first_503:-1]) == {503} and len(health) - first_503 > 10, health
        assert backend.proc.wait(timeout=15) == 1, backend.output
        assert f"no step finished for {STEP_TIMEOUT:g} s with 4 requests in flight" in backend.output
        assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        backend.stop()
        _kill_leftovers(tree)
