"""The frontend's copy of the served model's tokenizer: chat templates, /tokenize, token texts.

`TokenizerStore` loads it once from the backend's `GET /v1/tokenizer` (in a worker thread: the
transformers import and the load take seconds), either when first needed or by `warm_up`, which
waits for the backend after start-up. `FrontendTokenizer` wraps the Hugging Face tokenizer with
what the handlers need; each failure a client can cause is an `ApiError` 400. `encode` and
`render_chat` take long on a long prompt: handlers call them in a worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re

from mi.api.backend import check_prompt_bytes
from mi.api.errors import ApiError
from mi.api.tokenizer_files import load_tokenizer_files
from mi.sdk.transport import Backend

__all__ = ["FrontendTokenizer", "TokenizerStore"]

log = logging.getLogger("mi.frontend")

# Keyword arguments of apply_chat_template that chat_template_kwargs may not override.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class FrontendTokenizer:
    """The served model's tokenizer plus the frontend's chat template override."""

    def __init__(self, tokenizer, chat_template: str | None) -> None:
        self.hf = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self._special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            getattr(tokenizer, "added_tokens_decoder", {}) or {}
        )
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._is_byte_level = type(decoder).__name__ == "ByteLevel"
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._token_str)
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(self._token_bytes)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _token_str(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a byte-level piece may be part of a UTF-8 character)."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._special_ids:
            if self._is_byte_level and all(c in _byte_decoder() for c in piece):
                return bytes(_byte_decoder()[c] for c in piece)
            match = _BYTE_TOKEN.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        return self._token_str(token_id).encode("utf-8")

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
        *,
        max_prompt_bytes: int = 0,
        max_model_len: int = 0,
    ) -> list[int]:
        """Render `messages` with the chat template and tokenize the text as it stands (the
        template writes BOS itself where the model wants one). A rendered text longer than
        `max_prompt_bytes` (the backend's bound) is the context-length 400, not tokenized."""
        if not self.chat_template:
            raise ApiError(
                400,
                "The served model has no chat template; start mi-frontend with "
                "--chat-template, or use /v1/completions.",
                "messages",
                code="no_chat_template",
            )
        kwargs = dict(template_kwargs or {})
        reserved = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ApiError(
                400,
                f"'chat_template_kwargs' may not set '{reserved[0]}'.",
                "chat_template_kwargs",
                code="invalid_value",
            )
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ApiError(
                400,
                "'continue_final_message' needs an assistant message last.",
                "messages",
                code="invalid_value",
            )
        try:
            text = self.hf.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except Exception as exc:  # jinja errors, raise_exception() in the template, bad kwargs
            message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ApiError(
                400,
                f"The chat template could not render these messages: {message}",
                "messages",
                code="chat_template_error",
            ) from None
        if not isinstance(text, str):
            raise ApiError(400, "The chat template did not render to text.", "messages")
        check_prompt_bytes(text, max_prompt_bytes, max_model_len)
        return self.encode(text, add_special_tokens=False)

    def info(self, max_model_len: int) -> dict:
        """`GET /tokenizer_info`, as vLLM serves it (the fields evaluation tools read)."""
        hf = self.hf
        return {
            "tokenizer_class": type(hf).__name__,
            "bos_token": hf.bos_token,
            "eos_token": hf.eos_token,
            "pad_token": hf.pad_token,
            "unk_token": hf.unk_token,
            "bos_token_id": hf.bos_token_id,
            "eos_token_id": hf.eos_token_id,
            "pad_token_id": hf.pad_token_id,
            "chat_template": self.chat_template,
            "model_max_length": max_model_len,
            "vocab_size": len(hf),
            "add_bos_token": getattr(hf, "add_bos_token", None),
        }


class TokenizerStore:
    """Loads the tokenizer once (concurrent callers wait for the same load)."""

    def __init__(self, backend: Backend, chat_template: str | None) -> None:
        self._backend = backend
        self._chat_template = chat_template
        self._tokenizer: FrontendTokenizer | None = None
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> FrontendTokenizer | None:
        return self._tokenizer

    async def get(self) -> FrontendTokenizer:
        async with self._lock:
            if self._tokenizer is None:
                files = await self._backend.tokenizer_files()
                hf = await asyncio.to_thread(load_tokenizer_files, files)
                self._tokenizer = FrontendTokenizer(hf, self._chat_template)
            return self._tokenizer

    async def warm_up(self, interval: float = 1.0) -> None:
        """Load the tokenizer as soon as the backend serves; runs until it succeeds."""
        while self._tokenizer is None:
            status, _ = await self._backend.health()
            if status == 200:
                try:
                    await self.get()
                    return
                except ApiError as err:
                    log.warning("could not load the tokenizer yet: %s", err.message)
            await asyncio.sleep(interval)
