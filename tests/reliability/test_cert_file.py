"""The backend's cert file is checked at start by `mi-backend` and `mi-frontend`: an empty,
unreadable or over-shared one is a one-line error (exit 2), never a crash or a silent use, and the
one the backend creates is private (docs/backend-api.md, Authentication)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import REPO, Process, free_port

COMMANDS = ("mi-backend", "mi-frontend")


def _args(command: str, model_dir: Path) -> list[str]:
    if command == "mi-backend":
        return ["-m", "mi.backend.launch", "--model", str(model_dir), "--port", str(free_port())]
    return ["-m", "mi.frontend.launch", "--backend", str(free_port()), "--server-port", str(free_port())]


def _run(command: str, cert: Path, model_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *_args(command, model_dir)],
        env={**os.environ, "MI_CERT": str(cert)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _refused(result: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mi"
    directory.mkdir(mode=0o700)
    return directory


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_cert_is_a_one_line_error(command, converted, tmp_path):
    cert = _write(_private_dir(tmp_path) / "cert", "")
    _refused(_run(command, cert, converted("llama", 1)), command, str(cert), "is empty", "remove it")
    assert cert.read_text() == ""  # never overwritten


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreadable_cert_is_a_one_line_error(command, converted, tmp_path):
    if os.geteuid() == 0:
        # root reads any mode-000 file; /proc/self/mem is a private regular file whose first
        # bytes no one can read (address 0 is never mapped)
        cert = Path("/proc/self/mem")
    else:
        cert = _write(_private_dir(tmp_path) / "cert", "secret\n", mode=0o000)
    _refused(_run(command, cert, converted("llama", 1)), command, "cannot read", str(cert))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_cert_that_is_no_file_is_a_one_line_error(command, kind, converted, tmp_path):
    cert = _private_dir(tmp_path) / "cert"
    if kind == "directory":
        cert.mkdir()
    else:
        cert.symlink_to(tmp_path / "missing")
    _refused(_run(command, cert, converted("llama", 1)), command, str(cert))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_cert_open_to_others_is_refused_with_the_fix(command, mode, converted, tmp_path):
    cert = _write(_private_dir(tmp_path) / "cert", "secret\n", mode)
    _refused(_run(command, cert, converted("llama", 1)), command, f"mode {mode:03o}", f"chmod 600 {cert}")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", [0o770, 0o757])
def test_a_cert_directory_others_can_write_is_refused_with_the_fix(command, mode, converted, tmp_path):
    directory = _private_dir(tmp_path)
    cert = _write(directory / "cert", "secret\n")
    directory.chmod(mode)
    _refused(_run(command, cert, converted("llama", 1)), command, "writable", f"chmod 700 {directory}")


def test_a_cert_directory_others_can_read_is_a_loud_warning(tmp_path):
    directory = _private_dir(tmp_path)
    cert = _write(directory / "cert", "secret\n")
    directory.chmod(0o755)
    warning = f"warning: the cert directory {directory} is readable by group/other users (mode 755)"
    # the backend goes on to read the model (none here: its own error comes next)
    result = _run("mi-backend", cert, tmp_path / "no-model")
    assert result.returncode == 2 and "is not a converted model" in result.stderr, result.stderr
    assert f"mi-backend: {warning}; run `chmod 700 {directory}`" in result.stderr
    # the frontend starts
    proc = Process(
        [sys.executable, *_args("mi-frontend", tmp_path)], env={"MI_CERT": str(cert), "PYTHONUNBUFFERED": "1"}
    )
    try:
        proc.wait_for_output("frontend start at", timeout=60)
        assert f"mi-frontend: {warning}" in proc.output
    finally:
        assert proc.stop() == 0


def test_the_cert_the_backend_creates_is_private_before_the_model_loads(tmp_path):
    cert = tmp_path / "home" / ".mi" / "cert"
    result = _run("mi-backend", cert, tmp_path / "no-model")
    assert "is not a converted model" in result.stderr, result.stderr
    assert cert.parent.stat().st_mode & 0o777 == 0o700
    assert cert.stat().st_mode & 0o777 == 0o600
    assert len(cert.read_text().strip()) == 64
    assert [p.name for p in cert.parent.iterdir()] == ["cert"]  # no private name left behind
    before = cert.read_text()
    _run("mi-backend", cert, tmp_path / "no-model")
    assert cert.read_text() == before
