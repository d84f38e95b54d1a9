"""The async SDK: `AsyncModel` and `AsyncStream` over the backend's token-level API.

    async with AsyncModel("http://localhost:12222") as model:
        outputs = await model.generate(["hello"], do_sample=False, max_new_tokens=8)
        async with model.stream("hello", max_new_tokens=64) as stream:
            async for delta in stream:
                print(delta.text, end="")

Every call opens its own session of the transport (mi/sdk/transport.py) in the running loop, so
a model works from any loop and needs no closing; every request carries `Authorization: Bearer
SECRET` from the backend's cert file when that file exists. Abandoning a call (cancellation,
`aclose()`, `abort()`) aborts the request in the backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

from mi.api.backend import BackendStats, GenerateRequest, GenerateResult, ModelInfo
from mi.api.errors import ApiError, validation_error
from mi.api.tokenizer_files import load_tokenizer_files
from mi.config import cert_path
from mi.sdk.stream import AsyncStream
from mi.sdk.transport import Backend
from mi.sdk.types import GenerationOutput, InvalidRequest, ServerError, to_logprobs

__all__ = ["AsyncModel", "make_request", "normalize_prompts", "run_sync"]

Prompts = str | list[str] | list[int] | list[list[int]]


# Sampling keywords the SDK takes as they are: GenerateRequest's fields (mi/api/sampling.py
# documents each) but the prompt and the two it names as Hugging Face `generate` does.
_SAMPLING_KEYWORDS = frozenset(GenerateRequest.__struct_fields__) - {
    "prompt",
    "prompt_ids",
    "max_tokens",
    "min_tokens",
}


def make_request(
    prompt: str | list[int],
    *,
    do_sample: bool = True,
    max_new_tokens: int = 16,
    min_new_tokens: int = 0,
    **sampling: Any,
) -> GenerateRequest:
    """One backend request. A string prompt is tokenized by the backend (BOS added unless
    `add_special_tokens=False`); token ids are used as given. `do_sample=False` is greedy
    decoding (temperature 0). Other keywords are the fields of `SamplingParams` (temperature,
    top_p, top_k, min_p, the penalties, logit_bias, stop, stop_token_ids, seed, logprobs,
    prompt_logprobs, ...) and add_special_tokens, stream; an unknown one is a TypeError. The
    backend checks every value (`InvalidRequest` names it); the rules between fields
    (max_new_tokens 0, min_new_tokens) are checked here already."""
    unknown = sorted(set(sampling) - _SAMPLING_KEYWORDS)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}; the sampling "
            f"keywords are do_sample, max_new_tokens, min_new_tokens, "
            f"{', '.join(sorted(_SAMPLING_KEYWORDS))}"
        )
    if not do_sample:
        sampling["temperature"] = 0.0
    if sampling.get("logit_bias"):
        sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"].items()}
    try:
        return GenerateRequest(
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_ids=None if isinstance(prompt, str) else tuple(prompt),
            max_tokens=max_new_tokens,
            min_tokens=min_new_tokens,
            **{name: value for name, value in sampling.items() if value is not None},  # None: default
        )
    except ValueError as exc:  # a rule between fields (SamplingParams.__post_init__)
        err = validation_error(str(exc))
        raise InvalidRequest(err.message, err.status, err.param, err.code) from None


def normalize_prompts(prompts: Prompts) -> list[str | list[int]]:
    """One entry per prompt; raise TypeError on anything else."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a str, a list of str, a list of token ids or a list of such lists")
    if all(_is_int(p) for p in prompts):
        return [list(prompts)]
    normalized = []
    for prompt in prompts:
        if isinstance(prompt, str):
            normalized.append(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(_is_int(i) for i in prompt):
            normalized.append(list(prompt))
        else:
            raise TypeError(f"each prompt must be a str or a non-empty list of token ids, got {prompt!r:.80}")
    return normalized


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _output(result: GenerateResult) -> GenerationOutput:
    return GenerationOutput(
        list(result.prompt_ids),
        list(result.ids),
        result.text,
        result.finish_reason,
        to_logprobs(result.logprobs),
        to_logprobs(result.prompt_logprobs),
        result.usage,
        result.request_id,
    )


class AsyncModel:
    """A served model, reached at `endpoint` (e.g. "http://localhost:12222").

    `cert`: the backend's shared-secret file (default: $MI_CERT or ~/.mi/cert; nothing is sent
    when it does not exist). `timeout`: seconds one `generate` may take, and the longest wait
    for the next delta of a stream. `connect_timeout`: seconds to open a connection.
    Nothing is contacted until first use.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        cert: str | Path | None = None,
        timeout: float = 600,
        connect_timeout: float = 10,
    ) -> None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http:// URL, got {endpoint!r}")
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError(f"timeouts must be positive, got {timeout!r} and {connect_timeout!r}")
        self.endpoint = endpoint.rstrip("/")
        self.cert = cert_path(cert)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self._tokenizer = None
        self._info: ModelInfo | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self.endpoint!r})"

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def _backend(self, *, is_stream: bool = False) -> Backend:
        """A transport session: a call may take `timeout` in all, a stream that long per delta."""
        timeouts = {"read_timeout": self.timeout} if is_stream else {"timeout": self.timeout}
        return Backend(self.endpoint, self.cert, connect_timeout=self.connect_timeout, **timeouts)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, prompts: Prompts, **sampling: Any) -> list[GenerationOutput]:
        """Complete each prompt (concurrently); one output per prompt, in order. Keyword
        arguments are those of `make_request` (do_sample, max_new_tokens, temperature, top_p,
        top_k, min_p, penalties, logit_bias, stop, stop_token_ids, seed, logprobs, ...)."""
        reqs = [make_request(prompt, **sampling) for prompt in normalize_prompts(prompts)]
        async with self._backend() as backend:
            tasks = [asyncio.ensure_future(backend.generate(req)) for req in reqs]
            try:
                results = await asyncio.gather(*tasks)
            finally:
                for task in tasks:  # NOTE: a failed sibling closes the others' connections: aborted
                    task.cancel()
        return [_output(result) for result in results]

    def stream(self, prompt: str | list[int], **sampling: Any) -> AsyncStream:
        """Stream one prompt's deltas: `async for delta in model.stream(...)`. Close it (or use
        `async with`) when leaving early: that aborts the request in the backend."""
        if not isinstance(prompt, (str, list, tuple)) or len(normalize_prompts(prompt)) != 1:
            raise TypeError("stream takes one prompt: a str or a list of token ids")
        req = make_request(normalize_prompts(prompt)[0], **sampling, stream=True)
        return AsyncStream(self._backend(is_stream=True), req)

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; False when it is unknown or already finished."""
        async with self._backend() as backend:
            return await backend.abort_now(request_id)

    # -- model metadata ------------------------------------------------------------------------

    async def get_info(self) -> ModelInfo:
        """`GET /v1/model`: name, context length, vocabulary size, ... (fetched once)."""
        if self._info is None:
            async with self._backend() as backend:
                self._info = await backend.model_info()
        return self._info

    @property
    def tokenizer(self):
        """The tokenizer, loaded on first use; that first use blocks (in a helper thread), so
        async code may prefer `await get_tokenizer()` once."""
        return self._tokenizer or run_sync(self.get_tokenizer())

    async def get_tokenizer(self):
        """The served model's Hugging Face tokenizer, fetched from the backend on first use."""
        if self._tokenizer is None:
            async with self._backend() as backend:
                files = await backend.tokenizer_files()
            try:
                self._tokenizer = await asyncio.to_thread(load_tokenizer_files, files)
            except ApiError as err:
                raise ServerError(err.message) from None
        return self._tokenizer

    async def stats(self) -> BackendStats:
        """`GET /v1/stats`: running / waiting requests, KV blocks in use, counters."""
        async with self._backend() as backend:
            return await backend.stats()

    async def health(self) -> bool:
        """True when the backend answers `/health` with 200."""
        async with self._backend() as backend:
            status, _ = await backend.health()
        return status == 200


def run_sync(coro):
    """Run `coro` to completion from synchronous code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        return asyncio.run(coro)
    # NOTE: asyncio.run refuses to nest; a helper thread gets its own loop (e.g. in Jupyter).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
