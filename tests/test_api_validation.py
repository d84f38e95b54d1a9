"""Pure tests of mi.api: request checks, answer decoding, SSE encoding (no processes, no sockets)."""

from __future__ import annotations

import orjson
import pytest

from mi.api.backend import (
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamDelta,
    StreamStart,
    Usage,
    check_context_len,
    parse_generate_request,
    parse_stream_line,
    socket_path,
)
from mi.api.errors import ApiError, error_body
from mi.api.openai import (
    completion_chunk,
    completion_response,
    model_list,
    parse_completion_request,
    usage_chunk,
)
from mi.api.sse import DONE, decode_events, encode_event

VOCAB = 100


def parse_completion(body, **kw):
    kw = {"model_name": "tiny", "vocab_size": VOCAB, "completion_id": "cmpl-x", **kw}
    return parse_completion_request(body, **kw)


# -- errors ---------------------------------------------------------------------------------------


def test_error_body_shape():
    assert error_body("m", "invalid_request_error", "p", "c") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}
    }
    err = ApiError(503, "down", retry_after=2)
    assert err.body() == {"error": {"message": "down", "type": "server_error", "param": None, "code": None}}
    assert err.headers() == {"Retry-After": "2"}
    assert ApiError(404, "x").type == "invalid_request_error"
    assert ApiError(400, "x").headers() == {}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"error": {"message": "too long", "type": "invalid_request_error", "param": "prompt", "code": None}}, "too long"),
        ({"status": "starting"}, "The backend answered with HTTP status 503."),
        (None, "The backend answered with HTTP status 503."),
        ({"error": "text"}, "The backend answered with HTTP status 503."),
    ],
)
def test_api_error_from_body(body, message):
    err = ApiError.from_body(503, body)
    assert err.status == 503 and err.message == message


# -- backend /v1/generate -----------------------------------------------------------------------


def test_generate_defaults():
    req = parse_generate_request({"prompt": "hi"}, vocab_size=VOCAB)
    assert req.prompt == "hi" and req.prompt_ids is None
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (16, 1.0, 1.0, 0, None)
    assert req.stop == () and req.stop_token_ids == () and req.add_special_tokens
    assert not req.stream and not req.ignore_eos and req.skip_special_tokens
    assert req.request_id.startswith("req-")


def test_generate_full_body_round_trips():
    body = {
        "request_id": "r1", "prompt_ids": [1, 2, 99], "add_special_tokens": False, "max_tokens": 5,
        "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": -(2**63), "stop": ["\n", "x"],
        "stop_token_ids": [2], "ignore_eos": True, "skip_special_tokens": False, "stream": True,
    }
    req = parse_generate_request(body, vocab_size=VOCAB)
    assert req == GenerateRequest(
        request_id="r1", prompt_ids=(1, 2, 99), add_special_tokens=False, max_tokens=5,
        temperature=0.0, top_p=0.5, top_k=3, seed=-(2**63), stop=("\n", "x"), stop_token_ids=(2,),
        ignore_eos=True, skip_special_tokens=False, stream=True,
    )
    assert parse_generate_request(orjson.loads(orjson.dumps(req.to_json())), vocab_size=VOCAB) == req


def test_generate_stop_accepts_a_single_string_and_null():
    assert parse_generate_request({"prompt": "a", "stop": "\n"}, vocab_size=VOCAB).stop == ("\n",)
    assert parse_generate_request({"prompt": "a", "stop": None, "seed": None}, vocab_size=VOCAB).stop == ()


@pytest.mark.parametrize(
    "body, param",
    [
        ([1, 2], "body"),
        ("prompt", "body"),
        ({}, "prompt"),
        ({"prompt": "a", "prompt_ids": [1]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt_ids": []}, "prompt_ids"),
        ({"prompt_ids": "1 2"}, "prompt_ids"),
        ({"prompt_ids": [1, True]}, "prompt_ids"),
        ({"prompt_ids": [1, 1.0]}, "prompt_ids"),
        ({"prompt_ids": [VOCAB]}, "prompt_ids"),
        ({"prompt_ids": [-1]}, "prompt_ids"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "7"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 7.5}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.01}, "top_p"),
        ({"prompt": "a", "top_k": 1.5}, "top_k"),
        ({"prompt": "a", "seed": 2**63}, "seed"),
        ({"prompt": "a", "seed": "1"}, "seed"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "stop": [1]}, "stop"),
        ({"prompt": "a", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "a", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"prompt": "a", "stop_token_ids": 2}, "stop_token_ids"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "ignore_eos": 1}, "ignore_eos"),
        ({"prompt": "a", "request_id": ""}, "request_id"),
        ({"prompt": "a", "request_id": "x" * 257}, "request_id"),
        ({"prompt": "a", "request_id": 7}, "request_id"),
        ({"prompt": "a", "max_token": 7}, "max_token"),
    ],
)
def test_generate_rejects(body, param):
    with pytest.raises(ApiError) as info:
        parse_generate_request(body, vocab_size=VOCAB)
    err = info.value
    assert err.status == 400 and err.param == param and err.type == "invalid_request_error"
    assert err.message


