"""Pure tests of mi.api: request checks, answer decoding, SSE encoding (no processes, no sockets)."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from mi.api.backend import (
    BackendStats,
    GenerateRequest,
    GenerateResult,
    Logprob,
    ModelInfo,
    ReplicaStats,
    StreamDecoder,
    StreamDelta,
    StreamStart,
    TokenizerFiles,
    Usage,
    check_context_len,
    decode_answer,
    encode_answer,
    parse_generate_request,
)
from mi.api.chat import parse_chat_request
from mi.api.errors import ApiError, error_body
from mi.api.logprobs import chat_logprobs, completion_logprobs
from mi.api.openai import parse_completion_request
from mi.api.openai_answers import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
)
from mi.api.openai_common import Limits, model_list, seed_for_choice, usage_info
from mi.api.openapi import openapi_document
from mi.api.sse import DONE, decode_events, encode_event

VOCAB = 100


def parse_completion(body, **kw):
    kw = {"served_names": ("tiny", "alias"), "vocab_size": VOCAB, "completion_id": "cmpl-x", **kw}
    return parse_completion_request(body, **kw)


def parse_chat(body, **kw):
    kw = {"served_names": ("tiny", "alias"), "vocab_size": VOCAB, **kw}
    return parse_chat_request(body, **kw)


USER = [{"role": "user", "content": "hi"}]


def wire(answer) -> dict:
    """An answer Struct as the client receives it."""
    return orjson.loads(msgspec.json.encode(answer))


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
        (
            {
                "error": {
                    "message": "too long",
                    "type": "invalid_request_error",
                    "param": "prompt",
                    "code": None,
                }
            },
            "too long",
        ),
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
    assert (req.min_tokens, req.min_p, req.repetition_penalty, req.presence_penalty) == (0, 0.0, 1.0, 0.0)
    assert (req.frequency_penalty, req.logit_bias, req.logprobs, req.prompt_logprobs) == (0.0, {}, None, None)
    assert not req.include_stop_str_in_output


def test_generate_full_body_round_trips():
    body = {
        "request_id": "r1",
        "prompt_ids": [1, 2, 99],
        "add_special_tokens": False,
        "max_tokens": 5,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 3,
        "seed": -(2**63),
        "stop": ["\n", "x"],
        "stop_token_ids": [2],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stream": True,
        "min_tokens": 2,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "presence_penalty": -0.5,
        "frequency_penalty": 2,
        "logit_bias": {"7": -100, "3": 2.5},
        "logprobs": 0,
        "prompt_logprobs": 20,
        "include_stop_str_in_output": True,
    }
    req = parse_generate_request(body, vocab_size=VOCAB)
    assert req == GenerateRequest(
        request_id="r1",
        prompt_ids=(1, 2, 99),
        add_special_tokens=False,
        max_tokens=5,
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        seed=-(2**63),
        stop=("\n", "x"),
        stop_token_ids=(2,),
        ignore_eos=True,
        skip_special_tokens=False,
        stream=True,
        min_tokens=2,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=-0.5,
        frequency_penalty=2.0,
        logit_bias={3: 2.5, 7: -100.0},
        logprobs=0,
        prompt_logprobs=20,
        include_stop_str_in_output=True,
    )
    assert parse_generate_request(orjson.loads(orjson.dumps(req.to_json())), vocab_size=VOCAB) == req


def test_generate_to_json_sends_only_what_differs_from_the_defaults():
    assert GenerateRequest(request_id="r", prompt="a").to_json() == {
        "request_id": "r",
        "prompt": "a",
        "max_tokens": 16,
    }
    body = GenerateRequest(
        request_id="r", prompt_ids=(1,), max_tokens=0, prompt_logprobs=0, logit_bias={4: 1.0}
    ).to_json()
    assert body == {
        "request_id": "r",
        "prompt_ids": [1],
        "max_tokens": 0,
        "prompt_logprobs": 0,
        "logit_bias": {"4": 1.0},
    }


def test_generate_max_tokens_0_scores_the_prompt():
    req = parse_generate_request({"prompt": "a", "max_tokens": 0, "prompt_logprobs": 0}, vocab_size=VOCAB)
    assert req.max_tokens == 0 and req.prompt_logprobs == 0


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
        ({"prompt_ids": [1, 1.5]}, "prompt_ids"),
        ({"prompt_ids": [VOCAB]}, "prompt_ids"),
        ({"prompt_ids": [-1]}, "prompt_ids"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "a", "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"prompt": "a", "min_tokens": -1}, "min_tokens"),
        ({"prompt": "a", "min_p": 1.5}, "min_p"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
        # these made the logits infinite: the request could only fail at sampling, as a 500
        ({"prompt": "a", "repetition_penalty": 5e-324}, "repetition_penalty"),
        ({"prompt": "a", "repetition_penalty": 1e39}, "repetition_penalty"),
        ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "a", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "a", "logit_bias": [1]}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {str(VOCAB): 1}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"1": 101}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"1": "1"}}, "logit_bias"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "logprobs": True}, "logprobs"),
        ({"prompt": "a", "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt": "a", "include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"prompt": "a", "max_tokens": "7"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 7.5}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
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


@pytest.mark.parametrize("raw", [b"-9223372036854775809", b"9223372036854775808", b"1e18"])
def test_an_integer_beyond_int64_is_not_rounded_into_range(raw):
    # The frontend's JSON parser gives such an integer as a float; -2**63 - 1 became -2**63, a
    # valid seed, and the request sampled with a seed nobody sent.
    body = orjson.loads(b'{"prompt": "a", "seed": ' + raw + b"}")
    with pytest.raises(ApiError) as info:
        parse_completion(body)
    assert info.value.status == 400 and info.value.param == "seed"
    assert parse_completion({"prompt": "a", "max_tokens": 7.0}).generate_requests[0].max_tokens == 7


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
    from mi.local_socket import socket_path

    assert socket_path(12222).endswith("mi-backend-12222.sock")


# -- backend answers ------------------------------------------------------------------------------


def round_trip(answer):
    return decode_answer(encode_answer(answer), type(answer))


def test_generate_result_round_trip():
    result = GenerateResult("r", (1, 2), (3, 4), " hi", "stop", Usage(2, 2))
    assert round_trip(result) == result
    assert orjson.loads(encode_answer(result)) == {
        "request_id": "r",
        "prompt_ids": [1, 2],
        "ids": [3, 4],
        "text": " hi",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "cached_tokens": 0},
        "logprobs": None,
        "prompt_logprobs": None,
    }


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
    body = orjson.loads(encode_answer(GenerateResult("r", (1,), (3,), "x", "length", Usage(1, 1))))
    mutate(body)
    with pytest.raises(ApiError) as info:
        decode_answer(orjson.dumps(body), GenerateResult)
    assert info.value.status == 502 and info.value.code == "bad_backend_response"


def stream_of(*lines: dict) -> list:
    decoder = StreamDecoder()
    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    return decoder.feed(data) + decoder.end()


START = {"request_id": "r", "prompt_ids": [1, 2]}


def test_stream_lines():
    last = StreamDelta((8, 2), "b", "stop", Usage(2, 3))
    assert stream_of(
        START, {"ids": [7], "text": "a", "finish_reason": None}, orjson.loads(encode_answer(last))
    ) == [StreamStart("r", (1, 2)), StreamDelta((7,), "a"), last]
    aborted = {"ids": [], "text": "", "finish_reason": "abort"}  # an abort may come without usage
    assert stream_of(START, aborted)[-1] == StreamDelta((), "", "abort")


def test_stream_error_line_is_the_error_it_carries():
    error = {
        "error": {"message": "worker died", "type": "server_error", "param": None, "code": "backend_failed"}
    }
    with pytest.raises(ApiError) as info:
        stream_of(START, error)
    assert (info.value.status, info.value.message, info.value.code) == (503, "worker died", "backend_failed")
    error["error"].update(type="invalid_request_error", param="prompt")
    with pytest.raises(ApiError) as info:
        stream_of(START, error)
    assert (info.value.status, info.value.param) == (400, "prompt")


@pytest.mark.parametrize(
    "lines",
    [
        [START, {"ids": [8], "text": "b", "finish_reason": "stop"}],  # usage missing
        [{"ids": [8], "text": "b", "finish_reason": None}],  # no start
        [START, START],
        [START, {"ids": [8], "text": "b", "finish_reason": "abort"}, {"ids": [9], "text": "c"}],
        [START, {"ids": [8], "text": "b"}],  # cut before the last line
        [],
    ],
)
def test_malformed_streams_are_502(lines):
    with pytest.raises(ApiError) as info:
        stream_of(*lines)
    assert info.value.status == 502


def test_stream_decoder_splits_whatever_the_chunking():
    decoder = StreamDecoder()
    assert decoder.feed(b'{"request_id": "r", "prompt_ids"') == []
    assert decoder.feed(b": [1]}\n\n{") == [StreamStart("r", (1,))]
    assert decoder.feed(b'"ids": [], "text": "", "finish_reason": "abort"}') == []
    assert decoder.end() == [StreamDelta((), "", "abort")] and decoder.finished


LOGPROB = Logprob(3, -0.5, ((3, -0.5), (4, None)))


def test_answers_carry_logprobs_and_cached_tokens():
    result = GenerateResult("r", (1, 2), (3,), "x", "stop", Usage(2, 1, 1), (LOGPROB,), (None, LOGPROB))
    assert round_trip(result) == result
    assert decode_answer(b'{"prompt_tokens": 2, "completion_tokens": 1}', Usage) == Usage(2, 1, 0)
    start = StreamStart("r", (1, 2), (None, LOGPROB))
    assert round_trip(start) == start
    delta = StreamDelta((3,), "x", None, None, (LOGPROB,))
    assert round_trip(delta) == delta


def test_non_finite_logprobs_are_null():
    entry = Logprob(3, float("-inf"), ((3, float("nan")),))
    assert orjson.loads(encode_answer(entry)) == {"token_id": 3, "logprob": None, "top": [[3, None]]}


@pytest.mark.parametrize(
    "logprobs, prompt_logprobs",
    [
        ([{"token_id": 3, "logprob": "x", "top": []}], None),
        ([{"token_id": 3, "logprob": -1.0}], None),
        ([{"token_id": 3, "logprob": -1.0, "top": [[1]]}], None),
        ("no", None),
        ([None], None),
        (None, [orjson.loads(encode_answer(LOGPROB))]),  # the first prompt token has no logprob
        (None, [None, None]),
    ],
)
def test_malformed_logprobs_are_502(logprobs, prompt_logprobs):
    body = orjson.loads(encode_answer(GenerateResult("r", (1, 2), (3,), "x", "stop", Usage(2, 1))))
    body.update(logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    with pytest.raises(ApiError) as info:
        decode_answer(orjson.dumps(body), GenerateResult)
    assert info.value.status == 502


def test_backend_stats():
    stats = decode_answer(
        orjson.dumps(
            {
                "num_requests_running": 2,
                "num_kv_blocks_used": 17,
                "requests_finished_total": {"stop": 3},
                "replicas": [{"index": 0, "requests_routed_total": 5, "num_requests_running": 2}],
                "new": [1],
            }
        ),
        BackendStats,
    )
    assert stats.num_requests_running == 2 and stats.num_kv_blocks_used == 17 and stats.num_preemptions == 0
    assert stats.requests_finished_total == {"stop": 3}
    assert stats.replicas == (ReplicaStats(num_requests_running=2, index=0, requests_routed_total=5),)
    for bad in ([], {"num_requests_running": -1}, {"requests_finished_total": {"stop": "3"}}):
        with pytest.raises(ApiError):
            decode_answer(orjson.dumps(bad), BackendStats)


def test_model_info_tolerates_extra_and_missing_optional_fields():
    info = decode_answer(
        b'{"model_name": "m", "max_model_len": 2048, "vocab_size": 512, "new": 1}', ModelInfo
    )
    assert (info.model_name, info.max_model_len, info.vocab_size, info.tp) == ("m", 2048, 512, 1)
    assert round_trip(info) == info
    for bad in (
        {"model_name": "m", "max_model_len": 2048},
        {"model_name": "", "max_model_len": 1, "vocab_size": 1},
    ):
        with pytest.raises(ApiError):
            decode_answer(orjson.dumps(bad), ModelInfo)


def test_tokenizer_files_answer():
    assert decode_answer(b'{"files": {"tokenizer.json": "{}"}}', TokenizerFiles).files == {
        "tokenizer.json": "{}"
    }
    for bad in ({"files": {}}, {"files": {"a": 1}}, {}):
        with pytest.raises(ApiError):
            decode_answer(orjson.dumps(bad), TokenizerFiles)


# -- OpenAI /v1/completions ---------------------------------------------------------------------


def test_completion_defaults():
    creq = parse_completion({"prompt": "Say this is a test"})
    assert creq.model == "tiny" and not creq.stream and not creq.include_usage and creq.n == 1
    (req,) = creq.generate_requests
    assert req.prompt == "Say this is a test" and req.request_id == "cmpl-x-0"
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k) == (16, 1.0, 1.0, 0)
    assert req.logprobs is None and req.prompt_logprobs is None


def test_completion_answers_with_the_alias_asked_for():
    assert parse_completion({"prompt": "a", "model": "alias"}).model == "alias"


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([5, 6], [(5, 6)]),
        ([[5], [6, 7]], [(5,), (6, 7)]),
    ],
)
def test_completion_prompt_forms(prompt, expected):
    reqs = parse_completion({"prompt": prompt}).generate_requests
    assert [r.prompt if r.prompt is not None else r.prompt_ids for r in reqs] == expected
    assert [r.request_id for r in reqs] == [f"cmpl-x-{i}" for i in range(len(expected))]


def test_completion_choices_are_prompt_major_with_distinct_seeds():
    creq = parse_completion({"prompt": ["a", "b"], "n": 3, "seed": 2**63 - 2})
    reqs = creq.generate_requests
    assert [r.prompt for r in reqs] == ["a"] * 3 + ["b"] * 3
    assert [r.request_id for r in reqs] == [f"cmpl-x-{i}" for i in range(6)]
    assert [r.seed for r in reqs[:3]] == [2**63 - 2, 2**63 - 1, -(2**63)]  # wraps within int64
    assert [r.seed for r in reqs[3:]] == [r.seed for r in reqs[:3]]
    assert [r.seed for r in parse_completion({"prompt": "a", "n": 2}).generate_requests] == [None, None]
    assert seed_for_choice(None, 3) is None and seed_for_choice(5, 0) == 5


def test_completion_maps_every_sampling_field():
    body = {
        "model": "tiny",
        "prompt": "a",
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 5,
        "stop": "\n",
        "seed": 3,
        "n": 1,
        "best_of": 1,
        "echo": False,
        "logprobs": 2,
        "suffix": None,
        "frequency_penalty": 0.5,
        "presence_penalty": -1,
        "logit_bias": {"5": 1},
        "user": "u",
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "stop_token_ids": [2],
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "min_tokens": 3,
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "add_special_tokens": False,
    }
    creq = parse_completion(body)
    assert creq.stream and creq.include_usage and creq.logprobs == 2
    (req,) = creq.generate_requests
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (7, 0.0, 0.9, 5, 3)
    assert req.stop == ("\n",) and req.stop_token_ids == (2,) and req.ignore_eos and req.stream
    assert (req.frequency_penalty, req.presence_penalty, req.logit_bias) == (0.5, -1.0, {5: 1.0})
    assert (req.min_p, req.repetition_penalty, req.min_tokens) == (0.05, 1.1, 3)
    assert not req.skip_special_tokens and req.include_stop_str_in_output and not req.add_special_tokens
    assert req.logprobs == 2 and req.prompt_logprobs is None


def test_completion_top_k_minus_one_is_off_and_top_p_0_is_top_1():
    assert parse_completion({"prompt": "a", "top_k": -1}).generate_requests[0].top_k == 0
    (req,) = parse_completion({"prompt": "a", "top_p": 0}).generate_requests
    assert (req.top_p, req.top_k) == (1.0, 1)


def test_integral_floats_are_integers_as_in_json_schema():
    (req,) = parse_completion({"prompt": [5.0, 6], "max_tokens": 7.0, "n": 1.0}).generate_requests
    assert req.prompt_ids == (5, 6) and req.max_tokens == 7 and type(req.max_tokens) is int


def test_completion_echo_asks_for_prompt_logprobs():
    (req,) = parse_completion({"prompt": "a", "echo": True, "logprobs": 3}).generate_requests
    assert req.prompt_logprobs == 3 and req.logprobs == 3
    (req,) = parse_completion({"prompt": "a", "echo": True, "max_tokens": 0}).generate_requests
    assert req.max_tokens == 0 and req.prompt_logprobs == 0 and req.logprobs is None
    (req,) = parse_completion({"prompt": "a", "echo": True}).generate_requests
    assert req.prompt_logprobs is None


def test_completion_nulls_mean_defaults():
    body = {
        k: None
        for k in (
            "model",
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "n",
            "stream",
            "best_of",
            "echo",
            "logprobs",
            "suffix",
            "user",
            "logit_bias",
            "stop_token_ids",
            "min_p",
            "stream_options",
        )
    }
    (req,) = parse_completion({**body, "prompt": "a"}).generate_requests
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (16, 1.0, 1.0, None, ())


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ([], 400, "body", "invalid_type"),
        ({}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": None}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": ""}, 400, "prompt", "invalid_value"),
        ({"prompt": ["a", ""]}, 400, "prompt", "invalid_value"),
        ({"prompt": []}, 400, "prompt", "invalid_value"),
        ({"prompt": [[]]}, 400, "prompt", "invalid_value"),
        ({"prompt": ["a", 1]}, 400, "prompt", "invalid_type"),
        ({"prompt": [1, [2]]}, 400, "prompt", "invalid_type"),
        ({"prompt": {"text": "a"}}, 400, "prompt", "invalid_type"),
        ({"prompt": [VOCAB]}, 400, "prompt", "invalid_value"),
        ({"prompt": ["a"] * 257}, 400, "prompt", "invalid_value"),
        ({"prompt": ["a"] * 100, "n": 3}, 400, "prompt", "invalid_value"),
        ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"prompt": "a", "model": 4}, 400, "model", "invalid_type"),
        ({"prompt": "a", "max_tokens": "7"}, 400, "max_tokens", "invalid_type"),
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"prompt": "a", "max_tokens": -1, "echo": True}, 400, "max_tokens", "invalid_value"),
        ({"prompt": "a", "temperature": 2.5}, 400, "temperature", "invalid_value"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature", "invalid_value"),
        ({"prompt": "a", "top_p": 1.5}, 400, "top_p", "invalid_value"),
        ({"prompt": "a", "top_k": -2}, 400, "top_k", "invalid_value"),
        ({"prompt": "a", "min_p": -0.1}, 400, "min_p", "invalid_value"),
        ({"prompt": "a", "stop": ["s"] * 17}, 400, "stop", "invalid_value"),
        ({"prompt": "a", "stop": 5}, 400, "stop", "invalid_type"),
        ({"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
        ({"prompt": "a", "n": 65}, 400, "n", "invalid_value"),
        ({"prompt": "a", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
        ({"prompt": "a", "best_of": 0}, 400, "best_of", "invalid_value"),
        ({"prompt": "a", "echo": "yes"}, 400, "echo", "invalid_type"),
        ({"prompt": "a", "logprobs": 21}, 400, "logprobs", "invalid_value"),
        ({"prompt": "a", "logprobs": -1}, 400, "logprobs", "invalid_value"),
        ({"prompt": "a", "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
        ({"prompt": "a", "presence_penalty": 2.1}, 400, "presence_penalty", "invalid_value"),
        ({"prompt": "a", "frequency_penalty": 3}, 400, "frequency_penalty", "invalid_value"),
        ({"prompt": "a", "repetition_penalty": -1}, 400, "repetition_penalty", "invalid_value"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias", "invalid_value"),
        ({"prompt": "a", "logit_bias": [1]}, 400, "logit_bias", "invalid_type"),
        ({"prompt": "a", "seed": 2**63}, 400, "seed", "invalid_value"),
        ({"prompt": "a", "seed": 1.5}, 400, "seed", "invalid_type"),
        ({"prompt": "a", "min_tokens": 17}, 400, "min_tokens", "invalid_value"),
        ({"prompt": "a", "stop_token_ids": [VOCAB]}, 400, "stop_token_ids", "invalid_value"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
        (
            {"prompt": "a", "stream": True, "stream_options": {"x": 1}},
            400,
            "stream_options.x",
            "unknown_parameter",
        ),
        ({"prompt": "a", "stream": True, "stream_options": 1}, 400, "stream_options", "invalid_type"),
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


def test_completion_unsupported_message_says_so():
    with pytest.raises(ApiError) as info:
        parse_completion({"prompt": "a", "best_of": 3})
    assert "not supported" in info.value.message


def test_completion_limits_are_flags():
    limits = Limits(max_n=2, max_choices=3, max_stop=1, max_logprobs=1, max_tokens=8)
    assert len(parse_completion({"prompt": ["a"] * 3}, limits=limits).generate_requests) == 3
    assert parse_completion({"prompt": "a"}, limits=limits).generate_requests[0].max_tokens == 8
    for body in (
        {"prompt": ["a"] * 4},
        {"prompt": ["a", "b"], "n": 2},
        {"prompt": "a", "n": 3},
        {"prompt": "a", "stop": ["x", "y"]},
        {"prompt": "a", "logprobs": 2},
        {"prompt": "a", "max_tokens": 9},
    ):
        with pytest.raises(ApiError):
            parse_completion(body, limits=limits)
    with pytest.raises(ValueError):
        Limits(max_logprobs=21)


def test_completion_response_shape():
    choices = [CompletionChoice(0, "x", None, "stop"), CompletionChoice(1, "yz", None, "length")]
    body = wire(
        CompletionResponse(id="cmpl-1", created=10, model="tiny", choices=choices, usage=usage_info(5, 3, 2))
    )
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 10,
        "model": "tiny",
        "choices": [
            {"index": 0, "text": "x", "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "text": "yz", "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }


def test_chunks_and_model_list():
    chunk = wire(
        CompletionChunk(
            id="cmpl-1", created=10, model="tiny", choices=[CompletionChoice(2, "ab", None, None)]
        )
    )
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"] == [{"index": 2, "text": "ab", "logprobs": None, "finish_reason": None}]
    with_usage = CompletionChunk(
        id="c", created=1, model="m", choices=[CompletionChoice(0, "", None, "stop")], usage=None
    )
    assert wire(with_usage)["usage"] is None
    usage = wire(CompletionChunk(id="c", created=1, model="m", choices=[], usage=usage_info(4, 6, 0)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 10
    assert wire(model_list(("tiny", "alias"), 7, 64)) == {
        "object": "list",
        "data": [
            {"id": "tiny", "object": "model", "created": 7, "owned_by": "mi", "max_model_len": 64},
            {"id": "alias", "object": "model", "created": 7, "owned_by": "mi", "max_model_len": 64},
        ],
    }


# -- OpenAI /v1/chat/completions ----------------------------------------------------------------


def test_chat_defaults_and_requests():
    creq = parse_chat({"messages": USER})
    assert creq.model == "tiny" and creq.n == 1 and creq.max_tokens is None and not creq.logprobs
    assert creq.add_generation_prompt and not creq.continue_final_message
    assert creq.messages == [{"role": "user", "content": "hi"}]
    reqs = parse_chat(
        {"messages": USER, "n": 2, "seed": 1, "logprobs": True, "top_logprobs": 0, "stream": True}
    ).generate_requests([0, 5], "chatcmpl-x", 9)
    assert [r.request_id for r in reqs] == ["chatcmpl-x-0", "chatcmpl-x-1"]
    assert all(r.prompt_ids == (0, 5) and r.max_tokens == 9 and r.logprobs == 0 and r.stream for r in reqs)
    assert [r.seed for r in reqs] == [1, 2]


def test_chat_messages_forms():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "developer", "content": "d", "name": "x"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "t", "tool_call_id": "c1"},
    ]
    assert parse_chat({"messages": messages}).messages == [
        {"role": "system", "content": "a\nb"},
        {"role": "developer", "content": "d", "name": "x"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "content": "t", "tool_call_id": "c1"},
    ]


def test_chat_max_completion_tokens_wins_and_ignored_fields_pass():
    body = {
        "messages": USER,
        "max_tokens": 5,
        "max_completion_tokens": 7,
        "metadata": {"a": "b"},
        "store": False,
        "user": "u",
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "modalities": ["text"],
    }
    assert parse_chat(body).max_tokens == 7


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({}, 400, "messages", "missing_required_parameter"),
        ({"messages": []}, 400, "messages", "invalid_value"),
        ({"messages": "hi"}, 400, "messages", "invalid_type"),
        ({"messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
        ({"messages": [{"content": "x"}]}, 400, "messages[0].role", "missing_required_parameter"),
        ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content",
            "unsupported_parameter",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "colour": 1}]},
            400,
            "messages[0].colour",
            "unknown_parameter",
        ),
        ({"messages": USER, "model": "nope"}, 404, "model", "model_not_found"),
        ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"messages": USER, "max_completion_tokens": "5"}, 400, "max_completion_tokens", "invalid_type"),
        ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
        ({"messages": USER, "logprobs": 1}, 400, "logprobs", "invalid_type"),
        (
            {"messages": USER, "response_format": {"type": "xml"}},
            400,
            "response_format.type",
            "invalid_value",
        ),
        (
            {"messages": USER, "response_format": {"type": "json_object"}, "guided_regex": "a+"},
            400,
            "guided_regex",
            "invalid_value",
        ),
        ({"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
        ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice", "unsupported_parameter"),
        ({"messages": USER, "audio": {"voice": "x", "format": "wav"}}, 400, "audio", "unsupported_parameter"),
        ({"messages": USER, "modalities": ["audio"]}, 400, "modalities", "unsupported_parameter"),
        ({"messages": USER, "metadata": "x"}, 400, "metadata", "invalid_type"),
        ({"messages": USER, "n": 0}, 400, "n", "invalid_value"),
        (
            {"messages": USER, "stream_options": {"include_usage": True}},
            400,
            "stream_options",
            "invalid_value",
        ),
        ({"messages": USER, "chat_template_kwargs": []}, 400, "chat_template_kwargs", "invalid_type"),
        (
            {"messages": USER, "continue_final_message": True, "add_generation_prompt": True},
            400,
            "continue_final_message",
            "invalid_value",
        ),
        ({"messages": USER, "echo": True}, 400, "echo", "unknown_parameter"),
    ],
)
def test_chat_rejects(body, status, param, code):
    with pytest.raises(ApiError) as info:
        parse_chat(body)
    err = info.value
    assert (err.status, err.param, err.code) == (status, param, code)


def test_chat_chunks():
    role = wire(
        ChatCompletionChunk(
            id="c", created=1, model="m", choices=[ChatChunkChoice(0, ChatDelta("assistant", ""), None, None)]
        )
    )
    assert role["object"] == "chat.completion.chunk" and role["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }
    last = wire(
        ChatCompletionChunk(
            id="c", created=1, model="m", choices=[ChatChunkChoice(0, ChatDelta(), None, "stop")], usage=None
        )
    )
    assert last["usage"] is None and last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    choice = wire(ChatChoice(1, AssistantMessage(content="hey"), None, "length"))
    assert choice == {
        "index": 1,
        "message": {"role": "assistant", "content": "hey", "refusal": None, "tool_calls": []},
        "logprobs": None,
        "finish_reason": "length",
    }


# -- logprobs -----------------------------------------------------------------------------------


class FakeTexts:
    def token_str(self, token_id: int) -> str:
        return f"<{token_id}>"

    def token_bytes(self, token_id: int) -> bytes:
        return self.token_str(token_id).encode()


def test_completion_logprobs_add_the_chosen_token_and_keep_the_first_null():
    positions = [(1, None), (3, Logprob(3, -0.5, ((4, -0.1),))), (5, Logprob(5, None, ()))]
    obj, end = completion_logprobs(positions, FakeTexts(), 10)
    assert obj == {
        "tokens": ["<1>", "<3>", "<5>"],
        "token_logprobs": [None, -0.5, -9999.0],
        "top_logprobs": [None, {"<4>": -0.1, "<3>": -0.5}, {"<5>": -9999.0}],
        "text_offset": [10, 13, 16],
    }
    assert end == 19


def test_completion_logprobs_keep_the_best_of_tokens_with_equal_text():
    class SameText(FakeTexts):
        def token_str(self, token_id: int) -> str:
            return "?" if token_id in (3, 4) else super().token_str(token_id)

    entry = Logprob(3, -0.5, ((3, -0.5), (7, -0.7), (4, -0.9)))
    obj, _ = completion_logprobs([(3, entry)], SameText(), 0)
    assert obj["top_logprobs"] == [{"?": -0.5, "<7>": -0.7}]


def test_chat_logprobs_give_exactly_top_logprobs_alternatives():
    positions = [(3, Logprob(3, -0.5, ())), (4, Logprob(4, -1.0, ((4, -1.0), (9, -2.0))))]
    obj = chat_logprobs(positions, FakeTexts())
    assert obj["content"][0] == {"token": "<3>", "logprob": -0.5, "bytes": list(b"<3>"), "top_logprobs": []}
    assert [t["token"] for t in obj["content"][1]["top_logprobs"]] == ["<4>", "<9>"]


# -- our OpenAPI document ------------------------------------------------------------------------


def test_openapi_document_refs_resolve():
    doc = openapi_document("9.9")
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == "9.9"
    assert {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/version",
    } <= set(doc["paths"])
    raw = orjson.dumps(doc).decode()
    for ref in set(__import__("re").findall(r'"#/components/schemas/(\w+)"', raw)):
        assert ref in doc["components"]["schemas"], ref


def test_openapi_document_is_the_parsers_own():
    from mi.api.chat import ChatCompletionRequest
    from mi.api.info import DetokenizeRequest, TokenizeRequest
    from mi.api.openai import CompletionRequest

    schemas = openapi_document("9.9")["components"]["schemas"]
    for struct in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
        assert set(schemas[struct.__name__]["properties"]) == set(struct.__struct_fields__), struct
        assert schemas[struct.__name__]["additionalProperties"] is False
    assert {"continue_final_message", "chat_template_kwargs"} <= set(schemas["TokenizeRequest"]["properties"])
    assert "skip_special_tokens" in schemas["DetokenizeRequest"]["properties"]
    temperature = schemas["CompletionRequest"]["properties"]["temperature"]  # SamplingParams' bound
    assert {"type": "number", "minimum": 0.0, "maximum": 2.0} in temperature["anyOf"]
    assert {"type": "null"} in temperature["anyOf"]  # null means the default
    chunk = schemas["CompletionChunk"]
    assert "usage" in chunk["properties"] and "usage" not in chunk["required"]


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


def test_generate_top_p_0_keeps_the_most_likely_token_as_the_frontend_does():
    req = parse_generate_request({"prompt": "a", "top_p": 0, "top_k": -1}, vocab_size=VOCAB)
    assert (req.top_p, req.top_k) == (1.0, 1)
    assert parse_generate_request({"prompt": "a", "top_k": -1}, vocab_size=VOCAB).top_k == 0
