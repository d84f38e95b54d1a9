"""Backend logprob entries -> the two OpenAI logprobs shapes.

A position is `(token_id, entry)`, `entry` the backend's `Logprob` (mi/api/backend_answers.py)
or None (the first prompt token, which has no logprob). Token text comes from a `TokenTexts`
(the frontend's tokenizer), so this module stays plain data.

- completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; `top_logprobs[i]`
  maps token text to logprob for the top alternatives plus the chosen token (OpenAI: "up to
  logprobs + 1 elements"), so `logprobs: 0` gives the chosen token alone; two tokens with the
  same text (e.g. partial UTF-8 bytes shown as U+FFFD) share one key holding the better logprob;
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, exactly
  `top_logprobs` alternatives (0 gives `[]`).

A logprob the backend could not represent (null: -inf) is reported as -9999.0, as OpenAI does.
"""

from __future__ import annotations

from typing import Protocol

from mi.api.backend_answers import Logprob

__all__ = ["Position", "TokenTexts", "chat_logprobs", "completion_logprobs"]

Position = tuple[int, Logprob | None]
_FLOOR = -9999.0


class TokenTexts(Protocol):
    def token_str(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def _lp(value: float | None) -> float:
    return _FLOOR if value is None else value


def completion_logprobs(positions: list[Position], texts: TokenTexts, text_offset: int) -> tuple[dict, int]:
    """The completions `logprobs` object of `positions`, whose text starts at `text_offset`
    in the choice's text; also returns the offset after the last token."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in positions:
        token = texts.token_str(token_id)
        tokens.append(token)
        offsets.append(text_offset)
        text_offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(entry.logprob))
        top: dict[str, float] = {}
        for top_id, lp in entry.top:  # NOTE: best first; tokens with equal text keep the best
            top.setdefault(texts.token_str(top_id), _lp(lp))
        top.setdefault(token, _lp(entry.logprob))
        top_logprobs.append(top)
    obj = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
    return obj, text_offset


def _chat_token(texts: TokenTexts, token_id: int, logprob: float | None) -> dict:
    raw = texts.token_bytes(token_id)
    return {"token": texts.token_str(token_id), "logprob": _lp(logprob), "bytes": list(raw)}


def chat_logprobs(positions: list[Position], texts: TokenTexts) -> dict:
    """The chat `logprobs` object of generated `positions` (entries are never None here)."""
    content = []
    for token_id, entry in positions:
        item = _chat_token(texts, token_id, entry.logprob if entry else None)
        item["top_logprobs"] = [_chat_token(texts, i, lp) for i, lp in entry.top] if entry else []
        content.append(item)
    return {"content": content, "refusal": None}
