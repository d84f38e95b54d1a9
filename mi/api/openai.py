"""The OpenAI `/v1/completions` protocol: request checks and response builders.

`parse_completion_request` turns a decoded body into a `CompletionRequest`: one backend
`GenerateRequest` per choice, choice `index` = prompt index * n + i. Field names follow the
OpenAI spec (shared/openapi/openai-subset.yaml); the common policy is in openai_common.py.

Completions specifics:
- unknown fields are rejected, as OpenAI itself does ("Unrecognized request argument supplied"):
  a typo such as `max_token` must not silently fall back to a default;
- `best_of` (other than 1) and a non-empty `suffix` are a 400 "not supported";
- `echo` puts the prompt first, and with `logprobs` the prompt's tokens first (the first one's
  logprob null); `max_tokens: 0` is allowed only with `echo` (scoring, as lm-evaluation-harness
  does), and then the backend is asked for prompt logprobs;
- a token-id prompt is used as given (no BOS added); an empty prompt is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from mi.api.backend import GenerateRequest
from mi.api.errors import (
    ApiError,
    as_int,
    invalid,
    read_bool,
    read_int,
    read_str,
    read_token_ids,
    reject_unknown,
    wrong_type,
)
from mi.api.openai_common import (
    SAMPLING_FIELDS,
    Limits,
    check_min_tokens,
    check_model,
    read_max_tokens,
    read_sampling,
    read_stream_options,
    seed_for_choice,
)

__all__ = [
    "CompletionRequest",
    "completion_choice",
    "completion_chunk",
    "completion_response",
    "parse_completion_request",
    "usage_chunk",
]

_FIELDS = SAMPLING_FIELDS | {
    "model", "prompt", "max_tokens", "n", "stream", "stream_options", "user", "best_of", "echo",
    "logprobs", "suffix", "add_special_tokens",
}


def not_supported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported.", param, code="unsupported_parameter")


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completion request: one `GenerateRequest` per choice, in choice order."""

    model: str  # the name to answer with
    prompts: tuple[str | tuple[int, ...], ...]
    n: int
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage and no choices
    generate_requests: tuple[GenerateRequest, ...]


def parse_completion_request(
    body: object,
    *,
    served_names: tuple[str, ...],
    vocab_size: int,
    completion_id: str,
    limits: Limits = Limits(),
) -> CompletionRequest:
    """Check a decoded body; raise `ApiError` (400, or 404 for an unknown model) on the first
    problem. Backend request ids are `{completion_id}-{index}`, so an abort can name them."""
    if not isinstance(body, dict):
        raise wrong_type("body", body, "a JSON object")
    reject_unknown(body, _FIELDS)
    model = check_model(body, served_names)
    read_str(body, "user", None)

    n = read_int(body, "n", 1, 1, limits.max_n)
    best_of = read_int(body, "best_of", None, 1, None)
    if best_of is not None and best_of != 1:
        raise not_supported("best_of", "best_of other than 1")
    if read_str(body, "suffix", ""):
        raise not_supported("suffix", "suffix")
    echo = read_bool(body, "echo", False)
    logprobs = read_int(body, "logprobs", None, 0, limits.max_logprobs)
    stream = read_bool(body, "stream", False)
    include_usage = read_stream_options(body, stream)
    max_tokens = read_max_tokens(body, "max_tokens", min(16, limits.max_tokens or 16), 0, limits)
    if max_tokens == 0 and not echo:
        raise invalid("max_tokens", "'max_tokens' may be 0 only with 'echo' (to score the prompt).")
    sampling = read_sampling(body, vocab_size, limits)
    check_min_tokens(sampling, max_tokens, "max_tokens")
    add_special_tokens = read_bool(body, "add_special_tokens", True)

    prompts = _read_prompts(body.get("prompt"), vocab_size)
    if len(prompts) * n > limits.max_choices:
        raise invalid("prompt", f"At most {limits.max_choices} choices (prompts x n) per request, "
                                f"got {len(prompts)} x {n}.")
    # NOTE: echo with logprobs (or scoring with max_tokens 0) needs the prompt's logprobs.
    prompt_logprobs = None
    if echo and logprobs is not None:
        prompt_logprobs = logprobs
    elif max_tokens == 0:
        prompt_logprobs = 0
    seed = sampling.pop("seed")
    reqs = []
    for prompt_index, prompt in enumerate(prompts):
        for i in range(n):
            index = prompt_index * n + i
            reqs.append(GenerateRequest(
                request_id=f"{completion_id}-{index}",
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_ids=None if isinstance(prompt, str) else prompt,
                add_special_tokens=add_special_tokens,
                max_tokens=max_tokens,
                seed=seed_for_choice(seed, i),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                stream=stream,
                **sampling,
            ))
    return CompletionRequest(model, tuple(prompts), n, echo, logprobs, stream, include_usage, tuple(reqs))


def _read_prompts(value: object, vocab_size: int) -> list[str | tuple[int, ...]]:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    if value is None:
        raise ApiError(400, "'prompt' is required.", "prompt", code="missing_required_parameter")
    expected = "a string, an array of strings, an array of integers or an array of integer arrays"
    if isinstance(value, str):
        prompts = [value]
    elif not isinstance(value, list):
        raise wrong_type("prompt", value, expected)
    elif not value:
        raise invalid("prompt", "'prompt' must not be an empty array.")
    elif all(as_int(v) is not None for v in value):
        prompts = [read_token_ids(value, "prompt", vocab_size, allow_empty=False)]
    elif all(isinstance(v, str) for v in value):
        prompts = list(value)
    elif all(isinstance(v, list) for v in value):
        prompts = [read_token_ids(v, "prompt", vocab_size, allow_empty=False) for v in value]
    else:
        raise wrong_type("prompt", value, expected)
    if any(p == "" for p in prompts):
        raise invalid("prompt", "'prompt' must not be empty.")
    return prompts


# -- answers ------------------------------------------------------------------------------------


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(completion_id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    """The non-streaming body; `choices` built with `completion_choice`, in index order."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def completion_chunk(
    completion_id: str, created: int, model: str, choice: dict, *, include_usage: bool = False
) -> dict:
    """One streamed event: a text delta of one choice (same shape as the full answer)."""
    chunk = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(completion_id: str, created: int, model: str, usage: dict, object_: str = "text_completion") -> dict:
    """The last event when `stream_options.include_usage` is set: no choices, total usage."""
    return {
        "id": completion_id,
        "object": object_,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }
