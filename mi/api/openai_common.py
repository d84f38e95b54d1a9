"""What `/v1/completions` and `/v1/chat/completions` share: limits, the model check, the
sampling fields, `stream_options`, usage and the model list.

Policy on fields (each failure a 400 with the OpenAI error body naming the field):
- `null` means the default for every optional field;
- numbers are strict JSON types (a bool is not an int, "7" is not a number);
- extensions follow vLLM's names: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
  `ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from mi.api.backend import INT64_MAX, INT64_MIN, MAX_LOGPROBS, read_logit_bias, read_stop
from mi.api.errors import (
    ApiError,
    invalid,
    read_bool,
    read_float,
    read_int,
    read_str,
    read_token_ids,
    reject_unknown,
    wrong_type,
)

__all__ = [
    "SAMPLING_FIELDS",
    "Limits",
    "check_model",
    "model_list",
    "new_id",
    "read_sampling",
    "read_stream_options",
    "seed_for_choice",
    "usage_json",
]

# Fields `read_sampling` reads, shared by both endpoints.
SAMPLING_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "ignore_eos",
    "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
})


@dataclass(frozen=True)
class Limits:
    """Per-request limits of the frontend (each a flag of mi-frontend)."""

    max_n: int = 64  # choices per prompt
    max_choices: int = 256  # prompts x n in one request
    max_stop: int = 16  # stop strings
    max_logprobs: int = MAX_LOGPROBS  # top alternatives per position
    max_tokens: int | None = None  # generated tokens per choice; None: the context decides

    def __post_init__(self) -> None:
        if self.max_n < 1 or self.max_choices < 1 or self.max_stop < 0:
            raise ValueError("max_n >= 1, max_choices >= 1 and max_stop >= 0 are required")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(body: dict, served_names: tuple[str, ...]) -> str:
    """The name to answer with: the request's `model` when it is served (404 otherwise), else the
    first served name. `model` is optional (the seed's examples have none)."""
    model = read_str(body, "model", None)
    if model is None:
        return served_names[0]
    if model not in served_names:
        raise ApiError(404, f"The model '{model[:100]}' does not exist.", "model", code="model_not_found")
    return model


def read_stream_options(body: dict, stream: bool) -> bool:
    """`stream_options.include_usage`; `stream_options` without `stream: true` is a 400."""
    value = body.get("stream_options")
    if value is None:
        return False
    if not isinstance(value, dict):
        raise wrong_type("stream_options", value, "an object")
    if not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    reject_unknown(value, frozenset({"include_usage", "include_obfuscation"}))
    read_bool(value, "include_obfuscation", False)
    return read_bool(value, "include_usage", False)


def read_sampling(body: dict, vocab_size: int, limits: Limits) -> dict:
    """The sampling fields as `GenerateRequest` keyword arguments. `top_p` 0 (allowed by the
    OpenAI spec) keeps the most likely token only, as `top_k` 1 does."""
    top_k = read_int(body, "top_k", 0, -1, 2**31 - 1)
    top_p = read_float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        top_p, top_k = 1.0, 1
    return dict(
        temperature=read_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=read_float(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=read_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=read_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=read_float(body, "repetition_penalty", 1.0, 0.0, lo_open=True),
        logit_bias=dict(read_logit_bias(body.get("logit_bias"), "logit_bias", vocab_size)),
        seed=read_int(body, "seed", None, INT64_MIN, INT64_MAX),
        stop=read_stop(body.get("stop"), "stop", limits.max_stop),
        stop_token_ids=read_token_ids(
            [] if body.get("stop_token_ids") is None else body["stop_token_ids"],
            "stop_token_ids", vocab_size, allow_empty=True,
        ),
        ignore_eos=read_bool(body, "ignore_eos", False),
        min_tokens=read_int(body, "min_tokens", 0, 0, 2**31 - 1),
        skip_special_tokens=read_bool(body, "skip_special_tokens", True),
        include_stop_str_in_output=read_bool(body, "include_stop_str_in_output", False),
    )


def read_max_tokens(body: dict, key: str, default: int | None, lo: int, limits: Limits) -> int | None:
    value = read_int(body, key, default, lo, 2**31 - 1)
    if value is not None and limits.max_tokens is not None and value > limits.max_tokens:
        raise invalid(key, f"'{key}' must be at most {limits.max_tokens} on this server, got {value}.")
    return value


def check_min_tokens(sampling: dict, max_tokens: int | None, key: str) -> None:
    if max_tokens is not None and sampling["min_tokens"] > max_tokens:
        raise invalid("min_tokens", f"'min_tokens' must not exceed '{key}' ({max_tokens}).")


def seed_for_choice(seed: int | None, index: int) -> int | None:
    """Choice `index` of one prompt samples with `seed + index` (wrapped into int64), so n > 1
    gives different samples and the same request gives the same ones."""
    if seed is None:
        return None
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def model_list(served_names: tuple[str, ...], created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_card(name, created, max_model_len) for name in served_names]}


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "mi", "max_model_len": max_model_len}
