"""`GET /openapi.json`: the OpenAPI 3.1 document of mi-frontend's own API, generated.

Every schema comes from the Structs that decode the requests and encode the answers
(`msgspec.json.schema_components`), so the document cannot drift from them; only the table of
paths is written here. Two rules of the wire are applied to the generated schemas, so that the
document says what the server does:
- a request body's optional top-level field may be `null` (it means the default: see
  `mi.api.errors.decode_body`);
- an answer always carries every field of its Struct, except those left unset (`usage` of a
  chunk without `include_usage`, the fields of a chat delta), so those are the only optional ones.
"""

from __future__ import annotations

import functools

import msgspec
import msgspec.inspect

from mi.api.chat import ChatCompletionRequest
from mi.api.errors import ErrorResponse
from mi.api.info import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from mi.api.openai import CompletionRequest
from mi.api.openai_answers import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
)
from mi.api.openai_common import ModelCard, ModelList

__all__ = ["openapi_document"]

_REQUESTS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
_ANSWERS = (
    CompletionResponse,
    CompletionChunk,
    ChatCompletionResponse,
    ChatCompletionChunk,
    ModelList,
    ModelCard,
    TokenizeResponse,
    DetokenizeResponse,
    HealthResponse,
    VersionResponse,
    ErrorResponse,
)
_ERRORS = {
    400: "Invalid request",
    401: "Missing or wrong API key",
    404: "Unknown model or route",
    413: "Body too large",
    415: "Body is not JSON",
    503: "Backend down or overloaded (Retry-After)",
}


def _ref(cls: type) -> dict:
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def _schemas() -> dict:
    _, schemas = msgspec.json.schema_components(
        _REQUESTS + _ANSWERS, ref_template="#/components/schemas/{name}"
    )
    for cls in _REQUESTS:
        schema = schemas[cls.__name__]
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            if (
                name not in required
                and prop.get("type") != "null"
                and {"type": "null"} not in prop.get("anyOf", ())
            ):
                kept = {k: prop.pop(k) for k in ("description", "default") if k in prop}
                schema["properties"][name] = {**kept, "anyOf": [prop, {"type": "null"}]}
    for cls in _answer_structs():
        schema = schemas[cls.__name__]
        schema["required"] = [
            f.encode_name for f in msgspec.structs.fields(cls) if f.default is not msgspec.UNSET
        ]
    return schemas


def _answer_structs() -> set[type]:
    """Every Struct an answer is made of."""
    found: set[type] = set()
    todo = list(msgspec.inspect.multi_type_info(_ANSWERS))
    while todo:
        info = todo.pop()
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found:
                continue
            found.add(info.cls)
            todo.extend(f.type for f in info.fields)
        elif isinstance(info, msgspec.inspect.UnionType):
            todo.extend(info.types)
        elif isinstance(info, (msgspec.inspect.ListType, msgspec.inspect.Metadata)):
            todo.append(info.item_type if isinstance(info, msgspec.inspect.ListType) else info.type)
        elif isinstance(info, msgspec.inspect.DictType):
            todo.append(info.value_type)
    return found


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _events(chunk: type) -> dict:
    """Server-sent events: `data: CHUNK` (or an error as the last event), then `data: [DONE]`."""
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
            },
        ]
    }
    return {
        "text/event-stream": {
            "schema": {"type": "object", "required": ["data"], "properties": {"data": data}}
        }
    }


def _answers(ok: dict, *errors: int) -> dict:
    return {
        "200": {"description": "OK", "content": ok},
        **{str(s): {"description": _ERRORS[s], "content": _json(_ref(ErrorResponse))} for s in errors},
    }


def _post(summary: str, request: type, answer: type, chunk: type | None = None) -> dict:
    ok = _json(_ref(answer)) | (_events(chunk) if chunk is not None else {})
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": _answers(ok, 400, 401, 404, 413, 415, 503),
        }
    }


def _get(summary: str, ok: dict, *errors: int) -> dict:
    return {"get": {"summary": summary, "responses": _answers(ok, *errors)}}


@functools.cache
def openapi_document(version: str) -> dict:
    """The document (built once; callers must not change it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mi-frontend",
            "version": version,
            "description": "OpenAI-compatible API of an mi backend. Every error has the OpenAI "
            "body {error: {message, type, param, code}}.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "only when mi-frontend runs with --api-key",
                }
            },
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/completions": _post(
                "Create a completion", CompletionRequest, CompletionResponse, CompletionChunk
            ),
            "/v1/chat/completions": _post(
                "Create a chat completion", ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk
            ),
            "/v1/models": _get("List the served model names", _json(_ref(ModelList)), 401, 503),
            "/v1/models/{model}": {
                **_get("One served model", _json(_ref(ModelCard)), 401, 404, 503),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            },
            "/health": {
                "get": {
                    "summary": "200 when the backend serves (no API key needed)",
                    "responses": {
                        "200": {"description": "OK", "content": _json(_ref(HealthResponse))},
                        "503": {
                            "description": "The backend does not serve",
                            "content": _json(_ref(HealthResponse)),
                        },
                    },
                }
            },
            "/version": _get("The mi version", _json(_ref(VersionResponse)), 401),
            "/openapi.json": _get("This document", _json({"type": "object"}), 401),
            "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}, 401),
            "/tokenize": _post("Tokenize a prompt or chat messages", TokenizeRequest, TokenizeResponse),
            "/detokenize": _post("Turn token ids into text", DetokenizeRequest, DetokenizeResponse),
            "/tokenizer_info": _get(
                "Tokenizer facts: special tokens, chat template, max length",
                _json({"type": "object"}),
                401,
                503,
            ),
        },
    }
