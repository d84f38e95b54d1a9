"""The answers of `/v1/completions` and `/v1/chat/completions` as Structs: full responses and
streamed chunks, encoded with msgspec by the frontend and described by /openapi.json.

The JSON keeps OpenAI's shape to the key, including the nulls clients rely on (`logprobs: null`,
`finish_reason: null` in chunks, `usage: null` in every chunk when `include_usage` is set).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from mi.api.openai_common import CompletionUsage

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobs",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionResponse",
    "TopLogprob",
]


# -- completions --------------------------------------------------------------------------------


class CompletionLogprobs(msgspec.Struct, frozen=True):
    """Per token of the choice's text (the echoed prompt first): its text, logprob, the top
    alternatives plus itself by text, and its offset in the text. The first prompt token has no
    logprob (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, frozen=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Annotated[
        Literal["stop", "length"] | None,
        Meta(
            description="Null in every streamed chunk but the last of its choice.",
        ),
    ]


class CompletionResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The answer without `stream`: every choice, in index order."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    """One streamed event: a text delta of one choice; with `stream_options.include_usage`
    every chunk has `usage: null` and a last chunk has no choices and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None | UnsetType = UNSET


# -- chat completions ---------------------------------------------------------------------------


class TopLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: Annotated[list[int], Meta(description="The token's raw bytes (part of a UTF-8 character, maybe).")]


class ChatTokenLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: Annotated[list[TopLogprob], Meta(description="Exactly top_logprobs alternatives.")]


class ChatLogprobs(msgspec.Struct, frozen=True):
    content: list[ChatTokenLogprob]
    refusal: None = None


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    tool_calls: Annotated[list[dict[str, Any]], Meta(description="Always empty.")] = []


class ChatChoice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The answer without `stream`: every choice, in index order."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(msgspec.Struct, frozen=True):
    """The first chunk of a choice has `{"role": "assistant", "content": ""}`, the last may be `{}`."""

    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Annotated[
        Literal["stop", "length"] | None,
        Meta(
            description="Null in every chunk but the last of its choice.",
        ),
    ]


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    """One streamed event of one choice; with `stream_options.include_usage` every chunk has
    `usage: null` and a last chunk has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None | UnsetType = UNSET
