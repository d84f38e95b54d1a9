"""Frozen configuration, built once by each entry point: the backend's from its command line,
and every `MI_*` environment variable of the project (`Environment`).

No other module reads an `MI_*` variable: the entry points (`mi-backend`, `mi-frontend`, the
SDK's `Model` / `AsyncModel`) call `read_environment` once and pass the values down, so
libraries take parameters and a test sets the environment of the processes it starts.
"""

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CERT_PATH = Path("~/.mi/cert")
DEFAULT_RUN_DIR = Path("~/.mi/run")  # the backend's unix socket, when XDG_RUNTIME_DIR is unusable

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 10**3,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
}


def parse_bytes(text: str) -> int:
    """'1GiB', '512MiB', '2g', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 1GiB, 512MiB, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """The variable's value, one of `choices`; unset or empty is the first."""
    value = environ.get(name, "") or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Environment:
    """The `MI_*` variables, parsed (a bad value is a ValueError naming it)."""

    cert: str | None = None  # MI_CERT: the backend's secret file (default of --cert, --backend-cert, cert=)
    api_key: str | None = None  # MI_API_KEY: the default of mi-frontend --api-key
    profile: bool = False  # MI_PROFILE=1: workers print step / collective time on shutdown
    force_triton: bool = False  # MI_FORCE_TRITON=1: the triton kernels also on CPU (TRITON_INTERPRET=1)
    cpu_linear: str = "onednn"  # MI_CPU_LINEAR: "onednn" (packed weights) or "torch" (nn.Linear)
    run_dir: str | None = None  # MI_RUN_DIR: the private directory of the backend's unix socket
    xdg_runtime_dir: str | None = None  # XDG_RUNTIME_DIR (no MI_ variable, read here so tests can set it)


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """This process's `MI_*` variables (or those of `environ`)."""
    environ = os.environ if environ is None else environ
    return Environment(
        cert=environ.get("MI_CERT") or None,
        api_key=environ.get("MI_API_KEY") or None,
        profile=_flag(environ, "MI_PROFILE"),
        force_triton=_flag(environ, "MI_FORCE_TRITON"),
        cpu_linear=_choice(environ, "MI_CPU_LINEAR", ("onednn", "torch")),
        run_dir=environ.get("MI_RUN_DIR") or None,
        xdg_runtime_dir=environ.get("XDG_RUNTIME_DIR") or None,
    )


def cert_path(explicit: str | Path | None = None, env: Environment | None = None) -> Path:
    """The backend's secret file: `explicit` (a flag or argument), else MI_CERT, else ~/.mi/cert."""
    env = read_environment() if env is None else env
    return Path(explicit or env.cert or DEFAULT_CERT_PATH).expanduser()


def socket_dir(env: Environment | None = None) -> Path:
    """The private directory of the backend's unix socket (mi/local_socket.py): MI_RUN_DIR, else
    $XDG_RUNTIME_DIR/mi when that runtime directory is ours and 0700, else ~/.mi/run."""
    env = read_environment() if env is None else env
    if env.run_dir:
        return Path(env.run_dir).expanduser()
    if env.xdg_runtime_dir and _is_private_dir(Path(env.xdg_runtime_dir)):
        return Path(env.xdg_runtime_dir) / "mi"
    return DEFAULT_RUN_DIR.expanduser()


def _is_private_dir(path: Path) -> bool:
    # NOTE: a stale XDG_RUNTIME_DIR (su, sudo, a finished login session) names a directory that
    # is gone or someone else's; ~/.mi/run is then the safe place.
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        path.is_absolute()
        and stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o077
    )


def kv_window(model: dict) -> int | None:
    """The sliding window of an mi_config model when every layer has one (the scheduler may then
    free the KV blocks before it); None when some layer attends to every key."""
    window, layer_types = model.get("sliding_window"), model.get("layer_types")
    if window is None or (layer_types and any(t != "sliding_attention" for t in layer_types)):
        return None
    return int(window)