@pytest.mark.parametrize(
    "prompt_len, max_tokens, max_model_len, ok",
    [(3, 5, 8, True), (3, 6, 8, False), (1, 1, 2, True), (0, 1, 8, False)],
)
def test_check_context_len(prompt_len, max_tokens, max_model_len, ok):
    if ok:
        check_context_len(prompt_len, max_tokens, max_model_len)
        return
    with pytest.raises(ApiError) as info:
        check_context_len(prompt_len, max_tokens, max_model_len)
    assert info.value.status == 400 and info.value.param == "prompt"


def test_context_len_message():
    with pytest.raises(ApiError) as info:
        check_context_len(10, 7, 16)
    assert info.value.message.startswith(
        "This model's maximum context length is 16 tokens. However, you requested 17 tokens "
        "(10 in the prompt, 7 for the completion)."
    )
    assert info.value.code == "context_length_exceeded"


def test_socket_path_names_the_port():
    assert socket_path(12222).endswith("mi-backend-12222.sock")


# -- backend answers ------------------------------------------------------------------------------


def test_generate_result_round_trip():
    result = GenerateResult("r", (1, 2), (3, 4), " hi", "stop", Usage(2, 2))
    assert GenerateResult.from_json(orjson.loads(orjson.dumps(result.to_json()))) == result


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("ids"),
        lambda b: b.update(ids=[1, "2"]),
        lambda b: b.update(text=None),
        lambda b: b.update(finish_reason="eos"),
        lambda b: b.update(usage={"prompt_tokens": 1}),
    ],
)
def test_generate_result_rejects_malformed(mutate):
    body = GenerateResult("r", (1,), (3,), "x", "length", Usage(1, 1)).to_json()
    mutate(body)
    with pytest.raises(ApiError) as info:
        GenerateResult.from_json(body)
    assert info.value.status == 502


def test_stream_lines():
    assert parse_stream_line({"request_id": "r", "prompt_ids": [1, 2]}) == StreamStart("r", (1, 2))
    assert parse_stream_line({"ids": [7], "text": "a", "finish_reason": None}) == StreamDelta((7,), "a")
    last = StreamDelta((8, 2), "b", "stop", Usage(2, 3))
    assert parse_stream_line(orjson.loads(orjson.dumps(last.to_json()))) == last
    with pytest.raises(ApiError) as info:
        parse_stream_line({"error": {"message": "worker died", "type": "server_error", "param": None, "code": None}})
    assert info.value.status == 500 and info.value.message == "worker died"
    with pytest.raises(ApiError) as info:
        parse_stream_line({"ids": [8], "text": "b", "finish_reason": "stop"})  # usage missing
    assert info.value.status == 502


def test_model_info_tolerates_extra_and_missing_optional_fields():
    info = ModelInfo.from_json({"model_name": "m", "max_model_len": 2048, "vocab_size": 512, "new": 1})
    assert (info.model_name, info.max_model_len, info.vocab_size, info.tp) == ("m", 2048, 512, 1)
    assert ModelInfo.from_json(info.to_json()) == info
    with pytest.raises(ApiError):
        ModelInfo.from_json({"model_name": "m", "max_model_len": 2048})


# -- OpenAI /v1/completions ---------------------------------------------------------------------


def test_completion_defaults():
    creq = parse_completion({"prompt": "Say this is a test"})
    assert creq.model == "tiny" and not creq.stream and not creq.include_usage
    (req,) = creq.generate_requests
    assert req.prompt == "Say this is a test" and req.request_id == "cmpl-x-0"
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k) == (16, 1.0, 1.0, 0)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a", ["a"]),
        ("", [""]),
        (["a", "b", ""], ["a", "b", ""]),
        ([5, 6], [(5, 6)]),
        ([[5], [6, 7]], [(5,), (6, 7)]),
    ],
)
def test_completion_prompt_forms(prompt, expected):
    reqs = parse_completion({"prompt": prompt}).generate_requests
    assert [r.prompt if r.prompt is not None else r.prompt_ids for r in reqs] == expected
    assert [r.request_id for r in reqs] == [f"cmpl-x-{i}" for i in range(len(expected))]


def test_completion_maps_every_sampling_field():
    body = {
        "model": "tiny", "prompt": "a", "max_tokens": 7, "temperature": 0, "top_p": 0.9, "top_k": 5,
        "stop": "\n", "seed": 3, "n": 1, "best_of": 1, "echo": False, "logprobs": None,
        "suffix": None, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
        "user": "u", "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True, "stop_token_ids": [2],
    }
    creq = parse_completion(body)
    assert creq.stream and creq.include_usage
    (req,) = creq.generate_requests
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (7, 0.0, 0.9, 5, 3)
    assert req.stop == ("\n",) and req.stop_token_ids == (2,) and req.ignore_eos and req.stream


