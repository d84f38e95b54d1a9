"""Soak test (issue 10; not in CI): minutes of mixed load through a real mi-frontend and
mi-backend, with idle checkpoints that look for leaks.

    PYTHONPATH=. .venv/bin/python scripts/soak.py --minutes 30

The load: --clients concurrent clients, each sending completions and chat completions, streamed
or not, with n of 1-3, logprobs on some; 10% of the streams are dropped by the client after their
first chunk (the backend must abort them). Every --checkpoint-minutes the load stops; once the
backend is idle and the frontend's pooled backend connections have expired, the script records
the RSS and open file descriptors of every process of the tree, and the backend's KV blocks in use.

It prints one row per checkpoint and the RSS slope (MiB/hour, least squares over the
checkpoints after the first), and exits 1 when KV blocks are in use at an idle checkpoint, the
tree's open fds grew from the first checkpoint to the last, or any request failed.
Without --model it serves the tiny Llama of the tests (mi.models.tiny), built in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
SETTLE_S = 22.0  # the frontend's pooled backend connections expire after 15 s idle (aiohttp)
FD_SLACK = 2
PROMPTS = ["the quick brown fox", "once upon a time", "hello, my name is", "the capital of france is"]


@dataclass
class Counters:
    requests: int = 0
    aborted_by_client: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Checkpoint:
    minutes: float
    rss: dict[str, int]  # process label -> bytes
    fds: dict[str, int]
    kv_blocks_used: int
    requests: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict, ready: str, timeout: float = 300) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="mi-soak-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    while ready not in Path(log.name).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{args[2]} did not start:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def _tiny_model(root: Path) -> Path:
    from mi.convert import convert
    from mi.models.tiny import build_tiny_model

    return convert(build_tiny_model(root / "hf", arch="llama"), root / "mi", 1)


# -- load --------------------------------------------------------------------------------------------


def _request(rng: random.Random) -> tuple[str, dict, bool]:
    """(path, body, stream) of one random request."""
    stream = rng.random() < 0.6
    body = {"max_tokens": rng.randint(4, 32), "n": rng.choice([1, 1, 1, 2, 3]), "stream": stream}
    body["temperature"] = rng.choice([0, 0.7, 1.0])
    if rng.random() < 0.5:
        path = "/v1/completions"
        body["prompt"] = rng.choice(PROMPTS)
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 5)
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        if rng.random() < 0.3:
            body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
    return path, body, stream


async def _one(session: aiohttp.ClientSession, url: str, rng: random.Random, counters: Counters) -> None:
    path, body, stream = _request(rng)
    drop = stream and rng.random() < 0.1
    try:
        async with session.post(url + path, json=body) as resp:
            if resp.status != 200:
                counters.failures.append(f"{path} {resp.status}: {(await resp.text())[:200]}")
                return
            if not stream:
                answer = await resp.json()
                if len(answer["choices"]) != body["n"]:
                    counters.failures.append(f"{path}: {len(answer['choices'])} choices, not {body['n']}")
                return
            lines = []
            async for line in resp.content:
                if line.strip():
                    lines.append(line.strip())
                    if drop:  # leave mid-stream: closing the response drops the connection
                        counters.aborted_by_client += 1
                        return
            if lines[-1] != b"data: [DONE]" or any(b'"error"' in line for line in lines):
                counters.failures.append(f"{path}: stream ended with {lines[-2:]}")
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        counters.failures.append(f"{path}: {type(exc).__name__}: {exc}")
    finally:
        counters.requests += 1


async def _load(url: str, clients: int, seconds: float, seed: int, counters: Counters) -> None:
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                await _one(session, url, rng, counters)

    await asyncio.gather(*(client(i) for i in range(clients)))


# -- checkpoints -------------------------------------------------------------------------------------


async def _backend_stats(backend_url: str, headers: dict) -> dict:
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(backend_url + "/v1/stats") as resp:
            return await resp.json()


def _processes(backend: subprocess.Popen, frontend: subprocess.Popen) -> dict[str, psutil.Process]:
    root = psutil.Process(backend.pid)
    procs = {"backend": root}
    for child in root.children(recursive=True):
        procs[f"{child.pid}:{' '.join(child.cmdline()[1:3])[-24:]}"] = child
    procs["frontend"] = psutil.Process(frontend.pid)
    return procs


async def _checkpoint(
    start: float, backend, frontend, backend_url: str, headers: dict, counters
) -> Checkpoint:
    deadline = time.monotonic() + 60
    while (stats := await _backend_stats(backend_url, headers))["num_requests_running"] or stats[
        "num_requests_waiting"
    ]:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(SETTLE_S)
    stats = await _backend_stats(backend_url, headers)
    procs = _processes(backend, frontend)
    return Checkpoint(
        (time.monotonic() - start) / 60,
        {label: p.memory_info().rss for label, p in procs.items()},
        {label: p.num_fds() for label, p in procs.items()},
        stats["num_kv_blocks_used"],
        counters.requests,
    )


def _slope_mib_per_hour(points: list[Checkpoint], label: str | None = None) -> float:
    """Least squares slope of the RSS of process `label` (None: the whole tree) over the
    checkpoints after the first (warm-up)."""
    xs = [p.minutes / 60 for p in points[1:]]
    ys = [(sum(p.rss.values()) if label is None else p.rss.get(label, 0)) / 2**20 for p in points[1:]]
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _table(points: list[Checkpoint]) -> str:
    labels = list(points[0].rss)
    rows = [["minute", "requests", "kv_used", "fds", *[f"{label} MiB" for label in labels]]]
    for p in points:
        mib = [f"{p.rss.get(label, 0) / 2**20:.1f}" for label in labels]
        rows.append(
            [f"{p.minutes:.1f}", str(p.requests), str(p.kv_blocks_used), str(sum(p.fds.values())), *mib]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


async def soak(args, backend, frontend, frontend_url: str, backend_url: str, headers: dict) -> int:
    counters = Counters()
    start = time.monotonic()
    await _load(frontend_url, args.clients, 20, args.seed, counters)  # warm-up: tokenizer, pools
    points = [await _checkpoint(start, backend, frontend, backend_url, headers, counters)]
    print(f"checkpoint 0 at {points[0].minutes:.1f} min", flush=True)
    remaining, index = args.minutes * 60, 0
    while remaining > 0:
        seconds = min(args.checkpoint_minutes * 60, remaining)
        index += 1
        await _load(frontend_url, args.clients, seconds, args.seed + index, counters)
        remaining -= seconds
        points.append(await _checkpoint(start, backend, frontend, backend_url, headers, counters))
        print(f"checkpoint {index} at {points[-1].minutes:.1f} min: {counters.requests} requests", flush=True)
    print(_table(points))
    slope = _slope_mib_per_hour(points)
    fds_first, fds_last = sum(points[0].fds.values()), sum(points[-1].fds.values())
    print(
        f"requests: {counters.requests} ({counters.aborted_by_client} dropped mid-stream by the client), "
        f"failed: {len(counters.failures)}; RSS slope: {slope:+.1f} MiB/hour; "
        f"open fds: {fds_first} -> {fds_last}; KV blocks in use at idle: {[p.kv_blocks_used for p in points]}"
    )
    print(
        "RSS slope per process (MiB/hour):",
        {label: round(_slope_mib_per_hour(points, label), 1) for label in points[0].rss},
    )
    for failure in counters.failures[:10]:
        print("  failed:", failure)
    bad = any(p.kv_blocks_used for p in points) or fds_last > fds_first + FD_SLACK or counters.failures
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--minutes", type=float, default=30.0, help="minutes of load (idle checkpoints not counted)"
    )
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--model", type=Path, default=None, help="a converted model dir (default: the tiny Llama)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kv-cache-memory",
        default="16MiB",
        help="the backend's KV cache: its pages are touched lazily, block by block, so a large one "
        "makes the worker's RSS climb for hours as it fills (not a leak); a small one fills in the warm-up",
    )
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mi-soak-"))
    (tmp / "cert").mkdir(mode=0o700)
    env = {**os.environ, "MI_CERT": str(tmp / "cert" / "cert"), "PYTHONPATH": str(REPO)}
    env.setdefault("TRITON_INTERPRET", "1")
    os.environ["MI_CERT"] = env["MI_CERT"]
    model = args.model or _tiny_model(tmp)
    port = _free_port()
    backend = _start(
        [
            sys.executable,
            "-m",
            "mi.backend.launch",
            "--model",
            str(model),
            "--port",
            str(port),
            "--kv-cache-memory",
            args.kv_cache_memory,
        ],
        env,
        f"service start at localhost:{port}",
    )
    frontend = None
    try:
        from mi.auth import read_secret

        headers = {"Authorization": f"Bearer {read_secret(Path(env['MI_CERT']))}"}
        frontend_port = _free_port()
        frontend = _start(
            [
                sys.executable,
                "-m",
                "mi.frontend.launch",
                "--backend",
                str(port),
                "--server-port",
                str(frontend_port),
            ],
            env,
            "frontend start at",
        )
        return asyncio.run(
            soak(
                args,
                backend,
                frontend,
                f"http://127.0.0.1:{frontend_port}",
                f"http://127.0.0.1:{port}",
                headers,
            )
        )
    finally:
        for proc in (frontend, backend):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
