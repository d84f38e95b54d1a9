"""What the lifecycle tests check after a kill or a stop: the process tree of a backend (by
kind) and what it may leave behind (processes, /dev/shm entries, run directories, sockets)."""

import json
import os
import tempfile
import time
from pathlib import Path

import psutil

from mi.config import socket_dir
from mi.local_socket import socket_path


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def by_kind(pid: int) -> dict[str, psutil.Process]:
    """ "supervisor", "scheduler", "worker0", "worker1", ... of the backend `pid`."""
    kinds = {"supervisor": psutil.Process(pid)}
    for child in psutil.Process(pid).children(recursive=True):
        cmd = child.cmdline()
        if "mi.actors.scheduler" in cmd:
            kinds["scheduler"] = child
        elif "mi.actors.worker" in cmd:
            kinds[f"worker{json.loads(cmd[-1])['rank']}"] = child
    return kinds


def alive(procs: list[psutil.Process]) -> list[int]:
    """The pids of `procs` still running (a zombie has ended)."""
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(procs)


def kill_leftovers(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
            proc.wait(10)
        except psutil.NoSuchProcess:
            pass


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


def run_dirs(pids: list[int]) -> list[str]:
    """The supervisor run directories (`mi-backend-PID-*` in the temp dir) of these pids."""
    prefixes = tuple(f"mi-backend-{pid}-" for pid in pids)
    return [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(prefixes)]


def backend_socket(port: int) -> Path:
    return Path(socket_path(port, socket_dir()))
