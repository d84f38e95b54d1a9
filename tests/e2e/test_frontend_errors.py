"""Bad requests, auth, CORS and model aliases against a real mi-frontend.

Uses the session fixture `secured_frontend` (tests/conftest.py): a second frontend on the
session backend with `--api-key`, two served model names, CORS for http://allowed.example and
tight limits (n <= 4, max_tokens <= 32, bodies <= 64 KiB). Every bad request must get the right
4xx with the OpenAI error body, and the server must keep serving: a normal request right after
each one succeeds.
"""

from __future__ import annotations

import asyncio
import tempfile

import aiohttp
import openai
import orjson
import pytest

USER = [{"role": "user", "content": "hi"}]
GOOD = ("POST", "/v1/completions", {"prompt": "hello", "max_tokens": 2})


def call(
    frontend,
    method: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict | None = None,
    auth: bool = True,
) -> tuple[int, dict, bytes]:
    """One request to `frontend` (with its API key unless `auth` is False)."""

    async def run():
        all_headers = {
            "Content-Type": "application/json",
            **(frontend.headers if auth else {}),
            **(headers or {}),
        }
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        async with aiohttp.ClientSession() as session:
            async with session.request(method, frontend.url + path, data=data, headers=all_headers) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(run())


def check_error_body(raw: bytes) -> dict:
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    for leak in ("Traceback", tempfile.gettempdir(), "127.0.0.1", "/work/", ".py"):
        assert leak not in err["message"], err["message"]
    return err


C, CHAT = "/v1/completions", "/v1/chat/completions"

