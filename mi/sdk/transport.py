"""The one HTTP transport to a backend's token-level API (docs/backend-api.md), for the SDK and the
frontend alike.

A `Backend` is one aiohttp session to one backend (`async with`, or `start()` / `close()`): the
SDK opens one per call, the frontend one for its lifetime. A backend named by a bare port
(`address`) is reached over its private unix socket (mi/local_socket.py) when that exists and
passes the checks, connection by connection, else over TCP 127.0.0.1:PORT. Every request but
/health carries `Authorization: Bearer SECRET`, the secret read from the backend's cert file at
`start()` (nothing is sent while the file is absent); a 401 re-reads the file and, when the
secret changed, retries once (a backend started after us creates it). Every answer is decoded
into its typed Struct (mi/api/backend_answers.py).

Invariant: every failure raises one of the typed errors of mi/sdk/types.py (`MIError`), whose
`api_error` keeps the backend's own error; a caller with errors of its own (the frontend) passes
`errors`, which turns each into the exception raised instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec

from mi.api.backend import (
    BackendStats,
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamDecoder,
    StreamDelta,
    StreamStart,
    TokenizerFiles,
    decode_answer,
)
from mi.api.errors import ApiError
from mi.auth import read_secret
from mi.local_socket import peer_problem, socket_path, socket_problem
from mi.sdk.types import (
    AuthenticationError,
    BackendUnavailable,
    InvalidRequest,
    MIError,
    Overloaded,
    RequestTimeout,
    ServerError,
)

__all__ = ["Backend", "address", "parse_backend"]

log = logging.getLogger("mi.transport")

T = TypeVar("T")

_CONNECT_RETRIES = 12


class _Aborted(msgspec.Struct, frozen=True):
    aborted: bool


def parse_backend(spec: str) -> tuple[str, int]:
    """`"12222"` -> ("", 12222) (local), `"host:12222"` -> ("host", 12222)."""
    spec = spec.removeprefix("http://").rstrip("/")
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--backend must be PORT or HOST:PORT, got {spec!r}")
    return host.strip("[]"), int(port)


def address(spec: str) -> tuple[str, str | None]:
    """A `--backend` spec -> the base URL, and the unix socket to prefer for a bare port."""
    host, port = parse_backend(spec)
    if not host:
        return f"http://127.0.0.1:{port}", socket_path(port)
    url_host = f"[{host}]" if ":" in host else host
    return f"http://{url_host}:{port}", None


class _PrivateSocketConnector(aiohttp.TCPConnector):
    """TCP to 127.0.0.1:PORT, except that each new connection first tries the backend's unix
    socket, and keeps it only when its directory and file pass `socket_problem` and the process
    listening there passes `peer_problem`, all before the request (and its secret) is written.

    It hooks `_create_connection`, the one method aiohttp's own UnixConnector overrides to connect
    (its body is this `create_unix_connection` call), so the TCP fallback of the same connection
    needs no second session.
    """

    def __init__(self, unix_socket: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._unix_socket = unix_socket

    async def _create_connection(self, req, traces, timeout):
        proto = await self._connect_private(timeout.sock_connect)
        return proto if proto is not None else await super()._create_connection(req, traces, timeout)

    async def _connect_private(self, connect_timeout: float | None):
        try:
            problem = socket_problem(self._unix_socket)
        except FileNotFoundError:
            return None  # no local backend, or one that serves TCP only
        if problem is None:
            try:
                transport, proto = await asyncio.wait_for(
                    self._loop.create_unix_connection(self._factory, self._unix_socket), connect_timeout
                )
            except (OSError, asyncio.TimeoutError):
                return None  # a dead backend's socket, or a full backlog: TCP answers the same
            problem = peer_problem(transport.get_extra_info("socket"))
            if problem is None:
                return proto
            transport.close()
        if self._unix_socket not in _warned_sockets:
            _warned_sockets.add(self._unix_socket)
            log.warning("not using the unix socket %s (%s); using TCP instead", self._unix_socket, problem)
        return None


_warned_sockets: set[str] = set()  # each refused socket is logged once per process


class Backend:
    """One session to the backend at `url` (or its `unix_socket`, when that passes the checks).

    `timeout`: seconds for one whole request; `read_timeout`: the longest wait for the next
    bytes (a stream's next line); `connect_timeout`: to open a connection. None: no limit.
    """

    def __init__(
        self,
        url: str,
        cert_path: Path,
        *,
        unix_socket: str | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = None,
        read_timeout: float | None = None,
        errors: Callable[[MIError], Exception] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.cert_path = cert_path
        self._unix_socket = unix_socket
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._seconds = timeout or read_timeout  # named in a RequestTimeout
        self._errors_as = errors
        self._secret: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._model_info: ModelInfo | None = None
        self._model_info_lock = asyncio.Lock()
        self._aborts: set[asyncio.Task] = set()

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self._secret = read_secret(self.cert_path)
        if self._unix_socket is not None:
            connector = _PrivateSocketConnector(self._unix_socket, limit=0)
        else:
            connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def close(self) -> None:
        if self._aborts:
            await asyncio.wait(self._aborts, timeout=2)
        if self._session is not None:
            await self._session.close()

    # -- the API -----------------------------------------------------------------------------

    async def health(self) -> tuple[int, object]:
        """`GET /health`: its status and body; 503 `{"status": "unavailable"}` when unreachable."""
        try:
            async with self._session.get(self.url + "/health") as resp:
                return resp.status, msgspec.json.decode(await resp.read())
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, msgspec.DecodeError):
            return 503, {"status": "unavailable"}

    async def model_info(self) -> ModelInfo:
        """`GET /v1/model`, fetched once and cached."""
        async with self._model_info_lock:
            if self._model_info is None:
                self._model_info = await self._call("GET", "/v1/model", ModelInfo)
            return self._model_info

    async def stats(self) -> BackendStats:
        return await self._call("GET", "/v1/stats", BackendStats)

    async def tokenizer_files(self) -> TokenizerFiles:
        return await self._call("GET", "/v1/tokenizer", TokenizerFiles)

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        return await self._call("POST", "/v1/generate", GenerateResult, req.to_json())

    async def stream(self, req: GenerateRequest) -> aiohttp.ClientResponse:
        """Open a streamed generate (its status checked); read it with `lines`, then release it."""
        with self._raising():
            return await self._request("POST", "/v1/generate", req.to_json())

    async def lines(self, resp: aiohttp.ClientResponse) -> AsyncIterator[StreamStart | StreamDelta]:
        """The answers of a streamed generate, in order, to the end of the stream; a stream cut
        before its last line, or a malformed line, raises."""
        decoder = StreamDecoder()
        with self._raising():
            try:
                while True:
                    try:
                        data = await resp.content.readany()
                    except asyncio.TimeoutError:
                        raise self._timed_out() from None
                    except (aiohttp.ClientError, OSError):
                        data = b""  # a cut connection ends the stream: the decoder tells if early
                    for item in decoder.feed(data) if data else decoder.end():
                        yield item
                    if not data:
                        return
            except ApiError as err:
                raise self._typed_error(err) from None

    async def abort_now(self, request_id: str) -> bool:
        """`POST /v1/abort`; False when the request is unknown or already finished."""
        answer = await self._call("POST", "/v1/abort", _Aborted, {"request_id": request_id})
        return answer.aborted

    def abort(self, request_id: str) -> None:
        """`POST /v1/abort` in the background (never raises, never blocks the caller)."""

        async def call() -> None:
            with contextlib.suppress(MIError):
                (await self._request("POST", "/v1/abort", {"request_id": request_id})).release()

        if self._session is not None and not self._session.closed:
            task = asyncio.get_running_loop().create_task(call())
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    # -- HTTP --------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, answer_type: type[T], body: dict | None = None) -> T:
        with self._raising():
            resp = await self._request(method, path, body)
            raw = await self._read(resp)
            try:
                return decode_answer(raw, answer_type)
            except ApiError as err:
                raise self._typed_error(err) from None

    @contextlib.contextmanager
    def _raising(self) -> Iterator[None]:
        """Raise the caller's own errors in place of MIError (the `errors` argument)."""
        try:
            yield
        except MIError as err:
            if self._errors_as is None:
                raise
            raise self._errors_as(err) from None

    async def _request(self, method: str, path: str, body: dict | None) -> aiohttp.ClientResponse:
        """Send one request; a non-200 answer raises its typed error. The caller releases the
        response."""
        data = None if body is None else msgspec.json.encode(body)
        resp = await self._send(method, path, data)
        if resp.status == 401:
            secret = read_secret(self.cert_path)
            if secret != self._secret:
                self._secret = secret
                resp.release()
                resp = await self._send(method, path, data)
        if resp.status != 200:
            try:
                raise self._typed_error(await self._status_error(resp))
            finally:
                resp.release()
        return resp

    async def _send(self, method: str, path: str, data: bytes | None) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._secret is not None:
            headers["Authorization"] = f"Bearer {self._secret}"
        # NOTE: a unix socket whose accept backlog is full refuses at once with EAGAIN (TCP would
        # queue the SYN); _PrivateSocketConnector then connects over TCP, and a connect that
        # still fails with EAGAIN is retried for up to ~1.5 s.
        delay = 0.005
        for _ in range(_CONNECT_RETRIES):
            try:
                return await self._session.request(method, self.url + path, data=data, headers=headers)
            except asyncio.TimeoutError:
                raise self._timed_out() from None
            except aiohttp.ClientConnectorError as exc:
                if not isinstance(exc.os_error, BlockingIOError):
                    raise self._unreachable(exc) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise BackendUnavailable(
                    f"Cannot reach the backend at {self.url} ({type(exc).__name__})."
                ) from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.2)
        raise BackendUnavailable(f"The backend at {self.url} accepts no connection (its backlog is full).")

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerError(f"The connection to {self.url} broke ({type(exc).__name__}).") from None
        finally:
            resp.release()

    async def _status_error(self, resp: aiohttp.ClientResponse) -> ApiError:
        try:
            body = msgspec.json.decode(await resp.read())
        except (msgspec.DecodeError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            body = None
        err = ApiError.from_body(resp.status, body)
        if resp.status in (429, 503):
            retry_after = resp.headers.get("Retry-After", "")
            err.retry_after = int(retry_after) if retry_after.isdigit() else 1
        return err

    # -- typed errors ------------------------------------------------------------------------

    def _typed_error(self, err: ApiError) -> MIError:
        """The SDK's error for what the backend answered (an HTTP status or an error line)."""
        status, message = err.status, err.message
        if status == 401:
            typed: MIError = AuthenticationError(
                f"The backend at {self.url} refused the secret from {self.cert_path}: {message}",
                status,
                err.param,
                err.code,
            )
        elif status == 429 or (status == 503 and err.code in ("overloaded", "queue_timeout")):
            typed = Overloaded(
                f"The backend at {self.url} is overloaded: {message}", float(err.retry_after or 1)
            )
        elif status == 503 and err.code != "backend_failed":  # that one is an engine failure
            typed = BackendUnavailable(f"The backend at {self.url} is not ready: {message}")
        elif status == 504 and err.code == "request_timeout":
            typed = RequestTimeout(f"The backend at {self.url} stopped the request: {message}")
        elif 400 <= status < 500:
            typed = InvalidRequest(message, status, err.param, err.code)
        else:
            typed = ServerError(f"The backend at {self.url} failed ({status}): {message}")
        typed.api_error = err
        return typed

    def _timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"No answer from {self.url} within {self._seconds or 0:g} s.")

    def _unreachable(self, exc: aiohttp.ClientConnectorError) -> BackendUnavailable:
        if exc.os_error is not None and exc.os_error.errno == errno.ECONNREFUSED:
            return BackendUnavailable(
                f"Cannot connect to the backend at {self.url}: connection refused, so no mi-backend "
                "is running on that port. Start one with `mi-backend --model DIR --port PORT`."
            )
        return BackendUnavailable(
            f"Cannot connect to the backend at {self.url} ({type(exc).__name__}). Check the "
            "address and that mi-backend is running there."
        )
