"""`mi-backend` / `python -m mi.backend.launch`: serve a converted model on this host's devices.

    mi-backend --model OUT --device all|N --port 12222

Prints `service start at localhost:PORT` once it accepts requests; SIGTERM or Ctrl-C drains it
(requests in flight finish, for up to --drain-timeout s) and a second one stops it at once (exit 0
either way). Before loading anything it checks the host (x86-64 only, `mi.arch`) and the
cert file (`mi.auth.check_cert`, creating it when absent) and the unix socket's private directory
(`mi.local_socket.prepare_socket_dir`): a failed check is one line, exit 2.
"""

import argparse
import asyncio
import logging
import sys

from mi.arch import check_memory_ordering
from mi.auth import check_cert, load_or_create_secret
from mi.config import BackendConfig, Environment, cert_path, parse_bytes, read_environment, socket_dir
from mi.local_socket import prepare_socket_dir
from mi.ops.rope_scaling import rope_type

_DEFAULT_CPU_KV_BYTES = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mi-backend", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, help="a directory written by mi-convert")
    p.add_argument(
        "--device",
        default="all",
        help="'all' or a number of devices, a multiple of the checkpoint's tp. "
        "On a host without a GPU a device is a CPU worker with an equal share of "
        "the cores, and 'all' means one replica (tp workers).",
    )
    p.add_argument("--port", type=int, default=12222)
    p.add_argument("--host", default="127.0.0.1", help="TCP bind address (default: loopback only)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on CPU (bf16/fp16 matmuls are slow there), the checkpoint's dtype on GPU",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="running requests per replica (default: 64 on CPU, 256 on GPU)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens computed per step; longer prompts are prefilled in chunks",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + completion tokens (default: the model's max positions)",
    )
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV-cache size per worker, e.g. 2GiB (default: 1GiB on CPU, "
        "90%% of free memory after the weights on GPU)",
    )
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=0,
        help="exact number of KV blocks per worker; overrides --kv-cache-memory",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV cache of identical prompt prefixes",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests waiting per replica beyond --max-num-seqs; more get HTTP 503",
    )
    p.add_argument(
        "--cert",
        default=None,
        help="shared-secret file the frontend and SDK must present (default: $MI_CERT "
        "or ~/.mi/cert, created with mode 0600 if absent)",
    )
    p.add_argument(
        "--gloo-collectives",
        action="store_true",
        help="CPU tensor parallelism: use gloo for all-reduce instead of the shared-memory collectives",
    )
    p.add_argument(
        "--debug-invariants",
        action="store_true",
        help="check the KV block manager's invariants whenever a scheduler goes idle "
        "(a violation stops the backend with an error)",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for the workers to load the model"
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=60.0,
        help="seconds a replica with requests in flight may go without finishing a step (a hung "
        "worker or collective) before the backend fails them all and exits 1; loading is not "
        "counted; 0 turns the watchdog off",
    )
    _add_admission_flags(p)
    # Lifecycle flags (docs/reliability.md).
    p.add_argument(
        "--on-failure",
        choices=["exit", "restart"],
        default="exit",
        help="after an engine failure of a replica (a child died, --step-timeout, a failed reader): "
        "fail its requests in flight (503 backend_failed) and exit 1 (exit), or replace the replica "
        "with fresh processes after 1, 2, 4 s while the others serve on (restart; at most 3 restarts "
        "in 10 minutes, then exit 1)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds requests in flight may run on (new ones get 503) before "
        "they are failed; a second signal stops at once",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _add_admission_flags(p: argparse.ArgumentParser) -> None:
    """Backpressure and deadlines (docs/reliability.md, "Admission")."""
    p.add_argument(
        "--max-prompt-bytes",
        default="auto",
        help="text prompts of more UTF-8 bytes get the context-length 400 without being tokenized "
        "(e.g. 4MiB; 0: no limit); auto: the most bytes --max-model-len tokens can cover, from the "
        "vocabulary's longest token, where the tokenizer allows a sound bound",
    )
    p.add_argument(
        "--max-request-time",
        type=float,
        default=0.0,
        help="seconds a request may run from its arrival; one still running then is stopped with "
        "HTTP 504 request_timeout (in a stream: an error line); 0: no limit",
    )
    p.add_argument(
        "--max-queue-wait",
        type=float,
        default=0.0,
        help="seconds a request may wait in a scheduler's queue before it first runs; one that "
        "waits longer gets HTTP 503 queue_timeout with Retry-After; 0: no limit",
    )


def _prompt_bytes(value: str) -> int:
    return -1 if value == "auto" else parse_bytes(value)


def _device_count(requested: str, tp: int) -> tuple[str, int]:
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "all":
        return device_type, torch.cuda.device_count() if device_type == "cuda" else tp
    try:
        count = int(requested)
    except ValueError:
        raise ValueError(f"--device must be 'all' or a number, got {requested!r}") from None
    if device_type == "cuda" and count > torch.cuda.device_count():
        raise ValueError(f"--device {count}: only {torch.cuda.device_count()} GPUs are visible")
    return device_type, count


def config_from_args(args: argparse.Namespace, mi_config: dict, env: Environment) -> BackendConfig:
    tp = mi_config["tp"]
    device_type, num_devices = _device_count(args.device, tp)  # BackendConfig checks it vs tp
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if device_type == "cpu" else mi_config["dtype"]
    model_len = mi_config["model"]["max_position_embeddings"]
    max_model_len = args.max_model_len or model_len
    # Dynamic NTK RoPE exists to serve past max_position_embeddings.
    dynamic_rope = rope_type(mi_config["model"].get("rope_scaling")) == "dynamic"
    if max_model_len > model_len and not dynamic_rope:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's {model_len} positions")
    if args.kv_cache_memory is not None:
        kv_bytes = parse_bytes(args.kv_cache_memory)
    else:
        kv_bytes = _DEFAULT_CPU_KV_BYTES if device_type == "cpu" else -1  # -1: GPU auto-size
    return BackendConfig(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        device_type=device_type,
        num_devices=num_devices,
        tp=tp,
        dtype=dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs or (64 if device_type == "cpu" else 256),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len,
        kv_cache_bytes=kv_bytes,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        max_queued_requests=args.max_queued_requests,
        cert_path=cert_path(args.cert, env),
        socket_dir=socket_dir(env),
        ready_timeout=args.ready_timeout,
        shutdown_grace=5.0,
        step_timeout=args.step_timeout,
        shm_collectives=not args.gloo_collectives,
        debug_invariants=args.debug_invariants,
        profile=env.profile,
        force_triton=env.force_triton,
        cpu_linear=env.cpu_linear,
        max_prompt_bytes=_prompt_bytes(args.max_prompt_bytes),
        max_request_time=args.max_request_time,
        max_queue_wait=args.max_queue_wait,
        on_failure=args.on_failure,
        drain_timeout=args.drain_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="mi-backend %(levelname)s %(message)s"
    )
    try:
        check_memory_ordering()
        env = read_environment()
        cert = cert_path(args.cert, env)
        for warning in check_cert(cert):
            print(f"mi-backend: warning: {warning}", file=sys.stderr, flush=True)
        load_or_create_secret(cert)  # here, so a cert that cannot be written is a start-up error too
        prepare_socket_dir(socket_dir(env))
        from mi.convert import load_mi_config

        mi_config = load_mi_config(args.model)
        cfg = config_from_args(args, mi_config, env)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (ValueError, OSError) as exc:
        print(f"mi-backend: error: {exc}", file=sys.stderr)
        return 2
    from mi.actors.supervisor.server import serve

    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return run(serve(cfg, mi_config, tokenizer))


if __name__ == "__main__":
    sys.exit(main())
