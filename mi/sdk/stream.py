"""`AsyncStream`: the deltas of one streamed generate (NDJSON from the backend), for the SDK.

It owns one aiohttp session and one response for its lifetime. Leaving early (`aclose()`,
`async with` exit, cancellation) aborts the request in the backend: an explicit `/v1/abort`
(best effort), then closing the connection, which aborts it as well.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import orjson

from mi.api.backend import GenerateRequest, LineBuffer, StreamDelta, StreamStart, parse_stream_line
from mi.api.errors import ApiError
from mi.sdk.types import InvalidRequest, MIError, ServerError, StreamOutput, Usage, to_logprobs

if TYPE_CHECKING:
    from mi.sdk.async_model import AsyncModel

__all__ = ["AsyncStream"]


class AsyncStream:
    """The deltas of one streamed generate. After the start, `prompt_ids` (and
    `prompt_logprobs` when asked) are set; after the last delta, `finish_reason` and `usage`."""

    def __init__(self, model: "AsyncModel", req: GenerateRequest) -> None:
        self._model, self._req = model, req
        self.request_id = req.request_id
        self.prompt_ids: list[int] | None = None
        self.prompt_logprobs = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resp: aiohttp.ClientResponse | None = None
        self._lines: list[bytes] = []
        self._buf = LineBuffer()
        self._started = False
        self._closed = False

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Send the request and read the first line (done by the first `__anext__` otherwise)."""
        if self._started or self._closed:
            return
        self._started = True
        model = self._model
        self._session = model._session(sock_read=model.timeout)
        try:
            self._resp = await model._open(self._session, "POST", "/v1/generate", self._req.to_json())
            first = await self._next_item()
        except BaseException:
            await self._release()
            raise
        if not isinstance(first, StreamStart):
            await self._release()
            raise ServerError("The backend's stream did not start with the prompt.")
        self.prompt_ids = list(first.prompt_ids)
        self.prompt_logprobs = to_logprobs(first.prompt_logprobs)

    async def __anext__(self) -> StreamOutput:
        if self._closed or self.finish_reason is not None:
            raise StopAsyncIteration
        await self.start()
        try:
            item = await self._next_item()
        except BaseException:
            await self.aclose()
            raise
        if not isinstance(item, StreamDelta):
            await self.aclose()
            raise ServerError("The backend sent a second stream start.")
        if item.finish_reason is not None:
            self.finish_reason = item.finish_reason
            if item.usage is not None:
                self.usage = Usage(item.usage.prompt_tokens, item.usage.completion_tokens, item.usage.cached_tokens)
            await self._release()
        return StreamOutput(list(item.ids), item.text, item.finish_reason, to_logprobs(item.logprobs))

    async def _next_item(self) -> StreamStart | StreamDelta:
        while not self._lines:
            try:
                data = await self._resp.content.readany()
            except asyncio.TimeoutError:
                raise self._model._timeout() from None
            except aiohttp.ClientError:
                data = b""
            if not data:
                rest = self._buf.rest()
                if rest is None:
                    raise ServerError(f"The backend at {self._model.endpoint} closed the stream early.")
                self._lines.append(rest)
                break
            self._lines.extend(self._buf.feed(data))
        line = self._lines.pop(0)
        try:
            return parse_stream_line(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise ServerError("The backend sent an invalid stream line.") from None
        except ApiError as err:
            if err.status < 500:
                raise InvalidRequest(err.message, err.status, err.param, err.code) from None
            raise ServerError(err.message) from None

    async def abort(self) -> bool:
        """Ask the backend to stop; the stream then ends with finish_reason "abort"."""
        if self.finish_reason is not None:
            return False
        return await self._model.abort(self.request_id)

    async def aclose(self) -> None:
        """Stop reading; an unfinished request is aborted in the backend."""
        if self._closed:
            return
        self._closed = True
        if self._resp is not None and self.finish_reason is None:
            try:
                await self._model.abort(self.request_id)
            except MIError:
                pass  # closing the connection below aborts it as well
        await self._release()

    async def _release(self) -> None:
        if self._resp is not None:
            self._resp.close()
        if self._session is not None:
            await self._session.close()
        self._resp = self._session = None
