"""SIGTERM drains, a second SIGTERM stops at once, on the backend and on the frontend.

Backend: SIGTERM during 10 greedy streams: /health is 503 at once, a new request gets 503
shutting_down with Retry-After, the 10 finish with their full text (the text of the same request
sent before the signal), exit 0 within drain + 5 s. The requests still running when the drain
times out, or at a second SIGTERM, end with a 503 shutting_down error line; exit 0.
Frontend: the same over SSE, the stream cut by the drain's end being an error event then [DONE].

Real processes: the tiny Llama, a backend (and frontend) per test.
"""

import asyncio
import json
import signal
import time

import aiohttp
import orjson
import pytest
from proc_tree import kill_leftovers, tree, wait_gone

from mi.api.sse import decode_events

from servers import backend_headers, start_backend, start_frontend

GREEDY = {"prompt": "once upon a time", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
LONG = {"prompt": "hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
DRAIN = 30.0  # slack for a loaded machine: the 10 streams need a few seconds


async def _open(session, url: str, body: dict) -> aiohttp.ClientResponse:
    """A stream whose first line has come (the start line, or an SSE event): it runs."""
    resp = await session.post(url, json=body)
    assert resp.status == 200, await resp.text()
    await resp.content.readline()
    return resp


async def _ndjson(resp: aiohttp.ClientResponse) -> list[dict]:
    return [json.loads(line) for line in (await resp.content.read()).splitlines() if line.strip()]


async def _status(session, method: str, url: str, body=None) -> tuple[int, dict, dict]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def _health_turns_503(session, url: str) -> dict:
    """/health's body once it answers 503, which must be within a second of the signal (the
    signal reaches the server's loop asynchronously, so the first answer may still be 200)."""
    deadline = time.monotonic() + 1.0
    while True:
        status, _, body = await _status(session, "GET", url + "/health")
        if status == 503:
            return body
        assert time.monotonic() < deadline, "/health still 200 a second after SIGTERM"
        await asyncio.sleep(0.01)


async def _backend_running(url: str) -> int:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        deadline = time.monotonic() + 5
        while True:
            _, _, stats = await _status(session, "GET", url + "/v1/stats")
            if not stats["num_requests_running"] or time.monotonic() > deadline:
                return stats["num_requests_running"]
            await asyncio.sleep(0.05)


@pytest.mark.timeout(240)
def test_sigterm_lets_running_streams_finish_and_refuses_new_ones(converted):
    backend, port = start_backend(converted("llama", 1), "--drain-timeout", str(DRAIN))
    url = f"http://127.0.0.1:{port}"
    procs = tree(backend.proc.pid)

    async def run() -> tuple[float, list]:
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            _, _, reference = await _status(session, "POST", url + "/v1/generate", GREEDY)
            streams = [
                await _open(session, url + "/v1/generate", {**GREEDY, "stream": True}) for _ in range(10)
            ]
            backend.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            health = await _health_turns_503(session, url)
            refused = await _status(session, "POST", url + "/v1/generate", GREEDY)
            bodies = await asyncio.wait_for(asyncio.gather(*map(_ndjson, streams)), DRAIN)
            return reference, signalled, health, refused, bodies

    try:
        reference, signalled, health, (status, headers, body), bodies = asyncio.run(run())
        assert health == {"status": "stopping"}, health
        assert status == 503 and headers["Retry-After"] == "1", (status, body)
        assert body["error"]["code"] == "shutting_down", body
        for lines in bodies:
            assert lines[-1].get("finish_reason") == "length", lines[-1]
            assert "".join(line.get("text", "") for line in lines) == reference["text"]
        assert backend.proc.wait(timeout=DRAIN + 5) == 0, backend.output
        assert time.monotonic() - signalled < DRAIN + 5
        assert not wait_gone(procs, 5)
    finally:
        backend.stop()
        kill_leftovers(procs)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("drain, second_signal", [(1, False), (60, True)], ids=["timeout", "second-sigterm"])
def test_the_drain_ends_at_its_timeout_or_a_second_sigterm(converted, drain, second_signal):
    """The streams still running then end with shutting_down, and the backend exits 0 at once."""
    backend, port = start_backend(converted("llama", 1), "--drain-timeout", str(drain))
    url = f"http://127.0.0.1:{port}"
    procs = tree(backend.proc.pid)

    async def run() -> list:
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            streams = [await _open(session, url + "/v1/generate", LONG) for _ in range(3)]
            backend.proc.send_signal(signal.SIGTERM)
            if second_signal:
                await asyncio.sleep(0.5)
                backend.proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*map(_ndjson, streams)), 10)

    try:
        started = time.monotonic()
        for lines in asyncio.run(run()):
            error = lines[-1]["error"]
            assert (error["type"], error["code"]) == ("server_error", "shutting_down"), lines[-1]
            assert len(lines) > 2, "it ran on during the drain"
        assert backend.proc.wait(timeout=10) == 0, backend.output
        assert time.monotonic() - started < 8
        assert not wait_gone(procs, 5)
    finally:
        backend.stop()
        kill_leftovers(procs)


@pytest.mark.timeout(240)
def test_the_frontend_drains_too(converted):
    backend, port = start_backend(converted("llama", 1))
    procs = tree(backend.proc.pid)
    # 3 s: the short streams (32 tokens) finish within it even on a loaded machine, the long one
    # (2000 tokens) cannot; with 10 s it sometimes did on a quiet one and ended without the error.
    frontend, url = start_frontend(port, "--drain-timeout", "3")
    body = {"prompt": "once upon a time", "max_tokens": 32, "temperature": 0, "ignore_eos": True}

    async def run() -> tuple:
        async with aiohttp.ClientSession() as session:
            short = [
                await _open(session, url + "/v1/completions", {**body, "stream": True}) for _ in range(4)
            ]
            long = await _open(session, url + "/v1/completions", {**LONG, "prompt": "x"})
            frontend.proc.send_signal(signal.SIGTERM)
            health = await _health_turns_503(session, url)
            refused = await _status(session, "POST", url + "/v1/completions", body)
            raws = await asyncio.wait_for(asyncio.gather(*(r.content.read() for r in [*short, long])), 15)
            # The first event's line was read by _open: its blank line leads each rest.
            return health, refused, [decode_events(raw.removeprefix(b"\n")) for raw in raws]

    try:
        health, (status, headers, refused), events = asyncio.run(run())
        assert health["status"] == "stopping", health
        assert status == 503 and headers["Retry-After"] == "1" and refused["error"]["code"] == "shutting_down"
        *finished, cut = events
        for payloads in finished:
            assert payloads[-1] == b"[DONE]"
            assert orjson.loads(payloads[-2]).get("choices", [{}])[0].get("finish_reason") == "length", (
                payloads[-2]
            )
        assert cut[-1] == b"[DONE]" and orjson.loads(cut[-2])["error"]["code"] == "shutting_down", cut[-2:]
        assert frontend.proc.wait(timeout=10) == 0, frontend.output
        # The cut stream's backend request was aborted: the backend is idle again.
        assert asyncio.run(_backend_running(f"http://127.0.0.1:{port}")) == 0
    finally:
        frontend.stop()
        backend.stop()
        kill_leftovers(procs)
