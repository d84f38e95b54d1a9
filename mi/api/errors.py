"""OpenAI-style API errors, shared by the backend, the frontend and the SDK.

Every 4xx/5xx body any `mi` server sends has the OpenAI shape
`{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`.
Messages are for end users: they never name file paths, addresses or internals.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

__all__ = ["ApiError", "decode_body", "default_error_type", "error_body", "validation_error"]

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


def error_body(
    message: str,
    type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """A request that must be answered with `status` and an OpenAI error body.

    `retry_after` (seconds) is sent as the `Retry-After` header, e.g. on 503.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI field name
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
    def from_body(cls, status: int, body: object) -> "ApiError":
        """Rebuild an error received from another `mi` server (any malformed body is tolerated)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return cls(status, f"The backend answered with HTTP status {status}.")

        def opt_str(key: str) -> str | None:
            value = err.get(key)
            return value if isinstance(value, str) else None

        return cls(status, err["message"], opt_str("param"), opt_str("type"), opt_str("code"))


# -- field checks -------------------------------------------------------------------------------
# Strict JSON types: a bool is not an int, an int is a valid float, a float with no fractional
# part is a valid int (as in JSON Schema: 1.0 is an integer), `null` means "use the default"
# (OpenAI marks its optional fields nullable). Each raises a 400 naming the field.

_JSON_TYPE_NAMES = {
    bool: "boolean", int: "integer", float: "number", str: "string",
    list: "array", dict: "object", type(None): "null",
}


def json_type_name(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param, code="invalid_value")


def wrong_type(param: str, value: object, expected: str) -> ApiError:
    return ApiError(
        400, f"'{param}' must be {expected}, got {json_type_name(value)}.", param, code="invalid_type"
    )


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_int(value: object) -> int | None:
    """`value` as an int when it is one (1 or 1.0, not True or 1.5), else None."""
    if is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def read_bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise wrong_type(key, value, "a boolean")
    return value


def read_int(body: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(key)
    if value is None:
        return default
    if as_int(value) is None:
        raise wrong_type(key, value, "an integer")
    value = as_int(value)
    if lo is not None and value < lo:
        raise invalid(key, f"'{key}' must be at least {lo}, got {value}.")
    if hi is not None and value > hi:
        raise invalid(key, f"'{key}' must be at most {hi}, got {value}.")
    return value


def read_float(
    body: dict, key: str, default: float, lo: float, hi: float | None = None, *, lo_open: bool = False
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise wrong_type(key, value, "a number")
    value = float(value)
    if value != value or value < lo or (lo_open and value == lo):
        bound = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise invalid(key, f"'{key}' must be {bound}, got {value:g}.")
    if hi is not None and value > hi:
        raise invalid(key, f"'{key}' must be at most {hi:g}, got {value:g}.")
    return value


def read_str(body: dict, key: str, default: str | None) -> str | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise wrong_type(key, value, "a string")
    return value


def read_token_ids(value: object, param: str, vocab_size: int, *, allow_empty: bool) -> tuple[int, ...]:
    """A JSON array of token ids, each in [0, vocab_size)."""
    if not isinstance(value, list):
        raise wrong_type(param, value, "an array of integers")
    if not value and not allow_empty:
        raise invalid(param, f"'{param}' must not be empty.")
    ids = []
    for token_id in value:
        if as_int(token_id) is None:
            raise wrong_type(param, token_id, "an array of integers")
        token_id = as_int(token_id)
        if not 0 <= token_id < vocab_size:
            raise invalid(
                param, f"Token id {token_id} in '{param}' is out of range [0, {vocab_size})."
            )
        ids.append(token_id)
    return tuple(ids)


def reject_unknown(body: dict, known: frozenset[str]) -> None:
    for key in body:
        if key not in known:
            key = key[:64]
            raise ApiError(
                400, f"Unrecognized request argument supplied: {key}", key, code="unknown_parameter"
            )


# -- typed request bodies -----------------------------------------------------------------------
# Every request body is one msgspec Struct (mi/api/sampling.py, backend.py, openai.py, chat.py);
# `decode_body` is the one place its validation errors become OpenAI error bodies.

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$|^(?P<key>.*) - at `key` in `\$(?P<keypath>[^`]*)`$")
_LEADING_NAME = re.compile(r"^'(?P<name>[A-Za-z_][A-Za-z0-9_]*)'")


def decode_body(body: object, body_type: type[T], *, param_prefix: str = "") -> T:
    """`body` (decoded JSON) as a `body_type` Struct, or `ApiError` 400 with the OpenAI error body.

    `null` in a top-level field means "the default", as the OpenAI spec marks its optional fields
    nullable. Codes: unknown_parameter, missing_required_parameter, invalid_type, invalid_value.
    """
    if isinstance(body, dict):
        body = {key: value for key, value in body.items() if value is not None}
    try:
        # Through JSON bytes, not msgspec.convert: object keys must parse as they do in JSON
        # (logit_bias {"50256": -100} into dict[int, float]).
        return msgspec.json.decode(msgspec.json.encode(body), type=body_type)
    except msgspec.ValidationError as exc:
        raise validation_error(str(exc), param_prefix) from None


def validation_error(message: str, param_prefix: str = "") -> ApiError:
    """The 400 for one msgspec validation message (see `decode_body`)."""
    detail, param = message, None
    match = _AT.search(message)
    if match and match.group("path") is not None:
        detail, param = message[: match.start()], _param(match.group("path"))
    elif match:
        detail, param = match.group("key") + " as a key", _param(match.group("keypath"))
    if detail.startswith("Object contains unknown field `"):
        name = detail.split("`")[1][:64]
        return ApiError(400, f"Unrecognized request argument supplied: {name}",
                        _join(param, name, param_prefix), code="unknown_parameter")
    if detail.startswith("Object missing required field `"):
        name = detail.split("`")[1]
        return ApiError(400, f"'{_join(param, name, '')}' is required.", _join(param, name, param_prefix),
                        code="missing_required_parameter")
    if param is None and (named := _LEADING_NAME.match(detail)):  # a __post_init__ rule
        return ApiError(400, detail, param_prefix + named.group("name"), code="invalid_value")
    if param is None:
        return ApiError(400, f"The request body is invalid: {detail}.", param_prefix or "body",
                        code="invalid_type" if detail.startswith("Expected `object`") else "invalid_value")
    is_type = re.match(r"Expected `[^`]*`, got `", detail) is not None
    shown = param_prefix + param
    return ApiError(400, f"Invalid '{shown}': {detail[0].lower()}{detail[1:]}.", shown,
                    code="invalid_type" if is_type else "invalid_value")


def _param(path: str) -> str | None:
    """`.stream_options.include_usage` -> "stream_options.include_usage"; `.logit_bias[...]` and
    `.stop[1]` -> the field ("logit_bias", "stop"); `` (the body itself) -> None."""
    path = re.sub(r"(\[\.\.\.\]|\[\d+\])+$", "", path).lstrip(".")
    return path or None


def _join(parent: str | None, name: str, prefix: str) -> str:
    return prefix + (f"{parent}.{name}" if parent else name)
