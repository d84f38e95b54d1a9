"""Resident memory of each backend process after waves of mixed requests: a leak grows every
wave, a cache levels off.

    python benchmarks/bench_rss_waves.py [--waves 10] [--requests 300] [-- BACKEND FLAGS...]

Serves a tiny random Llama (tp=1) and sends waves of random completions at concurrency 16:
prompts of 3-150 words, 1-32 tokens, greedy or sampled, with or without logprobs, streamed or
not, so the steps see every row count. Prints each wave's seconds and the RSS of the supervisor,
scheduler and worker. Run it twice, with and without MI_CPU_LINEAR=torch, to compare.
"""

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("MI_CERT", os.path.join(tempfile.mkdtemp(), "cert"))
from mi.convert import convert  # noqa: E402
from mi.models.tiny import build_tiny_model  # noqa: E402

from servers import backend_headers, start_backend  # noqa: E402

WORDS = "the quick brown fox jumps over lazy dog a b c d e f g".split()


async def wave(port: int, num_requests: int, rng: random.Random) -> None:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        slots = asyncio.Semaphore(16)

        async def one() -> None:
            body = {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 150))),
                "max_tokens": rng.randint(1, 32),
                "temperature": rng.choice([0, 1]),
                "logprobs": rng.choice([None, 2]),
                "stream": rng.random() < 0.5,
            }
            async with slots, session.post(f"http://127.0.0.1:{port}/v1/generate", json=body) as resp:
                await resp.read()
                resp.raise_for_status()

        await asyncio.gather(*(one() for _ in range(num_requests)))


def rss_by_role(supervisor: psutil.Process) -> dict[str, int]:
    """MB per process; children are named by the module they run (`-m mi.actors.worker...`)."""
    sizes = {"supervisor": supervisor.memory_info().rss >> 20}
    for child in supervisor.children(recursive=True):
        role = next(
            (arg.split(".")[2] for arg in child.cmdline() if arg.startswith("mi.actors.")), child.name()
        )
        sizes[role] = child.memory_info().rss >> 20
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300, help="per wave")
    parser.add_argument("backend_flags", nargs="*", default=["--num-kv-blocks", "512"])
    args = parser.parse_args()
    workdir = tempfile.mkdtemp()
    model = convert(build_tiny_model(workdir + "/hf", arch="llama"), workdir + "/mi", 1)
    proc, port = start_backend(model, *args.backend_flags)
    try:
        supervisor = psutil.Process(proc.proc.pid)
        rng = random.Random(0)
        print(f"MI_CPU_LINEAR={os.environ.get('MI_CPU_LINEAR', 'onednn')}")
        print("start", rss_by_role(supervisor), flush=True)
        for index in range(args.waves):
            start = time.perf_counter()
            asyncio.run(wave(port, args.requests, rng))
            print(f"wave {index} ({time.perf_counter() - start:.1f} s)", rss_by_role(supervisor), flush=True)
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