# (id, method, path, body, options, status, param, code); options: raw / headers / auth
BAD_REQUESTS = [
    ("invalid-json", "POST", C, None, {"raw": b'{"prompt": "a", '}, 400, None, "invalid_json"),
    ("body-not-object", "POST", C, ["prompt"], {}, 400, "body", "invalid_type"),
    (
        "wrong-content-type",
        "POST",
        C,
        None,
        {"raw": b"prompt=a", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        415,
        None,
        "unsupported_media_type",
    ),
    ("missing-key", "POST", C, {"prompt": "a"}, {"auth": False}, 401, None, "missing_api_key"),
    (
        "wrong-key",
        "POST",
        C,
        {"prompt": "a"},
        {"auth": False, "headers": {"Authorization": "Bearer sk-wrong"}},
        401,
        None,
        "invalid_api_key",
    ),
    (
        "wrong-auth-scheme",
        "GET",
        "/v1/models",
        None,
        {"auth": False, "headers": {"Authorization": "Basic eDp5"}},
        401,
        None,
        "invalid_api_key",
    ),
    ("huge-body", "POST", C, {"prompt": "a" * 70_000}, {}, 413, None, None),
    (
        "unknown-model",
        "POST",
        C,
        {"prompt": "a", "model": "no-such-model"},
        {},
        404,
        "model",
        "model_not_found",
    ),
    ("empty-prompt", "POST", C, {"prompt": ""}, {}, 400, "prompt", "invalid_value"),
    ("empty-prompt-list", "POST", C, {"prompt": []}, {}, 400, "prompt", "invalid_value"),
    ("missing-prompt", "POST", C, {"max_tokens": 3}, {}, 400, "prompt", "missing_required_parameter"),
    ("prompt-wrong-type", "POST", C, {"prompt": {"text": "a"}}, {}, 400, "prompt", "invalid_type"),
    ("out-of-vocab-id", "POST", C, {"prompt": [5, 10**6]}, {}, 400, "prompt", "invalid_value"),
    ("negative-id", "POST", C, {"prompt": [[5], [-1]]}, {}, 400, "prompt", "invalid_value"),
    (
        "too-many-stops",
        "POST",
        C,
        {"prompt": "a", "stop": [f"s{i}" for i in range(17)]},
        {},
        400,
        "stop",
        "invalid_value",
    ),
    ("empty-stop", "POST", C, {"prompt": "a", "stop": [""]}, {}, 400, "stop", "invalid_value"),
    ("logprobs-21", "POST", C, {"prompt": "a", "logprobs": 21}, {}, 400, "logprobs", "invalid_value"),
    ("n-0", "POST", C, {"prompt": "a", "n": 0}, {}, 400, "n", "invalid_value"),
    ("n-over-limit", "POST", C, {"prompt": "a", "n": 5}, {}, 400, "n", "invalid_value"),
    (
        "max-tokens-string",
        "POST",
        C,
        {"prompt": "a", "max_tokens": "7"},
        {},
        400,
        "max_tokens",
        "invalid_type",
    ),
    (
        "max-tokens-over-limit",
        "POST",
        C,
        {"prompt": "a", "max_tokens": 33},
        {},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max-tokens-0-without-echo",
        "POST",
        C,
        {"prompt": "a", "max_tokens": 0},
        {},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "temperature-negative",
        "POST",
        C,
        {"prompt": "a", "temperature": -1},
        {},
        400,
        "temperature",
        "invalid_value",
    ),
    ("top-p-above-1", "POST", C, {"prompt": "a", "top_p": 1.5}, {}, 400, "top_p", "invalid_value"),
    (
        "presence-penalty-5",
        "POST",
        C,
        {"prompt": "a", "presence_penalty": 5},
        {},
        400,
        "presence_penalty",
        "invalid_value",
    ),
    ("seed-beyond-int64", "POST", C, {"prompt": "a", "seed": 2**63}, {}, 400, "seed", "invalid_value"),
    (
        "logit-bias-1000",
        "POST",
        C,
        {"prompt": "a", "logit_bias": {"5": 1000}},
        {},
        400,
        "logit_bias",
        "invalid_value",
    ),
    ("stream-not-bool", "POST", C, {"prompt": "a", "stream": "yes"}, {}, 400, "stream", "invalid_type"),
    (
        "stream-options-without-stream",
        "POST",
        C,
        {"prompt": "a", "stream_options": {"include_usage": True}},
        {},
        400,
        "stream_options",
        "invalid_value",
    ),
    (
        "unknown-field",
        "POST",
        C,
        {"prompt": "a", "max_tokenz": 3},
        {},
        400,
        "max_tokenz",
        "unknown_parameter",
    ),
    ("best-of", "POST", C, {"prompt": "a", "best_of": 2}, {}, 400, "best_of", "unsupported_parameter"),
    ("suffix", "POST", C, {"prompt": "a", "suffix": "end"}, {}, 400, "suffix", "unsupported_parameter"),
    (
        "context-too-long",
        "POST",
        C,
        {"prompt": [5] * 4096, "max_tokens": 4},
        {},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "chat-missing-messages",
        "POST",
        CHAT,
        {"max_tokens": 2},
        {},
        400,
        "messages",
        "missing_required_parameter",
    ),
    (
        "chat-bad-role",
        "POST",
        CHAT,
        {"messages": [{"role": "robot", "content": "x"}]},
        {},
        400,
        "messages[0].role",
        "invalid_value",
    ),
    (
        "chat-image-part",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {},
        400,
        "messages[0].content",
        "unsupported_parameter",
    ),
    (
        "chat-top-logprobs-alone",
        "POST",
        CHAT,
        {"messages": USER, "top_logprobs": 2},
        {},
        400,
        "top_logprobs",
        "invalid_value",
    ),
    (
        "chat-json-schema",
        "POST",
        CHAT,
        # compiled by the backend, whose error names the field the request used
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nope"}},
            },
        },
        {},
        400,
        "response_format.json_schema.schema",
        "invalid_value",
    ),
    (
        "chat-tools",
        "POST",
        CHAT,
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {},
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "chat-context-too-long",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "a " * 4000}], "max_tokens": 4},
        {},
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("unknown-route", "GET", "/v1/nothing", None, {}, 404, None, None),
    ("wrong-method", "GET", C, None, {}, 405, None, None),
    ("tokenize-both", "POST", "/tokenize", {"prompt": "a", "messages": USER}, {}, 400, "prompt", None),
    (
        "detokenize-out-of-vocab",
        "POST",
        "/detokenize",
        {"tokens": [10**6]},
        {},
        400,
        "tokens",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(
    "method, path, body, options, status, param, code",
    [pytest.param(*row[1:], id=row[0]) for row in BAD_REQUESTS],
)
def test_bad_request_then_serving_goes_on(secured_frontend, method, path, body, options, status, param, code):
    got, headers, raw = call(secured_frontend, method, path, body, **options)
    assert got == status, raw[:300]
    assert headers["Content-Type"].startswith("application/json")
    err = check_error_body(raw)
    assert (err["param"], err["code"]) == (param, code)
    if status == 401:
        assert err["type"] in ("invalid_request_error", "authentication_error")
    assert call(secured_frontend, *GOOD)[0] == 200


def test_there_are_at_least_30_kinds():
    assert len({row[0] for row in BAD_REQUESTS}) == len(BAD_REQUESTS) >= 30


def test_health_is_public_and_everything_else_needs_the_key(secured_frontend):
    assert call(secured_frontend, "GET", "/health", auth=False)[0] == 200
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/version"),
        ("GET", "/openapi.json"),
        ("GET", "/tokenizer_info"),
        ("POST", "/tokenize"),
    ):
        assert call(secured_frontend, method, path, {"prompt": "a"}, auth=False)[0] == 401, path
        assert call(secured_frontend, method, path, {"prompt": "a"})[0] == 200, path


