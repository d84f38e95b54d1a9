"""Admitting a text prompt: a size check before tokenizing, then tokenizing off the event loop.

The size check needs a bound that is sound: a prompt is refused without tokenizing only when it
certainly has more than `max_model_len` tokens. Bytes alone do not bound tokens from below (a
byte-level BPE token is *at least* one byte, which bounds the count from above), but the
vocabulary does: no token covers more input than its longest entry, so a prompt of B bytes has
at least B / longest tokens. That holds for a BPE model whose unknown characters are not fused
into one token, behind normalizers that never shrink the text by more than a bounded factor
(Unicode normalization composes at most 3 code points, as Hangul jamo, into one). Any other
tokenizer gets no automatic bound (0); `--max-prompt-bytes` then sets a hard one.

Tokenizing runs in a small thread pool: HF tokenizers release the GIL while they encode (in
Rust), so the loop stays responsive; only turning the ids into a Python list holds it (about
0.1 s for a 2 MiB prompt of 1.4 M tokens, measured). A process pool would move that list
conversion too but pay the same again unpickling the ids, so it is not worth it.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import msgspec

from mi.api.backend import GenerateRequest, check_prompt_bytes

# Normalizers (tokenizers' type names) that shrink a text by at most _SHRINK_FACTOR.
_BOUNDED_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Sequence"})
_SHRINK_FACTOR = 4
_TOKENIZER_THREADS = 2


def _normalizers(spec: dict | None) -> list[dict]:
    if spec is None:
        return []
    return [spec, *(n for child in spec.get("normalizers", ()) for n in _normalizers(child))]


def auto_prompt_byte_limit(tokenizer, max_model_len: int) -> int:
    """The most UTF-8 bytes a prompt of `max_model_len` tokens can have, or 0 when this
    tokenizer allows no sound bound (see the module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return 0
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and model.get("unk_token") is not None):
        return 0
    if any(n.get("type") not in _BOUNDED_NORMALIZERS for n in _normalizers(spec.get("normalizer"))):
        return 0
    pieces = [*model.get("vocab", {}), *(t.get("content", "") for t in spec.get("added_tokens", ()))]
    longest = max((len(piece.encode("utf-8", "surrogatepass")) for piece in pieces), default=0)
    return max_model_len * max(longest, 1) * _SHRINK_FACTOR


class PromptTokenizer:
    """Turns a request's text prompt into token ids, in a worker thread, after the size check."""

    def __init__(self, tokenizer, max_model_len: int, max_prompt_bytes: int) -> None:
        """`max_prompt_bytes`: -1 for the automatic bound, 0 for none, else a hard limit."""
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self.max_prompt_bytes = (
            auto_prompt_byte_limit(tokenizer, max_model_len) if max_prompt_bytes < 0 else max_prompt_bytes
        )
        self._pool = ThreadPoolExecutor(_TOKENIZER_THREADS, thread_name_prefix="mi-tokenize")

    async def tokenized(self, req: GenerateRequest) -> GenerateRequest:
        """`req` with its `prompt` replaced by `prompt_ids` (raises the context-length 400 for a
        prompt too long to fit, without tokenizing it)."""
        if req.prompt is None:
            return req
        check_prompt_bytes(req.prompt, self.max_prompt_bytes, self._max_model_len)
        ids = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._encode, req.prompt, req.add_special_tokens
        )
        return msgspec.structs.replace(req, prompt=None, prompt_ids=ids)

    def _encode(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        return tuple(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
