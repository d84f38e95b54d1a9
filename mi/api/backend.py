"""The backend's internal token-level API (docs/backend-api.md): requests as plain data.

The backend parses `POST /v1/generate` bodies with `parse_generate_request`; its clients (the
frontend and the SDK) build a `GenerateRequest` and send `to_json()`. Answers (`GenerateResult`,
the NDJSON stream lines, `ModelInfo`, `BackendStats`) live in mi/api/backend_answers.py and are
re-exported here.

Invariants: nothing here imports aiohttp, torch or asyncio; a parse either returns a fully
checked object or raises `ApiError` (400 naming the field).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field

from mi.api.backend_answers import (
    FINISH_REASONS,
    BackendStats,
    GenerateResult,
    LineBuffer,
    ModelInfo,
    StreamDelta,
    StreamStart,
    Usage,
    parse_stream_line,
)
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
    "FINISH_REASONS",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_LOGPROBS",
    "BackendStats",
    "GenerateRequest",
    "GenerateResult",
    "LineBuffer",
    "ModelInfo",
    "StreamDelta",
    "StreamStart",
    "Usage",
    "check_context_len",
    "new_request_id",
    "parse_generate_request",
    "parse_stream_line",
    "read_logit_bias",
    "read_stop",
    "socket_path",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_REQUEST_ID_LEN = 256
MAX_NUM_STOP = 16  # stop strings per request; the OpenAI frontend allows 4
MAX_LOGPROBS = 20  # top alternatives per position
MAX_LOGIT_BIAS = 1024  # entries in logit_bias


def socket_path(port: int) -> str:
    """The unix socket a backend serving TCP `port` also listens on."""
    return os.path.join(tempfile.gettempdir(), f"mi-backend-{port}.sock")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class GenerateRequest:
    """One `POST /v1/generate` body; exactly one of `prompt` / `prompt_ids` is set.

    Defaults are the documented ones; `to_json` sends only fields that differ from them, so a
    request that uses no new feature is also understood by an older backend.
    """

    request_id: str = field(default_factory=new_request_id)
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    add_special_tokens: bool = True
    max_tokens: int = 16  # 0: score the prompt only (needs prompt_logprobs)
    min_tokens: int = 0  # EOS and stop_token_ids are blocked before this many tokens
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids unique
    seed: int | None = None
    logprobs: int | None = None  # top alternatives per generated token
    prompt_logprobs: int | None = None  # top alternatives per prompt token
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False

    def to_json(self) -> dict:
        body: dict = {"request_id": self.request_id}
        if self.prompt_ids is not None:
            body["prompt_ids"] = list(self.prompt_ids)
        else:
            body["prompt"] = self.prompt
        body["max_tokens"] = self.max_tokens
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                body[name] = value
        if self.logit_bias:
            body["logit_bias"] = {str(token_id): bias for token_id, bias in self.logit_bias}
        for name in ("stop", "stop_token_ids"):
            if getattr(self, name):
                body[name] = list(getattr(self, name))
        return body


_GENERATE_FIELDS = frozenset(GenerateRequest.__dataclass_fields__)
_DEFAULTS = {name: f.default for name, f in GenerateRequest.__dataclass_fields__.items()}
_OPTIONAL_FIELDS = (
    "add_special_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logprobs",
    "prompt_logprobs", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "stream",
)


def parse_generate_request(body: object, *, vocab_size: int) -> GenerateRequest:
    """Check a decoded `/v1/generate` body; raise `ApiError(400, ...)` on the first problem.

    Unknown fields are rejected (a typo must not silently change sampling). The context-length
    rule needs the tokenized prompt: the backend applies `check_context_len` afterwards.
    """
    if not isinstance(body, dict):
        raise wrong_type("body", body, "a JSON object")
    reject_unknown(body, _GENERATE_FIELDS)

    prompt, prompt_ids = body.get("prompt"), body.get("prompt_ids")
    if (prompt is None) == (prompt_ids is None):
        raise ApiError(400, "Exactly one of 'prompt' and 'prompt_ids' must be given.", "prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise wrong_type("prompt", prompt, "a string")
    if prompt_ids is not None:
        prompt_ids = read_token_ids(prompt_ids, "prompt_ids", vocab_size, allow_empty=False)

    request_id = read_str(body, "request_id", None)
    if request_id is None:
        request_id = new_request_id()
    elif not 0 < len(request_id) <= MAX_REQUEST_ID_LEN:
        raise invalid("request_id", f"'request_id' must have 1 to {MAX_REQUEST_ID_LEN} characters.")

    max_tokens = read_int(body, "max_tokens", 16, 0, INT64_MAX)
    min_tokens = read_int(body, "min_tokens", 0, 0, INT64_MAX)
    prompt_logprobs = read_int(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
    if max_tokens == 0 and prompt_logprobs is None:
        raise invalid("max_tokens", "'max_tokens' 0 only scores the prompt: it needs 'prompt_logprobs'.")
    if min_tokens > max_tokens:
        raise invalid("min_tokens", f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens}).")
    return GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=prompt_ids,
        add_special_tokens=read_bool(body, "add_special_tokens", True),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=read_float(body, "temperature", 1.0, 0.0),
        top_p=read_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=read_int(body, "top_k", 0, INT64_MIN, INT64_MAX),
        min_p=read_float(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=read_float(body, "repetition_penalty", 1.0, 0.0, lo_open=True),
        presence_penalty=read_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=read_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=read_logit_bias(body.get("logit_bias"), "logit_bias", vocab_size),
        seed=read_int(body, "seed", None, INT64_MIN, INT64_MAX),
        logprobs=read_int(body, "logprobs", None, 0, MAX_LOGPROBS),
        prompt_logprobs=prompt_logprobs,
        stop=read_stop(body.get("stop"), "stop", MAX_NUM_STOP),
        include_stop_str_in_output=read_bool(body, "include_stop_str_in_output", False),
        stop_token_ids=read_token_ids(
            _or_empty(body.get("stop_token_ids")), "stop_token_ids", vocab_size, allow_empty=True
        ),
        ignore_eos=read_bool(body, "ignore_eos", False),
        skip_special_tokens=read_bool(body, "skip_special_tokens", True),
        stream=read_bool(body, "stream", False),
    )


def _or_empty(value: object) -> object:
    return [] if value is None else value


def read_stop(value: object, param: str, max_num: int) -> tuple[str, ...]:
    """`null`, a string, or an array of at most `max_num` non-empty strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise wrong_type(param, value, "a string or an array of strings")
    if len(stops) > max_num:
        raise invalid(param, f"'{param}' may hold at most {max_num} strings, got {len(stops)}.")
    if any(not s for s in stops):
        raise invalid(param, f"'{param}' must not contain an empty string.")
    return tuple(stops)


def read_logit_bias(value: object, param: str, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`null` or `{token id: bias}`: ids as decimal strings (JSON keys) or ints, bias in [-100, 100]."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise wrong_type(param, value, "an object mapping token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(param, f"'{param}' may hold at most {MAX_LOGIT_BIAS} entries, got {len(value)}.")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit() and len(key) <= 20:
            token_id = int(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            token_id = key
        else:
            raise invalid(param, f"'{param}' keys must be token ids, got {str(key)[:40]!r}.")
        if not 0 <= token_id < vocab_size:
            raise invalid(param, f"Token id {token_id} in '{param}' is out of range [0, {vocab_size}).")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool):
            raise wrong_type(param, bias, "an object mapping token ids to numbers")
        if not -100.0 <= bias <= 100.0:  # NaN fails too
            raise invalid(param, f"'{param}' values must be in [-100, 100], got {bias!r}.")
        pairs[token_id] = float(bias)
    return tuple(sorted(pairs.items()))


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