def test_openai_client_with_and_without_the_key(secured_frontend):
    good = openai.OpenAI(
        base_url=secured_frontend.url + "/v1", api_key=secured_frontend.api_key, max_retries=0
    )
    assert good.completions.create(model="tiny-llama", prompt="a", max_tokens=2).choices
    bad = openai.OpenAI(base_url=secured_frontend.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-llama", prompt="a", max_tokens=2)


def test_served_model_names_are_aliases(secured_frontend):
    status, _, raw = call(secured_frontend, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in orjson.loads(raw)["data"]] == list(secured_frontend.model_names)
    for name in secured_frontend.model_names:
        status, _, raw = call(secured_frontend, "POST", C, {"prompt": "a", "max_tokens": 2, "model": name})
        assert status == 200 and orjson.loads(raw)["model"] == name
        status, _, raw = call(secured_frontend, "GET", f"/v1/models/{name}")
        assert status == 200 and orjson.loads(raw)["id"] == name
    status, _, raw = call(secured_frontend, "POST", C, {"prompt": "a", "max_tokens": 2})
    assert orjson.loads(raw)["model"] == secured_frontend.model_names[0]
    assert call(secured_frontend, "GET", "/v1/models/other")[0] == 404


def test_cors(secured_frontend):
    preflight = {
        "Origin": "http://allowed.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = call(secured_frontend, "OPTIONS", C, headers=preflight, auth=False)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    status, headers, raw = call(
        secured_frontend, "OPTIONS", C, auth=False, headers={**preflight, "Origin": "http://evil.example"}
    )
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    check_error_body(raw)
    body = {"prompt": "a", "max_tokens": 2}
    for stream in (False, True):
        _, headers, _ = call(
            secured_frontend,
            "POST",
            C,
            {**body, "stream": stream},
            headers={"Origin": "http://allowed.example"},
        )
        assert headers["Access-Control-Allow-Origin"] == "http://allowed.example"
        _, headers, _ = call(
            secured_frontend, "POST", C, {**body, "stream": stream}, headers={"Origin": "http://evil.example"}
        )
        assert "Access-Control-Allow-Origin" not in headers
