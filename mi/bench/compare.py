"""`mi-bench compare`: ours and each peer, one after another, on the same model and workload.

Order: mi (mi-backend + mi-frontend: the OpenAI sweep through the frontend, then the offline
sweep straight to the backend, on a fresh backend so that its prompts do not hit the prefix cache
the first sweep filled), then vLLM, llama.cpp's server and
HF `generate`, each only when asked for. Only one system runs at a time (the machine's cores
are shared by all). A peer that is not asked for, or cannot run, is reported as "not run" with
why; a peer that fails to start is reported, and the others still run.

The table has a row per (load value, figure) and a column per system, then mi / peer ratios.
For throughput a ratio above 1 is better for mi; for latencies below 1 is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mi.bench.commands import (
    BenchError,
    build_prompts,
    checked_loads,
    offline_points,
    run_async,
    serve_points,
)
from mi.bench.openai_client import Target
from mi.bench.report import arguments, write_json
from mi.bench.servers import (
    ServerError,
    converted_model,
    start_llamacpp,
    start_mi_backend,
    start_mi_frontend,
    start_vllm,
)

SYSTEMS = ("mi", "mi offline", "vLLM", "llama.cpp", "HF")
PEERS = ("vLLM", "llama.cpp", "HF")
FIGURES = (
    # label, point key, statistic (None: a scalar)
    ("output tok/s (higher is better)", "output_throughput", None),
    ("requests/s (higher is better)", "request_throughput", None),
    ("TTFT p50 ms (lower is better)", "ttft_ms", "p50"),
    ("TPOT mean ms (lower is better)", "tpot_ms", "mean"),
    ("ITL p50 ms (lower is better)", "itl_ms", "p50"),
    ("ITL p99 ms (lower is better)", "itl_ms", "p99"),
)


def _figure(point: dict | None, key: str, stat: str | None) -> float | None:
    if point is None or point.get("completed", 0) == 0:
        return None
    value = point[key]
    return value if stat is None else value[stat]


def _target(args: argparse.Namespace, url: str) -> Target:
    return Target(url, endpoint=args.endpoint, ignore_eos=args.ignore_eos, temperature=args.temperature)


def _run_mi(args, prompts, load_list, work_dir: Path) -> dict:
    model_dir = converted_model(Path(args.model), work_dir)
    backend, port = start_mi_backend(model_dir, work_dir, args.backend_args)
    try:
        frontend, url = start_mi_frontend(port, work_dir, args.frontend_args)
        try:
            served = run_async(serve_points(_target(args, url), prompts, load_list, args))
        finally:
            frontend.stop()
    finally:
        backend.stop()
    # A fresh backend: on the same one, every prompt would hit the prefix cache the served run
    # filled, and offline's TTFT and throughput would measure the cache, not the engine.
    backend, port = start_mi_backend(model_dir, work_dir, args.backend_args)
    try:
        offline = run_async(offline_points(str(port), prompts, load_list, args))
    finally:
        backend.stop()
    return {"mi": served, "mi offline": offline}


def _run_peer(name: str, args, prompts, load_list, work_dir: Path) -> list[dict] | str:
    """The peer's points, or why it did not run."""
    hf_dir = Path(args.model)
    is_hf = (hf_dir / "config.json").is_file()
    if name == "HF":
        if not args.hf:
            return "not run (no --hf)"
        if not is_hf:
            return "not run (--model is not an HF directory)"
        from mi.bench.hf_static import hf_static

        return [
            {"load": load.to_json(), **hf_static(hf_dir, prompts, load.concurrency or len(prompts))}
            for load in load_list
        ]
    if name == "vLLM":
        if not args.vllm_python:
            return "not run (no --vllm-python)"
        if not is_hf:
            return "not run (--model is not an HF directory)"
        start, start_args = start_vllm, (args.vllm_python, hf_dir, work_dir, args.vllm_args)
    else:
        if not args.llamacpp_python or not args.gguf:
            return "not run (needs --llamacpp-python and --gguf)"
        start, start_args = (
            start_llamacpp,
            (args.llamacpp_python, Path(args.gguf), work_dir, args.llamacpp_args),
        )
    try:
        proc, url = start(*start_args)
    except ServerError as exc:
        print(f"mi-bench compare: {exc}", file=sys.stderr)
        return f"not run (failed to start: see {work_dir})"
    try:
        return run_async(serve_points(_target(args, url), prompts, load_list, args))
    finally:
        proc.stop()


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_table(results: dict, workload: dict, load_labels: list[str]) -> str:
    """A markdown table: (load, figure) rows, systems, then mi / peer ratios; notes for peers not run."""
    peers = [p for p in PEERS if isinstance(results.get(p), list)]
    header = ["workload", "figure", *SYSTEMS, *(f"mi / {p}" for p in peers)]
    rows = [header, ["---"] * 2 + ["---:"] * (len(header) - 2)]
    for i, label in enumerate(load_labels):
        points = {s: results[s][i] if isinstance(results.get(s), list) else None for s in SYSTEMS}
        for name, key, stat in FIGURES:
            values = {s: _figure(points[s], key, stat) for s in SYSTEMS}
            ratios = [
                values["mi"] / values[p] if values["mi"] is not None and values[p] else None for p in peers
            ]
            cells = [_cell(v) if isinstance(results.get(s), list) else "not run" for s, v in values.items()]
            rows.append([f"{workload['source']}, {label}", name, *cells, *map(_cell, ratios)])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    for i, label in enumerate(load_labels):
        served, offline = (_figure(results[s][i], "output_throughput", None) for s in ("mi", "mi offline"))
        if served and offline:
            lines.append(f"serve / offline output tok/s, {label}: {served / offline:.2f}")
    lines += [f"{s}: {results[s]}" for s in SYSTEMS if isinstance(results.get(s), str)]
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    load_list = checked_loads(args)
    if not args.tokenizer and not args.dataset:
        args.tokenizer = args.model
    prompts, workload = build_prompts(args)
    with tempfile.TemporaryDirectory(prefix="mi-bench-compare-") as tmp:
        work_dir = Path(args.work_dir or tmp)
        try:
            results: dict = _run_mi(args, prompts, load_list, work_dir)
        except (ServerError, ValueError) as exc:
            raise BenchError(str(exc)) from None
        for peer in PEERS:
            results[peer] = _run_peer(peer, args, prompts, load_list, work_dir)
    labels = [load.label for load in load_list]
    print(format_table(results, workload, labels))
    if args.json:
        write_json(
            args.json,
            {"command": "compare", "args": arguments(args), "workload": workload, "systems": results},
        )
    failed = sum(p["failed"] for points in results.values() if isinstance(points, list) for p in points)
    if failed:
        print(f"mi-bench compare: {failed} requests failed (see the JSON's errors)", file=sys.stderr)
    return 1 if failed else 0
