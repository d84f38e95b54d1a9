"""The abuse corpus (issue 10): over 1,000 requests of over 30 kinds of bad input, to a real
frontend and a real backend. Every answer is a 4xx with the OpenAI error body (no traceback, path
or address in it), never a 5xx, never a hang; after each kind a canary request succeeds; at the
end no worker restarted, no KV block is in use and no server process grew by more than 50 MiB.

The request kinds are generated in abuse_cases.py; the kinds that need raw sockets (slow clients,
broken HTTP framing) are here. HTTP framing errors are answered by aiohttp's parser before any
route runs (a plain-text 400, connection closed): for those the promise checked is a 4xx, no
traceback, and a closed connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable

import abuse_cases
import aiohttp
import psutil
import pytest
from abuse_cases import MAX_MODEL_LEN, Case

from servers import REPO, backend_headers, start_backend, start_frontend

CLIENT_TIMEOUT_S = 60  # a hang is an answer slower than this
CONCURRENCY = 32
RSS_GROWTH_LIMIT = 50 << 20
# Both servers close a connection that has not sent a whole request head this long after it
# opened (or after its last answer), and answer 408 to a body that does not arrive in time.
READ_TIMEOUT_S = 20
# What an error message must not hold (it may quote the request: a model name "../../etc/passwd").
_LEAK = re.compile(rf"Traceback|File \"|\.py\b|site-packages|0x[0-9a-f]{{8,}}|{re.escape(str(REPO))}|/tmp/")


@pytest.fixture(scope="module")
def servers(converted):
    backend, port = start_backend(
        converted("llama", 1), "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "12"
    )
    try:
        frontend, url = start_frontend(port)
    except Exception:
        backend.stop()
        raise
    yield {"frontend": url, "backend": f"http://127.0.0.1:{port}"}, backend, frontend
    frontend.stop()
    backend.stop()


def problem_with(status: int, raw: bytes) -> str | None:
    """Why an answer breaks the promise, or None."""
    if not 400 <= status < 500:
        return f"status {status}"
    try:
        error = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an error body: {raw[:200]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not the OpenAI error shape: {error!r:.200}"
    if not isinstance(error["message"], str) or _LEAK.search(error["message"]):
        return f"the message leaks internals: {error['message']!r:.300}"
    return None


async def send(session: aiohttp.ClientSession, urls: dict, case: Case, auth: dict) -> str | None:
    headers = {**case.headers, **(auth if case.target == "backend" and case.auth else {})}
    try:
        async with session.request(
            case.method, urls[case.target] + case.path, data=case.body or None, headers=headers
        ) as resp:
            return problem_with(resp.status, await resp.read())
    except asyncio.TimeoutError:
        return f"no answer within {CLIENT_TIMEOUT_S} s"
    except aiohttp.ClientError as exc:
        return f"{type(exc).__name__}: {exc}"


async def canary(session: aiohttp.ClientSession, urls: dict, auth: dict) -> str | None:
    """A real completion through each server, and a chat completion (the frontend's tokenizer
    path); None when all answered."""
    body = {"prompt": "the quick brown fox", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
    for url, json_body, headers, key in (
        (urls["frontend"] + "/v1/completions", body, {}, "choices"),
        (urls["frontend"] + "/v1/chat/completions", chat, {}, "choices"),
        (urls["backend"] + "/v1/generate", body, auth, "ids"),
    ):
        async with session.post(url, json=json_body, headers=headers) as resp:
            answer = await resp.json(content_type=None)
            if resp.status != 200 or not answer.get(key):
                return f"canary {url}: {resp.status} {answer}"
    return None


# -- raw sockets -------------------------------------------------------------------------------------


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def raw_exchange(
    url: str, data: bytes, timeout: float = CLIENT_TIMEOUT_S
) -> tuple[int | None, bytes, bool]:
    """Send `data`, read until the server closes: (status, body, closed)."""
    reader, writer = await asyncio.open_connection(*_host_port(url))
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    except (ConnectionResetError, BrokenPipeError):
        return None, b"", True
    except asyncio.TimeoutError:
        return None, b"", False
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else None), body, True


def framing_cases(auth: dict) -> dict[str, list[tuple[str, bytes]]]:
    """(target, bytes on the wire) of requests that break HTTP itself."""
    secret = "".join(f"{k}: {v}\r\n" for k, v in auth.items()).encode()

    def post(path: str, extra: bytes, body: bytes = b"{}", target: str = "frontend") -> tuple[str, bytes]:
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode()
        return target, head + (secret if target == "backend" else b"") + extra + b"\r\n" + body

    many = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    routes = (("frontend", "/v1/completions"), ("backend", "/v1/generate"))
    return {
        "10k headers": [post(p, many, target=t) for t, p in routes],
        "huge header lines": [
            post(p, b"X-Big: " + b"v" * size + b"\r\n", target=t)
            for t, p in routes
            for size in (9000, 1 << 20)
        ],
        "broken HTTP framing": [
            (t, data)
            for t, p in routes
            for data in (
                b"GARBAGE\r\n\r\n",
                b"POST " + p.encode() + b" HTTP/9.9\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
                post(p, b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n", t)[1],
                post(p, b"Content-Length: -5\r\n", target=t)[1],
                post(p, b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", target=t)[1],
                post(p, b"Content-Length: 2\r\nContent-Length: 3\r\n", target=t)[1],
            )
        ],
    }


async def slow_client(url: str, head: bytes, drip: bytes) -> tuple[float | None, bytes]:
    """Send `head` at once, then `drip` a byte a second: the seconds until the server answered or
    closed the connection (None: it never did), and what it sent."""
    reader, writer = await asyncio.open_connection(*_host_port(url))
    start = time.monotonic()
    try:
        writer.write(head)
        for byte in drip:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(1 << 16), 1.0)
                return time.monotonic() - start, answer  # an answer (408) or the close (b"")
            except asyncio.TimeoutError:
                pass
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - start, b""
    finally:
        writer.close()
    return None, b""


def _slow_clients(urls: dict, auth: dict) -> list[tuple[str, Awaitable]]:
    """(what it should get, the client): `closed` for a slow head, `408` for a slow body."""
    secret = "".join(f"{k}: {v}\r\n" for k, v in auth.items()).encode()
    clients = []
    never_done = READ_TIMEOUT_S * 3 + 10
    for target, path in (("frontend", "/v1/completions"), ("backend", "/v1/generate")):
        extra = secret if target == "backend" else b""
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode() + extra
        for _ in range(8):  # a byte of the request head a second
            clients.append(("closed", slow_client(urls[target], b"", head + b"X-Slow: " + b"a" * never_done)))
        for _ in range(4):  # the whole head, then a byte of the body a second
            body_head = head + b"Content-Length: 100000\r\n\r\n"
            clients.append(("408", slow_client(urls[target], body_head, b"[" * never_done)))
    return clients


def _slow_answer_ok(want: str, answer: bytes) -> bool:
    if want == "closed":
        return answer == b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 408 ") and problem_with(408, body) is None


# -- the test ---------------------------------------------------------------------------------------


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    return [proc, *proc.children(recursive=True)]


def _rss(procs: list[psutil.Process]) -> dict[int, int]:
    return {p.pid: p.memory_info().rss for p in procs}


async def _kv_blocks_used(session, urls, auth) -> int:
    deadline = time.monotonic() + 30
    while True:
        async with session.get(urls["backend"] + "/v1/stats", headers=auth) as resp:
            stats = await resp.json()
        if stats["num_kv_blocks_used"] == 0 or time.monotonic() > deadline:
            return stats["num_kv_blocks_used"]
        await asyncio.sleep(0.2)


def test_bad_input_gets_a_4xx_error_body_and_costs_nothing(servers):
    urls, backend, frontend = servers
    auth = backend_headers()
    procs = _tree(psutil.Process(backend.proc.pid)) + [psutil.Process(frontend.proc.pid)]
    kinds = abuse_cases.kinds()

    async def run() -> tuple[dict, dict, int, list]:
        failures: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            # Warm-up: the tokenizer loaded, and every thread of the frontend's tokenizing pool
            # (each with its own malloc arena) started, before the baseline.
            assert await asyncio.gather(*(canary(session, urls, auth) for _ in range(16))) == [None] * 16
            rss_before = _rss(procs)
            # The slow clients run beside the whole corpus: they must not hold anyone up.
            expected, slow_clients = zip(*_slow_clients(urls, auth))
            slow = asyncio.gather(*slow_clients)
            for name, cases in kinds.items():
                problems = await asyncio.gather(*(send(session, urls, case, auth) for case in cases))
                failures[name] = [f"{case.describe()}: {p}" for case, p in zip(cases, problems) if p]
                counts[name] = len(cases)
                if (why := await canary(session, urls, auth)) is not None:
                    failures[name].append(why)
            for name, cases in framing_cases(auth).items():
                answers = await asyncio.gather(*(raw_exchange(urls[t], data) for t, data in cases))
                failures[name] = [
                    f"{t} {data[:60]!r}: {status} closed={closed} {body[:200]!r}"
                    for (t, data), (status, body, closed) in zip(cases, answers)
                    if not (status is not None and 400 <= status < 500 and closed)
                    or _LEAK.search(body.decode(errors="replace"))
                ]
                counts[name] = len(cases)
                if (why := await canary(session, urls, auth)) is not None:
                    failures[name].append(why)
            slow_answers = await slow
            print(
                "slow clients answered or closed after", sorted(round(t or -1) for t, _ in slow_answers), "s"
            )
            counts["slow clients"] = len(slow_answers)
            failures["slow clients"] = [
                f"client {i} ({want}): {'never closed' if t is None else f'{t:.0f} s'}: {answer[:200]!r}"
                for i, (want, (t, answer)) in enumerate(zip(expected, slow_answers))
                if t is None or t > READ_TIMEOUT_S + 15 or not _slow_answer_ok(want, answer)
            ]
            if (why := await canary(session, urls, auth)) is not None:
                failures["slow clients"].append(why)
            kv_used = await _kv_blocks_used(session, urls, auth)
        return failures, counts, kv_used, rss_before

    start = time.monotonic()
    failures, counts, kv_used, rss_before = asyncio.run(run())
    elapsed = time.monotonic() - start
    print(f"abuse corpus: {sum(counts.values())} requests of {len(counts)} kinds in {elapsed:.1f} s")
    bad = {name: lines for name, lines in failures.items() if lines}
    assert not bad, "\n".join(
        f"{name}: {len(lines)} bad, e.g.\n  " + "\n  ".join(lines[:5]) for name, lines in bad.items()
    )
    assert len(counts) >= 30 and sum(counts.values()) >= 1000, counts
    # No worker restarted (the same children, all alive), and the failed requests left nothing.
    assert [p.pid for p in _tree(psutil.Process(backend.proc.pid))] == [p.pid for p in procs[:-1]]
    assert all(p.is_running() for p in procs)
    assert kv_used == 0
    growth = {pid: rss - rss_before[pid] for pid, rss in _rss(procs).items()}
    print("RSS growth (MiB):", [round(g / 2**20, 1) for g in growth.values()])
    assert max(growth.values()) < RSS_GROWTH_LIMIT, {pid: f"{g / 2**20:.1f} MiB" for pid, g in growth.items()}
