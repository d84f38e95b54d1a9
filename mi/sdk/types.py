"""What the SDK hands back: outputs, stream deltas and typed errors.

Errors, by what a caller does about them:

    MIError
    ├── BackendUnavailable   cannot connect, or the backend is starting / stopping: start it, retry
    │   └── Overloaded       the backend's queue is full: retry after `retry_after` seconds
    ├── InvalidRequest       a 4xx: fix the request (`status`, `param`, `code`)
    │   └── AuthenticationError   the backend refused the secret of the cert file
    ├── ServerError          a 5xx, a malformed answer, or a failure mid-stream
    └── RequestTimeout       no answer in time (also a builtin TimeoutError)

Each carries `api_error`, the OpenAI-style error behind it (what the backend answered, or a 502
for an answer that could not be read), None when the backend was not reached in time or at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mi.api.backend_answers import Usage  # the backend's own: prompt, completion, cached tokens

if TYPE_CHECKING:
    from mi.api.backend_answers import Logprob
    from mi.api.errors import ApiError

__all__ = [
    "AuthenticationError",
    "BackendUnavailable",
    "GenerationOutput",
    "InvalidRequest",
    "MIError",
    "Overloaded",
    "RequestTimeout",
    "ServerError",
    "StreamOutput",
    "TokenLogprob",
    "Usage",
    "to_logprobs",
]


class MIError(Exception):
    """Base class of every error the SDK raises."""

    api_error: ApiError | None = None


class BackendUnavailable(MIError):
    """The backend cannot be reached (not running, wrong endpoint, starting or stopping)."""


class Overloaded(BackendUnavailable):
    """The backend refused the request because too many are queued; retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(MIError):
    """The backend refused the request (HTTP 4xx); `param` names the offending field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class AuthenticationError(InvalidRequest):
    """The backend refused the shared secret (HTTP 401): check the cert file (`cert=`, MI_CERT)."""


class ServerError(MIError):
    """The backend failed while serving a valid request (HTTP 5xx or a malformed answer)."""


class RequestTimeout(MIError, TimeoutError):
    """No answer within the call's timeout."""


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token, its logprob (None for -inf), and the top alternatives."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float | None], ...] = ()


def to_logprobs(entries: tuple[Logprob | None, ...] | None) -> list[TokenLogprob | None] | None:
    """The backend's logprob entries -> TokenLogprob (None stays None)."""
    if entries is None:
        return None
    return [None if e is None else TokenLogprob(e.token_id, e.logprob, e.top) for e in entries]


@dataclass(frozen=True)
class GenerationOutput:
    prompt_ids: list[int]  # the prompt as the model saw it (BOS included for a text prompt)
    ids: list[int]  # the generated tokens only
    text: str  # the generated text (stop strings excluded unless asked)
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None  # one per id in `ids`, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (first None)
    usage: Usage | None = field(default=None, compare=False)
    request_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class StreamOutput:
    """One streamed delta: new token ids and their text (UTF-8 safe); the last has
    `finish_reason` set."""

    ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
