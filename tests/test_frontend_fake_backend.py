"""mi-frontend (and the SDK) against a scripted fake backend that speaks docs/backend-api.md.

The fake runs in this process (aiohttp on a thread) and records what it receives, so these tests
check the frontend's side of the contract without the real engine: which generate bodies it sends,
how it formats logprobs and echo, the shared secret, errors in the middle of a stream, a backend
that is overloaded or refuses the secret, aborts on client disconnect, and /metrics.
"""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import orjson
import pytest
from aiohttp import web

from mi import AuthenticationError, InvalidRequest, Model, Overloaded, ServerError
from mi.api.sse import decode_events
from servers import free_port, start_frontend

SECRET = "fake-backend-secret"
PROMPT_IDS = [0, 50, 51, 52]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _entry(token_id: int, k: int) -> dict:
    return {"token_id": token_id, "logprob": -0.25, "top": [[token_id + j, -1.0 - j] for j in range(k)]}


def _answer(obj: dict):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(obj)

    return handler


class FakeBackend:
    """`mode` picks the answer of /v1/generate: "ok", "slow" (a delta every 20 ms, 500 of
    them), "error_mid_stream", "cut", "abort", "overloaded", "unauthorized"."""

    def __init__(self, tokenizer_dir) -> None:
        self.files = {n: (tokenizer_dir / n).read_text() for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()}
        self.mode = "ok"
        self.bodies: list[dict] = []
        self.aborts: list[str] = []
        self.auth: list[str | None] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record_auth])
        app.router.add_get("/health", _answer({"status": "ok"}))
        app.router.add_get("/v1/model", _answer(
            {"model_name": "fake", "max_model_len": 64, "vocab_size": 500, "eos_token_ids": [1]}))
        app.router.add_get("/v1/tokenizer", _answer({"files": self.files}))
        app.router.add_get("/v1/stats", _answer({
            "num_requests_running": 3, "num_requests_waiting": 1, "num_kv_blocks": 100,
            "num_kv_blocks_used": 25, "num_preemptions": 2, "prefix_cache_queried_tokens": 10,
            "prefix_cache_hit_tokens": 4, "requests_finished_total": {"stop": 5, "length": 1, "abort": 0}}))
        app.router.add_post("/v1/abort", self._abort)
        app.router.add_post("/v1/generate", self._generate)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    @web.middleware
    async def _record_auth(self, request, handler):
        if request.path != "/health":
            self.auth.append(request.headers.get("Authorization"))
        return await handler(request)

    async def _abort(self, request: web.Request) -> web.Response:
        self.aborts.append((await request.json())["request_id"])
        return web.json_response({"aborted": True})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "overloaded":
            return web.json_response({"error": {"message": "too many queued", "type": "server_error",
                                                "param": None, "code": "overloaded"}},
                                     status=503, headers={"Retry-After": "7"})
        if self.mode == "unauthorized":
            return web.json_response({"error": {"message": "bad secret", "type": "authentication_error",
                                                "param": None, "code": "unauthorized"}}, status=401)
        prompt_ids = body.get("prompt_ids") or PROMPT_IDS
        max_tokens = body.get("max_tokens", 16)
        ids = [60 + i for i in range(min(max_tokens, 500 if self.mode == "slow" else 3))]
        k, pk = body.get("logprobs"), body.get("prompt_logprobs")
        logprobs = None if k is None else [_entry(i, k) for i in ids]
        prompt_logprobs = None if pk is None else [None] + [_entry(i, pk) for i in prompt_ids[1:]]
        finish = "abort" if self.mode == "abort" else ("length" if len(ids) == max_tokens else "stop")
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids), "cached_tokens": 1}
        texts = [f" t{i}" for i in ids]
        if not body.get("stream"):
            if self.mode == "slow":
                await asyncio.sleep(0.02 * len(ids))
            return web.json_response({
                "request_id": body["request_id"], "prompt_ids": prompt_ids, "ids": ids, "text": "".join(texts),
                "finish_reason": finish, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(obj):
            await response.write(orjson.dumps(obj) + b"\n")

        await line({"request_id": body["request_id"], "prompt_ids": prompt_ids, "prompt_logprobs": prompt_logprobs})
        for n, (token_id, text) in enumerate(zip(ids, texts)):
            lp = None if logprobs is None else [logprobs[n]]
            last = n == len(ids) - 1
            if n == 1 and self.mode == "error_mid_stream":
                await line({"error": {"message": "worker died", "type": "server_error", "param": None,
                                      "code": "backend_failed"}})
                return response
            if n == 1 and self.mode == "cut":
                return response
            await line({"ids": [token_id], "text": text, "finish_reason": finish if last else None,
                        "logprobs": lp, **({"usage": usage} if last else {})})
            if self.mode == "slow":
                await asyncio.sleep(0.02)
        if not ids:
            await line({"ids": [], "text": "", "finish_reason": finish, "logprobs": logprobs, "usage": usage})
        await response.write_eof()
        return response

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def fake(converted):
    backend = FakeBackend(converted("llama", 1))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def frontend(fake, tmp_path_factory) -> str:
    cert = tmp_path_factory.mktemp("fake-cert") / "cert"
    cert.write_text(SECRET + "\n")
    proc, url = start_frontend(f"127.0.0.1:{fake.port}", "--backend-cert", str(cert))
    yield url
    proc.stop()


@pytest.fixture(autouse=True)
def reset(fake):
    fake.mode = "ok"
    fake.bodies.clear()
    fake.aborts.clear()
    yield


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted("llama", 1))


def post(url: str, body: dict) -> tuple[int, dict, bytes]:
    async def call():
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(call())


def events(raw: bytes) -> list:
    payloads = decode_events(raw)
    assert payloads[-1] == b"[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


def test_every_backend_call_carries_the_secret(fake, frontend):
    assert post(frontend + "/v1/completions", {"prompt": "hi"})[0] == 200
    assert fake.auth and set(fake.auth) == {f"Bearer {SECRET}"}


def test_completion_fields_reach_the_backend(fake, frontend):
    body = {"prompt": ["a", "b"], "n": 2, "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 4,
            "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.3,
            "logit_bias": {"17": -100}, "seed": 9, "stop": ["x"], "stop_token_ids": [3], "ignore_eos": True,
            "min_tokens": 1, "skip_special_tokens": False, "include_stop_str_in_output": True, "logprobs": 2,
            "echo": True}
    status, _, raw = post(frontend + "/v1/completions", body)
    assert status == 200
    sent = sorted(fake.bodies, key=lambda b: b["request_id"])
    assert [b["prompt"] for b in sent] == ["a", "a", "b", "b"]
    assert [b["seed"] for b in sent] == [9, 10, 9, 10]
    assert [b["request_id"].rsplit("-", 1)[1] for b in sent] == ["0", "1", "2", "3"]
    first = sent[0]
    for key in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
                "skip_special_tokens", "include_stop_str_in_output", "logprobs"):
        assert first[key] == body[key], key
    assert first["logit_bias"] == {"17": -100.0} and first["prompt_logprobs"] == 2
    assert [c["index"] for c in orjson.loads(raw)["choices"]] == [0, 1, 2, 3]


