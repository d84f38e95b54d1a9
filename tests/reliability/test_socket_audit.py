"""The backend's unix socket cannot be squatted (issue 10; mi/local_socket.py): it lives in a
private 0700 directory, is 0600, replaces a dead backend's socket, and a client sends the secret
over it only after checking the directory, the file and the listening process (SO_PEERCRED);
otherwise it uses TCP. The whole backend process tree listens on one TCP socket, on 127.0.0.1,
plus that unix socket."""

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from mi.config import DEFAULT_RUN_DIR, Environment, cert_path, socket_dir
from mi.local_socket import peer_problem, socket_path, socket_problem
from mi.sdk.transport import Backend
from mi.sdk.types import MIError

from servers import REPO, Process, backend_headers, free_port, start_frontend

NOBODY = 65534


def _run_dir() -> Path:
    # NOTE: short on purpose: a unix socket path has 107 bytes at most (pytest's tmp_path is long)
    return Path(tempfile.mkdtemp(prefix="mi-run-")) / "run"


def _backend_args(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "mi.backend.launch", "--model", str(model_dir), "--port", str(port)]


def _start_backend(model_dir: Path, run_dir: Path) -> tuple[Process, int]:
    port = free_port()
    proc = Process(_backend_args(model_dir, port), env={"MI_RUN_DIR": str(run_dir)})
    proc.wait_for_output(f"service start at localhost:{port}", timeout=180)
    return proc, port


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module")
def backend(converted):
    run_dir = _run_dir()
    proc, port = _start_backend(converted("llama", 1), run_dir)
    yield proc, port, run_dir
    proc.stop()
    shutil.rmtree(run_dir.parent, ignore_errors=True)


def test_socket_and_its_directory_are_private(backend):
    _, port, run_dir = backend
    path = socket_path(port, run_dir)
    assert _mode(run_dir) == 0o700 and os.stat(run_dir).st_uid == os.geteuid()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert _mode(path) == 0o600 and os.lstat(path).st_uid == os.geteuid()
    assert socket_problem(path) is None


def test_the_process_tree_listens_on_one_loopback_tcp_socket_and_the_unix_socket(backend):
    proc, port, run_dir = backend
    tcp, udp, unix = set(), set(), set()
    for process in _tree(proc.proc.pid):
        for conn in process.net_connections(kind="all"):
            if conn.family == socket.AF_UNIX:
                if conn.laddr:  # a bound name (a listener, or a connection accepted on it)
                    unix.add(conn.laddr)
            elif conn.type == socket.SOCK_DGRAM:
                udp.add(conn.laddr)
            elif conn.status == psutil.CONN_LISTEN:
                tcp.add((conn.laddr.ip, conn.laddr.port))
    assert tcp == {("127.0.0.1", port)}
    assert not udp
    assert unix == {socket_path(port, run_dir)}


