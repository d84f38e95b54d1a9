"""The load generator: send a workload's requests by a Poisson arrival rate or a fixed concurrency.

`Load` is one point of a sweep. `run_load` calls `send(prompt)` once per prompt; `send` is the
client (OpenAI HTTP or the backend's own API) and returns a `RequestRecord` whatever happens: a
failing request is a record with `error`, never an exception that stops the run.

Invariants: arrival times are drawn once, up front, from a seeded generator (the same seed, the
same schedule); `request_rate=inf` sends everything at once; a closed loop at concurrency N keeps
exactly N requests in flight until the prompts run out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mi.bench.metrics import RequestRecord
from mi.bench.workload import Prompt

Send = Callable[[Prompt], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Load:
    request_rate: float = math.inf  # requests/s, Poisson arrivals (open loop)
    concurrency: int | None = None  # closed loop: this many in flight (request_rate unused)

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency {self.concurrency}"
        return "all at once" if math.isinf(self.request_rate) else f"{self.request_rate:g} req/s"

    @property
    def value(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.request_rate)

    def to_json(self) -> dict:
        rate = None if math.isinf(self.request_rate) else self.request_rate
        return {"label": self.label, "request_rate": rate, "concurrency": self.concurrency}


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> np.ndarray:
    """Seconds after the start at which each request is sent (exponential gaps, first at 0)."""
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


async def run_load(
    send: Send, prompts: list[Prompt], load: Load, *, seed: int = 0, progress: bool = True
) -> list[RequestRecord]:
    """Every prompt's record, in prompt order."""
    bar = tqdm(total=len(prompts), desc=load.label, disable=not progress, leave=False)
    records: list[RequestRecord | None] = [None] * len(prompts)

    async def one(i: int) -> None:
        records[i] = await send(prompts[i])
        bar.update(1)

    try:
        if load.concurrency is not None:
            next_index = iter(range(len(prompts)))

            async def worker() -> None:
                for i in next_index:  # NOTE: one shared iterator: each index is taken once
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(min(load.concurrency, len(prompts)))))
        else:
            start = time.perf_counter()
            tasks = []
            for i, offset in enumerate(arrival_offsets(len(prompts), load.request_rate, seed)):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    return records