def test_completion_nulls_mean_defaults():
    body = {k: None for k in ("model", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
                              "stream", "best_of", "echo", "logprobs", "suffix", "user")}
    (req,) = parse_completion({**body, "prompt": "a"}).generate_requests
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (16, 1.0, 1.0, None, ())


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ([], 400, "body", "invalid_type"),
        ({}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": None}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": []}, 400, "prompt", "invalid_value"),
        ({"prompt": [[]]}, 400, "prompt", "invalid_value"),
        ({"prompt": ["a", 1]}, 400, "prompt", "invalid_type"),
        ({"prompt": [1, [2]]}, 400, "prompt", "invalid_type"),
        ({"prompt": {"text": "a"}}, 400, "prompt", "invalid_type"),
        ({"prompt": [VOCAB]}, 400, "prompt", "invalid_value"),
        ({"prompt": ["a"] * 257}, 400, "prompt", "invalid_value"),
        ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"prompt": "a", "model": 4}, 400, "model", "invalid_type"),
        ({"prompt": "a", "max_tokens": "7"}, 400, "max_tokens", "invalid_type"),
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"prompt": "a", "temperature": 2.5}, 400, "temperature", "invalid_value"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature", "invalid_value"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ({"prompt": "a", "stop": 5}, 400, "stop", "invalid_type"),
        ({"prompt": "a", "n": 2}, 400, "n", "unsupported_parameter"),
        ({"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
        ({"prompt": "a", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
        ({"prompt": "a", "best_of": 0}, 400, "best_of", "invalid_value"),
        ({"prompt": "a", "echo": True}, 400, "echo", "unsupported_parameter"),
        ({"prompt": "a", "logprobs": 1}, 400, "logprobs", "unsupported_parameter"),
        ({"prompt": "a", "logprobs": 0}, 400, "logprobs", "unsupported_parameter"),
        ({"prompt": "a", "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
        ({"prompt": "a", "presence_penalty": 1}, 400, "presence_penalty", "unsupported_parameter"),
        ({"prompt": "a", "frequency_penalty": 3}, 400, "frequency_penalty", "invalid_value"),
        ({"prompt": "a", "logit_bias": {"5": 1}}, 400, "logit_bias", "unsupported_parameter"),
        ({"prompt": "a", "logit_bias": [1]}, 400, "logit_bias", "invalid_type"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
        ({"prompt": "a", "stream": True, "stream_options": {"x": 1}}, 400, "x", "unknown_parameter"),
        ({"prompt": "a", "stream": "true"}, 400, "stream", "invalid_type"),
        ({"prompt": "a", "user": 1}, 400, "user", "invalid_type"),
        ({"prompt": "a", "max_token": 7}, 400, "max_token", "unknown_parameter"),
        ({"prompt": "a", "prompt_ids": [1]}, 400, "prompt_ids", "unknown_parameter"),
    ],
)
def test_completion_rejects(body, status, param, code):
    with pytest.raises(ApiError) as info:
        parse_completion(body)
    err = info.value
    assert (err.status, err.param, err.code) == (status, param, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_completion_unsupported_message_says_not_yet():
    with pytest.raises(ApiError) as info:
        parse_completion({"prompt": "a", "best_of": 3})
    assert "not supported yet" in info.value.message


def test_completion_max_prompts_is_a_limit():
    assert len(parse_completion({"prompt": ["a"] * 3}, max_prompts=3).generate_requests) == 3
    with pytest.raises(ApiError):
        parse_completion({"prompt": ["a"] * 4}, max_prompts=3)


def test_completion_response_shape():
    body = completion_response("cmpl-1", 10, "tiny", [("x", "stop"), ("yz", "length")], 5, 3)
    assert body == {
        "id": "cmpl-1", "object": "text_completion", "created": 10, "model": "tiny",
        "choices": [
            {"index": 0, "text": "x", "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "text": "yz", "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def test_chunks_and_model_list():
    chunk = completion_chunk("cmpl-1", 10, "tiny", 2, "ab", None)
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"] == [{"index": 2, "text": "ab", "logprobs": None, "finish_reason": None}]
    assert completion_chunk("c", 1, "m", 0, "", "stop", include_usage=True)["usage"] is None
    usage = usage_chunk("c", 1, "m", 4, 6)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 10
    assert model_list("tiny", 7) == {
        "object": "list", "data": [{"id": "tiny", "object": "model", "created": 7, "owned_by": "mi"}]
    }


# -- SSE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [{"a": 1}, {"text": "line\nbreak\r\n"}, {"text": "data: [DONE]\n\n"}, {"t": "\u00e9\U0001f600"}, []],
)
def test_sse_event_round_trip(obj):
    event = encode_event(obj)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert [orjson.loads(p) for p in decode_events(event)] == [obj]


def test_sse_done_and_stream_decoding():
    assert DONE == b"data: [DONE]\n\n"
    raw = encode_event({"i": 0}) + encode_event({"i": 1}) + DONE
    assert decode_events(raw) == [b'{"i":0}', b'{"i":1}', b"[DONE]"]


@pytest.mark.parametrize("raw", [b"data: {}\n", b"event: x\n\n", b"data: {}\ndata: {}\n\n"])
def test_sse_decode_rejects_other_framing(raw):
    with pytest.raises(ValueError):
        decode_events(raw)
