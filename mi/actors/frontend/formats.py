"""How a completions or a chat answer is shaped: a `Format` turns backend results and stream
pieces of one request into the endpoint's answer Structs (mi/api/openai_answers.py).

`generate.py` runs the same machinery for both endpoints and asks its `Format` for each chunk,
choice and response; `UsageTotal` sums usage over choices (each prompt counted once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from mi.actors.frontend.tokenizer import FrontendTokenizer
from mi.api.backend import GenerateResult
from mi.api.chat import ChatPlan
from mi.api.logprobs import chat_logprobs, completion_logprobs
from mi.api.openai import CompletionPlan
from mi.api.openai_answers import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
)
from mi.api.openai_common import CompletionUsage, usage_info

__all__ = ["ChatFormat", "CompletionFormat", "Format", "Piece", "UsageTotal"]


@dataclass
class Piece:
    """Text of one choice not yet written, with its logprob positions (token id, entry)."""

    text: str = ""
    positions: list = field(default_factory=list)

    def __add__(self, other: Piece) -> Piece:
        return Piece(self.text + other.text, self.positions + other.positions)


def _positions(ids, entries: list | None) -> list:
    return list(zip(ids, entries if entries is not None else [None] * len(ids)))


class CompletionFormat:
    def __init__(self, creq: CompletionPlan, cid: str, tok: FrontendTokenizer | None) -> None:
        self.creq, self.cid, self.tok = creq, cid, tok
        self.n, self.include_usage = creq.n, creq.include_usage
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}

    def opening_chunks(self) -> list[CompletionChunk]:
        return []

    def prompt_piece(self, index: int, prompt_ids, prompt_logprobs: list | None) -> Piece | None:
        """The echoed prompt of choice `index` (None without echo)."""
        if not self.creq.echo:
            return None
        prompt = self.creq.prompts[index // self.n]
        req = self.creq.generate_requests[index]
        text = prompt if isinstance(prompt, str) else self.tok.decode(prompt, req.skip_special_tokens)
        positions = _positions(prompt_ids, prompt_logprobs) if self.creq.logprobs is not None else []
        return Piece(text, positions)

    def piece(self, ids, logprobs: list | None, text: str) -> Piece:
        return Piece(text, _positions(ids, logprobs) if self.creq.logprobs is not None else [])

    def _logprobs(self, index: int, piece: Piece) -> CompletionLogprobs | None:
        if self.creq.logprobs is None:
            return None
        obj, self._offsets[index] = completion_logprobs(
            piece.positions, self.tok, self._offsets.get(index, 0)
        )
        return msgspec.convert(obj, CompletionLogprobs)

    def _chunk(self, choices: list[CompletionChoice], usage=None) -> CompletionChunk:
        return CompletionChunk(
            id=self.cid,
            created=self.created,
            model=self.creq.model,
            choices=choices,
            usage=usage if self.include_usage else msgspec.UNSET,
        )

    def chunk(self, index: int, piece: Piece, finish_reason: str | None) -> CompletionChunk:
        return self._chunk([CompletionChoice(index, piece.text, self._logprobs(index, piece), finish_reason)])

    def choice(self, index: int, result: GenerateResult) -> CompletionChoice:
        piece = self.prompt_piece(index, result.prompt_ids, result.prompt_logprobs) or Piece()
        piece += self.piece(result.ids, result.logprobs, result.text)
        return CompletionChoice(index, piece.text, self._logprobs(index, piece), result.finish_reason)

    def response(self, choices: list[CompletionChoice], usage: CompletionUsage) -> CompletionResponse:
        return CompletionResponse(
            id=self.cid, created=self.created, model=self.creq.model, choices=choices, usage=usage
        )

    def usage_chunk(self, usage: CompletionUsage) -> CompletionChunk:
        return self._chunk([], usage)


class ChatFormat:
    def __init__(self, creq: ChatPlan, cid: str, tok: FrontendTokenizer) -> None:
        self.creq, self.cid, self.tok = creq, cid, tok
        self.n, self.include_usage = creq.n, creq.include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.cid,
            created=self.created,
            model=self.creq.model,
            choices=choices,
            usage=usage if self.include_usage else msgspec.UNSET,
        )

    def _logprobs(self, positions: list) -> ChatLogprobs | None:
        return (
            msgspec.convert(chat_logprobs(positions, self.tok), ChatLogprobs) if self.creq.logprobs else None
        )

    def opening_chunks(self) -> list[ChatCompletionChunk]:
        return [
            self._chunk([ChatChunkChoice(i, ChatDelta("assistant", ""), None, None)]) for i in range(self.n)
        ]

    def prompt_piece(self, index: int, prompt_ids, prompt_logprobs: list | None) -> None:
        return None

    def piece(self, ids, logprobs: list | None, text: str) -> Piece:
        return Piece(text, _positions(ids, logprobs) if self.creq.logprobs else [])

    def chunk(self, index: int, piece: Piece, finish_reason: str | None) -> ChatCompletionChunk:
        delta = ChatDelta(content=piece.text) if piece.text else ChatDelta()
        return self._chunk([ChatChunkChoice(index, delta, self._logprobs(piece.positions), finish_reason)])

    def choice(self, index: int, result: GenerateResult) -> ChatChoice:
        logprobs = self._logprobs(_positions(result.ids, result.logprobs))
        return ChatChoice(index, AssistantMessage(content=result.text), logprobs, result.finish_reason)

    def response(self, choices: list[ChatChoice], usage: CompletionUsage) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.cid, created=self.created, model=self.creq.model, choices=choices, usage=usage
        )

    def usage_chunk(self, usage: CompletionUsage) -> ChatCompletionChunk:
        return self._chunk([], usage)


Format = CompletionFormat | ChatFormat


class UsageTotal:
    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    def add(self, index: int, usage) -> None:
        if index % self.n == 0:
            self.prompt_tokens += usage.prompt_tokens
            self.cached_tokens += usage.cached_tokens
        self.completion_tokens += usage.completion_tokens

    def info(self) -> CompletionUsage:
        return usage_info(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