def test_completion_logprobs_and_echo(fake, frontend, tokenizer):
    status, _, raw = post(frontend + "/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 3})
    assert status == 200
    (choice,) = orjson.loads(raw)["choices"]
    assert choice["text"] == "hi t60 t61 t62"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([i]) for i in PROMPT_IDS + [60, 61, 62]]
    assert lp["token_logprobs"] == [None] + [-0.25] * 6
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][4] == {tokenizer.decode([60]): -1.0}  # the fake's top-1 is the chosen token
    assert len(lp["text_offset"]) == 7 and lp["text_offset"][0] == 0


def test_scoring_with_max_tokens_0(fake, frontend):
    status, _, raw = post(frontend + "/v1/completions", {"prompt": [5, 6, 7], "echo": True, "max_tokens": 0})
    assert status == 200
    body = orjson.loads(raw)
    assert fake.bodies[0]["max_tokens"] == 0 and fake.bodies[0]["prompt_logprobs"] == 0
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == 3
    status, _, raw = post(frontend + "/v1/completions",
                          {"prompt": [5, 6, 7], "echo": True, "max_tokens": 0, "logprobs": 0, "stream": True})
    (chunk,) = events(raw)  # the echoed prompt carries the finish_reason: no extra empty chunk
    assert chunk["choices"][0]["finish_reason"] == "length"
    assert chunk["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.25, -0.25]


def test_streamed_logprobs_match_non_streamed(fake, frontend):
    body = {"prompt": "hi", "logprobs": 2, "max_tokens": 3}
    full = orjson.loads(post(frontend + "/v1/completions", body)[2])["choices"][0]["logprobs"]
    chunks = events(post(frontend + "/v1/completions", {**body, "stream": True})[2])
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == full["tokens"] and offsets == full["text_offset"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


def test_chat_logprobs_and_usage(fake, frontend, tokenizer):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2, "max_tokens": 3}
    status, _, raw = post(frontend + "/v1/chat/completions", body)
    assert status == 200
    sent = fake.bodies[0]
    expected_ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
    assert sent["prompt_ids"] == tokenizer.encode(expected_ids, add_special_tokens=False)
    assert sent["logprobs"] == 2 and "prompt" not in sent
    answer = orjson.loads(raw)
    content = answer["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.decode([i]) for i in (60, 61, 62)]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] == -0.25 for c in content)
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    status, _, raw = post(frontend + "/v1/chat/completions", {**body, "top_logprobs": 0})
    assert all(c["top_logprobs"] == [] for c in orjson.loads(raw)["choices"][0]["logprobs"]["content"])


def test_chat_default_max_tokens_is_the_rest_of_the_context(fake, frontend):
    assert post(frontend + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})[0] == 200
    assert fake.bodies[0]["max_tokens"] == 64 - len(fake.bodies[0]["prompt_ids"])


@pytest.mark.parametrize("mode", ["error_mid_stream", "cut"])
def test_a_failure_mid_stream_is_an_error_event_then_done(fake, frontend, mode):
    fake.mode = mode
    status, headers, raw = post(frontend + "/v1/completions", {"prompt": "hi", "stream": True, "max_tokens": 3})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    *chunks, error = events(raw)
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "server_error"
    assert all("choices" in c for c in chunks)
    fake.mode = "ok"
    assert post(frontend + "/v1/completions", {"prompt": "hi"})[0] == 200


def test_overloaded_backend_is_a_503_with_retry_after(fake, frontend):
    fake.mode = "overloaded"
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})):
        status, headers, raw = post(frontend + path, body)
        assert status == 503 and headers["Retry-After"] == "7"
        assert orjson.loads(raw)["error"]["code"] == "overloaded"


