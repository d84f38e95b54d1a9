"""The frontend's client of the backend's token-level API (docs/backend-api.md).

One aiohttp session for the frontend's lifetime; a bare port goes over the backend's unix socket
when it exists. Every request but /health carries `Authorization: Bearer SECRET`, the secret read
from the backend's cert file (nothing is sent while the file is absent; a 401 re-reads it once,
since a backend started after us creates it). Every failure to reach the backend becomes a 503
ApiError, every malformed answer a 502: handlers only ever see ApiError.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from mi.api.backend import (
    BackendStats,
    GenerateRequest,
    GenerateResult,
    LineBuffer,
    ModelInfo,
    StreamDelta,
    StreamStart,
    parse_stream_line,
    socket_path,
)
from mi.api.errors import ApiError
from mi.auth import read_secret

__all__ = ["Backend", "parse_backend"]

log = logging.getLogger("mi.frontend")


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
_CONNECT_RETRIES = 12
_CONNECT_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError)


def _unavailable() -> ApiError:
    return ApiError(503, _UNAVAILABLE, code="backend_unavailable", retry_after=1)


async def _error_from(resp: aiohttp.ClientResponse) -> ApiError:
    if resp.status == 401:
        log.error("the backend refused our secret: check --backend-cert / MI_CERT")
        return ApiError(503, "The frontend cannot authenticate to the backend.",
                        code="backend_auth_failed", retry_after=1)
    try:
        body = orjson.loads(await resp.read())
    except (orjson.JSONDecodeError, *_CONNECT_ERRORS):
        body = None
    err = ApiError.from_body(resp.status, body)
    if err.param == "prompt_ids":
        err.param = "prompt"
    if resp.status in (429, 503):
        retry_after = resp.headers.get("Retry-After", "")
        err.retry_after = int(retry_after) if retry_after.isdigit() else 1
    return err


class Backend:
    """The frontend's client of the backend API (one session for the app's lifetime)."""

    def __init__(self, spec: str, cert_path: Path) -> None:
        self._spec = spec
        self._cert_path = cert_path
        self._secret: str | None = None
        self._base_url = ""
        self._session: aiohttp.ClientSession | None = None
        self._model_info: ModelInfo | None = None
        self._model_info_lock = asyncio.Lock()
        self._aborts: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._secret = read_secret(self._cert_path)
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

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if has_body else {}
        if self._secret is not None:
            headers["Authorization"] = f"Bearer {self._secret}"
        return headers

    async def _send(self, method: str, path: str, data: bytes | None) -> aiohttp.ClientResponse:
        # NOTE: a unix socket whose accept backlog is full refuses at once with EAGAIN (TCP would
        # queue the SYN): a burst of new requests retries the connect for up to ~1.5 s.
        delay = 0.005
        for _ in range(_CONNECT_RETRIES):
            try:
                return await self._session.request(
                    method, self._base_url + path, data=data, headers=self._headers(data is not None)
                )
            except aiohttp.ClientConnectorError as exc:
                if not isinstance(exc.os_error, BlockingIOError):
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.2)
        raise _unavailable()

    async def _request(self, method: str, path: str, body: dict | None = None) -> aiohttp.ClientResponse:
        """Send one request; the caller releases the response. A 401 re-reads the secret and,
        when it changed, retries once. Connection failures raise the 503 ApiError."""
        data = None if body is None else orjson.dumps(body)
        try:
            resp = await self._send(method, path, data)
            if resp.status == 401:
                secret = read_secret(self._cert_path)
                if secret != self._secret:
                    self._secret = secret
                    resp.release()
                    resp = await self._send(method, path, data)
            return resp
        except _CONNECT_ERRORS:
            raise _unavailable() from None

    async def _get_json(self, path: str) -> object:
        resp = await self._request("GET", path)
        try:
            if resp.status != 200:
                raise await _error_from(resp)
            return orjson.loads(await resp.read())
        except (*_CONNECT_ERRORS, orjson.JSONDecodeError):
            raise _unavailable() from None
        finally:
            resp.release()

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
                self._model_info = ModelInfo.from_json(await self._get_json("/v1/model"))
            return self._model_info

    async def stats(self) -> BackendStats:
        return BackendStats.from_json(await self._get_json("/v1/stats"))

    async def tokenizer_files(self) -> object:
        """`GET /v1/tokenizer`: `{"files": {name: text}}`, checked by the caller."""
        return await self._get_json("/v1/tokenizer")

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        resp = await self._request("POST", "/v1/generate", req.to_json())
        try:
            if resp.status != 200:
                raise await _error_from(resp)
            raw = await resp.read()
        except _CONNECT_ERRORS:
            raise _unavailable() from None
        finally:
            resp.release()
        try:
            return GenerateResult.from_json(orjson.loads(raw))
        except orjson.JSONDecodeError:
            raise ApiError(502, "The backend sent an invalid response.") from None

    async def stream(self, req: GenerateRequest) -> aiohttp.ClientResponse:
        """Open a streamed generate; the caller reads it with `lines` and must release it."""
        resp = await self._request("POST", "/v1/generate", req.to_json())
        if resp.status != 200:
            try:
                raise await _error_from(resp)
            finally:
                resp.release()
        return resp

    @staticmethod
    async def lines(resp: aiohttp.ClientResponse) -> AsyncIterator[StreamStart | StreamDelta]:
        """The NDJSON lines of a streamed generate; raises ApiError on a bad or cut stream."""
        buf = LineBuffer()
        try:
            async for data in resp.content.iter_any():
                for line in buf.feed(data):
                    yield parse_stream_line(orjson.loads(line))
            rest = buf.rest()
            if rest is not None:
                yield parse_stream_line(orjson.loads(rest))
        except (*_CONNECT_ERRORS, aiohttp.ClientPayloadError, orjson.JSONDecodeError):
            raise ApiError(502, "The backend closed the stream unexpectedly.") from None

    def abort(self, request_id: str) -> None:
        """`POST /v1/abort` in the background (never raises, never blocks the caller)."""

        async def call() -> None:
            try:
                resp = await self._request("POST", "/v1/abort", {"request_id": request_id})
                resp.release()
            except (ApiError, *_CONNECT_ERRORS, aiohttp.ClientError):
                pass

        if self._session is not None and not self._session.closed:
            task = asyncio.get_running_loop().create_task(call())
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)
