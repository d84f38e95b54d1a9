"""Per-request timings and the summary of one load point (the figures every report shows).

Definitions (as vLLM's `benchmark_serving`, so figures compare across tools):
- TTFT: first text-carrying chunk - request sent.
- ITL: gaps between successive text-carrying chunks of a request, pooled over all requests (a
  chunk that carries several tokens is one gap, as a client sees it).
- TPOT: (last chunk - first chunk) / (output tokens - 1), per request with more than one token.
- E2E latency: end of the stream - request sent.
- Throughputs divide by the duration: first request sent to last stream ended.
Percentiles are numpy's (linear interpolation); a figure with no samples is None (JSON null).
Only completed requests enter latencies and token counts; failed ones are counted and grouped by
message.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    start: float  # time.perf_counter() when sent
    end: float = 0.0  # when the stream ended (or the request failed)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each text-carrying chunk
    output_tokens: int | None = None  # the server's usage; None: count the chunks
    prompt_tokens: int | None = None  # the server's usage, else the workload's count
    error: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)


def _stats_ms(seconds: np.ndarray) -> dict:
    if seconds.size == 0:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    ms = seconds * 1000.0
    return {
        "mean": float(ms.mean()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES))},
    }


def summarize(records: list[RequestRecord]) -> dict:
    """The summary of one load point: counts, throughputs, and TTFT/TPOT/ITL/E2E statistics (ms)."""
    done = [r for r in records if r.error is None and r.chunk_times]
    failed = [r for r in records if r not in done]
    errors = collections.Counter(r.error or "no output tokens" for r in failed)
    duration = max(r.end for r in records) - min(r.start for r in records) if records else 0.0

    starts = np.array([r.start for r in done])
    ends = np.array([r.end for r in done])
    firsts = np.array([r.chunk_times[0] for r in done])
    lasts = np.array([r.chunk_times[-1] for r in done])
    out_tokens = np.array([r.num_output_tokens for r in done], dtype=np.int64)
    in_tokens = np.array([r.prompt_tokens or 0 for r in done], dtype=np.int64)

    multi = out_tokens > 1
    tpot = (lasts[multi] - firsts[multi]) / (out_tokens[multi] - 1)
    # Pool every request's chunk gaps: diff over the concatenation, minus the gaps that span two
    # requests (the first chunk of each request after the first).
    times = np.concatenate([r.chunk_times for r in done]) if done else np.empty(0)
    gaps = np.diff(times)
    num_chunks = np.array([len(r.chunk_times) for r in done], dtype=np.int64)
    crossing = np.cumsum(num_chunks)[:-1] - 1
    itl = np.delete(gaps, crossing) if gaps.size else gaps

    total_out, total_in = int(out_tokens.sum()), int(in_tokens.sum())
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "errors": dict(errors.most_common()),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_out + total_in),
        "ttft_ms": _stats_ms(firsts - starts),
        "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms(itl),
        "e2el_ms": _stats_ms(ends - starts),
    }


def per_request(records: list[RequestRecord]) -> list[dict]:
    """One small row per request for the results JSON (the chunk times themselves are left out)."""
    return [
        {
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.num_output_tokens,
            "ttft_ms": (r.chunk_times[0] - r.start) * 1000.0 if r.chunk_times else None,
            "e2el_ms": (r.end - r.start) * 1000.0,
            "num_chunks": len(r.chunk_times),
            "error": r.error,
        }
        for r in records
    ]
