"""Nothing waits forever: a request running past --max-request-time is stopped with a 504 (in a
stream: an error line, then the end) and its KV blocks freed; a request waiting in the queue past
--max-queue-wait gets a 503 with Retry-After and leaves the queue; a frontend whose backend goes
silent (SIGSTOP) answers 504 after --backend-read-timeout (in a stream: an error event, then
[DONE]) and the backend request is aborted.

Real processes: the tiny Llama on backends of their own (one with the limits, one to stop).
"""

import asyncio
import json
import time

import aiohttp
import psutil
import pytest

from servers import backend_headers, start_backend, start_frontend

MAX_REQUEST_TIME = 3.0
MAX_QUEUE_WAIT = 1.0
READ_TIMEOUT = 1.5
SLACK = 4.0  # a loaded machine
LONG = {"prompt": "the quick brown fox", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="module")
def limited(converted):
    """A backend with both limits and one running request at a time (so a second one queues)."""
    proc, port = start_backend(
        converted("llama", 1),
        "--max-request-time",
        str(MAX_REQUEST_TIME),
        "--max-queue-wait",
        str(MAX_QUEUE_WAIT),
        "--max-num-seqs",
        "1",
    )
    yield f"http://127.0.0.1:{port}"
    proc.stop()


async def _stats(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/v1/stats", headers=backend_headers()) as resp:
        return await resp.json()


async def _wait_idle(session: aiohttp.ClientSession, url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = await _stats(session, url)
        if (stats["num_requests_running"], stats["num_requests_waiting"], stats["num_kv_blocks_used"]) == (
            0,
            0,
            0,
        ):
            return stats
        assert time.monotonic() < deadline, f"the backend did not free the request: {stats}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_queue_wait_and_request_time_limits(limited):
    async def run():
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            started = time.monotonic()
            stream = await session.post(limited + "/v1/generate", json={**LONG, "stream": True})
            assert stream.status == 200
            await stream.content.readline()  # the start line
            # The only slot is taken: this one waits in the queue until --max-queue-wait.
            async with session.post(limited + "/v1/generate", json=LONG) as resp:
                queued = resp.status, resp.headers.get("Retry-After"), await resp.json()
            queued_for = time.monotonic() - started
            await asyncio.sleep(0.5)  # the scheduler's stats go out every 0.2 s while it is busy
            waiting = (await _stats(session, limited))["num_requests_waiting"]
            lines = [json.loads(line) async for line in stream.content if line.strip()]
            ran_for = time.monotonic() - started
            stats = await _wait_idle(session, limited)
            # A non-streamed request gets the status.
            plain_started = time.monotonic()
            async with session.post(limited + "/v1/generate", json=LONG) as resp:
                plain = resp.status, await resp.json()
            plain_ran_for = time.monotonic() - plain_started
            await _wait_idle(session, limited)
            return queued, queued_for, waiting, lines, ran_for, stats, plain, plain_ran_for

    queued, queued_for, waiting, lines, ran_for, stats, plain, plain_ran_for = asyncio.run(run())
    status, retry_after, body = queued
    assert (status, body["error"]["code"]) == (503, "queue_timeout"), body
    assert retry_after == "1"
    assert MAX_QUEUE_WAIT <= queued_for < MAX_QUEUE_WAIT + SLACK, queued_for
    assert waiting == 0  # removed from the queue, not left to run later
    # The stream ran until the deadline: tokens, then the error as its last line.
    assert any(line.get("ids") for line in lines[:-1]), lines[:3]
    assert lines[-1]["error"]["code"] == "request_timeout", lines[-1]
    assert MAX_REQUEST_TIME <= ran_for < MAX_REQUEST_TIME + SLACK, ran_for
    assert stats["num_kv_blocks_used"] == 0
    assert (plain[0], plain[1]["error"]["code"]) == (504, "request_timeout"), plain
    assert "--max-request-time" in plain[1]["error"]["message"]
    assert MAX_REQUEST_TIME <= plain_ran_for < MAX_REQUEST_TIME + SLACK, plain_ran_for


@pytest.fixture
def stoppable(converted):
    backend, port = start_backend(converted("llama", 1))
    frontend, url = start_frontend(port, "--backend-read-timeout", str(READ_TIMEOUT))
    yield psutil.Process(backend.proc.pid), f"http://127.0.0.1:{port}", url
    frontend.stop()
    psutil.Process(backend.proc.pid).resume()
    backend.stop()


async def _model_name(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/v1/models") as resp:
        return (await resp.json())["data"][0]["id"]


@pytest.mark.timeout(120)
def test_a_silent_backend_ends_the_frontends_requests_after_the_read_timeout(stoppable):
    supervisor, backend_url, url = stoppable

    async def run():
        async with aiohttp.ClientSession() as session:
            body = {"model": await _model_name(session, url), **LONG}
            stream = await session.post(url + "/v1/completions", json={**body, "stream": True})
            assert stream.status == 200
            await stream.content.readline()  # the first event: the backend is generating
            supervisor.suspend()
            stopped_at = time.monotonic()
            events = [line async for line in stream.content if line.strip()]
            stream_ended_after = time.monotonic() - stopped_at
            # A non-streamed request to the silent backend.
            plain_started = time.monotonic()
            async with session.post(url + "/v1/completions", json=body) as resp:
                plain = resp.status, await resp.json()
            plain_ended_after = time.monotonic() - plain_started
            supervisor.resume()
            stats = await _wait_idle(session, backend_url)
            return events, stream_ended_after, plain, plain_ended_after, stats

    events, stream_ended_after, plain, plain_ended_after, stats = asyncio.run(run())
    # Before: the stream waited for the backend forever (the pytest timeout).
    assert events[-1].strip() == b"data: [DONE]", events[-3:]
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["code"] == "backend_timeout" and "--backend-read-timeout" in error["message"], error
    # The frontend's timer runs from the last bytes it read, which the backend may have sent a
    # little before it was stopped: hence the lower bound's half second.
    assert READ_TIMEOUT - 0.5 <= stream_ended_after < READ_TIMEOUT + SLACK, stream_ended_after
    assert (plain[0], plain[1]["error"]["code"]) == (504, "backend_timeout"), plain
    assert READ_TIMEOUT <= plain_ended_after < READ_TIMEOUT + SLACK, plain_ended_after
    # Once the backend runs again, its requests are aborted, not left running to max_tokens.
    assert stats["num_kv_blocks_used"] == 0
