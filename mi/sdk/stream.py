"""`AsyncStream`: the deltas of one streamed generate, for the SDK.

It owns one transport session (`Backend`) and one response for its lifetime. Leaving early
(`aclose()`, `async with` exit, cancellation) aborts the request in the backend: an explicit
`/v1/abort` (best effort), then closing the connection, which aborts it as well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from mi.api.backend import GenerateRequest, StreamDelta, StreamStart
from mi.sdk.transport import Backend
from mi.sdk.types import MIError, StreamOutput, Usage, to_logprobs

__all__ = ["AsyncStream"]


class AsyncStream:
    """The deltas of one streamed generate. After the start, `prompt_ids` (and
    `prompt_logprobs` when asked) are set; after the last delta, `finish_reason` and `usage`."""

    def __init__(self, backend: Backend, req: GenerateRequest) -> None:
        self._backend, self._req = backend, req
        self.request_id = req.request_id
        self.prompt_ids: list[int] | None = None
        self.prompt_logprobs = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._resp: aiohttp.ClientResponse | None = None
        self._items: AsyncIterator[StreamStart | StreamDelta] | None = None
        self._started = False
        self._closed = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Send the request and read the first line (done by the first `__anext__` otherwise)."""
        if self._started or self._closed:
            return
        self._started = True
        try:
            await self._backend.start()
            self._resp = await self._backend.stream(self._req)
            self._items = self._backend.lines(self._resp)
            first = await anext(self._items)  # the transport's decoder: a StreamStart
        except BaseException:
            await self._release()
            raise
        self.prompt_ids = list(first.prompt_ids)
        self.prompt_logprobs = to_logprobs(first.prompt_logprobs)

    async def __anext__(self) -> StreamOutput:
        if self._closed or self.finish_reason is not None:
            raise StopAsyncIteration
        await self.start()
        try:
            item = await anext(self._items)  # a StreamDelta; the stream ends after the last one
        except BaseException:
            await self.aclose()
            raise
        if item.finish_reason is not None:
            self.finish_reason, self.usage = item.finish_reason, item.usage
            await self._release()
        return StreamOutput(list(item.ids), item.text, item.finish_reason, to_logprobs(item.logprobs))

    async def abort(self) -> bool:
        """Ask the backend to stop; the stream then ends with finish_reason "abort". False when
        the request is not running (not sent yet, finished or closed)."""
        if self._resp is None:
            return False
        return await self._backend.abort_now(self.request_id)

    async def aclose(self) -> None:
        """Stop reading; an unfinished request is aborted in the backend."""
        if self._closed:
            return
        self._closed = True
        if self._resp is not None and self.finish_reason is None:
            try:
                await self._backend.abort_now(self.request_id)
            except MIError:
                pass  # closing the connection below aborts it as well
        await self._release()

    async def _release(self) -> None:
        if self._items is not None:
            await self._items.aclose()
        if self._resp is not None:
            self._resp.close()
        await self._backend.close()
        self._items = self._resp = None