def test_backend_refusing_the_secret_is_not_a_401_for_the_client(fake, frontend):
    fake.mode = "unauthorized"
    status, _, raw = post(frontend + "/v1/completions", {"prompt": "hi"})
    assert status == 503 and orjson.loads(raw)["error"]["code"] == "backend_auth_failed"


def test_backend_abort_is_a_503(fake, frontend):
    fake.mode = "abort"
    assert post(frontend + "/v1/completions", {"prompt": "hi"})[0] == 503
    error = events(post(frontend + "/v1/completions", {"prompt": "hi", "stream": True})[2])[-1]
    assert error["error"]["code"] == "aborted"


def test_client_disconnect_aborts_the_backend_request(fake, frontend):
    fake.mode = "slow"

    async def leave_early(path, body):
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(frontend + path, json=body, timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
                    await resp.read()
            except asyncio.TimeoutError:
                pass

    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 500, "stream": True}),
                       ("/v1/completions", {"prompt": "hi", "max_tokens": 500}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 500,
                                                 "stream": True})):
        fake.bodies.clear()
        asyncio.run(leave_early(path, body))
        deadline = time.monotonic() + 5
        while fake.bodies[0]["request_id"] not in fake.aborts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.bodies[0]["request_id"] in fake.aborts, path


def test_metrics_carry_backend_stats(fake, frontend):
    post(frontend + "/v1/completions", {"prompt": "hi", "stream": True})

    async def scrape():
        async with aiohttp.ClientSession() as session:
            async with session.get(frontend + "/metrics") as resp:
                return resp.status, await resp.text()

    status, text = asyncio.run(scrape())
    assert status == 200
    for line in ("mi_backend_up 1.0", "mi_num_requests_running 3.0", "mi_num_requests_waiting 1.0",
                 "mi_kv_cache_usage_ratio 0.25", "mi_prefix_cache_hit_rate 0.4", "mi_num_preemptions_total 2.0",
                 'mi_backend_requests_finished_total{finished_reason="stop"} 5.0'):
        assert line in text.splitlines(), line
    assert "mi_time_to_first_token_seconds_count" in text and "mi_inter_token_latency_seconds_count" in text


# -- the SDK's typed errors ---------------------------------------------------------------------


def test_sdk_typed_errors(fake, tmp_path):
    cert = tmp_path / "cert"
    cert.write_text(SECRET)
    model = Model(f"http://127.0.0.1:{fake.port}", cert=cert)
    assert model.generate("hi")[0].text == " t60 t61 t62"
    assert fake.auth[-1] == f"Bearer {SECRET}"
    fake.mode = "overloaded"
    with pytest.raises(Overloaded) as info:
        model.generate("hi")
    assert info.value.retry_after == 7
    fake.mode = "unauthorized"
    with pytest.raises(AuthenticationError) as info:
        model.generate("hi")
    assert isinstance(info.value, InvalidRequest) and info.value.status == 401
    fake.mode = "error_mid_stream"
    with pytest.raises(ServerError, match="worker died"):
        list(model.stream("hi"))
    fake.mode = "cut"
    with pytest.raises(ServerError):
        list(model.stream("hi"))
