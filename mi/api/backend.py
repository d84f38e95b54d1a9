"""The backend's internal token-level API (docs/backend-api.md) as plain data.

The backend parses `POST /v1/generate` bodies with `parse_generate_request`; its clients (the
frontend and the SDK) build a `GenerateRequest` and send `to_json()`. Responses travel as
`GenerateResult` (one JSON body) or as NDJSON lines: one `StreamStart`, then `StreamDelta`s, the
last one carrying `finish_reason` and `usage` (or an `{"error": ...}` line instead).

Invariants: nothing here imports aiohttp, torch or asyncio; every `from_json` either returns a
fully checked object or raises `ApiError` (400 for a client body, 502 for a malformed answer).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field

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
    "FINISH_REASONS",
    "GenerateRequest",
    "GenerateResult",
    "ModelInfo",
    "StreamDelta",
    "StreamStart",
    "Usage",
    "check_context_len",
    "new_request_id",
    "parse_generate_request",
    "parse_stream_line",
    "socket_path",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_REQUEST_ID_LEN = 256
MAX_NUM_STOP = 16  # stop strings per request; the OpenAI frontend allows 4
FINISH_REASONS = frozenset({"stop", "length", "abort"})


def socket_path(port: int) -> str:
    """The unix socket a backend serving TCP `port` also listens on."""
    return os.path.join(tempfile.gettempdir(), f"mi-backend-{port}.sock")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class GenerateRequest:
    """One `POST /v1/generate` body; exactly one of `prompt` / `prompt_ids` is set."""

    request_id: str = field(default_factory=new_request_id)
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    add_special_tokens: bool = True
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False

    def to_json(self) -> dict:
        body = {
            "request_id": self.request_id,
            "add_special_tokens": self.add_special_tokens,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "stream": self.stream,
        }
        if self.prompt_ids is not None:
            body["prompt_ids"] = list(self.prompt_ids)
        else:
            body["prompt"] = self.prompt
        return body


_GENERATE_FIELDS = frozenset(GenerateRequest.__dataclass_fields__)


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

    return GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=prompt_ids,
        add_special_tokens=read_bool(body, "add_special_tokens", True),
        max_tokens=read_int(body, "max_tokens", 16, 1, INT64_MAX),
        temperature=read_float(body, "temperature", 1.0, 0.0),
        top_p=read_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=read_int(body, "top_k", 0, INT64_MIN, INT64_MAX),
        seed=read_int(body, "seed", None, INT64_MIN, INT64_MAX),
        stop=read_stop(body.get("stop"), "stop", MAX_NUM_STOP),
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


# -- answers (checked on the client side) -------------------------------------------------------


def _bad_answer(what: str) -> ApiError:
    return ApiError(502, f"The backend sent an invalid response ({what}).", code="bad_backend_response")


def _ids(obj: dict, key: str) -> tuple[int, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not all(is_int(i) for i in value):
        raise _bad_answer(key)
    return tuple(value)


def _finish_reason(obj: dict, *, required: bool) -> str | None:
    value = obj.get("finish_reason")
    if value is None and not required:
        return None
    if value not in FINISH_REASONS:
        raise _bad_answer("finish_reason")
    return value


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @classmethod
    def from_json(cls, obj: object) -> "Usage":
        if not isinstance(obj, dict):
            raise _bad_answer("usage")
        prompt_tokens, completion_tokens = obj.get("prompt_tokens"), obj.get("completion_tokens")
        if not (is_int(prompt_tokens) and is_int(completion_tokens)):
            raise _bad_answer("usage")
        return cls(prompt_tokens, completion_tokens)


@dataclass(frozen=True)
class GenerateResult:
    """A non-streaming `/v1/generate` answer."""

    request_id: str
    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]  # generated tokens only
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    usage: Usage

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "ids": list(self.ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_json(),
        }

    @classmethod
    def from_json(cls, obj: object) -> "GenerateResult":
        if not isinstance(obj, dict):
            raise _bad_answer("not an object")
        request_id, text = obj.get("request_id"), obj.get("text")
        if not isinstance(request_id, str) or not isinstance(text, str):
            raise _bad_answer("request_id or text")
        return cls(
            request_id=request_id,
            prompt_ids=_ids(obj, "prompt_ids"),
            ids=_ids(obj, "ids"),
            text=text,
            finish_reason=_finish_reason(obj, required=True),
            usage=Usage.from_json(obj.get("usage")),
        )


@dataclass(frozen=True)
class StreamStart:
    """First NDJSON line of a streamed `/v1/generate`."""

    request_id: str
    prompt_ids: tuple[int, ...]

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "prompt_ids": list(self.prompt_ids)}


@dataclass(frozen=True)
class StreamDelta:
    """A later NDJSON line; the last one has `finish_reason` and `usage` set."""

    ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None

    def to_json(self) -> dict:
        obj = {"ids": list(self.ids), "text": self.text, "finish_reason": self.finish_reason}
        if self.usage is not None:
            obj["usage"] = self.usage.to_json()
        return obj


def parse_stream_line(obj: object) -> StreamStart | StreamDelta:
    """Decode one NDJSON line; an `{"error": ...}` line is raised as the `ApiError` it carries."""
    if not isinstance(obj, dict):
        raise _bad_answer("stream line is not an object")
    if "error" in obj:
        err = obj["error"]
        is_client_error = isinstance(err, dict) and err.get("type") == "invalid_request_error"
        raise ApiError.from_body(400 if is_client_error else 500, obj)
    if "request_id" in obj:
        if not isinstance(obj["request_id"], str):
            raise _bad_answer("request_id")
        return StreamStart(obj["request_id"], _ids(obj, "prompt_ids"))
    text = obj.get("text")
    if not isinstance(text, str):
        raise _bad_answer("text")
    finish_reason = _finish_reason(obj, required=False)
    usage = None
    if finish_reason is not None and (finish_reason != "abort" or "usage" in obj):
        usage = Usage.from_json(obj.get("usage"))
    return StreamDelta(_ids(obj, "ids"), text, finish_reason, usage)


@dataclass(frozen=True)
class ModelInfo:
    """`GET /v1/model`. Only the first three fields are required from the backend."""

    model_name: str
    max_model_len: int
    vocab_size: int
    architecture: str = ""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tp: int = 1
    num_replicas: int = 1
    block_size: int = 0
    num_kv_blocks: int = 0

    def to_json(self) -> dict:
        obj = {name: getattr(self, name) for name in self.__dataclass_fields__}
        obj["eos_token_ids"] = list(self.eos_token_ids)
        return obj

    @classmethod
    def from_json(cls, obj: object) -> "ModelInfo":
        if not isinstance(obj, dict):
            raise _bad_answer("model info is not an object")
        name = obj.get("model_name")
        if not isinstance(name, str) or not name:
            raise _bad_answer("model_name")
        ints = {}
        for key in ("max_model_len", "vocab_size", "tp", "num_replicas", "block_size", "num_kv_blocks"):
            value = obj.get(key, cls.__dataclass_fields__[key].default)
            if not is_int(value) or value < 0:
                raise _bad_answer(key)
            ints[key] = value
        bos = obj.get("bos_token_id")
        return cls(
            model_name=name,
            architecture=obj.get("architecture") if isinstance(obj.get("architecture"), str) else "",
            bos_token_id=bos if is_int(bos) else None,
            eos_token_ids=_ids(obj, "eos_token_ids") if "eos_token_ids" in obj else (),
            **ints,
        )
