"""kill -9 of each process kind with 16 streams in flight through the frontend, and a restart loop.

Kill matrix (tp=2, `--on-failure exit`): every stream ends with an error within 5 s (an SSE error
event then [DONE]; a killed frontend drops its connections); the backend's /health is 503 within
2 s (a killed supervisor: the frontend's /health is 503 within 2 s); the backend exits non-zero
within 10 s; no process of the tree is left, nothing new in /dev/shm, no run directory. A killed
frontend leaves the backend serving, its requests aborted.

Restart loop: 20 cycles of start, load, kill -9 of a random process of the tree, start again on
the same port: 20/20 start, and nothing is left behind. SIGSTOP of a worker is test_watchdog's.
"""

import asyncio
import json
import random
import time

import aiohttp
import psutil
import pytest
from proc_tree import (
    alive,
    backend_socket,
    by_kind,
    kill_leftovers,
    run_dirs,
    shm_names,
    tree,
    wait_gone,
)

from mi.api.sse import decode_events

from servers import backend_headers, free_port, start_backend, start_frontend

STREAM = {"prompt": "hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}


async def _status(session, url: str) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def _until_503(session, url: str, timeout: float) -> float:
    started = time.monotonic()
    while await _status(session, url) != 503:
        assert time.monotonic() - started < timeout, f"{url} not 503 within {timeout} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _end_of(resp: aiohttp.ClientResponse) -> str:
    """How a stream ended: an error event's code ("" for none), or "dropped" (the connection
    broke)."""
    try:
        raw = await resp.content.read()
    except aiohttp.ClientError:
        return "dropped"
    payloads = decode_events(raw.removeprefix(b"\n"))
    assert payloads[-1] == b"[DONE]", payloads[-2:]
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error", error
    return error["code"] or ""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["supervisor", "scheduler", "worker0", "worker1", "frontend"])
def test_kill_9_with_16_streams_in_flight(converted, kind):
    backend, port = start_backend(converted("llama", 2))
    backend_url = f"http://127.0.0.1:{port}"
    procs = tree(backend.proc.pid)
    shm_before = shm_names()
    frontend, url = start_frontend(port)
    victim = psutil.Process(frontend.proc.pid) if kind == "frontend" else by_kind(backend.proc.pid)[kind]

    async def run() -> tuple[list[str], float, float]:
        async with aiohttp.ClientSession() as session:
            streams = []
            for _ in range(16):
                resp = await session.post(url + "/v1/completions", json=STREAM)
                assert resp.status == 200, await resp.text()
                await resp.content.readline()  # the first event: it runs
                streams.append(resp)
            victim.kill()
            killed = time.monotonic()
            ends = await asyncio.wait_for(asyncio.gather(*map(_end_of, streams)), 5)
            errored = time.monotonic() - killed
            if kind == "frontend":
                return ends, errored, 0.0
            health_url = url if kind == "supervisor" else backend_url
            return ends, errored, await _until_503(session, health_url + "/health", 2)

    try:
        ends, errored, _ = asyncio.run(run())
        assert errored < 5
        if kind == "frontend":
            assert set(ends) == {"dropped"}, ends
            assert frontend.proc.wait(timeout=5) == -9

            async def idle() -> dict:  # the backend serves on, the dropped requests aborted
                async with aiohttp.ClientSession(headers=backend_headers()) as session:
                    for _ in range(100):
                        async with session.get(backend_url + "/v1/stats") as resp:
                            stats = await resp.json()
                        if not stats["num_requests_running"]:
                            break
                        await asyncio.sleep(0.05)
                    return stats

            stats = asyncio.run(idle())
            assert stats["num_requests_running"] == 0 and stats["num_kv_blocks_used"] == 0, stats
            assert stats["requests_finished_total"]["abort"] == 16, stats
            assert backend.stop() == 0
        else:
            # A killed supervisor just cuts the backend streams: the frontend reports that.
            assert set(ends) == {"" if kind == "supervisor" else "backend_failed"}, ends
            assert backend.proc.wait(timeout=10) != 0, backend.output
        assert not wait_gone(procs, 5), alive(procs)
        assert shm_names() <= shm_before
    finally:
        frontend.stop()
        backend.stop()
        kill_leftovers(procs)
    # A killed supervisor leaves its run directory: the next backend removes it.
    if kind != "supervisor":
        assert not run_dirs([backend.proc.pid])


@pytest.mark.timeout(900)
def test_restart_loop_20_cycles_leave_nothing_behind(converted):
    mi_dir, port = converted("llama", 1), free_port()
    rng = random.Random(10)
    print("restart loop seed 10")
    shm_before = shm_names()
    every_proc, supervisor_pids = [], []
    try:
        for cycle in range(20):
            backend, _ = start_backend(mi_dir, port=port)
            procs = tree(backend.proc.pid)
            every_proc += procs
            supervisor_pids.append(backend.proc.pid)

            async def load() -> None:
                async with aiohttp.ClientSession(headers=backend_headers()) as session:
                    body = {"prompt": "x", "max_tokens": 4}
                    async with session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as resp:
                        assert resp.status == 200, await resp.text()

            asyncio.run(load())
            victim = rng.choice(procs)
            victim.kill()
            assert backend.proc.wait(timeout=10) != 0, (cycle, victim, backend.output)
            assert not wait_gone(procs, 5), (cycle, alive(procs))
        backend, _ = start_backend(mi_dir, port=port)  # over the stale socket of a killed one
        every_proc += tree(backend.proc.pid)
        supervisor_pids.append(backend.proc.pid)
        assert backend.stop() == 0
        assert not alive(every_proc)
        assert shm_names() <= shm_before
        assert not backend_socket(port).exists()
        assert not run_dirs(supervisor_pids), "a start removes the run directories of killed ones"
    finally:
        kill_leftovers(every_proc)
