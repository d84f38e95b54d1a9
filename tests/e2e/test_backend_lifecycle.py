"""The backend process as an operator sees it: start, idle, bad input, SIGTERM, a dead child."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from mi.local_socket import socket_path

from servers import backend_headers, free_port, start_backend


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **backend_headers()}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _own_fds_in_dev_shm(pids) -> list[str]:
    """/dev/shm entries any of these processes has open or mapped."""
    found = []
    for pid in pids:
        try:
            maps = open(f"/proc/{pid}/maps").read()
        except OSError:
            continue
        found += [line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line]
    return found


@pytest.fixture(scope="module")
def backend(converted):
    proc, port = start_backend(converted("llama", 1))
    yield proc, port
    proc.stop()


def test_idle_backend_uses_almost_no_cpu(backend):
    proc, _ = backend
    tree = _tree(proc.proc.pid)
    assert len(tree) == 3, "supervisor + scheduler + one worker"
    time.sleep(1.0)  # let start-up work settle
    before = sum(p.cpu_times().user + p.cpu_times().system for p in tree)
    time.sleep(3.0)
    used = sum(p.cpu_times().user + p.cpu_times().system for p in tree) - before
    assert used / 3.0 < 0.02, f"idle backend used {used / 3.0:.1%} of a core"


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (json.dumps({"prompt": "hi", "max_tokens": "7"}).encode(), "max_tokens"),
        (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "temperature"),
        (json.dumps({"prompt_ids": [10**9]}).encode(), "prompt_ids"),
        (json.dumps({"prompt": "hi", "max_tokens": 100000}).encode(), "prompt"),
        (json.dumps({"prompt": "hi", "bogus": 1}).encode(), "bogus"),
    ],
)
def test_bad_request_gets_400_and_backend_keeps_serving(backend, body, param):
    _, port = backend
    status, error = _post(f"http://127.0.0.1:{port}/v1/generate", body)
    assert status == 400
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param
    status, ok = _post(
        f"http://127.0.0.1:{port}/v1/generate",
        json.dumps({"prompt": "hello", "max_tokens": 3, "temperature": 0}).encode(),
    )
    assert status == 200 and len(ok["ids"]) == 3


def test_prompt_too_long_names_the_limit(backend):
    _, port = backend
    status, error = _post(
        f"http://127.0.0.1:{port}/v1/generate",
        json.dumps({"prompt_ids": [5] * 2040, "max_tokens": 20}).encode(),
    )
    assert status == 400
    assert "maximum context length is 2048 tokens" in error["error"]["message"]


def test_sigterm_exits_zero_and_leaves_nothing_behind(converted):
    proc, port = start_backend(converted("llama", 1))
    pids = [p.pid for p in _tree(proc.proc.pid)]
    shm_before = set(os.listdir("/dev/shm"))
    assert not _own_fds_in_dev_shm(pids), "rings are memfds, never named /dev/shm segments"
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=10) == 0, proc.output
    assert time.monotonic() - started < 10
    time.sleep(0.2)
    assert not [
        pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert not os.path.exists(socket_path(port))


def test_sigterm_during_generation_ends_the_stream(converted):
    proc, port = start_backend(converted("llama", 1))
    body = json.dumps({"prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    auth = f"Authorization: {backend_headers()['Authorization']}"
    curl = subprocess.Popen(
        ["curl", "-sN", "-H", auth, f"http://127.0.0.1:{port}/v1/generate", "-d", body],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    proc.proc.send_signal(signal.SIGTERM)  # drains (tests/reliability/test_drain.py) ...
    time.sleep(0.5)
    proc.proc.send_signal(signal.SIGTERM)  # ... and the second one stops at once
    assert proc.proc.wait(timeout=10) == 0, proc.output
    lines = [json.loads(line) for line in curl.communicate(timeout=10)[0].splitlines()]
    assert lines[-1]["error"]["code"] == "shutting_down"


def test_killed_worker_fails_requests_and_stops_backend(converted):
    proc, port = start_backend(converted("llama", 1))
    worker = next(p for p in _tree(proc.proc.pid)[1:] if "mi.actors.worker" in " ".join(p.cmdline()))
    started = time.monotonic()
    worker.kill()
    assert proc.proc.wait(timeout=10) == 1
    assert time.monotonic() - started < 3, "the surviving scheduler is killed at once"
    assert "worker 0 exited" in proc.output


def test_refuses_device_count_not_multiple_of_tp(converted):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mi.backend.launch",
            "--model",
            str(converted("llama", 2)),
            "--device",
            "3",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--device 3 is not a positive multiple of the checkpoint's tp=2" in result.stderr
    assert "Traceback" not in result.stderr


def test_not_a_converted_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mi.backend.launch", "--model", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is not a converted model" in result.stderr


def test_new_request_joins_a_running_batch(backend):
    """Continuous batching: a short request finishes while a long one keeps streaming."""
    import asyncio

    import aiohttp

    _, port = backend
    url = f"http://127.0.0.1:{port}/v1/generate"

    async def scenario():
        async with aiohttp.ClientSession(headers=backend_headers()) as session:
            long_body = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}
            async with session.post(url, json=long_body) as long_resp:
                await long_resp.content.readline()  # stream start
                await long_resp.content.readline()  # first token: the long request is running
                async with session.post(
                    url, json={"prompt": "hello", "max_tokens": 4, "temperature": 0}
                ) as short_resp:
                    short = await short_resp.json()
                later = json.loads(await long_resp.content.readline())
                return short, later

    short, later = asyncio.run(scenario())
    assert short["finish_reason"] == "length" and len(short["ids"]) == 4
    assert later["finish_reason"] is None, "the long request was still running"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}])
def test_backend_requires_its_secret(backend, headers):
    _, port = backend
    for path in ("/v1/model", "/v1/stats", "/v1/tokenizer"):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
        assert json.loads(err.value.read())["error"]["code"] == "unauthorized"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        assert resp.status == 200


def test_cert_file_is_created_private(backend):
    from mi.config import cert_path

    path = cert_path()
    assert path.is_file()
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 64
