"""Run a workload at each load value through one client, and turn the records into results.

A client is anything with `send(prompt) -> RequestRecord` and `served_model()`, opened with
`async with`: `OpenAIClient` (serve) or `BackendClient` (offline). One warm-up request (short,
not measured) goes first, so that the first load point does not pay for the server's first step.
"""

from __future__ import annotations

import dataclasses

from mi.bench.load import Load, run_load
from mi.bench.metrics import per_request, summarize
from mi.bench.workload import Prompt

WARMUP_OUTPUT_LEN = 8


async def sweep(
    client, prompts: list[Prompt], loads: list[Load], *, seed: int = 0, warmup: int = 1, progress: bool = True
) -> list[dict]:
    """One point per load: the load, the summary figures and one row per request."""
    warm = dataclasses.replace(prompts[0], output_len=min(prompts[0].output_len, WARMUP_OUTPUT_LEN))
    for _ in range(warmup):
        await client.send(warm)
    points = []
    for load in loads:
        records = await run_load(client.send, prompts, load, seed=seed, progress=progress)
        points.append({"load": load.to_json(), **summarize(records), "requests": per_request(records)})
    return points


def failure_message(points: list[dict]) -> str | None:
    """One line naming the failed requests and their first error; None when all completed."""
    failed = sum(p["failed"] for p in points)
    if not failed:
        return None
    total = sum(p["num_requests"] for p in points)
    first = next(iter(next(p for p in points if p["failed"])["errors"]))
    return f"{failed} of {total} requests failed; first error: {first}"
