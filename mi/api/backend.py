"""The backend's internal token-level API (docs/backend-api.md): requests as plain data.

The backend parses `POST /v1/generate` bodies with `parse_generate_request`; its clients (the
frontend and the SDK) build a `GenerateRequest` and send `to_json()`. Answers (`GenerateResult`,
the NDJSON stream lines, `ModelInfo`, `BackendStats`) and their one decoder live in
mi/api/backend_answers.py and are re-exported here, so `mi.api.backend` is the whole wire.

Invariants: nothing here imports aiohttp, torch or asyncio; a parse either returns a fully
checked object or raises `ApiError` (400 naming the field).
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec
from msgspec import Meta

from mi.api.backend_answers import (
    BackendStats,
    GenerateResult,
    Logprob,
    ModelInfo,
    ReplicaStats,
    StreamDecoder,
    StreamDelta,
    StreamStart,
    TokenizerFiles,
    Usage,
    decode_answer,
    encode_answer,
)
from mi.api.errors import ApiError, decode_body, invalid
from mi.api.sampling import INT64_MAX, INT64_MIN, MAX_LOGPROBS, SamplingParams, TokenId

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_LOGPROBS",
    "BackendStats",
    "GenerateRequest",
    "GenerateResult",
    "Logprob",
    "ModelInfo",
    "ReplicaStats",
    "StreamDecoder",
    "StreamDelta",
    "StreamStart",
    "TokenizerFiles",
    "Usage",
    "check_context_len",
    "check_prompt_bytes",
    "decode_answer",
    "encode_answer",
    "new_request_id",
    "parse_generate_request",
]

MAX_REQUEST_ID_LEN = 256


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


class GenerateRequest(SamplingParams, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One `POST /v1/generate` body: the sampling fields (flat, as documented) plus the prompt.

    Exactly one of `prompt` / `prompt_ids` is set. `to_json` sends only fields that differ from
    their defaults, so a request that uses no new feature is also understood by an older backend.
    """

    request_id: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_REQUEST_ID_LEN,
            description="The name of this request in aborts and answers; default: a new unique one.",
        ),
    ] = msgspec.field(default_factory=new_request_id)
    prompt: Annotated[str, Meta(description="The prompt as text (tokenized by the backend).")] | None = None
    prompt_ids: (
        Annotated[
            tuple[TokenId, ...],
            Meta(
                min_length=1,
                description="The prompt as token ids, used as given.",
            ),
        ]
        | None
    ) = None
    add_special_tokens: Annotated[
        bool,
        Meta(
            description="Tokenizing `prompt` adds the model's special tokens (e.g. BOS).",
        ),
    ] = True
    stream: Annotated[bool, Meta(description="Answer with NDJSON lines as tokens arrive.")] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("'prompt': exactly one of 'prompt' and 'prompt_ids' must be given.")

    def to_json(self) -> dict:
        body = msgspec.json.decode(msgspec.json.encode(self))
        body["request_id"] = self.request_id
        body.setdefault("max_tokens", self.max_tokens)
        return body


def parse_generate_request(body: object, *, vocab_size: int) -> GenerateRequest:
    """Check a decoded `/v1/generate` body; raise `ApiError(400, ...)` on the first problem.

    Unknown fields are rejected (a typo must not silently change sampling). The context-length
    rule needs the tokenized prompt: the backend applies `check_context_len` afterwards.
    """
    req = decode_body(body, GenerateRequest)
    req.check_vocab(vocab_size)
    if req.prompt_ids is not None:
        bad = next((token_id for token_id in req.prompt_ids if token_id >= vocab_size), None)
        if bad is not None:
            raise invalid("prompt_ids", f"Token id {bad} in 'prompt_ids' is out of range [0, {vocab_size}).")
    return req


def check_context_len(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """The backend's check once the prompt is tokenized."""
    if prompt_len == 0:
        raise invalid("prompt", "The prompt is empty (it has no tokens).")
    total = prompt_len + max_tokens
    if total > max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {total} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or completion.",
            "prompt",
            code="context_length_exceeded",
        )


def check_prompt_bytes(text: str, max_prompt_bytes: int, max_model_len: int) -> None:
    """The context-length 400 for a text prompt too long to fit, decided before tokenizing it.

    `max_prompt_bytes` (0: no limit) is the backend's `ModelInfo.max_prompt_bytes`: the most
    UTF-8 bytes a prompt of at most `max_model_len` tokens can have (mi/actors/supervisor/
    admission.py derives it). Counting characters first keeps a huge prompt cheap to refuse.
    """
    if not max_prompt_bytes or len(text) * 4 <= max_prompt_bytes:  # UTF-8: <= 4 bytes a character
        return
    num_bytes = len(text) if len(text) > max_prompt_bytes else len(text.encode("utf-8", "surrogatepass"))
    if num_bytes > max_prompt_bytes:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has at least {num_bytes} bytes, more than the {max_prompt_bytes} bytes that can fit in "
            "that context. Please reduce the length of the prompt.",
            "prompt",
            code="context_length_exceeded",
        )
