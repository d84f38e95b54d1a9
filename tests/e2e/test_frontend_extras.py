"""mi-frontend's routes besides generation, and the SSE wire format as `curl -N` sees it.

/tokenize, /detokenize, /tokenizer_info (as vLLM serves them), /version, /openapi.json, /metrics,
the chat template (the tokenizer's, or --chat-template). Uses `served_model`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import aiohttp
import orjson
import pytest

import mi

from servers import start_frontend

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def call(url: str, method: str = "GET", body: object = None) -> tuple[int, dict, bytes]:
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, json=body) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(run())


def ok_json(url: str, method: str = "GET", body: object = None) -> dict:
    status, _, raw = call(url, method, body)
    assert status == 200, raw[:500]
    return orjson.loads(raw)


@pytest.fixture(scope="module")
def hf_tokenizer(served_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_model.hf_dir)


def rendered_ids(tokenizer, messages, template=None) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


# -- tokenizer endpoints ------------------------------------------------------------------------


def test_tokenize_and_detokenize(served_model, hf_tokenizer):
    url = served_model.frontend_url
    text = "hello, my name is"
    body = ok_json(url + "/tokenize", "POST", {"prompt": text, "return_token_strs": True})
    assert body["tokens"] == hf_tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["token_strs"] == [hf_tokenizer.decode([i]) for i in body["tokens"]]
    assert body["max_model_len"] == ok_json(url + "/v1/models")["data"][0]["max_model_len"]
    plain = ok_json(url + "/tokenize", "POST", {"prompt": text, "add_special_tokens": False})
    assert (
        plain["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False) and plain["token_strs"] is None
    )
    assert ok_json(url + "/detokenize", "POST", {"tokens": plain["tokens"]}) == {"prompt": text}


def test_tokenize_messages_uses_the_models_chat_template(served_model, hf_tokenizer):
    body = ok_json(served_model.frontend_url + "/tokenize", "POST", {"messages": MESSAGES})
    assert body["tokens"] == rendered_ids(hf_tokenizer, MESSAGES)
    assert body["tokens"].count(hf_tokenizer.bos_token_id) == 1  # the template writes BOS once


def test_tokenizer_info(served_model, hf_tokenizer):
    info = ok_json(served_model.frontend_url + "/tokenizer_info")
    assert info["eos_token"] == hf_tokenizer.eos_token and info["bos_token"] == hf_tokenizer.bos_token
    assert info["chat_template"] == hf_tokenizer.chat_template
    assert (
        info["model_max_length"]
        == ok_json(served_model.frontend_url + "/v1/models")["data"][0]["max_model_len"]
    )


def test_chat_template_flag_overrides_the_tokenizers(served_model, hf_tokenizer, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}[assistant]"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    proc, url = start_frontend(served_model.backend_port, "--chat-template", str(path))
    try:
        body = ok_json(url + "/tokenize", "POST", {"messages": MESSAGES})
        assert body["tokens"] == rendered_ids(hf_tokenizer, MESSAGES, template)
        assert ok_json(url + "/tokenizer_info")["chat_template"] == template
        chat = ok_json(url + "/v1/chat/completions", "POST", {"messages": MESSAGES, "max_tokens": 3})
        assert chat["usage"]["prompt_tokens"] == len(body["tokens"])
    finally:
        assert proc.stop() == 0


def test_version_and_openapi(served_model):
    assert ok_json(served_model.frontend_url + "/version") == {"version": mi.__version__}
    doc = ok_json(served_model.frontend_url + "/openapi.json")
    assert doc["openapi"].startswith("3.1") and "/v1/chat/completions" in doc["paths"]


# -- metrics ------------------------------------------------------------------------------------


def scrape(served_model) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, raw = call(served_model.frontend_url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(raw.decode())}


def sample(families: dict, name: str, **labels) -> float:
    for family in families.values():
        for s in family:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_frontend_metrics(served_model):
    before = scrape(served_model)
    url = served_model.frontend_url + "/v1/completions"
    ok_json(url, "POST", {"prompt": "hello", "max_tokens": 5, "ignore_eos": True})
    status, _, _ = call(url, "POST", {"prompt": "hello", "max_tokens": 5, "ignore_eos": True, "stream": True})
    assert status == 200
    after = scrape(served_model)

    def grew(name, by=1.0, **labels):
        try:
            old = sample(before, name, **labels)
        except KeyError:
            old = 0.0
        assert sample(after, name, **labels) >= old + by, name

    grew("mi_http_requests_total", 2, endpoint="/v1/completions", status="200")
    grew("mi_generation_tokens_total", 10)
    grew("mi_prompt_tokens_total", 2)
    grew("mi_time_to_first_token_seconds_count")
    grew("mi_inter_token_latency_seconds_count", 4)
    grew("mi_e2e_request_latency_seconds_count", 2)


def test_backend_metrics_come_from_v1_stats(served_model):
    families = scrape(served_model)
    assert sample(families, "mi_backend_up") == 1.0
    for name in (
        "mi_num_requests_running",
        "mi_num_requests_waiting",
        "mi_num_kv_blocks",
        "mi_num_kv_blocks_used",
        "mi_kv_cache_usage_ratio",
        "mi_prefix_cache_hit_rate",
        "mi_num_preemptions_total",
    ):
        assert sample(families, name) >= 0, name
    assert sample(families, "mi_num_kv_blocks") > 0


# -- the wire, as curl sees it ------------------------------------------------------------------

SSE = re.compile(rb"\A(?:data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n\Z")


def curl(url: str, body: dict) -> tuple[str, bytes]:
    """`curl -N` of a POST: (response head, body bytes)."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    proc = subprocess.run(
        ["curl", "-sS", "-N", "-D", "-", url, "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    head, _, data = proc.stdout.partition(b"\r\n\r\n")
    return head.decode(), data


def test_curl_completion_stream_matches_the_wire_format(served_model):
    url = served_model.frontend_url + "/v1/completions"
    body = {"prompt": "Say this is a test", "max_tokens": 7, "temperature": 0, "stream": True}
    head, data = curl(url, body)
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert SSE.match(data), data[:300]
    chunks = [orjson.loads(line[len(b"data: ") :]) for line in data.split(b"\n\n")[:-2]]
    assert all(list(c) == ["id", "object", "created", "model", "choices"] for c in chunks)
    assert all(list(c["choices"][0]) == ["index", "text", "logprobs", "finish_reason"] for c in chunks)
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] in ("stop", "length") and reasons[:-1] == [None] * (len(chunks) - 1)
    assert all(c["choices"][0]["text"] for c in chunks[:-1])  # no empty chunk before the last
    full = ok_json(url, "POST", {**body, "stream": False})
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_curl_stream_with_usage_and_chat(served_model):
    body = {
        "prompt": "Say this is a test",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, data = curl(served_model.frontend_url + "/v1/completions", body)
    assert SSE.match(data)
    *chunks, last = [orjson.loads(line[len(b"data: ") :]) for line in data.split(b"\n\n")[:-2]]
    assert all(c["usage"] is None for c in chunks)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    _, data = curl(
        served_model.frontend_url + "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 5, "stream": True},
    )
    assert SSE.match(data)
    chunks = [orjson.loads(line[len(b"data: ") :]) for line in data.split(b"\n\n")[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] is not None for c in chunks].count(True) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
