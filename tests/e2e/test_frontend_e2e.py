"""End-to-end tests of `mi-frontend` against the real backend, with real clients.

Uses the session fixture `served_model` (tests/conftest.py): a running backend and frontend, with
`.backend_port`, `.backend_url`, `.frontend_url` and `.hf_dir` (the tiny HF model they serve).
Tests that need no backend start their own frontend in front of a closed port. The table of bad
requests is in test_frontend_errors.py, the `openai` package's acceptance tests in
test_openai_client.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import openai
import orjson
import pytest

from mi.api.sse import decode_events

from servers import backend_headers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_frontend(backend: str, port: int) -> subprocess.Popen:
    """`python -m mi.frontend.launch` as the user runs it; returns once it prints its start line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mi.frontend.launch", "--backend", backend, "--server-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != f"frontend start at http://127.0.0.1:{port}":
        proc.kill()
        raise AssertionError(f"frontend did not start: {line!r} {proc.stdout.read()!r}")
    return proc


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def request(
    method: str, url: str, body: object = None, raw: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict, bytes]:
    """One HTTP call with aiohttp: (status, headers, body bytes)."""

    async def call():
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        async with aiohttp.ClientSession() as session:
            async with session.request(
                method, url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
            ) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(call())


def assert_error_body(raw: bytes) -> dict:
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert "Traceback" not in err["message"] and tempfile.gettempdir() not in err["message"]
    return err


@pytest.fixture(scope="module")
def model_name(served_model) -> str:
    status, _, raw = request("GET", served_model.frontend_url + "/v1/models")
    assert status == 200
    return orjson.loads(raw)["data"][0]["id"]


@pytest.fixture(scope="module")
def client(served_model):
    return openai.OpenAI(base_url=served_model.frontend_url + "/v1", api_key="x", max_retries=0)


def stream_texts(client, model_name: str, **kw) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Joined text and the finish_reasons seen, per choice index, of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, list[str]] = {}
    for chunk in client.completions.create(model=model_name, stream=True, **kw):
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            assert choice.index not in reasons, "a chunk after finish_reason"
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, reasons


def test_models(served_model, model_name):
    status, _, raw = request("GET", served_model.frontend_url + "/v1/models")
    body = orjson.loads(raw)
    assert status == 200 and body["object"] == "list" and len(body["data"]) == 1
    model = body["data"][0]
    assert model["object"] == "model" and model["owned_by"] == "mi" and isinstance(model["created"], int)


def test_health(served_model):
    status, _, raw = request("GET", served_model.frontend_url + "/health")
    assert status == 200 and orjson.loads(raw) == {"status": "ok"}


def test_completion_with_openai_client(client, model_name):
    completion = client.completions.create(
        model=model_name, prompt="Say this is a test", max_tokens=7, temperature=0
    )
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == model_name
    (choice,) = completion.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert 0 < usage.completion_tokens <= 7 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_model_field_is_optional(served_model):
    status, _, raw = request(
        "POST",
        served_model.frontend_url + "/v1/completions",
        {"prompt": "Say this is a test", "max_tokens": 7, "temperature": 0},
    )
    assert status == 200 and orjson.loads(raw)["choices"][0]["index"] == 0


def test_stream_equals_non_stream(client, model_name):
    kw = {"prompt": "hello, my name is", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(model=model_name, **kw)
    texts, reasons = stream_texts(client, model_name, **kw)
    assert texts == {0: full.choices[0].text}
    assert reasons == {0: [full.choices[0].finish_reason]}


def test_list_prompts_give_one_choice_each(client, model_name):
    prompts = ["hello, my name is", "Welcome to", "Say this is a test"]
    completion = client.completions.create(model=model_name, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    singles = [
        client.completions.create(model=model_name, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in prompts
    ]
    assert [c.text for c in completion.choices] == singles
    texts, reasons = stream_texts(client, model_name, prompt=prompts, max_tokens=6, temperature=0)
    assert texts == dict(enumerate(singles))
    assert sorted(reasons) == [0, 1, 2] and all(len(r) == 1 for r in reasons.values())


def test_token_id_prompts(client, model_name):
    one = client.completions.create(model=model_name, prompt=[5, 6, 7], max_tokens=4, temperature=0)
    many = client.completions.create(
        model=model_name, prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text


def test_sse_wire_format(served_model):
    body = {
        "prompt": ["Welcome to", "hello"],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, raw = request("POST", served_model.frontend_url + "/v1/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    payloads = decode_events(raw)  # every event: one "data: " line, then a blank line
    assert payloads[-1] == b"[DONE]" and b"[DONE]" not in payloads[:-1]
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    *text_chunks, usage_chunk = chunks
    finishes = {}
    for chunk in text_chunks:
        assert chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-")
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
        assert choice["index"] not in finishes, "a chunk after finish_reason"
        if choice["finish_reason"] is not None:
            finishes[choice["index"]] = choice["finish_reason"]
    assert sorted(finishes) == [0, 1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0


def test_prompt_too_long_is_a_400(served_model):
    _, _, raw = request("GET", served_model.backend_url + "/v1/model", headers=backend_headers())
    max_model_len = orjson.loads(raw)["max_model_len"]
    url = served_model.frontend_url + "/v1/completions"
    for stream in (False, True):
        status, _, body = request(
            "POST", url, {"prompt": [5] * max_model_len, "max_tokens": 4, "stream": stream}
        )
        assert status == 400
        assert "maximum context length" in assert_error_body(body)["message"]
    assert request("POST", url, {"prompt": "hello", "max_tokens": 2})[0] == 200


def test_openai_client_sees_typed_errors(client, model_name):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="a", n=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="a", best_of=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="a")


def test_unknown_route_and_method(served_model):
    status, _, body = request("GET", served_model.frontend_url + "/v1/nothing")
    assert status == 404
    assert_error_body(body)
    status, _, body = request("GET", served_model.frontend_url + "/v1/completions")
    assert status == 405
    assert_error_body(body)


def test_client_disconnect_mid_stream_keeps_serving(served_model):
    url = served_model.frontend_url + "/v1/completions"

    async def read_one_event_and_leave():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "hello", "max_tokens": 64, "stream": True, "ignore_eos": True}
            async with session.post(url, json=body) as resp:
                assert resp.status == 200
                assert (await resp.content.readline()).startswith(b"data: ")

    asyncio.run(read_one_event_and_leave())
    assert request("POST", url, {"prompt": "hello", "max_tokens": 2})[0] == 200


# -- no backend needed ----------------------------------------------------------------------------


def test_backend_down_gives_503_and_sigterm_exits_0():
    port = free_port()
    proc = start_frontend(str(free_port()), port)  # nothing listens on that backend port
    try:
        url = f"http://127.0.0.1:{port}"
        status, _, body = request("GET", url + "/health")
        assert status == 503
        for _ in range(2):
            status, headers, body = request("POST", url + "/v1/completions", {"prompt": "a"})
            assert status == 503 and "Retry-After" in headers
            err = assert_error_body(body)
            assert "127.0.0.1" not in err["message"]
        status, _, body = request("GET", url + "/v1/models")
        assert status == 503
        assert_error_body(body)
    finally:
        assert stop(proc) == 0


def test_bad_flags_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "mi.frontend.launch", "--backend", "not-a-port"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--backend" in proc.stderr


def test_port_in_use_is_a_clean_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "mi.frontend.launch", "--backend", "1", "--server-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_sigterm_while_idle_is_fast():
    proc = start_frontend("1", free_port())
    start = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - start < 10
