"""mi-frontend (and the SDK) when the backend fails, refuses or is busy, and the frontend's side
of the backend contract, all against the real backend and frontend processes.

Shared (`served_model`): request fields observed in the outputs (n with a seed, sampling
filters, penalties, stop ids, min_tokens, ignore_eos, skip_special_tokens), echo and logprobs
formatting, scoring with max_tokens 0, chat logprobs and cached tokens, chat's default
max_tokens, a backend abort mid-stream, /metrics against /v1/stats, chat clients that leave,
a wrong backend secret (frontend and SDK).
Dedicated backends (they are made busy, killed or stopped): an overloaded backend, a worker
that dies mid-request, a backend stopped (SIGTERM) or killed (SIGKILL) mid-request and then
restarted on the same port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

import mi
from mi.api.sse import decode_events
from mi.local_socket import socket_path

from servers import backend_headers, free_port, start_backend, start_frontend

PROMPT = "hello, my name is"
LONG = {"max_tokens": 1500, "ignore_eos": True}
TIMEOUT = aiohttp.ClientTimeout(total=60)


# -- helpers ------------------------------------------------------------------------------------


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, body: object = None, headers: dict | None = None
) -> tuple[int, dict, bytes]:
    async with session.request(method, url, json=body, headers=headers, timeout=TIMEOUT) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def call(method: str, url: str, body: object = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP call: (status, headers, body bytes); never waits more than a minute."""

    async def run():
        async with aiohttp.ClientSession() as session:
            return await _call(session, method, url, body, headers)

    return asyncio.run(run())


def ok(url: str, body: dict) -> dict:
    status, _, raw = call("POST", url, body)
    assert status == 200, raw[:500]
    return orjson.loads(raw)


def events(raw: bytes) -> list[dict]:
    """The JSON events of a complete SSE stream, which must end with exactly one [DONE]."""
    payloads = decode_events(raw)
    assert payloads and payloads[-1] == b"[DONE]" and b"[DONE]" not in payloads[:-1], raw[-300:]
    return [orjson.loads(p) for p in payloads[:-1]]


def error_of(raw: bytes) -> dict:
    """The OpenAI error object of a body, checked for shape and leaks."""
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    for leak in ("Traceback", tempfile.gettempdir(), "127.0.0.1", ".py"):
        assert leak not in err["message"], err["message"]
    return err


async def open_stream(
    session: aiohttp.ClientSession, url: str, body: dict
) -> tuple[aiohttp.ClientResponse, dict]:
    """POST a streamed request and read its first SSE event (the request is then running)."""
    resp = await session.post(url, json={**body, "stream": True})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    line = await asyncio.wait_for(resp.content.readline(), 60)
    assert line.startswith(b"data: {") and await resp.content.readline() == b"\n", line
    return resp, orjson.loads(line[len(b"data: ") :])


async def rest_of_stream(resp: aiohttp.ClientResponse) -> list[dict]:
    """The remaining events of an open SSE stream (at most 30 s: a hang fails)."""
    raw = await asyncio.wait_for(resp.content.read(), 30)
    resp.release()
    return events(raw)


def assert_error_event_then_done(chunks: list[dict], code: str | None = None) -> dict:
    *texts, last = chunks
    assert set(last) == {"error"}, last
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["type"] == "server_error" and "Traceback" not in last["error"]["message"]
    assert all("choices" in c for c in texts)
    if code is not None:
        assert last["error"]["code"] == code, last
    return last["error"]


async def wait_for_stats(
    session: aiohttp.ClientSession, backend_url: str, predicate, timeout: float = 10
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, _, raw = await _call(session, "GET", backend_url + "/v1/stats", headers=backend_headers())
        assert status == 200, raw
        stats = orjson.loads(raw)
        if predicate(stats):
            return stats
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)


