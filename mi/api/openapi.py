"""`GET /openapi.json`: an OpenAPI 3.1 document of mi-frontend's own API.

Field names and types follow the OpenAI spec; the extensions (vLLM names) and the error answers
are ours. Kept as data next to the parsers it describes: a field added to a parser belongs here.
"""

from __future__ import annotations

__all__ = ["openapi_document"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_STOP = {"anyOf": [_STR, {"type": "array", "items": _STR}, {"type": "null"}]}

_SAMPLING = {
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1, "description": "0: the top token only"}),
    "top_k": _nullable({"type": "integer", "minimum": -1, "description": "-1 or 0: off"}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": 0}),
    "logit_bias": _nullable({"type": "object", "additionalProperties": {"type": "number", "minimum": -100,
                                                                         "maximum": 100}}),
    "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
    "stop": _STOP,
    "stop_token_ids": _nullable({"type": "array", "items": _INT}),
    "ignore_eos": _nullable(_BOOL),
    "min_tokens": _nullable({"type": "integer", "minimum": 0}),
    "skip_special_tokens": _nullable(_BOOL),
    "include_stop_str_in_output": _nullable(_BOOL),
    "n": _nullable({"type": "integer", "minimum": 1}),
    "stream": _nullable(_BOOL),
    "stream_options": _nullable({"type": "object", "properties": {"include_usage": _BOOL}}),
    "model": _nullable(_STR),
    "user": _nullable(_STR),
}

_SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": _STR, "type": _STR, "param": _nullable(_STR), "code": _nullable(_STR)},
        }},
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                       "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": _INT}}},
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            **_SAMPLING,
            "prompt": {"anyOf": [_STR, {"type": "array", "items": _STR}, {"type": "array", "items": _INT},
                                 {"type": "array", "items": {"type": "array", "items": _INT}}]},
            "max_tokens": _nullable({"type": "integer", "minimum": 0, "description": "0 only with echo"}),
            "echo": _nullable(_BOOL),
            "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
            "best_of": _nullable({"type": "integer", "enum": [1]}),
            "suffix": _nullable({"type": "string", "maxLength": 0}),
            "add_special_tokens": _nullable(_BOOL),
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
            "choices": {"type": "array", "items": {
                "type": "object",
                "required": ["index", "text", "logprobs", "finish_reason"],
                "properties": {"index": _INT, "text": _STR, "logprobs": _nullable({"type": "object"}),
                               "finish_reason": _nullable({"enum": ["stop", "length"]})},
            }},
            "usage": _nullable(_ref("Usage")),
        },
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
            "content": {"anyOf": [_STR, {"type": "array", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": _STR}}}, {"type": "null"}]},
            "name": _STR, "tool_call_id": _STR,
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            **_SAMPLING,
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_tokens": _nullable({"type": "integer", "minimum": 1}),
            "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
            "logprobs": _nullable(_BOOL),
            "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
            "response_format": _nullable({"type": "object", "properties": {"type": {"const": "text"}}}),
            "add_generation_prompt": _nullable(_BOOL),
            "continue_final_message": _nullable(_BOOL),
            "chat_template_kwargs": _nullable({"type": "object"}),
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR,
            "choices": {"type": "array", "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": _INT,
                    "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": _STR}},
                    "logprobs": _nullable({"type": "object"}),
                    "finish_reason": {"enum": ["stop", "length"]},
                },
            }},
            "usage": _ref("Usage"),
        },
    },
    "ModelList": {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
    },
    "Model": {
        "type": "object",
        "properties": {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR,
                       "max_model_len": _INT},
    },
    "TokenizeRequest": {
        "type": "object",
        "properties": {"model": _STR, "prompt": _STR, "messages": {"type": "array", "items": _ref("ChatMessage")},
                       "add_special_tokens": _BOOL, "add_generation_prompt": _BOOL, "return_token_strs": _BOOL},
    },
    "TokenizeResponse": {
        "type": "object",
        "properties": {"count": _INT, "max_model_len": _INT, "tokens": {"type": "array", "items": _INT},
                       "token_strs": _nullable({"type": "array", "items": _STR})},
    },
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": _STR}},
    "DetokenizeRequest": {
        "type": "object", "required": ["tokens"],
        "properties": {"model": _STR, "tokens": {"type": "array", "items": _INT}},
    },
}


def _errors(*statuses: int) -> dict:
    words = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model or route",
             413: "Body too large", 415: "Body is not JSON", 503: "Backend down or overloaded (Retry-After)"}
    content = {"application/json": {"schema": _ref("Error")}}
    return {str(s): {"description": words[s], "content": content} for s in statuses}


def _post(summary: str, request: str, response: str, stream: bool) -> dict:
    content = {"application/json": {"schema": _ref(response)}}
    if stream:
        content["text/event-stream"] = {"schema": _STR}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": "OK", "content": content}, **_errors(400, 401, 404, 413, 415, 503)},
    }}


def _get(summary: str, schema: dict, *errors: int) -> dict:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": schema}}}, **_errors(*errors)}}}


def openapi_document(version: str) -> dict:
    object_ = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mi-frontend", "version": version,
                 "description": "OpenAI-compatible API of an mi backend. Every error has the OpenAI "
                                "body {error: {message, type, param, code}}."},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when mi-frontend runs with --api-key"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/completions": _post("Create a completion", "CompletionRequest", "Completion", True),
            "/v1/chat/completions": _post("Create a chat completion", "ChatCompletionRequest",
                                          "ChatCompletion", True),
            "/v1/models": _get("List the served model names", _ref("ModelList"), 401, 503),
            "/v1/models/{model}": {**_get("One served model", _ref("Model"), 401, 404, 503),
                                   "parameters": [{"name": "model", "in": "path", "required": True,
                                                   "schema": _STR}]},
            "/health": _get("200 when the backend serves (no API key needed)", object_, 503),
            "/version": _get("The mi version", object_, 401),
            "/openapi.json": _get("This document", object_, 401),
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": _STR}}}, **_errors(401)}}},
            "/tokenize": _post("Tokenize a prompt or chat messages", "TokenizeRequest", "TokenizeResponse", False),
            "/detokenize": _post("Turn token ids into text", "DetokenizeRequest", "DetokenizeResponse", False),
            "/tokenizer_info": _get("Tokenizer facts: special tokens, chat template, max length", object_,
                                    401, 503),
        },
    }
