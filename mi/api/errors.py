"""OpenAI-style API errors, shared by the backend, the frontend and the SDK.

Every 4xx/5xx body any `mi` server sends has the OpenAI shape
`{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`.
Messages are for end users: they never name file paths, addresses or internals.
"""

from __future__ import annotations

import re
from typing import Annotated, TypeVar

import msgspec
import msgspec.inspect
from msgspec import Meta

__all__ = [
    "ApiError",
    "ErrorInfo",
    "ErrorResponse",
    "decode_body",
    "default_error_type",
    "error_body",
    "invalid",
    "validation_error",
]

T = TypeVar("T")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",  # OpenAI answers an unknown model with this type
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def default_error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class ErrorInfo(msgspec.Struct, frozen=True):
    """What went wrong, for the client (never a path, an address or a traceback)."""

    message: Annotated[str, Meta(description="A sentence for the end user.")]
    type: Annotated[
        str,
        Meta(description="invalid_request_error, authentication_error, rate_limit_error, server_error, ..."),
    ]
    param: Annotated[
        str | None,
        Meta(description="The request field at fault, e.g. 'messages[0].role'; null when none is."),
    ]
    code: Annotated[
        str | None,
        Meta(description="A stable name of the failure, e.g. 'invalid_value', 'context_length_exceeded'."),
    ]


class ErrorResponse(msgspec.Struct, frozen=True):
    """The body of every 4xx/5xx answer (and of the last event of a failed stream)."""

    error: ErrorInfo


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """`ErrorResponse` as plain data: `{"error": {"message", "type", "param", "code"}}`."""
    return msgspec.to_builtins(ErrorResponse(ErrorInfo(message, type, param, code)))


class ApiError(Exception):
    """A request that must be answered with `status` and an OpenAI error body.

    `retry_after` (seconds) is sent as the `Retry-After` header, e.g. on 503.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str | None = None,
        code: str | None = None,
        *,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or default_error_type(status)
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"

    @classmethod
    def from_body(cls, status: int, body: object) -> ApiError:
        """Rebuild an error received from another `mi` server (any malformed body is tolerated)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return cls(status, f"The backend answered with HTTP status {status}.")

        def opt_str(key: str) -> str | None:
            value = err.get(key)
            return value if isinstance(value, str) else None

        return cls(status, err["message"], opt_str("param"), opt_str("type"), opt_str("code"))


def invalid(param: str, message: str) -> ApiError:
    """The 400 for a value of the right type that breaks a rule (a limit, the vocabulary)."""
    return ApiError(400, message, param, code="invalid_value")


