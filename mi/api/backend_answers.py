"""The backend's answers (docs/backend-api.md) as plain data, checked on the client side.

A generate answer is one `GenerateResult` body, or NDJSON lines: one `StreamStart`, then
`StreamDelta`s, the last carrying `finish_reason` and `usage` (or an `{"error": ...}` line).
A logprob entry stays the JSON object the backend sends,
`{"token_id": int, "logprob": float | None, "top": [[token_id, logprob], ...]}`
(`logprob` is null where the backend had NaN or -inf); `check_logprobs` validates a list of them.

Invariant: every `from_json` / `parse_*` either returns a fully checked object or raises
`ApiError` 502 (a malformed answer), so callers never index into unchecked JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from mi.api.errors import ApiError, is_int

__all__ = [
    "FINISH_REASONS",
    "BackendStats",
    "GenerateResult",
    "LineBuffer",
    "ModelInfo",
    "StreamDelta",
    "StreamStart",
    "Usage",
    "check_logprobs",
    "parse_stream_line",
]

FINISH_REASONS = frozenset({"stop", "length", "abort"})


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


def _is_logprob(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_entry(entry: object, key: str) -> None:
    if not isinstance(entry, dict) or not is_int(entry.get("token_id")) \
            or not _is_logprob(entry.get("logprob")) or not isinstance(entry.get("top"), list):
        raise _bad_answer(key)
    for pair in entry["top"]:
        if not isinstance(pair, list) or len(pair) != 2 or not is_int(pair[0]) or not _is_logprob(pair[1]):
            raise _bad_answer(key)


def check_logprobs(value: object, key: str, *, first_is_null: bool = False) -> list | None:
    """A list of logprob entries (or null); for prompt logprobs the first entry is null."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad_answer(key)
    for index, entry in enumerate(value):
        if first_is_null and index == 0:
            if entry is not None:
                raise _bad_answer(key)
            continue
        _check_entry(entry, key)
    return value


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def to_json(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }

    @classmethod
    def from_json(cls, obj: object) -> "Usage":
        if not isinstance(obj, dict):
            raise _bad_answer("usage")
        values = [obj.get("prompt_tokens"), obj.get("completion_tokens"), obj.get("cached_tokens", 0)]
        if not all(is_int(v) and v >= 0 for v in values):
            raise _bad_answer("usage")
        return cls(*values)


@dataclass(frozen=True)
class GenerateResult:
    """A non-streaming `/v1/generate` answer."""

    request_id: str
    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]  # generated tokens only
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    usage: Usage
    logprobs: list | None = None  # one entry per id in `ids`
    prompt_logprobs: list | None = None  # one entry per prompt token, the first None

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "ids": list(self.ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
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
            logprobs=check_logprobs(obj.get("logprobs"), "logprobs"),
            prompt_logprobs=check_logprobs(obj.get("prompt_logprobs"), "prompt_logprobs", first_is_null=True),
        )


@dataclass(frozen=True)
class StreamStart:
    """First NDJSON line of a streamed `/v1/generate`."""

    request_id: str
    prompt_ids: tuple[int, ...]
    prompt_logprobs: list | None = None

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "prompt_logprobs": self.prompt_logprobs,
        }


@dataclass(frozen=True)
class StreamDelta:
    """A later NDJSON line; the last one has `finish_reason` and `usage` set."""

    ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list | None = None  # entries for this line's `ids`

    def to_json(self) -> dict:
        obj = {"ids": list(self.ids), "text": self.text, "finish_reason": self.finish_reason,
               "logprobs": self.logprobs}
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
        prompt_logprobs = check_logprobs(obj.get("prompt_logprobs"), "prompt_logprobs", first_is_null=True)
        return StreamStart(obj["request_id"], _ids(obj, "prompt_ids"), prompt_logprobs)
    text = obj.get("text")
    if not isinstance(text, str):
        raise _bad_answer("text")
    finish_reason = _finish_reason(obj, required=False)
    usage = None
    if finish_reason is not None and (finish_reason != "abort" or "usage" in obj):
        usage = Usage.from_json(obj.get("usage"))
    return StreamDelta(_ids(obj, "ids"), text, finish_reason, usage, check_logprobs(obj.get("logprobs"), "logprobs"))


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


_STATS_COUNTS = (
    "num_requests_running", "num_requests_waiting", "num_kv_blocks", "num_kv_blocks_used",
    "num_preemptions", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens",
    "prompt_tokens_total", "generation_tokens_total",
)


@dataclass(frozen=True)
class BackendStats:
    """`GET /v1/stats`, summed over replicas. A missing counter reads 0."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_kv_blocks: int = 0
    num_kv_blocks_used: int = 0
    num_preemptions: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: tuple[tuple[str, int], ...] = ()  # (finish reason, count)

    @classmethod
    def from_json(cls, obj: object) -> "BackendStats":
        if not isinstance(obj, dict):
            raise _bad_answer("stats is not an object")
        counts = {}
        for key in _STATS_COUNTS:
            value = obj.get(key, 0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise _bad_answer(key)
            counts[key] = int(value)
        finished = obj.get("requests_finished_total") or {}
        if not isinstance(finished, dict) or not all(
            isinstance(k, str) and is_int(v) and v >= 0 for k, v in finished.items()
        ):
            raise _bad_answer("requests_finished_total")
        return cls(**counts, requests_finished_total=tuple(sorted(finished.items())))


class LineBuffer:
    """Splits an NDJSON byte stream into lines, whatever the chunking (no line-length limit)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The complete non-blank lines `data` finishes."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [line for line in lines if line.strip()]

    def rest(self) -> bytes | None:
        """The last line when the stream ended without a newline, else None."""
        rest, self._buf = self._buf, b""
        return rest if rest.strip() else None
