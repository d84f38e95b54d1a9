"""The frontend's client of the backend's token-level API (docs/backend-api.md).

One aiohttp session for the frontend's lifetime; a bare port goes over the backend's unix socket
when it exists. Every failure to reach the backend becomes a 503 ApiError, every malformed answer
a 502: handlers only ever see ApiError.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import orjson

from mi.api.backend import (
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamDelta,
    StreamStart,
    parse_stream_line,
    socket_path,
)
from mi.api.errors import ApiError

__all__ = ["Backend", "parse_backend"]

def parse_backend(spec: str) -> tuple[str, int]:
    """`"12222"` -> ("", 12222) (local), `"host:12222"` -> ("host", 12222)."""
    spec = spec.removeprefix("http://").rstrip("/")
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--backend must be PORT or HOST:PORT, got {spec!r}")
    return host.strip("[]"), int(port)


def _connector(spec: str) -> tuple[str, aiohttp.BaseConnector]:
    """Base URL and connector; a bare port prefers the backend's unix socket when it exists."""
    host, port = parse_backend(spec)
    if not host and os.path.exists(socket_path(port)):
        return "http://localhost", aiohttp.UnixConnector(path=socket_path(port), limit=0)
    host = host or "127.0.0.1"
    url_host = f"[{host}]" if ":" in host else host
    return f"http://{url_host}:{port}", aiohttp.TCPConnector(limit=0)


_UNAVAILABLE = "The backend is not available. Please retry later."
_CONNECT_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError)


def _unavailable() -> ApiError:
    return ApiError(503, _UNAVAILABLE, code="backend_unavailable", retry_after=1)


async def _error_from(resp: aiohttp.ClientResponse) -> ApiError:
    try:
        body = orjson.loads(await resp.read())
    except (orjson.JSONDecodeError, *_CONNECT_ERRORS):
        body = None
    err = ApiError.from_body(resp.status, body)
    if resp.status == 503:
        err.retry_after = 1
    return err


class Backend:
    """The frontend's client of the backend API (one session for the app's lifetime)."""

    def __init__(self, spec: str) -> None:
        self._spec = spec
        self._base_url = ""
        self._session: aiohttp.ClientSession | None = None
        self._model_info: ModelInfo | None = None
        self._model_info_lock = asyncio.Lock()
        self._aborts: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._base_url, connector = _connector(self._spec)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def close(self) -> None:
        if self._aborts:
            await asyncio.wait(self._aborts, timeout=2)
        if self._session is not None:
            await self._session.close()

    def _post(self, path: str, obj: dict):
        return self._session.post(
            self._base_url + path, data=orjson.dumps(obj), headers={"Content-Type": "application/json"}
        )

    async def health(self) -> tuple[int, object]:
        try:
            async with self._session.get(self._base_url + "/health") as resp:
                return resp.status, orjson.loads(await resp.read())
        except (*_CONNECT_ERRORS, orjson.JSONDecodeError):
            return 503, {"status": "unavailable"}

    async def model_info(self) -> ModelInfo:
        """`GET /v1/model`, fetched once and cached."""
        async with self._model_info_lock:
            if self._model_info is None:
                try:
                    async with self._session.get(self._base_url + "/v1/model") as resp:
                        if resp.status != 200:
                            raise await _error_from(resp)
                        self._model_info = ModelInfo.from_json(orjson.loads(await resp.read()))
                except (*_CONNECT_ERRORS, orjson.JSONDecodeError):
                    raise _unavailable() from None
            return self._model_info

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        try:
            async with self._post("/v1/generate", req.to_json()) as resp:
                if resp.status != 200:
                    raise await _error_from(resp)
                raw = await resp.read()
        except _CONNECT_ERRORS:
            raise _unavailable() from None
        try:
            return GenerateResult.from_json(orjson.loads(raw))
        except orjson.JSONDecodeError:
            raise ApiError(502, "The backend sent an invalid response.") from None

    async def stream(self, req: GenerateRequest) -> aiohttp.ClientResponse:
        """Open a streamed generate; the caller reads it with `lines` and must release it."""
        try:
            resp = await self._post("/v1/generate", req.to_json())
        except _CONNECT_ERRORS:
            raise _unavailable() from None
        if resp.status != 200:
            err = await _error_from(resp)
            resp.release()
            raise err
        return resp

    @staticmethod
    async def lines(resp: aiohttp.ClientResponse) -> AsyncIterator[StreamStart | StreamDelta]:
        """The NDJSON lines of a streamed generate; raises ApiError on a bad or cut stream."""
        buf = b""
        try:
            async for data in resp.content.iter_any():
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield parse_stream_line(orjson.loads(line))
            if buf.strip():
                yield parse_stream_line(orjson.loads(buf))
        except (*_CONNECT_ERRORS, aiohttp.ClientPayloadError, orjson.JSONDecodeError):
            raise ApiError(502, "The backend closed the stream unexpectedly.") from None

    def abort(self, request_id: str) -> None:
        """`POST /v1/abort` in the background (never raises, never blocks the caller)."""

        async def call() -> None:
            try:
                async with self._post("/v1/abort", {"request_id": request_id}) as resp:
                    await resp.read()
            except (*_CONNECT_ERRORS, aiohttp.ClientError):
                pass

        if self._session is not None and not self._session.closed:
            task = asyncio.get_running_loop().create_task(call())
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)
