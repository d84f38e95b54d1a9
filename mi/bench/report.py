"""Printing results, writing the results JSON, and the latency-against-load plot.

A results document (what `--json` writes, and `roofline --results` reads) is
`{"command", "args", "workload", "points": [point, ...]}`, one point per load value: the load,
every figure of `mi.bench.metrics.summarize` and a row per request.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

_ROWS = (
    ("Successful requests", "completed", "d"),
    ("Failed requests", "failed", "d"),
    ("Benchmark duration (s)", "duration_s", ".2f"),
    ("Total input tokens", "total_input_tokens", "d"),
    ("Total generated tokens", "total_output_tokens", "d"),
    ("Request throughput (req/s)", "request_throughput", ".2f"),
    ("Output token throughput (tok/s)", "output_throughput", ".2f"),
    ("Total token throughput (tok/s)", "total_token_throughput", ".2f"),
)
_LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2el_ms"))


class PlotError(RuntimeError):
    """--plot cannot be honoured (matplotlib missing); the message says what to install."""


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_point(title: str, point: dict) -> str:
    lines = [f"{f' {title} ':=^60}"]
    lines += [f"{name + ':':<44}{_fmt(point[key], spec):>16}" for name, key, spec in _ROWS]
    for name, key in _LATENCIES:
        lines.append(f"{f' {name} (ms) ':-^60}")
        for stat, value in point[key].items():
            lines.append(f"{f'{stat.capitalize()} {name}:':<44}{_fmt(value, '.2f'):>16}")
    for message, count in point["errors"].items():
        lines.append(f"error ({count}x): {message}")
    lines.append("=" * 60)
    return "\n".join(lines)


def arguments(args) -> dict:
    """The parsed flags as JSON values (an inf request rate becomes the string "inf")."""

    def plain(value):
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return [plain(v) for v in value] if isinstance(value, list) else value

    return {name: plain(value) for name, value in vars(args).items()}


def write_json(path: str | Path, document: dict) -> None:
    # NOTE: allow_nan=False: an inf request rate is written as null (Load.to_json), never Infinity.
    Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def require_matplotlib() -> None:
    """Raise PlotError before a run that could not write its --plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib: pip install 'mlinference[bench]' (or pip install matplotlib)"
        ) from None


def plot(path: str | Path, points: list[dict], title: str) -> None:
    """TTFT, TPOT / ITL and output throughput against the load values, one point per value."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels = [p["load"]["label"] for p in points]
    finite = [p["load"]["concurrency"] or p["load"]["request_rate"] for p in points]
    # A numeric axis when every load is a number; categories when one is "all at once".
    xs = finite if all(x is not None and math.isfinite(x) for x in finite) else list(range(len(points)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = (
        (axes[0], "time to first token (ms)", (("ttft_ms", "p50"), ("ttft_ms", "p99"))),
        (axes[1], "per-token latency (ms)", (("tpot_ms", "mean"), ("itl_ms", "p50"), ("itl_ms", "p99"))),
    )
    for ax, ylabel, keys in series:
        for key, stat in keys:
            ax.plot(xs, [p[key][stat] if p[key][stat] is not None else math.nan for p in points], "o-")
            ax.lines[-1].set_label(f"{key.split('_')[0].upper()} {stat}")
        ax.set_ylabel(ylabel)
        ax.legend()
    axes[2].plot(xs, [p["output_throughput"] for p in points], "o-")
    axes[2].set_ylabel("output tokens/s")
    load_name = "concurrency" if points and points[0]["load"]["concurrency"] is not None else "request rate"
    for ax in axes:
        ax.set_xlabel(load_name)
        ax.set_xticks(xs, labels if xs != finite else [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
