"""The serve, offline and roofline subcommands: build the workload, run, print, write, plot.

Each returns the exit status: 0, or 1 when a request failed (the results are still printed and
written; the last line on stderr says how many failed and why). Bad input (workload, flags,
missing matplotlib) raises `BenchError` before anything is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from mi.bench.cli import loads
from mi.bench.load import Load
from mi.bench.openai_client import OpenAIClient, Target
from mi.bench.report import PlotError, arguments, format_point, plot, require_matplotlib, write_json
from mi.bench.runner import failure_message, sweep
from mi.bench.workload import WorkloadError, describe, load_dataset, load_tokenizer, random_prompts


class BenchError(Exception):
    """Input the benchmark cannot run with; the message is one line for stderr."""


def run_async(coro):
    """Run on uvloop when installed: the load generator's own overhead is part of every figure."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_prompts(args: argparse.Namespace, tokenizer=None) -> tuple[list, dict]:
    """The workload from the flags; `tokenizer` is used when --tokenizer is not given."""
    try:
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        if args.dataset:
            prompts = load_dataset(args.dataset, args.num_requests, args.output_len, tokenizer)
            source = f"dataset {args.dataset}"
        elif tokenizer is None:
            raise WorkloadError(
                "random prompts need --tokenizer DIR (a model directory), or give --dataset FILE"
            )
        else:
            prompts = random_prompts(tokenizer, args.num_requests, args.input_len, args.output_len, args.seed)
            source = f"random tokens, {args.input_len} -> {args.output_len}"
    except WorkloadError as exc:
        raise BenchError(str(exc)) from None
    return prompts, describe(prompts, source)


def checked_loads(args: argparse.Namespace) -> list[Load]:
    try:
        result = loads(args)
        if getattr(args, "plot", None):
            require_matplotlib()
    except (ValueError, PlotError) as exc:
        raise BenchError(str(exc)) from None
    return result


def finish(args: argparse.Namespace, title: str, workload: dict, points: list[dict]) -> int:
    """Print each point; write --json and --plot; the exit status."""
    for point in points:
        print(format_point(f"{title} ({point['load']['label']})", point))
    if args.json:
        write_json(
            args.json,
            {"command": args.command, "args": arguments(args), "workload": workload, "points": points},
        )
    if getattr(args, "plot", None):
        plot(args.plot, points, f"{title}: {workload['source']}, {workload['num_requests']} requests")
    message = failure_message(points)
    if message:
        print(f"mi-bench: {message}", file=sys.stderr)
        return 1
    return 0


async def serve_points(target: Target, prompts, load_list, args) -> list[dict]:
    """The sweep against one OpenAI-compatible server (also used by compare)."""
    if target.model is None:
        async with OpenAIClient(target) as probe:
            target = dataclasses.replace(target, model=await probe.served_model())
    async with OpenAIClient(target) as client:
        return await sweep(
            client, prompts, load_list, seed=args.seed, warmup=args.warmup, progress=not args.no_progress
        )


def cmd_serve(args: argparse.Namespace) -> int:
    load_list = checked_loads(args)
    prompts, workload = build_prompts(args)
    target = Target(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout=args.timeout,
    )
    points = run_async(serve_points(target, prompts, load_list, args))
    return finish(args, f"serve {target.root}", workload, points)


async def _backend_tokenizer(spec: str, cert: str | None):
    from mi.api.tokenizer_files import load_tokenizer_files
    from mi.config import cert_path
    from mi.sdk.transport import Backend, address
    from mi.sdk.types import MIError

    url, unix_socket = address(spec)
    try:
        async with Backend(url, cert_path(cert), unix_socket=unix_socket, timeout=60) as backend:
            return load_tokenizer_files(await backend.tokenizer_files())
    except MIError as exc:
        raise BenchError(f"cannot fetch the tokenizer from the backend at {spec}: {exc}") from None


async def offline_points(spec: str, prompts, load_list, args) -> list[dict]:
    """The sweep straight to one mi-backend (also used by compare)."""
    from mi.bench.offline import BackendClient

    client = BackendClient(
        spec, cert=getattr(args, "cert", None), ignore_eos=args.ignore_eos, temperature=args.temperature
    )
    async with client:
        return await sweep(
            client, prompts, load_list, seed=args.seed, warmup=args.warmup, progress=not args.no_progress
        )


def cmd_offline(args: argparse.Namespace) -> int:
    from mi.bench.servers import ServerError, converted_model, start_mi_backend

    load_list = checked_loads(args)
    if args.backend:
        tokenizer = (
            None if args.tokenizer or args.dataset else run_async(_backend_tokenizer(args.backend, args.cert))
        )
        prompts, workload = build_prompts(args, tokenizer)
        points = run_async(offline_points(args.backend, prompts, load_list, args))
        return finish(args, f"offline mi-backend {args.backend}", workload, points)
    with tempfile.TemporaryDirectory(prefix="mi-bench-") as tmp:
        work_dir = Path(args.work_dir or tmp)
        if not args.tokenizer:
            args.tokenizer = args.model
        prompts, workload = build_prompts(args)
        try:
            model_dir = converted_model(Path(args.model), work_dir)
            backend, port = start_mi_backend(model_dir, work_dir, args.backend_args)
        except (ServerError, ValueError) as exc:
            raise BenchError(str(exc)) from None
        try:
            points = run_async(offline_points(str(port), prompts, load_list, args))
        finally:
            backend.stop()
        return finish(args, f"offline mi-backend {args.model}", workload, points)


def cmd_roofline(args: argparse.Namespace) -> int:
    import torch

    from mi.bench.roofline import format_roofline, measured_rates, roofline

    if (args.measured or args.results) and not args.model:
        raise BenchError("--measured and --results need --model (the roofline is per model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = [{"source": "--measured", "tok_s": value} for value in args.measured]
    for path in args.results:
        try:
            measured += measured_rates(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"--results {path}: not a results JSON of serve/offline ({exc})") from None
    try:
        result = roofline(
            args.model,
            dtype=args.dtype,
            measured=measured,
            gemv_size=args.gemv_size,
            gemm_size=args.gemm_size,
            repeats=args.repeats,
        )
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    print(format_roofline(result))
    if args.json:
        write_json(args.json, {"command": "roofline", "args": arguments(args), **result})
    return 0
