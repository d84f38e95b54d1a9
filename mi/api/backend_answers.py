"""The backend's answers (docs/backend-api.md) as msgspec Structs, and the one decoder for them.

A generate answer is one `GenerateResult` body, or NDJSON lines: one `StreamStart`, then
`StreamDelta`s, the last carrying `finish_reason` and `usage` (an abort may lack it), or an
`{"error": ...}` line. A `Logprob` entry is `{"token_id", "logprob", "top": [[token_id,
logprob], ...]}`; a logprob is null where the backend had NaN or -inf (msgspec writes a
non-finite float as null).

The backend (mi/actors/supervisor/server.py) writes these with `encode_answer`; its clients (the
SDK's transport, which the frontend uses too) read every body with `decode_answer` and every
stream with one `StreamDecoder`.

Invariants: a decode returns a fully checked Struct or raises `ApiError`: the error an
`{"error": ...}` line carries, else 502 `bad_backend_response`; callers never index into
unchecked JSON. Answers ignore fields they do not know (a newer backend may add some), unlike
requests.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from mi.api.errors import ApiError
from mi.api.sampling import TokenId

__all__ = [
    "BackendStats",
    "FinishReason",
    "GenerateResult",
    "Logprob",
    "ModelInfo",
    "ReplicaStats",
    "StreamDecoder",
    "StreamDelta",
    "StreamStart",
    "TokenizerFiles",
    "Usage",
    "decode_answer",
    "encode_answer",
]

T = TypeVar("T")

FinishReason = Literal["stop", "length", "abort"]
Count = Annotated[int, Meta(ge=0)]
MAX_TOKENIZER_FILES = 32


class Logprob(msgspec.Struct, frozen=True):
    """One position: the token, its logprob (None: NaN or -inf), and the top alternatives,
    best first, exactly as many as asked (the chosen token may or may not be among them)."""

    token_id: TokenId
    logprob: float | None
    top: tuple[tuple[TokenId, float | None], ...]


PromptLogprobs = tuple[Logprob | None, ...]  # one per prompt token; the first, and only it, None


def _check_prompt_logprobs(entries: PromptLogprobs | None) -> None:
    # NOTE: raised in __post_init__, msgspec reports it as a validation error of the answer.
    if entries and (entries[0] is not None or any(e is None for e in entries[1:])):
        raise ValueError("prompt_logprobs: the first entry, and only it, must be null")


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: Count
    completion_tokens: Count
    cached_tokens: Count = 0  # prompt tokens served from the prefix cache


class GenerateResult(msgspec.Struct, frozen=True):
    """A non-streaming `/v1/generate` answer."""

    request_id: str
    prompt_ids: tuple[TokenId, ...]
    ids: tuple[TokenId, ...]  # generated tokens only
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[Logprob, ...] | None = None  # one entry per id in `ids`
    prompt_logprobs: PromptLogprobs | None = None

    def __post_init__(self) -> None:
        _check_prompt_logprobs(self.prompt_logprobs)


class StreamStart(msgspec.Struct, frozen=True):
    """First NDJSON line of a streamed `/v1/generate`."""

    request_id: str
    prompt_ids: tuple[TokenId, ...]
    prompt_logprobs: PromptLogprobs | None = None

    def __post_init__(self) -> None:
        _check_prompt_logprobs(self.prompt_logprobs)


class StreamDelta(msgspec.Struct, frozen=True):
    """A later NDJSON line; the last one has `finish_reason` set, and `usage` unless aborted."""

    ids: tuple[TokenId, ...]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[Logprob, ...] | None = None  # entries for this line's `ids`

    def __post_init__(self) -> None:
        if self.finish_reason in ("stop", "length") and self.usage is None:
            raise ValueError("usage: the last line must carry it")


class ModelInfo(msgspec.Struct, frozen=True):
    """`GET /v1/model`. Only the first three fields are required from the backend."""

    model_name: Annotated[str, Meta(min_length=1)]
    max_model_len: Count
    vocab_size: Count
    architecture: str = ""
    bos_token_id: TokenId | None = None
    eos_token_ids: tuple[TokenId, ...] = ()
    tp: Count = 1
    num_replicas: Count = 1
    block_size: Count = 0
    num_kv_blocks: Count = 0
    # A text prompt of more UTF-8 bytes cannot fit in max_model_len tokens (0: no such bound).
    max_prompt_bytes: Count = 0


class _SchedulerCounts(msgspec.Struct, frozen=True):
    """What one scheduler reports (gauges, then counters); a missing one reads 0."""

    num_requests_running: Count = 0
    num_requests_waiting: Count = 0
    num_kv_blocks: Count = 0
    num_kv_blocks_used: Count = 0
    num_preemptions: Count = 0
    prefix_cache_queried_tokens: Count = 0
    prefix_cache_hit_tokens: Count = 0


class ReplicaStats(_SchedulerCounts, frozen=True):
    """One replica in `GET /v1/stats`: its scheduler's counts and its routing load."""

    index: Count = 0
    num_requests_live: Count = 0  # routed here and not finished
    requests_routed_total: Count = 0


