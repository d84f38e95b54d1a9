"""The Python SDK: `Model` talks to a running `mi-backend` over its token-level API.

    from mi import Model
    model = Model(endpoint="http://localhost:12222")
    outputs = model.generate(["hello, my name is", "Welcome to"], do_sample=False, max_new_tokens=200)
    model.tokenizer.decode(outputs[0].ids)

    with model.stream("hello", max_new_tokens=64) as stream:   # closing early aborts it
        for delta in stream:
            print(delta.text, end="")

`Model` is the synchronous face of `AsyncModel` (mi/sdk/async_model.py): each call runs on a
private event loop (in a helper thread when the calling thread already runs one, e.g. in
Jupyter); a stream keeps one loop in one helper thread for its lifetime. Failures raise the
typed errors of mi/sdk/types.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from mi.api.backend import BackendStats, ModelInfo
from mi.sdk.async_model import AsyncModel, Prompts, make_request, run_sync
from mi.sdk.stream import AsyncStream
from mi.sdk.types import (
    AuthenticationError,
    BackendUnavailable,
    GenerationOutput,
    InvalidRequest,
    MIError,
    Overloaded,
    RequestTimeout,
    ServerError,
    StreamOutput,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AsyncModel",
    "AsyncStream",
    "AuthenticationError",
    "BackendUnavailable",
    "GenerationOutput",
    "InvalidRequest",
    "MIError",
    "Model",
    "Overloaded",
    "RequestTimeout",
    "ServerError",
    "Stream",
    "StreamOutput",
    "TokenLogprob",
    "Usage",
    "make_request",
]


class Model:
    """A served model, reached at `endpoint` (e.g. "http://localhost:12222").

    Arguments as `AsyncModel`: `cert` (the backend's secret file; default $MI_CERT or
    ~/.mi/cert), `timeout` (seconds for one `generate`, and the longest wait for a stream's next
    delta), `connect_timeout`. Nothing is contacted until first use.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        cert: str | Path | None = None,
        timeout: float = 600,
        connect_timeout: float = 10,
    ) -> None:
        self._async = AsyncModel(endpoint, cert=cert, timeout=timeout, connect_timeout=connect_timeout)
        self._lock = threading.Lock()

    endpoint = property(lambda self: self._async.endpoint)
    timeout = property(lambda self: self._async.timeout)

    def __repr__(self) -> str:
        return f"Model(endpoint={self.endpoint!r})"

    def generate(self, prompts: Prompts, **sampling: Any) -> list[GenerationOutput]:
        """Complete each prompt; one output per prompt, in order (a single prompt gives a list
        of one). A prompt is a string (tokenized by the backend, BOS added) or a list of token
        ids (used as given). Keyword arguments: `do_sample` (False: greedy), `max_new_tokens`,
        `min_new_tokens`, and the fields of `mi.api.sampling.SamplingParams`: `temperature`,
        `top_p`, `top_k`, `min_p`, `repetition_penalty`, `presence_penalty`,
        `frequency_penalty`, `logit_bias`, `stop`, `stop_token_ids`,
        `include_stop_str_in_output`, `ignore_eos`, `seed`, `logprobs`, `prompt_logprobs`,
        `skip_special_tokens`; and `add_special_tokens`."""
        return run_sync(self._async.generate(prompts, **sampling))

    async def agenerate(self, prompts: Prompts, **sampling: Any) -> list[GenerationOutput]:
        """`generate` for code that already runs an event loop."""
        return await self._async.generate(prompts, **sampling)

    def stream(self, prompt: str | list[int], **sampling: Any) -> Stream:
        """Iterate over one prompt's deltas (`StreamOutput`). Leaving early: `close()` the
        stream or use `with`, which aborts the request; `abort()` stops it and the stream ends
        with finish_reason "abort"."""
        return Stream(self._async.stream(prompt, **sampling))

    def abort(self, request_id: str) -> bool:
        """Abort a running request by id; False when it is unknown or already finished."""
        return run_sync(self._async.abort(request_id))

    @property
    def info(self) -> ModelInfo:
        """`GET /v1/model`: name, context length, vocabulary size, ... (fetched once)."""
        with self._lock:
            return self._async._info or run_sync(self._async.get_info())

    @property
    def tokenizer(self):
        """The served model's Hugging Face tokenizer, fetched from the backend on first use."""
        with self._lock:
            return self._async._tokenizer or run_sync(self._async.get_tokenizer())

    def stats(self) -> BackendStats:
        """`GET /v1/stats`: running / waiting requests, KV blocks in use, counters."""
        return run_sync(self._async.stats())

    def health(self) -> bool:
        """True when the backend answers `/health` with 200."""
        return run_sync(self._async.health())


class Stream:
    """The synchronous face of an `AsyncStream`; its loop lives in one helper thread."""

    def __init__(self, astream: AsyncStream) -> None:
        self._astream = astream
        self._loop = asyncio.new_event_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi-stream")
        self._closed = False

    request_id = property(lambda self: self._astream.request_id)
    prompt_ids = property(lambda self: self._astream.prompt_ids)
    prompt_logprobs = property(lambda self: self._astream.prompt_logprobs)
    finish_reason = property(lambda self: self._astream.finish_reason)
    usage = property(lambda self: self._astream.usage)

    def _run(self, coro):
        if self._closed:
            coro.close()
            raise MIError("The stream is closed.")
        return self._pool.submit(self._loop.run_until_complete, coro).result()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamOutput:
        if self._closed:
            raise StopIteration
        try:
            return self._run(self._astream.__anext__())
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Send the request now (the first iteration does otherwise); sets `prompt_ids`."""
        self._run(self._astream.start())

    def abort(self) -> bool:
        """Ask the backend to stop; iteration then ends with finish_reason "abort"."""
        return self._run(self._astream.abort())

    def close(self) -> None:
        """Stop reading; an unfinished request is aborted in the backend."""
        if self._closed:
            return
        try:
            self._run(self._astream.aclose())
        finally:
            self._closed = True
            self._pool.submit(self._loop.close).result()
            self._pool.shutdown(wait=True)
