"""Start the real mi-backend / mi-frontend processes on free ports for tests."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def backend_headers() -> dict:
    """The Authorization header the backend requires (its secret comes from $MI_CERT)."""
    from mi.auth import read_secret
    from mi.config import cert_path

    secret = read_secret(cert_path())
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A child process whose combined output is collected by a thread (never blocks on a pipe)."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_output(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[2]} exited ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.05)
        raise TimeoutError(f"no {needle!r} after {timeout} s:\n{self.output}")

    def stop(self, timeout: float = 15.0, drain: float = 3.0) -> int:
        """SIGTERM (the servers drain requests in flight), and after `drain` s a second one
        (they stop at once); SIGKILL after `timeout` s more."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(drain)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


def start_backend(model_dir: Path, *extra: str, port: int | None = None) -> tuple[Process, int]:
    port = port or free_port()
    proc = Process(
        [
            sys.executable,
            "-m",
            "mi.backend.launch",
            "--model",
            str(model_dir),
            "--device",
            "all",
            "--port",
            str(port),
            *extra,
        ]
    )
    proc.wait_for_output(f"service start at localhost:{port}", timeout=180)
    return proc, port


def start_frontend(backend_port: int, *extra: str) -> tuple[Process, str]:
    port = free_port()
    proc = Process(
        [
            sys.executable,
            "-m",
            "mi.frontend.launch",
            "--backend",
            str(backend_port),
            "--server-port",
            str(port),
            *extra,
        ]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"frontend did not come up:\n{proc.output}")
        time.sleep(0.1)


@dataclass
class ServedModel:
    hf_dir: Path
    mi_dir: Path
    backend: Process
    backend_port: int
    frontend: Process
    frontend_url: str

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"


@dataclass
class Frontend:
    """An extra mi-frontend started with flags (see the `secured_frontend` fixture)."""

    url: str
    api_key: str
    model_names: tuple[str, ...]
    proc: Process

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}
