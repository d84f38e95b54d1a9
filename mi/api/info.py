"""The bodies of mi-frontend's other routes: /tokenize and /detokenize (as vLLM serves them),
/health and /version.

`TokenizeRequest` takes a `prompt` or chat `messages` (exactly one; the handler checks it, as
it needs no model), with the same message Struct and template options as chat completions.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from mi.api.chat import Message
from mi.api.sampling import TokenId

__all__ = [
    "DetokenizeRequest",
    "DetokenizeResponse",
    "HealthResponse",
    "TokenizeRequest",
    "TokenizeResponse",
    "VersionResponse",
]


class TokenizeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `POST /tokenize` body: exactly one of `prompt` and `messages`."""

    model: Annotated[str | None, Meta(description="A served model name; absent: the first one.")] = None
    prompt: Annotated[str | None, Meta(description="A text to tokenize.")] = None
    messages: (
        Annotated[
            list[Message],
            Meta(
                min_length=1,
                description="Chat messages, rendered with the chat template first.",
            ),
        ]
        | None
    ) = None
    add_special_tokens: Annotated[
        bool,
        Meta(
            description="With `prompt`: add the model's special tokens (e.g. BOS).",
        ),
    ] = True
    add_generation_prompt: Annotated[
        bool | None,
        Meta(
            description="With `messages`: open an assistant turn; default: not continue_final_message.",
        ),
    ] = None
    continue_final_message: Annotated[
        bool,
        Meta(
            description="With `messages`: continue the last (assistant) message.",
        ),
    ] = False
    chat_template_kwargs: Annotated[
        dict[str, Any],
        Meta(
            description="With `messages`: more variables for the chat template.",
        ),
    ] = msgspec.field(default_factory=dict)
    return_token_strs: Annotated[bool, Meta(description="Also return each token's text.")] = False


class TokenizeResponse(msgspec.Struct, frozen=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Annotated[list[str] | None, Meta(description="Null unless return_token_strs.")]


class DetokenizeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `POST /detokenize` body."""

    tokens: Annotated[list[TokenId], Meta(description="Token ids of the served model.")]
    model: Annotated[str | None, Meta(description="A served model name; absent: the first one.")] = None
    skip_special_tokens: Annotated[bool, Meta(description="Leave special tokens out of the text.")] = False


class DetokenizeResponse(msgspec.Struct, frozen=True):
    prompt: str


class HealthResponse(msgspec.Struct, frozen=True):
    status: Annotated[str, Meta(description='"ok", or the backend\'s word for why not (e.g. "starting").')]


class VersionResponse(msgspec.Struct, frozen=True):
    version: str