@dataclass(frozen=True)
class BackendConfig:
    model_dir: str  # a mi-convert output directory
    host: str  # TCP bind address (loopback unless asked otherwise)
    port: int
    device_type: str  # "cpu" or "cuda"
    num_devices: int  # workers in total = replicas * tp
    tp: int  # from the checkpoint
    dtype: str  # "float32" | "bfloat16" | "float16"
    block_size: int  # tokens per KV block
    max_num_seqs: int  # running requests per replica
    max_num_batched_tokens: int  # tokens computed per step (the chunked-prefill budget)
    max_model_len: int  # prompt + completion, in tokens
    kv_cache_bytes: int  # per worker; used when num_kv_blocks is 0
    num_kv_blocks: int  # 0: derive from kv_cache_bytes
    enable_prefix_caching: bool  # reuse KV blocks of identical prompt prefixes
    max_queued_requests: int  # per replica, beyond max_num_seqs running; more get a 503
    cert_path: Path  # the shared secret every request but /health must present
    socket_dir: Path  # the private (0700) directory of the unix socket (mi/local_socket.py)
    ready_timeout: float  # seconds for the workers to load and report ready
    shutdown_grace: float  # seconds children get to exit before SIGKILL
    step_timeout: float = 60.0  # a replica with work and no step result for this long is dead; 0: off
    shm_collectives: bool = True  # CPU tensor parallelism: shared-memory all-reduce, not gloo
    debug_invariants: bool = False  # schedulers run check_invariants() whenever they go idle
    profile: bool = False  # MI_PROFILE=1: workers print step / collective time on shutdown
    force_triton: bool = False  # MI_FORCE_TRITON=1: workers run the triton kernels also on CPU
    cpu_linear: str = "onednn"  # MI_CPU_LINEAR: how CPU workers run linear layers (mi/ops/cpu_linear.py)
    # Admission limits (docs/reliability.md, "Admission"): 0 turns each off.
    max_prompt_bytes: int = -1  # text prompts longer (UTF-8) get the context-length 400 untokenized; -1: auto
    max_request_time: float = 0.0  # seconds from arrival; a request still running then is stopped (504)
    max_queue_wait: float = 0.0  # seconds a request may wait unscheduled; then 503 + Retry-After
    # Lifecycle (docs/reliability.md): after an engine-scoped failure of a replica, "exit" (tear
    # everything down, exit 1) or "restart" it (mi/actors/supervisor/restarts.py); on the first
    # SIGTERM, requests in flight get drain_timeout seconds to finish.
    on_failure: str = "exit"
    drain_timeout: float = 30.0

    def __post_init__(self):
        checks = [
            (
                self.num_devices >= 1 and self.num_devices % self.tp == 0,
                f"--device {self.num_devices} is not a positive multiple of the checkpoint's tp={self.tp}",
            ),
            (
                self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                f"--block-size must be a power of two, got {self.block_size}",
            ),
            (self.max_num_seqs >= 1, f"--max-num-seqs must be >= 1, got {self.max_num_seqs}"),
            (
                self.max_num_batched_tokens >= 1,
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}",
            ),
            (self.max_model_len >= 2, f"--max-model-len must be >= 2, got {self.max_model_len}"),
            (self.num_kv_blocks >= 0, f"--num-kv-blocks must be >= 0, got {self.num_kv_blocks}"),
            (
                self.max_queued_requests >= 0,
                f"--max-queued-requests must be >= 0, got {self.max_queued_requests}",
            ),
            (1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}"),
            (self.step_timeout >= 0, f"--step-timeout must be >= 0, got {self.step_timeout}"),
            (self.max_prompt_bytes >= -1, f"--max-prompt-bytes must be >= 0, got {self.max_prompt_bytes}"),
            (self.max_request_time >= 0, f"--max-request-time must be >= 0, got {self.max_request_time}"),
            (self.max_queue_wait >= 0, f"--max-queue-wait must be >= 0, got {self.max_queue_wait}"),
            (
                self.on_failure in ("exit", "restart"),
                f"--on-failure must be exit or restart, got {self.on_failure!r}",
            ),
            (self.drain_timeout >= 0, f"--drain-timeout must be >= 0, got {self.drain_timeout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def num_replicas(self) -> int:
        return self.num_devices // self.tp
