"""The OpenAI `/v1/completions` protocol: request checks and response builders.

`parse_completion_request` turns a decoded body into a `CompletionRequest`: one backend
`GenerateRequest` per prompt (choice `index` = prompt index). Field names follow the OpenAI spec
(shared/openapi/openai-subset.yaml).

Policy on fields (each answer a 400 with the OpenAI error body):
- unknown fields are rejected, as OpenAI itself does ("Unrecognized request argument supplied"):
  a typo such as `max_token` must not silently fall back to a default;
- known fields we do not implement yet (`n` > 1, `best_of` > 1, `echo`, `logprobs`, `suffix`,
  penalties, `logit_bias`) are accepted only with their no-op value;
- extensions (vLLM names): `top_k`, `ignore_eos`, `stop_token_ids`;
- `null` means the default for every optional field (`max_tokens: null` is 16).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from mi.api.backend import GenerateRequest, read_stop
from mi.api.errors import (
    ApiError,
    invalid,
    is_int,
    read_bool,
    read_float,
    read_int,
    read_str,
    read_token_ids,
    reject_unknown,
    wrong_type,
)

__all__ = [
    "CompletionRequest",
    "completion_chunk",
    "completion_response",
    "model_list",
    "new_completion_id",
    "parse_completion_request",
    "usage_chunk",
]

MAX_NUM_STOP = 4  # OpenAI's limit
DEFAULT_MAX_PROMPTS = 256

_SUPPORTED = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
    "stream_options", "user", "best_of", "echo", "logprobs", "suffix", "frequency_penalty",
    "presence_penalty", "logit_bias",
    "top_k", "ignore_eos", "stop_token_ids",  # extensions
})


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def not_supported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported yet.", param, code="unsupported_parameter")


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completion request: one `GenerateRequest` per prompt, in prompt order."""

    model: str  # the served model name (the request's `model` was checked against it)
    generate_requests: tuple[GenerateRequest, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage and no choices


def parse_completion_request(
    body: object,
    *,
    model_name: str,
    vocab_size: int,
    completion_id: str,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
) -> CompletionRequest:
    """Check a decoded body; raise `ApiError` (400, or 404 for an unknown model) on the first problem.

    Backend request ids are `{completion_id}-{index}`, so an abort can name them.
    """
    if not isinstance(body, dict):
        raise wrong_type("body", body, "a JSON object")
    reject_unknown(body, _SUPPORTED)

    model = read_str(body, "model", None)
    if model is not None and model != model_name:
        raise ApiError(
            404, f"The model '{model[:100]}' does not exist.", "model", code="model_not_found"
        )
    read_str(body, "user", None)
    _check_unsupported(body)

    stream = read_bool(body, "stream", False)
    include_usage = _read_stream_options(body.get("stream_options"), stream)
    template = GenerateRequest(
        max_tokens=read_int(body, "max_tokens", 16, 1, 2**31 - 1),
        temperature=read_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=read_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=read_int(body, "top_k", 0, -1, 2**31 - 1),
        seed=read_int(body, "seed", None, -(2**63), 2**63 - 1),
        stop=read_stop(body.get("stop"), "stop", MAX_NUM_STOP),
        stop_token_ids=read_token_ids(
            [] if body.get("stop_token_ids") is None else body["stop_token_ids"],
            "stop_token_ids", vocab_size, allow_empty=True,
        ),
        ignore_eos=read_bool(body, "ignore_eos", False),
        stream=stream,
    )
    prompts = _read_prompts(body.get("prompt"), vocab_size, max_prompts)
    reqs = tuple(
        dataclasses.replace(
            template,
            request_id=f"{completion_id}-{index}",
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_ids=None if isinstance(prompt, str) else prompt,
        )
        for index, prompt in enumerate(prompts)
    )
    return CompletionRequest(model_name, reqs, stream, include_usage)


def _check_unsupported(body: dict) -> None:
    n = read_int(body, "n", 1, 1, 128)
    if n != 1:
        raise not_supported("n", "n other than 1")
    best_of = read_int(body, "best_of", 1, 0, 20)
    if best_of < n:
        raise invalid("best_of", "'best_of' must be at least 'n'.")
    if best_of != 1:
        raise not_supported("best_of", "best_of greater than 1")
    if read_bool(body, "echo", False):
        raise not_supported("echo", "echo")
    if read_int(body, "logprobs", None, 0, 5) is not None:
        raise not_supported("logprobs", "logprobs")
    if read_str(body, "suffix", ""):
        raise not_supported("suffix", "suffix")
    for key in ("frequency_penalty", "presence_penalty"):
        if read_float(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise not_supported(key, key)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise wrong_type("logit_bias", logit_bias, "an object")
    if logit_bias:
        raise not_supported("logit_bias", "logit_bias")


def _read_stream_options(value: object, stream: bool) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise wrong_type("stream_options", value, "an object")
    if not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    reject_unknown(value, frozenset({"include_usage", "include_obfuscation"}))
    read_bool(value, "include_obfuscation", False)
    return read_bool(value, "include_usage", False)


def _read_prompts(value: object, vocab_size: int, max_prompts: int) -> list[str | tuple[int, ...]]:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    if value is None:
        raise ApiError(400, "'prompt' is required.", "prompt", code="missing_required_parameter")
    if isinstance(value, str):
        return [value]
    expected = "a string, an array of strings, an array of integers or an array of integer arrays"
    if not isinstance(value, list):
        raise wrong_type("prompt", value, expected)
    if not value:
        raise invalid("prompt", "'prompt' must not be an empty array.")
    if all(is_int(v) for v in value):
        return [read_token_ids(value, "prompt", vocab_size, allow_empty=False)]
    if len(value) > max_prompts:
        raise invalid("prompt", f"At most {max_prompts} prompts per request, got {len(value)}.")
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(isinstance(v, list) for v in value):
        return [read_token_ids(v, "prompt", vocab_size, allow_empty=False) for v in value]
    raise wrong_type("prompt", value, expected)


# -- answers ------------------------------------------------------------------------------------


def completion_response(
    completion_id: str,
    created: int,
    model: str,
    choices: list[tuple[str, str]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict:
    """The non-streaming body; `choices[i]` is `(text, finish_reason)` of prompt `i`."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            for index, (text, finish_reason) in enumerate(choices)
        ],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    completion_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    *,
    include_usage: bool = False,
) -> dict:
    """One streamed event: a text delta of choice `index` (same shape as the full answer)."""
    chunk = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(
    completion_id: str, created: int, model: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    """The last event when `stream_options.include_usage` is set: no choices, total usage."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def model_list(model_name: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "mi"}],
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