# -- typed request bodies -----------------------------------------------------------------------
# Every request body is one msgspec Struct (mi/api/sampling.py, backend.py, openai.py, chat.py);
# `decode_body` is the one place its validation errors become OpenAI error bodies.

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$|^(?P<key>.*) - at `key` in `\$(?P<keypath>[^`]*)`$")
_LEADING_NAME = re.compile(r"^'(?P<name>[A-Za-z_][A-Za-z0-9_]*)'")
_STEP = re.compile(r"\.(\w+)|\[(\d+|\.\.\.)\]")


def decode_body(body: object, body_type: type[T], *, param_prefix: str = "") -> T:
    """`body` (decoded JSON) as a `body_type` Struct, or `ApiError` 400 with the OpenAI error body.

    As in the OpenAI spec and JSON Schema: `null` in a top-level field means "the default" (the
    spec marks its optional fields nullable), and a number with no fractional part is an integer
    (`"max_tokens": 7.0`, `"prompt": [5.0, 6]`; nested objects such as `chat_template_kwargs`
    are passed on as sent). Codes: unknown_parameter, missing_required_parameter, invalid_type,
    invalid_value.
    """
    if isinstance(body, dict):
        body = {key: _integral(value) for key, value in body.items() if value is not None}
    try:
        # Through JSON bytes, not msgspec.convert: object keys must parse as they do in JSON
        # (logit_bias {"50256": -100} into dict[int, float]).
        return msgspec.json.decode(msgspec.json.encode(body), type=body_type)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc), param_prefix, body_type) from None


# NOTE: the JSON parser gives an integer beyond int64 as the nearest float; from 2**53 on a float
# may be a rounded integer (-2**63 - 1 arrives as -2**63), which must fail as a float, not pass.
_EXACT_INTEGER_FLOATS = 2.0**53


def _integral(value: object) -> object:
    """A top-level number, or an array (of arrays) of numbers, with integral floats below 2**53
    as ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT_INTEGER_FLOATS:
        return int(value)
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def validation_error(message: str, param_prefix: str = "", body_type: type | None = None) -> ApiError:
    """The 400 for one msgspec validation message about a `body_type` (see `decode_body`).

    `param` names the field as OpenAI does: `messages[0].role` keeps the index of an element
    that is an object, `stop` and `prompt` name the whole array of strings or numbers.
    """
    detail, param = message, None
    match = _AT.search(message)
    if match and match.group("path") is not None:
        detail, param = message[: match.start()], _param(match.group("path"), body_type)
    elif match:
        detail, param = match.group("key") + " as a key", _param(match.group("keypath"), body_type)
    if detail.startswith("Object contains unknown field `"):
        name = detail.split("`")[1][:64]
        return ApiError(
            400,
            f"Unrecognized request argument supplied: {name}",
            _join(param, name, param_prefix),
            code="unknown_parameter",
        )
    if detail.startswith("Object missing required field `"):
        name = detail.split("`")[1]
        return ApiError(
            400,
            f"'{_join(param, name, '')}' is required.",
            _join(param, name, param_prefix),
            code="missing_required_parameter",
        )
    if param is None and (named := _LEADING_NAME.match(detail)):  # a __post_init__ rule
        return ApiError(400, detail, param_prefix + named.group("name"), code="invalid_value")
    if param is None:
        return ApiError(
            400,
            f"The request body is invalid: {detail}.",
            param_prefix or "body",
            code="invalid_type" if detail.startswith("Expected `object`") else "invalid_value",
        )
    is_type = re.match(r"Expected `[^`]*`, got `", detail) is not None
    shown = param_prefix + param
    return ApiError(
        400,
        f"Invalid '{shown}': {detail[0].lower()}{detail[1:]}.",
        shown,
        code="invalid_type" if is_type else "invalid_value",
    )


def _param(path: str, body_type: type | None) -> str | None:
    """A msgspec path as a `param`: `.stream_options.include_usage` -> "stream_options.include_usage",
    `.messages[0].role` -> "messages[0].role"; an index into an array of non-objects and
    everything after it is dropped (`.stop[1]` -> "stop", `.prompt[0][2]` -> "prompt"), as are
    dict keys (`.logit_bias[...]` -> "logit_bias"); `` (the body itself) -> None."""
    info = msgspec.inspect.type_info(body_type) if body_type is not None else None
    param = ""
    for name, index in _STEP.findall(path):
        if name:
            param += f".{name}" if param else name
            info = _step(info, name)
            continue
        info = _step(info, None)
        if not any(isinstance(t, msgspec.inspect.StructType) for t in _alternatives(info)):
            break
        param += f"[{index}]"
    return param or None


def _alternatives(info: msgspec.inspect.Type | None) -> list[msgspec.inspect.Type]:
    while isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        return [t for member in info.types for t in _alternatives(member)]
    return [] if info is None else [info]


def _step(info: msgspec.inspect.Type | None, name: str | None) -> msgspec.inspect.Type | None:
    """The type of field `name` (None: of an element) of `info`, where it has one."""
    for t in _alternatives(info):
        if name is not None and isinstance(t, msgspec.inspect.StructType):
            for f in t.fields:
                if f.encode_name == name:
                    return f.type
        elif name is None and isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.VarTupleType)):
            return t.item_type
        elif name is None and isinstance(t, msgspec.inspect.DictType):
            return t.value_type
    return None


def _join(parent: str | None, name: str, prefix: str) -> str:
    return prefix + (f"{parent}.{name}" if parent else name)
