"""What `/v1/completions` and `/v1/chat/completions` share: the sampling fields of a request,
`stream_options`, the server's limits, the model check, usage and the model list.

The sampling fields are `SamplingParams`' own declarations (bounds and descriptions included):
`sampling_base` copies them into a base Struct that each endpoint's request extends, leaving out
the ones whose OpenAI meaning differs, which that request declares itself (`max_tokens`;
chat's `logprobs`; `prompt_logprobs`, which OpenAI has not). `to_generate_request` is the one way
back: the copied fields plus what the endpoint resolved make a backend `GenerateRequest`.

Policy on fields (each failure a 400 with the OpenAI error body naming the field):
- `null` means the default for every optional top-level field;
- numbers are strict JSON types (a bool is not an int, "7" is not a number);
- extensions follow vLLM's names: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
  `ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`;
- `Limits` (flags of mi-frontend) are checked after decoding, as they differ per server.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from mi.api.backend import GenerateRequest
from mi.api.errors import ApiError, invalid, validation_error
from mi.api.sampling import INT64_MIN, MAX_LOGPROBS, SamplingParams
from mi.api.structured import GUIDED_FIELDS, ResponseFormat, StructuredOutputs, resolve

__all__ = [
    "CompletionUsage",
    "Limits",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "StreamOptions",
    "check_limits",
    "check_model",
    "model_list",
    "new_id",
    "sampling_base",
    "seed_for_choice",
    "to_generate_request",
    "usage_info",
]

# Declared by each endpoint, because OpenAI's meaning differs from the backend's.
_OWN_FIELDS = frozenset({"max_tokens", "logprobs", "prompt_logprobs"})


def sampling_base(name: str, *, keep: frozenset[str] = frozenset()) -> type[msgspec.Struct]:
    """A frozen Struct with `SamplingParams`' fields, except `max_tokens`, `logprobs` and
    `prompt_logprobs` (unless named in `keep`): the base of an OpenAI request."""
    fields = []
    for f in msgspec.structs.fields(SamplingParams):
        if f.name in _OWN_FIELDS - keep:
            continue
        default = (
            f.default
            if f.default is not msgspec.NODEFAULT
            else msgspec.field(default_factory=f.default_factory)
        )
        fields.append((f.name, f.type, default))
    fields += _CONSTRAINT_FIELDS
    return msgspec.defstruct(name, fields, frozen=True, forbid_unknown_fields=True, module=__name__)


# The OpenAI and older vLLM ways to ask for what `structured_outputs` asks (mi/api/structured.py):
# `guided_json` etc. take the type of the structured_outputs field they name.
_STRUCTURED_TYPES = {f.name: f.type for f in msgspec.structs.fields(StructuredOutputs)}
_CONSTRAINT_FIELDS = [
    (
        "response_format",
        Annotated[
            ResponseFormat | None,
            Meta(description="text, json_object (some JSON object) or json_schema (following its schema)."),
        ],
        None,
    ),
    *((name, _STRUCTURED_TYPES[kind], None) for name, kind in GUIDED_FIELDS.items()),
]


def to_generate_request(req: msgspec.Struct, **resolved) -> GenerateRequest:
    """A backend request from the sampling fields of `req` (an OpenAI request) and what the
    endpoint `resolved` (max_tokens, logprobs, prompt, ...); a rule between fields that only now
    holds (min_tokens > max_tokens) is a 400."""
    fields = {
        name: getattr(req, name) for name in SamplingParams.__struct_fields__ if name not in _OWN_FIELDS
    }
    fields["structured_outputs"] = resolve(req)
    try:
        return GenerateRequest(**(fields | resolved))
    except ValueError as exc:  # SamplingParams.__post_init__
        raise validation_error(str(exc)) from None


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Options of a streamed answer (only with `stream: true`)."""

    include_usage: Annotated[
        bool,
        Meta(
            description="Send one more chunk before [DONE], with no choices and the usage of the "
            "whole request; every other chunk then has `usage: null`.",
        ),
    ] = False
    include_obfuscation: Annotated[bool, Meta(description="Accepted and ignored.")] = False


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


def check_limits(
    limits: Limits,
    *,
    n: int,
    stop: str | tuple[str, ...],
    logprobs: int | None,
    logprobs_param: str,
    max_tokens: int | None,
    max_tokens_param: str,
) -> None:
    """The limits of this server on a decoded request (400 naming the field)."""
    if n > limits.max_n:
        raise invalid("n", f"'n' must be at most {limits.max_n} on this server, got {n}.")
    num_stop = 1 if isinstance(stop, str) else len(stop)
    if num_stop > limits.max_stop:
        raise invalid(
            "stop", f"'stop' may hold at most {limits.max_stop} strings on this server, got {num_stop}."
        )
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise invalid(
            logprobs_param,
            f"'{logprobs_param}' must be at most {limits.max_logprobs} on this server, got {logprobs}.",
        )
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise invalid(
            max_tokens_param,
            f"'{max_tokens_param}' must be at most {limits.max_tokens} on this server, got {max_tokens}.",
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(model: str | None, served_names: tuple[str, ...]) -> str:
    """The name to answer with: `model` when it is served (404 otherwise), else the first served
    name. `model` is optional (the seed's examples have none)."""
    if model is None:
        return served_names[0]
    if model not in served_names:
        raise ApiError(404, f"The model '{model[:100]}' does not exist.", "model", code="model_not_found")
    return model


def seed_for_choice(seed: int | None, index: int) -> int | None:
    """Choice `index` of one prompt samples with `seed + index` (wrapped into int64), so n > 1
    gives different samples and the same request gives the same ones."""
    if seed is None:
        return None
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


# -- answers ------------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: Annotated[int, Meta(description="Prompt tokens whose KV came from the prefix cache.")]


class CompletionUsage(msgspec.Struct, frozen=True):
    """Tokens of a whole request: each prompt once, every choice's generated tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
        PromptTokensDetails(cached_tokens),
    )


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """One served model name (an alias of the backend's model, or its own name)."""

    id: str
    object: Literal["model"] = "model"
    created: Annotated[int, Meta(description="When this frontend started (Unix seconds).")]
    owned_by: Literal["mi"] = "mi"
    max_model_len: Annotated[int, Meta(description="Prompt plus generated tokens, at most.")]


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_list(served_names: tuple[str, ...], created: int, max_model_len: int) -> ModelList:
    return ModelList(
        data=[ModelCard(id=name, created=created, max_model_len=max_model_len) for name in served_names]
    )