def test_the_frontend_serves_through_the_private_socket(backend, monkeypatch):
    backend_proc, port, run_dir = backend
    path = socket_path(port, run_dir)
    monkeypatch.setenv("MI_RUN_DIR", str(run_dir))  # the frontend's environment (servers.Process)
    frontend, url = start_frontend(port)
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as resp:
            model = json.load(resp)["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200
        # the kept-alive connection to the backend is a unix one; none goes to its TCP port
        frontend_tcp = [
            c
            for c in psutil.Process(frontend.proc.pid).net_connections("tcp")
            if c.raddr and c.raddr.port == port
        ]
        assert not frontend_tcp
        accepted = [
            c
            for c in psutil.Process(backend_proc.proc.pid).net_connections("unix")
            if c.laddr == path and c.status != psutil.CONN_LISTEN
        ]
        assert len(accepted) >= 2  # the listener and at least one accepted connection
    finally:
        assert frontend.stop() == 0
    assert "not using the unix socket" not in frontend.output


@pytest.mark.parametrize("left_over", ["dead backend's socket", "regular file"])
def test_a_file_left_at_the_socket_path_is_replaced(left_over, converted):
    run_dir = _run_dir()
    run_dir.mkdir(mode=0o700)
    port = free_port()
    path = socket_path(port, run_dir)
    if left_over == "regular file":
        Path(path).write_text("left over\n")
    else:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, as after a SIGKILL
    proc = Process(_backend_args(converted("llama", 1), port), env={"MI_RUN_DIR": str(run_dir)})
    try:
        proc.wait_for_output(f"service start at localhost:{port}", timeout=180)
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and _mode(path) == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            assert peer_problem(client) is None
            client.sendall(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        assert proc.stop() == 0, proc.output
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    assert not os.path.lexists(path)


def _refused(run_dir: Path, model_dir: Path) -> str:
    result = subprocess.run(
        _backend_args(model_dir, free_port()),
        env={**os.environ, "MI_RUN_DIR": str(run_dir)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mi-backend: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_socket_directory_open_to_others_is_refused_not_chmodded(mode, converted):
    run_dir = _run_dir()
    run_dir.mkdir()
    run_dir.chmod(mode)
    line = _refused(run_dir, converted("llama", 1))
    assert str(run_dir) in line and "group/other" in line and "chmod 700" in line
    assert _mode(run_dir) == mode


def test_a_socket_directory_of_another_user_is_refused(converted):
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory to another user")
    run_dir = _run_dir()
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    line = _refused(run_dir, converted("llama", 1))
    assert f"belongs to uid {NOBODY}" in line


def test_a_socket_directory_that_is_a_file_or_too_long_is_refused(converted):
    not_a_dir = _run_dir()
    not_a_dir.write_text("")
    assert "not a directory" in _refused(not_a_dir, converted("llama", 1))
    too_long = Path(tempfile.mkdtemp(prefix="mi-run-")) / ("x" * 100)
    try:
        assert "too long" in _refused(too_long, converted("llama", 1))
    finally:
        shutil.rmtree(too_long.parent)


def test_a_directory_at_the_socket_path_stops_the_backend_with_an_error(converted):
    run_dir = _run_dir()
    run_dir.mkdir(mode=0o700)
    port = free_port()
    os.mkdir(socket_path(port, run_dir))
    try:
        proc = Process(_backend_args(converted("llama", 1), port), env={"MI_RUN_DIR": str(run_dir)})
        assert proc.proc.wait(timeout=120) == 1
        proc.stop()
        assert "is a directory, not a stale socket" in proc.output
        assert "Traceback" not in proc.output
    finally:
        shutil.rmtree(run_dir.parent)


# -- the client side ---------------------------------------------------------------------------

# A plain unix server standing where the backend's socket would be: it binds (as the test's user,
# in a directory the test owns), sets the socket's mode, then drops to `uid` before listening, as
# SO_PEERCRED reports the listener's credentials of listen() time. It prints what it receives.
_LISTENER = r"""
import os, socket, sys
path, mode, uid = sys.argv[1], int(sys.argv[2], 8), int(sys.argv[3])
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, mode)
if uid != os.geteuid():
    os.setgid(uid)
    os.setuid(uid)
server.listen(8)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    data = conn.recv(65536)
    print("received", len(data), b"Bearer" in data, flush=True)
    conn.close()
"""

_SQUATTERS = {
    # case: (directory mode, socket mode, listener uid (None: ours))
    "directory open to others": (0o755, 0o600, None),
    "socket open to others": (0o700, 0o666, None),
    "listener of another user": (0o700, 0o600, NOBODY),
}


@pytest.mark.parametrize("case", _SQUATTERS)
def test_a_client_sends_no_secret_to_a_squatted_socket_and_uses_tcp(case, backend, caplog):
    dir_mode, sock_mode, uid = _SQUATTERS[case]
    if uid is not None and os.geteuid() != 0:
        pytest.skip("only root can run a listener as another user (test_peer_check_* covers it)")
    _, port, _ = backend
    squat_dir = Path(tempfile.mkdtemp(prefix="mi-squat-"))
    squat_dir.chmod(dir_mode)
    path = socket_path(port, squat_dir)
    listener = Process([sys.executable, "-c", _LISTENER, path, f"{sock_mode:o}", str(uid or os.geteuid())])
    try:
        listener.wait_for_output("listening", timeout=30)

        async def use() -> None:
            async with Backend(f"http://127.0.0.1:{port}", cert_path(), unix_socket=path) as client:
                assert (await client.health())[0] == 200
                assert (await client.model_info()).model_name
            async with Backend(f"http://127.0.0.1:{port}", cert_path(), unix_socket=path) as client:
                assert (await client.stats()).replicas

        with caplog.at_level(logging.WARNING, logger="mi.transport"):
            asyncio.run(use())
        warnings = [r.getMessage() for r in caplog.records if "not using the unix socket" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once, however many connections
        assert path in warnings[0]
        time.sleep(0.2)  # the listener prints what a probing connection sent, if any
        received = [line.split() for line in listener.lines if line.startswith("received")]
        assert all(words[1] == "0" for words in received), received
        if uid is not None:
            assert received  # it connected: the peer check refused it, not an earlier check
    finally:
        listener.proc.kill()
        listener.stop()
        shutil.rmtree(squat_dir, ignore_errors=True)


def test_the_squatter_check_can_fail(backend):
    """The same listener, private and ours, does get the secret: the test above would see it."""
    _, port, _ = backend
    squat_dir = Path(tempfile.mkdtemp(prefix="mi-squat-"))
    path = socket_path(port, squat_dir)
    listener = Process([sys.executable, "-c", _LISTENER, path, "600", str(os.geteuid())])
    try:
        listener.wait_for_output("listening", timeout=30)

        async def use() -> None:
            async with Backend(f"http://127.0.0.1:{port}", cert_path(), unix_socket=path) as client:
                with pytest.raises(MIError):
                    await client.stats()  # the listener hangs up without an answer

        asyncio.run(use())
        listener.wait_for_output("True", timeout=10)  # it received the Authorization header
        assert backend_headers()
    finally:
        listener.proc.kill()
        listener.stop()
        shutil.rmtree(squat_dir, ignore_errors=True)


def test_peer_check_names_a_listener_of_another_uid():
    # NOTE: a socketpair's peer is this very process; a different expected uid stands in for a
    # listener of another user where the test cannot switch users (not root).
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_problem(left) is None
        problem = peer_problem(left, expected_uid=os.geteuid() + 1)
        assert problem and f"runs as uid {os.geteuid()}" in problem


def test_socket_problem_checks_the_file_and_its_directory(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = str(private / "s.sock")
    with pytest.raises(FileNotFoundError):
        socket_problem(path)
    Path(path).write_text("")
    assert "is not a socket" in socket_problem(path)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        os.chmod(path, 0o600)
        assert socket_problem(path) is None
        os.chmod(path, 0o660)
        assert "chmod 600" in socket_problem(path)
        os.chmod(path, 0o600)
        private.chmod(0o750)
        assert "chmod 700" in socket_problem(path)


def test_socket_dir_prefers_mi_run_dir_then_a_private_xdg_runtime_dir(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert socket_dir(Environment(run_dir="/srv/mi", xdg_runtime_dir=str(runtime))) == Path("/srv/mi")
    assert socket_dir(Environment(xdg_runtime_dir=str(runtime))) == runtime / "mi"
    fallback = DEFAULT_RUN_DIR.expanduser()
    runtime.chmod(0o755)  # a runtime directory others can read is no private place
    assert socket_dir(Environment(xdg_runtime_dir=str(runtime))) == fallback
    assert socket_dir(Environment(xdg_runtime_dir=str(tmp_path / "gone"))) == fallback
    assert socket_dir(Environment(xdg_runtime_dir="relative")) == fallback
    assert socket_dir(Environment()) == fallback