def scrape(frontend_url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, raw = call("GET", frontend_url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def worker_of(backend) -> psutil.Process:
    tree = psutil.Process(backend.proc.pid).children(recursive=True)
    return next(p for p in tree if "mi.actors.worker" in " ".join(p.cmdline()))


def kill_leftovers(pids) -> None:
    """SIGKILL the given processes (children of a backend we killed) that still live."""
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.kill()
            proc.wait(10)
        except psutil.NoSuchProcess:
            pass


def assert_backend_down(frontend_url: str, backend_url: str) -> None:
    """What clients see while the backend is gone: 503s with Retry-After, never a traceback."""
    status, headers, raw = call("GET", frontend_url + "/health")
    assert status == 503 and "Retry-After" in headers, raw
    for path, body in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
    ):
        status, headers, raw = call("POST", frontend_url + path, body)
        assert status == 503 and headers.get("Retry-After", "").isdigit(), (path, status, raw[:300])
        assert headers["Content-Type"].startswith("application/json")
        assert error_of(raw)["code"] == "backend_unavailable"
    assert scrape(frontend_url)["mi_backend_up"] == 0.0
    with pytest.raises(mi.BackendUnavailable):
        mi.Model(backend_url).generate("hi", max_new_tokens=2)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(served_model) -> str:
    return served_model.frontend_url


@pytest.fixture(scope="module")
def sdk(served_model) -> mi.Model:
    return mi.Model(served_model.backend_url)


@pytest.fixture(scope="module")
def greedy(sdk):
    """The greedy continuation of PROMPT, from the backend itself (ids, text)."""
    (out,) = sdk.generate(PROMPT, do_sample=False, max_new_tokens=16, ignore_eos=True)
    return out


# -- request fields, observed in the outputs (shared backend) -----------------------------------


def test_n_choices_sample_with_seed_plus_index(url):
    prompts = ["hello, my name is", "Welcome to"]
    body = {"max_tokens": 4, "temperature": 1.0, "ignore_eos": True}
    full = ok(url + "/v1/completions", {**body, "prompt": prompts, "n": 2, "seed": 9})
    assert [c["index"] for c in full["choices"]] == [0, 1, 2, 3]

    def single(prompt, seed):
        return ok(url + "/v1/completions", {**body, "prompt": prompt, "seed": seed})["choices"][0]["text"]

    texts = [c["text"] for c in full["choices"]]
    assert texts == [
        single(prompts[0], 9),
        single(prompts[0], 10),
        single(prompts[1], 9),
        single(prompts[1], 10),
    ]
    assert texts[0] != texts[1], "choice 1 samples with seed + 1"

    messages = [{"role": "user", "content": "Say this is a test"}]
    chat = ok(url + "/v1/chat/completions", {**body, "messages": messages, "n": 2, "seed": 9})
    singles = [
        ok(url + "/v1/chat/completions", {**body, "messages": messages, "seed": s})["choices"][0]
        for s in (9, 10)
    ]
    assert [c["message"]["content"] for c in chat["choices"]] == [s["message"]["content"] for s in singles]


def test_sampling_filters_reach_the_backend(url, greedy):
    body = {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "temperature": 1.5, "seed": 1}
    expected = ok(url + "/v1/completions", {**body, "temperature": 0})["choices"][0]["text"]
    assert greedy.text.startswith(expected)
    assert ok(url + "/v1/completions", body)["choices"][0]["text"] != expected, "sampling, unfiltered"
    for extra in ({"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}):
        assert ok(url + "/v1/completions", {**body, **extra})["choices"][0]["text"] == expected, extra
    # a -100 bias on the greedy first token: another one comes first
    biased = ok(
        url + "/v1/completions",
        {**body, "temperature": 0, "logit_bias": {str(greedy.ids[0]): -100}, "logprobs": 0},
    )["choices"][0]
    plain = ok(url + "/v1/completions", {**body, "temperature": 0, "logprobs": 0})["choices"][0]
    assert biased["logprobs"]["tokens"][0] != plain["logprobs"]["tokens"][0]


def test_penalties_reach_the_backend(url):
    body = {"prompt": "Numbers: 1, 2, 3", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    plain = ok(url + "/v1/completions", body)["choices"][0]["text"]
    for extra in ({"repetition_penalty": 5.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert ok(url + "/v1/completions", {**body, **extra})["choices"][0]["text"] != plain, extra


def test_stop_ids_min_tokens_ignore_eos_and_special_tokens_reach_the_backend(url, served_model, greedy):
    body = {"prompt": PROMPT, "temperature": 0}
    # stop_token_ids: the first repeat-free position >= 2 of the greedy ids
    k = next(i for i in range(2, len(greedy.ids)) if greedy.ids[i] not in greedy.ids[:i])
    stopped = ok(
        url + "/v1/completions",
        {**body, "max_tokens": 16, "ignore_eos": True, "stop_token_ids": [greedy.ids[k]]},
    )
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == k + 1
    assert greedy.text.startswith(stopped["choices"][0]["text"])

    _, _, raw = call("GET", served_model.backend_url + "/v1/model", headers=backend_headers())
    eos = orjson.loads(raw)["eos_token_ids"][0]
    eos_text = ok(url + "/detokenize", {"tokens": [eos]})["prompt"]
    to_eos = {**body, "max_tokens": 20, "logit_bias": {str(eos): 100}}
    at_once = ok(url + "/v1/completions", to_eos)
    assert at_once["usage"]["completion_tokens"] == 1 and at_once["choices"][0]["finish_reason"] == "stop"
    late = ok(url + "/v1/completions", {**to_eos, "min_tokens": 5})
    assert late["usage"]["completion_tokens"] == 6 and late["choices"][0]["finish_reason"] == "stop"
    ignored = ok(url + "/v1/completions", {**to_eos, "max_tokens": 3, "ignore_eos": True})
    assert ignored["usage"]["completion_tokens"] == 3 and ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["choices"][0]["text"] == ""  # skip_special_tokens defaults to true
    kept = ok(
        url + "/v1/completions", {**to_eos, "max_tokens": 3, "ignore_eos": True, "skip_special_tokens": False}
    )
    assert eos_text and kept["choices"][0]["text"] == eos_text * 3

    chat = ok(
        url + "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "ignore_eos": True,
            "temperature": 0,
            "logit_bias": {"65": 100},
        },
    )
    assert chat["choices"][0]["message"]["content"] == ok(url + "/detokenize", {"tokens": [65] * 3})["prompt"]


# -- logprobs, echo and scoring (shared backend) ------------------------------------------------


def test_echo_with_logprobs_puts_the_scored_prompt_first(url, sdk):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    plain = ok(url + "/v1/completions", body)["choices"][0]
    echo = ok(url + "/v1/completions", {**body, "echo": True})["choices"][0]
    assert echo["text"] == PROMPT + plain["text"]
    prompt = ok(url + "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    n = prompt["count"]
    lp, plain_lp = echo["logprobs"], plain["logprobs"]
    assert lp["tokens"] == prompt["token_strs"] + plain_lp["tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(isinstance(top, dict) and 1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])
    assert lp["token_logprobs"][n:] == pytest.approx(plain_lp["token_logprobs"], abs=1e-4)
    assert [set(top) for top in lp["top_logprobs"][n:]] == [set(top) for top in plain_lp["top_logprobs"]]
    assert lp["text_offset"][0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))
    # the prompt's logprobs are the backend's own prompt_logprobs
    (scored,) = sdk.generate(prompt["tokens"], do_sample=False, max_new_tokens=1, prompt_logprobs=1)
    assert [e.logprob for e in scored.prompt_logprobs[1:]] == pytest.approx(
        lp["token_logprobs"][1:n], abs=1e-4
    )


def test_scoring_with_max_tokens_0(url):
    ids = ok(url + "/tokenize", {"prompt": "Welcome to", "add_special_tokens": False})["tokens"]
    body = {"prompt": ids, "echo": True, "max_tokens": 0}
    bare = ok(url + "/v1/completions", body)
    (choice,) = bare["choices"]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["text"] == "Welcome to"
    assert bare["usage"]["completion_tokens"] == 0 and bare["usage"]["prompt_tokens"] == len(ids) > 1
    scored = ok(url + "/v1/completions", {**body, "logprobs": 0})["choices"][0]["logprobs"]
    assert scored["token_logprobs"][0] is None and len(scored["token_logprobs"]) == len(ids)
    status, _, raw = call("POST", url + "/v1/completions", {**body, "logprobs": 0, "stream": True})
    assert status == 200
    (chunk,) = events(raw)  # the echoed prompt carries the finish_reason: no extra empty chunk
    assert chunk["choices"][0]["finish_reason"] == "length" and chunk["choices"][0]["text"] == choice["text"]
    streamed = chunk["choices"][0]["logprobs"]
    assert streamed["tokens"] == scored["tokens"] and streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(scored["token_logprobs"][1:], abs=1e-4)


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_match_non_streamed(url, echo):
    body = {
        "prompt": PROMPT,
        "logprobs": 2,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "echo": echo,
    }
    full = ok(url + "/v1/completions", body)["choices"][0]
    status, _, raw = call("POST", url + "/v1/completions", {**body, "stream": True})
    assert status == 200
    chunks = [c["choices"][0] for c in events(raw)]
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    joined = {key: [x for c in chunks for x in c["logprobs"][key]] for key in full["logprobs"]}
    for key in ("tokens", "text_offset"):
        assert joined[key] == full["logprobs"][key], key
    assert [x is None for x in joined["token_logprobs"]] == [
        x is None for x in full["logprobs"]["token_logprobs"]
    ]
    assert [x for x in joined["token_logprobs"] if x is not None] == pytest.approx(
        [x for x in full["logprobs"]["token_logprobs"] if x is not None], abs=1e-4
    )
    assert [None if t is None else set(t) for t in joined["top_logprobs"]] == [
        None if t is None else set(t) for t in full["logprobs"]["top_logprobs"]
    ]


def test_chat_logprobs_are_those_of_the_rendered_prompt(url):
    messages = [
        {"role": "system", "content": "You are a helpful assistant. " * 6},
        {"role": "user", "content": "Say this is a test"},
    ]
    ids = ok(url + "/tokenize", {"messages": messages})["tokens"]
    sampling = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    chat = ok(
        url + "/v1/chat/completions", {**sampling, "messages": messages, "logprobs": True, "top_logprobs": 2}
    )
    comp = ok(url + "/v1/completions", {**sampling, "prompt": ids, "logprobs": 2})["choices"][0]
    assert chat["usage"]["prompt_tokens"] == len(ids)
    assert chat["choices"][0]["message"]["content"] == comp["text"]
    content = chat["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == comp["logprobs"]["tokens"]
    assert [c["logprob"] for c in content] == pytest.approx(comp["logprobs"]["token_logprobs"], abs=1e-4)
    for item, top in zip(content, comp["logprobs"]["top_logprobs"]):
        assert len(item["top_logprobs"]) == 2 and {t["token"] for t in item["top_logprobs"]} <= set(top)
        assert item["bytes"] == list(item["token"].encode()) or "\ufffd" in item["token"]
    status, _, raw = call(
        "POST",
        url + "/v1/chat/completions",
        {**sampling, "messages": messages, "logprobs": True, "top_logprobs": 2, "stream": True},
    )
    assert status == 200
    streamed = [
        x for c in events(raw) for ch in c["choices"] if ch["logprobs"] for x in ch["logprobs"]["content"]
    ]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    # the same long prompt again: its full KV blocks come from the prefix cache
    again = ok(url + "/v1/chat/completions", {**sampling, "messages": messages})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * ((len(ids) - 1) // 16) > 0


def test_chat_default_max_tokens_is_the_rest_of_the_context(url, served_model):
    _, _, raw = call("GET", served_model.backend_url + "/v1/model", headers=backend_headers())
    max_model_len, rest = orjson.loads(raw)["max_model_len"], 4
    target, words = max_model_len - rest, max_model_len - rest - 16
    for _ in range(6):  # find a message that renders to exactly `target` tokens
        messages = [{"role": "user", "content": "a " * words}]
        count = ok(url + "/tokenize", {"messages": messages})["count"]
        if count == target:
            break
        words += target - count
    assert count == target
    # any default but the rest of the context would be a 400 (too long) or fewer tokens
    chat = ok(url + "/v1/chat/completions", {"messages": messages, "ignore_eos": True, "temperature": 0})
    assert chat["usage"]["prompt_tokens"] == target and chat["usage"]["completion_tokens"] == rest
    assert chat["choices"][0]["finish_reason"] == "length"


# -- a backend abort, /metrics (shared backend) -------------------------------------------------


def test_backend_abort_mid_stream_is_an_error_event_then_done(url, served_model):
    async def run():
        async with aiohttp.ClientSession() as session:
            for path, body in (
                ("/v1/completions", {"prompt": "hi", **LONG}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **LONG}),
            ):
                resp, first = await open_stream(session, url + path, body)
                status, _, raw = await _call(
                    session,
                    "POST",
                    served_model.backend_url + "/v1/abort",
                    {"request_id": f"{first['id']}-0"},
                    backend_headers(),
                )
                assert status == 200 and orjson.loads(raw) == {"aborted": True}, path
                assert_error_event_then_done(await rest_of_stream(resp), "aborted")
            status, _, _ = await _call(
                session, "POST", url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}
            )
            assert status == 200

    asyncio.run(run())


def test_metrics_mirror_the_backends_stats(url, served_model):
    async def run():
        async with aiohttp.ClientSession() as session:
            resp, _ = await open_stream(session, url + "/v1/completions", {"prompt": "hi", **LONG})
            deadline = time.monotonic() + 5
            while True:  # the scheduler reports its counters every 0.2 s while busy
                busy = await asyncio.to_thread(scrape, url)
                if busy["mi_num_requests_running"] == 1:
                    break
                assert time.monotonic() < deadline, busy
                await asyncio.sleep(0.05)
            stats = await wait_for_stats(session, served_model.backend_url, lambda s: True)
            resp.close()
            return busy, stats

    before = scrape(url)
    busy, stats = asyncio.run(run())
    assert busy["mi_backend_up"] == 1.0
    assert busy["mi_num_requests_running"] == stats["num_requests_running"] == 1.0
    assert busy["mi_num_requests_waiting"] == stats["num_requests_waiting"] == 0.0
    assert busy["mi_num_kv_blocks"] == stats["num_kv_blocks"] > 0
    assert 1 <= busy["mi_num_kv_blocks_used"] <= stats["num_kv_blocks_used"]
    assert busy["mi_kv_cache_usage_ratio"] == pytest.approx(
        busy["mi_num_kv_blocks_used"] / busy["mi_num_kv_blocks"]
    )
    assert busy["mi_num_preemptions_total"] == stats["num_preemptions"]
    assert busy["mi_prefix_cache_hit_tokens_total"] == stats["prefix_cache_hit_tokens"]
    queried = busy["mi_prefix_cache_queried_tokens_total"]
    assert queried == stats["prefix_cache_queried_tokens"] > 0
    assert busy["mi_prefix_cache_hit_rate"] == pytest.approx(
        busy["mi_prefix_cache_hit_tokens_total"] / queried
    )
    for reason in ("stop", "length"):
        key = f'mi_backend_requests_finished_total{{finished_reason="{reason}"}}'
        assert busy[key] == stats["requests_finished_total"][reason], key
    # the client left: the backend aborted the request and /metrics shows it
    deadline = time.monotonic() + 10
    while True:
        after = scrape(url)
        if after["mi_num_requests_running"] == 0 and after["mi_num_kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    key = 'mi_backend_requests_finished_total{finished_reason="abort"}'
    assert after[key] == before.get(key, 0) + 1
    assert (
        after["mi_time_to_first_token_seconds_count"]
        >= before.get("mi_time_to_first_token_seconds_count", 0) + 1
    )


def test_chat_client_disconnect_aborts_the_backend_request(url, served_model):
    """test_frontend_disconnect.py covers completions; chat, streamed and not, here."""
    body = {"messages": [{"role": "user", "content": "x"}], **LONG}

    async def run():
        async with aiohttp.ClientSession() as session:
            idle = lambda s: s["num_requests_running"] == 0 and s["num_kv_blocks_used"] == 0
            before = await wait_for_stats(session, served_model.backend_url, idle)
            resp, _ = await open_stream(session, url + "/v1/chat/completions", body)
            resp.close()  # the client leaves mid-stream
            await wait_for_stats(session, served_model.backend_url, idle)
            plain = asyncio.ensure_future(_call(session, "POST", url + "/v1/chat/completions", body))
            await wait_for_stats(session, served_model.backend_url, lambda s: s["num_requests_running"] == 1)
            plain.cancel()  # the client leaves while waiting for the answer
            after = await wait_for_stats(session, served_model.backend_url, idle)
            assert after["num_requests_waiting"] == 0
            assert after["requests_finished_total"]["abort"] == before["requests_finished_total"]["abort"] + 2

    asyncio.run(run())


# -- a wrong backend secret (shared backend) ----------------------------------------------------


def test_frontend_with_a_wrong_backend_secret_answers_503(served_model, tmp_path):
    cert = tmp_path / "cert"
    cert.write_text("not-the-backend-secret\n")
    cert.chmod(0o600)  # mi-frontend refuses a cert that others can read
    proc, url = start_frontend(served_model.backend_port, "--backend-cert", str(cert))
    try:
        for path, body in (
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            status, headers, raw = call("POST", url + path, body)
            assert status == 503 and "Retry-After" in headers, (path, status, raw[:300])
            assert error_of(raw)["code"] == "backend_auth_failed"
        # on a 401 the frontend re-reads its cert file: the right secret works without a restart
        cert.write_text(Path(os.environ["MI_CERT"]).read_text())
        assert ok(url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})["choices"]
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.output


def test_sdk_with_a_wrong_secret_raises_authentication_error(served_model, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-backend-secret\n")
    model = mi.Model(served_model.backend_url, cert=wrong)
    with pytest.raises(mi.AuthenticationError) as info:
        model.generate("hi", max_new_tokens=2)
    assert isinstance(info.value, mi.InvalidRequest) and info.value.status == 401
    assert info.value.code == "unauthorized"
    with pytest.raises(mi.AuthenticationError):
        list(model.stream("hi", max_new_tokens=2))
    right = tmp_path / "right"
    right.write_text(Path(os.environ["MI_CERT"]).read_text())
    assert mi.Model(served_model.backend_url, cert=right).generate("hi", max_new_tokens=2)[0].ids


# -- dedicated backends -------------------------------------------------------------------------


def test_overloaded_backend_is_a_503_with_retry_after(converted):
    backend, port = start_backend(converted("llama", 1), "--max-num-seqs", "1", "--max-queued-requests", "0")
    backend_url = f"http://127.0.0.1:{port}"
    try:
        frontend, url = start_frontend(port)
    except Exception:
        backend.stop()
        raise

    async def run():
        async with aiohttp.ClientSession() as session:
            resp, _ = await open_stream(session, url + "/v1/completions", {"prompt": "hi", **LONG})
            for path, body in (
                ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
            ):
                status, headers, raw = await _call(session, "POST", url + path, body)
                assert status == 503 and headers["Retry-After"] == "1", (path, status, raw[:300])
                assert headers["Content-Type"].startswith("application/json")  # not an event stream
                assert error_of(raw)["code"] == "overloaded"
            model = mi.Model(backend_url)
            with pytest.raises(mi.Overloaded) as info:
                await asyncio.to_thread(model.generate, "hi", max_new_tokens=2)
            assert info.value.retry_after == 1 and isinstance(info.value, mi.BackendUnavailable)
            with pytest.raises(mi.Overloaded):
                await asyncio.to_thread(lambda: list(model.stream("hi", max_new_tokens=2)))
            resp.close()  # the slot frees: serving goes on
            await wait_for_stats(session, backend_url, lambda s: s["num_requests_running"] == 0)
            status, _, raw = await _call(
                session, "POST", url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}
            )
            assert status == 200, raw

    try:
        asyncio.run(run())
    finally:
        assert frontend.stop() == 0
        backend.stop()
    assert "Traceback" not in frontend.output


def test_worker_death_fails_every_request_in_flight_cleanly(converted):
    backend, port = start_backend(converted("llama", 1))
    backend_url = f"http://127.0.0.1:{port}"
    try:
        frontend, url = start_frontend(port)
    except Exception:
        backend.stop()
        raise
    pids = [p.pid for p in psutil.Process(backend.proc.pid).children(recursive=True)]

    async def run():
        async with aiohttp.ClientSession() as session:
            stream, _ = await open_stream(session, url + "/v1/completions", {"prompt": "hi", **LONG})
            chat, _ = await open_stream(
                session,
                url + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "x"}], **LONG},
            )
            plain = asyncio.ensure_future(
                _call(session, "POST", url + "/v1/completions", {"prompt": "hi", **LONG})
            )
            async with mi.AsyncModel(backend_url) as model:
                sdk_stream = model.stream("hi", max_new_tokens=1500, ignore_eos=True)
                await sdk_stream.__anext__()
                await wait_for_stats(session, backend_url, lambda s: s["num_requests_running"] == 4)
                worker_of(backend).kill()
                with pytest.raises(mi.ServerError):
                    async for _ in sdk_stream:
                        pass
            for resp in (stream, chat):
                assert_error_event_then_done(await rest_of_stream(resp), "backend_failed")
            status, headers, raw = await asyncio.wait_for(plain, 30)
            assert status == 503 and headers["Content-Type"].startswith("application/json"), (status, raw)
            err = error_of(raw)
            assert (err["type"], err["code"]) == ("server_error", "backend_failed")

    try:
        asyncio.run(run())
        assert backend.proc.wait(timeout=15) == 1, backend.output
        assert "worker 0 exited" in backend.output
        assert frontend.proc.poll() is None, "the frontend outlives its backend"
        assert_backend_down(url, backend_url)
    finally:
        assert frontend.stop() == 0
        backend.stop()
        kill_leftovers(pids)
    assert "Traceback" not in frontend.output


def test_backend_stopped_or_killed_mid_request_then_restarted(converted):
    """SIGTERM mid-request (no drain): the backend fails what runs, the frontend answers 503 shutting_down;
    a backend restarted on the same port is used again; SIGKILL cuts the streams, which end with
    an error event (the SDK raises ServerError)."""
    mi_dir, port = converted("llama", 1), free_port()
    backend_url = f"http://127.0.0.1:{port}"
    backend, _ = start_backend(mi_dir, "--drain-timeout", "0", port=port)
    try:
        frontend, url = start_frontend(port)
    except Exception:
        backend.stop()
        raise
    pids: list[int] = []

    async def sigterm():
        async with aiohttp.ClientSession() as session:
            stream, _ = await open_stream(session, url + "/v1/completions", {"prompt": "hi", **LONG})
            plain = asyncio.ensure_future(
                _call(session, "POST", url + "/v1/completions", {"prompt": "hi", **LONG})
            )
            await wait_for_stats(session, backend_url, lambda s: s["num_requests_running"] == 2)
            backend.proc.send_signal(signal.SIGTERM)
            status, headers, raw = await asyncio.wait_for(plain, 30)
            assert status == 503 and "Retry-After" in headers, (status, raw)
            assert error_of(raw)["code"] == "shutting_down"
            assert_error_event_then_done(await rest_of_stream(stream), "shutting_down")

    async def sigkill():
        async with aiohttp.ClientSession() as session:
            stream, _ = await open_stream(session, url + "/v1/completions", {"prompt": "hi", **LONG})
            async with mi.AsyncModel(backend_url) as model:
                sdk_stream = model.stream("hi", max_new_tokens=1500, ignore_eos=True)
                await sdk_stream.__anext__()
                backend.proc.kill()
                with pytest.raises(mi.ServerError):
                    async for _ in sdk_stream:
                        pass
            assert_error_event_then_done(await rest_of_stream(stream))

    try:
        asyncio.run(sigterm())
        assert backend.proc.wait(timeout=15) == 0, backend.output
        assert_backend_down(url, backend_url)

        backend, _ = start_backend(mi_dir, port=port)
        pids = [p.pid for p in psutil.Process(backend.proc.pid).children(recursive=True)]
        deadline = time.monotonic() + 10
        while call("GET", url + "/health")[0] != 200:
            assert time.monotonic() < deadline, "the frontend did not see the restarted backend"
            time.sleep(0.1)
        assert ok(url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})["choices"]

        asyncio.run(sigkill())
        kill_leftovers(pids)
        assert frontend.proc.poll() is None
        assert_backend_down(url, backend_url)
    finally:
        assert frontend.stop() == 0
        backend.stop()
        kill_leftovers(pids)
        Path(socket_path(port)).unlink(missing_ok=True)  # the SIGKILLed backend could not remove it
    assert "Traceback" not in frontend.output
