"""The OpenAI `/v1/chat/completions` protocol: the request Structs and the one
conversion from a request to backend `GenerateRequest`s.

`parse_chat_request` decodes and checks the body into a `ChatPlan`; the frontend renders
`messages` with the model's chat template (it needs the tokenizer) and then calls
`ChatPlan.generate_requests` with the prompt's token ids. Choice `index` = i for i < n.

Chat specifics (the common policy is in openai_common.py):
- message content is a string or an array of text (or refusal) parts; image, audio and file
  parts are a 400 "not supported";
- `max_completion_tokens` wins over `max_tokens`; without either a choice may use the rest of
  the context (capped by the server's max-tokens limit);
- `logprobs: true` with `top_logprobs` k (0 gives `[]` alternatives); `top_logprobs` without
  `logprobs: true` is a 400;
- `response_format` (text, json_object, json_schema) and the other output constraints are the
  sampling base's (mi/api/structured.py); tools, audio and predicted outputs are a 400 until
  they exist; fields that do not change the output (`metadata`, `store`,
  `service_tier`, `user`, ...) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from mi.api import structured
from mi.api.backend import GenerateRequest
from mi.api.errors import ApiError, decode_body
from mi.api.openai_common import (
    Limits,
    StreamOptions,
    check_limits,
    check_model,
    sampling_base,
    seed_for_choice,
    to_generate_request,
)
from mi.api.sampling import INT32_MAX, NumLogprobs, SamplingParams

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatPlan",
    "parse_chat_request",
    "template_messages",
]

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Ignored = Meta(description="Accepted and ignored: it does not change what the model generates.")
Unsupported = Meta(
    description="Not supported yet: any value but null is a 400.", extra_json_schema={"type": "null"}
)
UnsupportedPart = Meta(description="Not read: a part of this type is a 400 (not supported yet).")
NoneOrAuto = Meta(
    description='Only "none" and "auto" are supported.', extra_json_schema={"enum": ["none", "auto", None]}
)
MaxTokens = Annotated[int, Meta(ge=1, le=INT32_MAX)]


def not_supported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported.", param, code="unsupported_parameter")


# -- messages -----------------------------------------------------------------------------------


class TextPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="text"):
    text: Annotated[str, Meta(description="Text of the message.")]


class RefusalPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="refusal"):
    refusal: Annotated[str, Meta(description="A refusal by the assistant, used as text.")]


class ImageUrlPart(msgspec.Struct, frozen=True, tag_field="type", tag="image_url"):
    """Not supported yet (a 400)."""

    image_url: Annotated[dict[str, Any] | None, UnsupportedPart] = None


class InputAudioPart(msgspec.Struct, frozen=True, tag_field="type", tag="input_audio"):
    """Not supported yet (a 400)."""

    input_audio: Annotated[dict[str, Any] | None, UnsupportedPart] = None


class FilePart(msgspec.Struct, frozen=True, tag_field="type", tag="file"):
    """Not supported yet (a 400)."""

    file: Annotated[dict[str, Any] | None, UnsupportedPart] = None


ContentPart = TextPart | RefusalPart | ImageUrlPart | InputAudioPart | FilePart


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One message of the conversation, as the chat template receives it (`template_messages`)."""

    role: Annotated[Role, Meta(description="Who speaks; the chat template decides what each role means.")]
    content: Annotated[
        str | list[ContentPart] | None,
        Meta(
            description="A string, or text parts joined with newlines; null only for an assistant "
            "or a function message.",
        ),
    ] = None
    name: Annotated[str | None, Meta(description="The speaker's name, for the template.")] = None
    tool_calls: Annotated[
        list[dict[str, Any]] | None,
        Meta(
            description="An assistant's earlier tool calls, for the template.",
        ),
    ] = None
    tool_call_id: Annotated[str | None, Meta(description="The call a tool message answers.")] = None
    refusal: Annotated[str | None, Ignored] = None
    function_call: Annotated[dict[str, Any] | None, Ignored] = None
    audio: Annotated[dict[str, Any] | None, Ignored] = None


# What `template_messages` checks, said in the document: only an assistant or a function message
# may leave `content` out.
Message = Annotated[
    ChatMessage,
    Meta(
        extra_json_schema={
            "if": {"properties": {"role": {"enum": ["system", "developer", "user", "tool"]}}},
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    ),
]


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """`messages` as the chat template takes them: `{"role", "content": str}`, plus `name`,
    `tool_call_id` and `tool_calls` where given."""
    out = []
    for i, message in enumerate(messages):
        item = {"role": message.role, "content": _text(message, f"messages[{i}].content")}
        for key in ("name", "tool_call_id", "tool_calls"):
            if getattr(message, key) is not None:
                item[key] = getattr(message, key)
        out.append(item)
    return out


def _text(message: ChatMessage, param: str) -> str:
    content = message.content
    if content is None:
        if message.role in ("assistant", "function"):
            return ""
        raise ApiError(400, f"'{param}' is required.", param, code="missing_required_parameter")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        else:
            raise not_supported(param, f"Content parts of type '{type(part).__struct_config__.tag}'")
    return "\n".join(texts)


# -- the request --------------------------------------------------------------------------------


class ChatCompletionRequest(
    sampling_base("ChatSampling"), frozen=True, forbid_unknown_fields=True, kw_only=True
):
    """A `POST /v1/chat/completions` body: the sampling fields plus these."""

    messages: Annotated[list[Message], Meta(min_length=1, description="The conversation so far.")]
    model: Annotated[str | None, Meta(description="A served model name; absent: the first one.")] = None
    max_completion_tokens: Annotated[
        MaxTokens | None,
        Meta(
            description="Tokens to generate per choice; absent: the rest of the context (capped by "
            "the server's --max-tokens).",
        ),
    ] = None
    max_tokens: Annotated[MaxTokens | None, Meta(description="The old name of max_completion_tokens.")] = None
    n: Annotated[int, Meta(ge=1, description="Choices.")] = 1
    stream: Annotated[bool, Meta(description="Answer with server-sent events as tokens arrive.")] = False
    stream_options: Annotated[StreamOptions | None, Meta(description="Only with stream.")] = None
    logprobs: Annotated[bool, Meta(description="Return the logprob of each generated token.")] = False
    top_logprobs: Annotated[
        NumLogprobs | None,
        Meta(
            description="With logprobs: this many alternatives per token (0 gives []).",
        ),
    ] = None
    tools: (
        Annotated[
            list[dict[str, Any]],
            Meta(
                description="Only an empty list is supported.",
                extra_json_schema={"maxItems": 0},
            ),
        ]
        | None
    ) = None
    tool_choice: Annotated[str | dict[str, Any] | None, NoneOrAuto] = None
    function_call: Annotated[str | dict[str, Any] | None, NoneOrAuto] = None
    modalities: (
        Annotated[
            list[str],
            Meta(
                description='Only ["text"] is supported.',
                extra_json_schema={"enum": [["text"]]},
            ),
        ]
        | None
    ) = None
    add_generation_prompt: Annotated[
        bool | None,
        Meta(
            description="The template opens an assistant turn; default: not continue_final_message.",
        ),
    ] = None
    continue_final_message: Annotated[
        bool,
        Meta(
            description="Continue the last (assistant) message instead of starting a new one.",
        ),
    ] = False
    chat_template_kwargs: Annotated[
        dict[str, Any],
        Meta(
            description="More variables for the chat template.",
        ),
    ] = msgspec.field(default_factory=dict)
    user: Annotated[str | None, Ignored] = None
    safety_identifier: Annotated[str | None, Ignored] = None
    prompt_cache_key: Annotated[str | None, Ignored] = None
    prompt_cache_retention: Annotated[str | None, Ignored] = None
    service_tier: Annotated[str | None, Ignored] = None
    reasoning_effort: Annotated[str | None, Ignored] = None
    verbosity: Annotated[str | None, Ignored] = None
    store: Annotated[bool | None, Ignored] = None
    parallel_tool_calls: Annotated[bool | None, Ignored] = None
    metadata: Annotated[dict[str, Any] | None, Ignored] = None
    prompt_cache_options: Annotated[dict[str, Any] | None, Ignored] = None
    moderation: Annotated[dict[str, Any] | None, Ignored] = None
    audio: Annotated[Any, Unsupported] = None
    prediction: Annotated[Any, Unsupported] = None
    web_search_options: Annotated[Any, Unsupported] = None
    functions: Annotated[Any, Unsupported] = None

    def __post_init__(self) -> None:
        # ValueError here becomes a 400 naming the quoted field (mi.api.errors.validation_error).
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs' to be true.")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("'continue_final_message' and 'add_generation_prompt' cannot both be true.")

    def check_supported(self) -> None:
        """400 "not supported" for what this server cannot do yet."""
        for key in ("audio", "prediction", "web_search_options", "functions"):
            if getattr(self, key) is not None:
                raise not_supported(key, f"'{key}'")
        if self.tools:
            raise not_supported("tools", "Tool calling")
        for key in ("tool_choice", "function_call"):
            if getattr(self, key) not in (None, "none", "auto"):
                raise not_supported(key, f"'{key}' other than \"none\"")
        if self.modalities is not None and self.modalities != ["text"]:
            raise not_supported("modalities", 'Output modalities other than ["text"]')


@dataclass(frozen=True)
class ChatPlan:
    """A checked chat request; `generate_requests` once the messages are rendered."""

    request: ChatCompletionRequest
    model: str  # the name to answer with
    messages: list[dict]  # as the chat template receives them (`template_messages`)

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def max_tokens(self) -> int | None:
        """None: the rest of the context (capped by the server's limit)."""
        if self.request.max_completion_tokens is not None:
            return self.request.max_completion_tokens
        return self.request.max_tokens

    @property
    def logprobs(self) -> bool:
        return self.request.logprobs

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def include_usage(self) -> bool:
        return self.request.stream_options is not None and self.request.stream_options.include_usage

    @property
    def add_generation_prompt(self) -> bool:
        req = self.request
        return (
            req.add_generation_prompt
            if req.add_generation_prompt is not None
            else not req.continue_final_message
        )

    @property
    def continue_final_message(self) -> bool:
        return self.request.continue_final_message

    @property
    def chat_template_kwargs(self) -> dict:
        return self.request.chat_template_kwargs

    def generate_requests(
        self, prompt_ids: list[int], chat_id: str, max_tokens: int
    ) -> tuple[GenerateRequest, ...]:
        """One backend request per choice; `max_tokens` is what the frontend resolved."""
        req = self.request
        template = to_generate_request(
            req,
            prompt_ids=tuple(prompt_ids),
            max_tokens=max_tokens,
            stream=req.stream,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        return tuple(
            msgspec.structs.replace(template, request_id=f"{chat_id}-{i}", seed=seed_for_choice(req.seed, i))
            for i in range(req.n)
        )


def parse_chat_request(
    body: object, *, served_names: tuple[str, ...], vocab_size: int, limits: Limits = Limits()
) -> ChatPlan:
    """Check a decoded body; raise `ApiError` (400, or 404 for an unknown model) on the first problem."""
    req = decode_body(body, ChatCompletionRequest)
    model = check_model(req.model, served_names)
    structured.resolve(req)  # one output constraint at most (each choice's request resolves it again)
    req.check_supported()
    plan = ChatPlan(req, model, template_messages(req.messages))
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_limits(
        limits,
        n=req.n,
        stop=req.stop,
        logprobs=req.top_logprobs,
        logprobs_param="top_logprobs",
        max_tokens=plan.max_tokens,
        max_tokens_param=key,
    )
    SamplingParams.check_vocab(req, vocab_size)  # the sampling fields are SamplingParams' own
    return plan