class BackendStats(_SchedulerCounts, frozen=True):
    """`GET /v1/stats`: the scheduler counts summed over replicas, the supervisor's own, and
    the replicas one by one."""

    prompt_tokens_total: Count = 0
    generation_tokens_total: Count = 0
    requests_finished_total: dict[str, Count] = {}  # finish reason -> requests
    replica_restarts_total: Count = 0  # replicas replaced after a failure (--on-failure restart)
    replicas: tuple[ReplicaStats, ...] = ()


class TokenizerFiles(msgspec.Struct, frozen=True):
    """`GET /v1/tokenizer`: file name -> text (mi/api/tokenizer_files.py checks the names)."""

    files: Annotated[dict[str, str], Meta(min_length=1, max_length=MAX_TOKENIZER_FILES)]


class _Error(msgspec.Struct, frozen=True):
    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None


class _ErrorLine(msgspec.Struct, frozen=True):
    error: _Error


encode_answer = msgspec.json.Encoder().encode


@functools.cache
def _decoder(answer_type: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(answer_type)


def _bad_answer(what: str) -> ApiError:
    return ApiError(502, f"The backend sent an invalid response ({what}).", code="bad_backend_response")


def decode_answer(raw: bytes, answer_type: type[T]) -> T:
    """One answer body or stream line as `answer_type`; raises the `ApiError` an `{"error": ...}`
    line carries, or 502 for anything else that is not a valid `answer_type`."""
    try:
        return _decoder(answer_type).decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError included
        problem = str(exc)
    try:
        err = _decoder(_ErrorLine).decode(raw).error
    except msgspec.DecodeError:
        raise _bad_answer(problem[:200]) from None
    status = 400 if err.type == "invalid_request_error" else _LINE_STATUS.get(err.code, 500)
    raise ApiError(status, err.message, err.param, err.type, err.code)


# The HTTP status the backend answers for the codes an error line can carry (docs/backend-api.md),
# so that a stream's error becomes the same answer as a plain request's.
_LINE_STATUS = {
    "backend_failed": 503,
    "backend_unavailable": 503,
    "shutting_down": 503,
    "queue_timeout": 503,
    "overloaded": 503,
    "request_timeout": 504,
    "backend_timeout": 504,
}


class StreamDecoder:
    """The NDJSON lines of one streamed generate, whatever the chunking: a `StreamStart`, then
    `StreamDelta`s up to the one with `finish_reason` (a line after it is an error)."""

    def __init__(self) -> None:
        self._buf = b""
        self._started = False
        self.finished = False

    def feed(self, data: bytes) -> list[StreamStart | StreamDelta]:
        """The answers of the complete lines `data` finishes."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [self._decode(line) for line in lines if line.strip()]

    def end(self) -> list[StreamStart | StreamDelta]:
        """At the end of the stream: the last line if it had no newline; 502 if the stream
        stopped before its last line."""
        rest, self._buf = self._buf, b""
        items = [self._decode(rest)] if rest.strip() else []
        if not self.finished:
            raise ApiError(502, "The backend closed the stream unexpectedly.")
        return items

    def _decode(self, line: bytes) -> StreamStart | StreamDelta:
        if self.finished:
            raise _bad_answer("a line after the last one")
        if not self._started:
            self._started = True
            return decode_answer(line, StreamStart)
        delta = decode_answer(line, StreamDelta)
        self.finished = delta.finish_reason is not None
        return delta
