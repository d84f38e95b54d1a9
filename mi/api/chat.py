"""The OpenAI `/v1/chat/completions` protocol: request checks and response builders.

`parse_chat_request` checks the body; the frontend renders `messages` with the model's chat
template (it needs the tokenizer) and then calls `ChatRequest.generate_requests` with the
prompt's token ids. Choice `index` = i for i < n.

Chat specifics (the common policy is in openai_common.py):
- message content is a string or an array of text parts; other part types are a 400;
- `max_completion_tokens` wins over `max_tokens`; without either a choice may use the rest of
  the context (capped by the server's max-tokens limit);
- `logprobs: true` with `top_logprobs` k (0 gives `[]` alternatives); `top_logprobs` without
  `logprobs: true` is a 400;
- `response_format` `{"type": "text"}` is accepted, other formats, tools, audio and predicted
  outputs are a 400 until they exist; fields that do not change the output (`metadata`, `store`,
  `service_tier`, `user`, ...) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from mi.api.backend import GenerateRequest
from mi.api.errors import (
    ApiError,
    invalid,
    read_bool,
    read_int,
    read_str,
    reject_unknown,
    wrong_type,
)
from mi.api.openai_common import (
    SAMPLING_FIELDS,
    Limits,
    check_min_tokens,
    check_model,
    read_max_tokens,
    read_sampling,
    read_stream_options,
    seed_for_choice,
)

__all__ = [
    "ChatRequest",
    "chat_choice",
    "chat_chunk",
    "chat_response",
    "parse_chat_request",
    "read_messages",
]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Accepted and ignored: they do not change what the model generates.
_IGNORED_STR = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                "service_tier", "reasoning_effort", "verbosity")
_IGNORED_BOOL = ("store", "parallel_tool_calls")
_IGNORED_OBJ = ("metadata", "prompt_cache_options", "moderation")
_UNSUPPORTED = ("audio", "prediction", "web_search_options", "functions")
_FIELDS = SAMPLING_FIELDS | set(_IGNORED_STR) | set(_IGNORED_BOOL) | set(_IGNORED_OBJ) | set(_UNSUPPORTED) | {
    "model", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
    "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "function_call",
    "modalities", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
}
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal",
                             "function_call", "audio"})


def not_supported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported.", param, code="unsupported_parameter")


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the name to answer with
    messages: list  # [{"role", "content": str, ...}] as the chat template receives them
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict
    n: int
    max_tokens: int | None  # None: the rest of the context (capped by the server's limit)
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    sampling: dict  # GenerateRequest keyword arguments (seed included)

    def generate_requests(self, prompt_ids: list[int], chat_id: str, max_tokens: int) -> tuple[GenerateRequest, ...]:
        """One backend request per choice; `max_tokens` is what the frontend resolved."""
        sampling = dict(self.sampling)
        seed = sampling.pop("seed")
        template = GenerateRequest(
            prompt_ids=tuple(prompt_ids),
            max_tokens=max_tokens,
            logprobs=self.top_logprobs if self.logprobs else None,
            stream=self.stream,
            **sampling,
        )
        return tuple(
            msgspec.structs.replace(template, request_id=f"{chat_id}-{i}", seed=seed_for_choice(seed, i))
            for i in range(self.n)
        )


def parse_chat_request(
    body: object, *, served_names: tuple[str, ...], vocab_size: int, limits: Limits = Limits()
) -> ChatRequest:
    """Check a decoded body; raise `ApiError` (400, or 404 for an unknown model) on the first problem."""
    if not isinstance(body, dict):
        raise wrong_type("body", body, "a JSON object")
    reject_unknown(body, frozenset(_FIELDS))
    model = check_model(body, served_names)
    _check_ignored_and_unsupported(body)
    messages = read_messages(body.get("messages"))

    n = read_int(body, "n", 1, 1, limits.max_n)
    stream = read_bool(body, "stream", False)
    include_usage = read_stream_options(body, stream)
    max_tokens = read_max_tokens(body, "max_completion_tokens", None, 1, limits)
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = read_max_tokens(body, "max_tokens", None, 1, limits), "max_tokens"
    logprobs = read_bool(body, "logprobs", False)
    top_logprobs = read_int(body, "top_logprobs", None, 0, limits.max_logprobs)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
    sampling = read_sampling(body, vocab_size, limits)
    check_min_tokens(sampling, max_tokens, key)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise wrong_type("chat_template_kwargs", kwargs, "an object")
    continue_final = read_bool(body, "continue_final_message", False)
    add_generation_prompt = read_bool(body, "add_generation_prompt", not continue_final)
    if continue_final and add_generation_prompt:
        raise invalid("continue_final_message",
                      "'continue_final_message' and 'add_generation_prompt' cannot both be true.")
    return ChatRequest(
        model=model, messages=messages, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final, chat_template_kwargs=dict(kwargs or {}), n=n,
        max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top_logprobs or 0, stream=stream,
        include_usage=include_usage, sampling=sampling,
    )


def _check_ignored_and_unsupported(body: dict) -> None:
    for key in _IGNORED_STR:
        read_str(body, key, None)
    for key in _IGNORED_BOOL:
        read_bool(body, key, False)
    for key in _IGNORED_OBJ:
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise wrong_type(key, body[key], "an object")
    for key in _UNSUPPORTED:
        if body.get(key) is not None:
            raise not_supported(key, f"'{key}'")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise wrong_type("response_format", fmt, 'an object with a string "type"')
        if fmt["type"] != "text":
            raise not_supported("response_format", f"response_format type '{fmt['type'][:40]}'")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise wrong_type("tools", tools, "an array")
    if tools:
        raise not_supported("tools", "Tool calling")
    for key in ("tool_choice", "function_call"):
        choice = body.get(key)
        if choice is not None and choice not in ("none", "auto"):
            raise not_supported(key, f"'{key}' other than \"none\"")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        if not isinstance(modalities, list):
            raise wrong_type("modalities", modalities, "an array of strings")
        raise not_supported("modalities", 'Output modalities other than ["text"]')


def read_messages(value: object) -> list[dict]:
    if value is None:
        raise ApiError(400, "'messages' is required.", "messages", code="missing_required_parameter")
    if not isinstance(value, list):
        raise wrong_type("messages", value, "an array of message objects")
    if not value:
        raise invalid("messages", "'messages' must not be empty.")
    return [_read_message(message, f"messages[{i}]") for i, message in enumerate(value)]


def _read_message(message: object, param: str) -> dict:
    if not isinstance(message, dict):
        raise wrong_type(param, message, "a message object")
    unknown = set(message) - _MESSAGE_FIELDS
    if unknown:
        key = sorted(unknown)[0][:64]
        raise ApiError(400, f"Unrecognized field in {param}: {key}", f"{param}.{key}", code="unknown_parameter")
    role = message.get("role")
    if not isinstance(role, str):
        raise wrong_type(f"{param}.role", role, "a string")
    if role not in ROLES:
        raise invalid(f"{param}.role", f"'{param}.role' must be one of {', '.join(sorted(ROLES))}, got {role[:40]!r}.")
    out = {"role": role, "content": _read_content(message.get("content"), f"{param}.content", role)}
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = read_str(message, key, None)
    if message.get("tool_calls") is not None:
        if not isinstance(message["tool_calls"], list):
            raise wrong_type(f"{param}.tool_calls", message["tool_calls"], "an array")
        out["tool_calls"] = message["tool_calls"]
    return out


def _read_content(content: object, param: str, role: str) -> str:
    """A string, or an array of text parts joined with newlines (null only for an assistant or
    a function message, as the spec allows)."""
    if content is None:
        if role in ("assistant", "function"):
            return ""
        raise ApiError(400, f"'{param}' is required.", param, code="missing_required_parameter")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise wrong_type(param, content, "a string or an array of content parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise wrong_type(param, part, 'an array of objects with a string "type"')
        if part["type"] in ("text", "refusal"):
            text = part.get(part["type"])
            if not isinstance(text, str):
                raise wrong_type(f"{param}.{part['type']}", text, "a string")
            texts.append(text)
        else:
            raise not_supported(param, f"Content parts of type '{part['type'][:40]}'")
    return "\n".join(texts)


# -- answers ------------------------------------------------------------------------------------


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None, "tool_calls": []},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_response(chat_id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {
        "id": chat_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chat_chunk(
    chat_id: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None,
    logprobs: dict | None = None, *, include_usage: bool = False,
) -> dict:
    """One streamed event of choice `index`: the first carries `{"role": "assistant"}`."""
    chunk = {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk
