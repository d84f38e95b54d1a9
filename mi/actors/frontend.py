"""Frontend actor: the OpenAI HTTP API (aiohttp) in front of the backend's token-level API.

State it owns: one aiohttp `ClientSession` to the backend (created on startup, closed on
cleanup), the cached `ModelInfo`, and the abort calls still in flight. It keeps no model state.

Invariants:
- every answer that is not a 200 carries the OpenAI error body; nothing leaks a traceback,
  a path or an address;
- each prompt of a request is one backend `/v1/generate` call (choice `index` = prompt index);
- a backend call the frontend gives up on (client gone, sibling prompt failed) is closed and
  aborted with `POST /v1/abort` (handler cancellation is on, so a closed client cancels us);
- in a stream, `finish_reason` rides on the chunk with the last text, exactly once per choice.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from mi.actors.backend_client import Backend, parse_backend
from mi.api.backend import GenerateRequest, StreamDelta
from mi.api.errors import ApiError, default_error_type, error_body
from mi.api.openai import (
    DEFAULT_MAX_PROMPTS,
    CompletionRequest,
    completion_chunk,
    completion_response,
    model_list,
    new_completion_id,
    parse_completion_request,
    usage_chunk,
)
from mi.api.sse import DONE, encode_event

log = logging.getLogger("mi.frontend")

__all__ = ["FrontendConfig", "create_app", "serve"]


@dataclass(frozen=True)
class FrontendConfig:
    backend: str  # "PORT" (unix socket if present, else 127.0.0.1:PORT) or "HOST:PORT"
    host: str = "127.0.0.1"
    port: int = 13000
    max_body_bytes: int = 16 * 2**20  # larger request bodies get a 413
    max_prompts: int = DEFAULT_MAX_PROMPTS  # prompts in one completion request
    # On SIGTERM in-flight requests get this long to finish, then (aiohttp) as long again to
    # react to cancellation; the backend requests still open are then aborted.
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        parse_backend(self.backend)  # fails loudly on a bad spec
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.max_body_bytes < 1024 or self.max_prompts < 1 or self.shutdown_timeout < 0:
            raise ValueError("max_body_bytes >= 1024, max_prompts >= 1, shutdown_timeout >= 0")



# -- handlers -----------------------------------------------------------------------------------

BACKEND: web.AppKey[Backend] = web.AppKey("backend", Backend)
CONFIG: web.AppKey[FrontendConfig] = web.AppKey("config", FrontendConfig)
CREATED: web.AppKey[int] = web.AppKey("created", int)  # the `created` of /v1/models


def json_response(obj: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )


def error_response(err: ApiError) -> web.Response:
    return json_response(err.body(), err.status, err.headers())


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[..., Awaitable]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:  # routing (404, 405) and body size (413)
        if exc.status < 400:
            raise
        message = {413: "The request body is too large."}.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response(error_body(message, default_error_type(exc.status)), exc.status, headers)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(ApiError(500, "The server had an error processing your request."))


async def read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None


async def health(request: web.Request) -> web.Response:
    """200 when the backend's /health is 200, else 503 with the backend's status word."""
    status, body = await request.app[BACKEND].health()
    if status == 200:
        return json_response({"status": "ok"})
    word = body.get("status") if isinstance(body, dict) else None
    return json_response({"status": word if isinstance(word, str) else "unavailable"}, 503)


async def models(request: web.Request) -> web.Response:
    info = await request.app[BACKEND].model_info()
    return json_response(model_list(info.model_name, request.app[CREATED]))


async def completions(request: web.Request) -> web.StreamResponse:
    backend, config = request.app[BACKEND], request.app[CONFIG]
    body = await read_json(request)
    info = await backend.model_info()
    completion_id = new_completion_id()
    creq = parse_completion_request(
        body,
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        completion_id=completion_id,
        max_prompts=config.max_prompts,
    )
    if creq.stream:
        return await _stream_completion(request, backend, creq, completion_id)
    results = await _run_all(backend, creq.generate_requests, backend.generate)
    for result in results:
        _check_not_aborted(result.finish_reason)
    return json_response(
        completion_response(
            completion_id,
            int(time.time()),
            creq.model,
            [(r.text, r.finish_reason) for r in results],
            sum(r.usage.prompt_tokens for r in results),
            sum(r.usage.completion_tokens for r in results),
        )
    )


def _check_not_aborted(finish_reason: str | None) -> None:
    if finish_reason == "abort":
        raise ApiError(503, "The request was aborted by the server.", code="aborted", retry_after=1)


async def _run_all(
    backend: Backend,
    reqs: tuple[GenerateRequest, ...],
    call: Callable[[GenerateRequest], Awaitable],
    release: Callable[[object], None] | None = None,
) -> list:
    """`call(req)` for every request concurrently, results in request order.

    The first failure (or our cancellation) cancels and aborts the calls still running, and
    hands the results already in to `release` (and aborts them too: they may still be running).
    """
    tasks = [asyncio.ensure_future(call(req)) for req in reqs]
    is_ok = False
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
        results = [task.result() for task in tasks]
        is_ok = True
        return results
    finally:
        if not is_ok:
            for req, task in zip(reqs, tasks):
                if not task.done():
                    task.cancel()
                    backend.abort(req.request_id)
                elif not task.cancelled() and task.exception() is None and release is not None:
                    release(task.result())
                    backend.abort(req.request_id)


async def _stream_completion(
    request: web.Request, backend: Backend, creq: CompletionRequest, completion_id: str
) -> web.StreamResponse:
    # NOTE: every backend stream is opened (status checked) before our 200 goes out, so a
    # backend 4xx such as a too-long prompt is still an HTTP error, not an event.
    reqs = creq.generate_requests
    streams = await _run_all(backend, reqs, backend.stream, lambda resp: resp.release())
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, resp: aiohttp.ClientResponse) -> None:
        try:
            async for item in backend.lines(resp):
                await queue.put((index, item))
        except ApiError as err:
            await queue.put((index, err))
        finally:
            resp.release()
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, resp)) for i, resp in enumerate(streams)]
    finished: set[int] = set()
    try:
        await response.prepare(request)
        writer = _ChunkWriter(response, creq, completion_id, int(time.time()))
        num_open = len(pumps)
        while num_open:
            index, item = await queue.get()
            if item is None:
                num_open -= 1
                if index not in finished:  # the stream ended without finish_reason
                    raise ApiError(502, "The backend closed the stream unexpectedly.")
            elif isinstance(item, ApiError):
                raise item
            elif isinstance(item, StreamDelta):
                _check_not_aborted(item.finish_reason)
                await writer.delta(index, item)
                if item.finish_reason is not None:
                    finished.add(index)
        await writer.finish()
    except ApiError as err:
        await _write_quietly(response, encode_event(err.body()) + DONE)
    except ConnectionResetError:
        pass  # the client went away; the finally block aborts the backend work
    except Exception:
        log.exception("unexpected error in a completion stream")
        err = ApiError(500, "The server had an error processing your request.")
        await _write_quietly(response, encode_event(err.body()) + DONE)
    finally:
        for index, (req, task) in enumerate(zip(reqs, pumps)):
            task.cancel()
            if index not in finished:
                backend.abort(req.request_id)
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass


class _ChunkWriter:
    """Writes SSE chunks holding back one text delta per choice, so that `finish_reason` rides
    on the chunk with the last text even when the backend's final line has no text."""

    def __init__(self, response: web.StreamResponse, creq: CompletionRequest, cid: str, created: int):
        self._response, self._creq, self._cid, self._created = response, creq, cid, created
        self._held: dict[int, str] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0

    async def _write(self, index: int, text: str, finish_reason: str | None) -> None:
        chunk = completion_chunk(
            self._cid, self._created, self._creq.model, index, text, finish_reason,
            include_usage=self._creq.include_usage,
        )
        await self._response.write(encode_event(chunk))

    async def delta(self, index: int, delta: StreamDelta) -> None:
        if delta.finish_reason is None:
            if delta.text:
                if index in self._held:
                    await self._write(index, self._held[index], None)
                self._held[index] = delta.text
            return
        held = self._held.pop(index, None)
        if delta.text and held is not None:
            await self._write(index, held, None)
        await self._write(index, delta.text or held or "", delta.finish_reason)
        self._prompt_tokens += delta.usage.prompt_tokens
        self._completion_tokens += delta.usage.completion_tokens

    async def finish(self) -> None:
        tail = DONE
        if self._creq.include_usage:
            chunk = usage_chunk(
                self._cid, self._created, self._creq.model, self._prompt_tokens, self._completion_tokens
            )
            tail = encode_event(chunk) + DONE
        await self._response.write(tail)
        await self._response.write_eof()


# -- app ----------------------------------------------------------------------------------------


def create_app(config: FrontendConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[BACKEND] = Backend(config.backend)
    app[CREATED] = int(time.time())

    async def on_startup(app: web.Application) -> None:
        await app[BACKEND].start()

    async def on_cleanup(app: web.Application) -> None:
        await app[BACKEND].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


async def serve(config: FrontendConfig) -> None:
    """Serve until SIGTERM or SIGINT, then stop intake, give in-flight requests
    `shutdown_timeout` seconds, abort the rest and return."""
    app = create_app(config)
    # NOTE: handler_cancellation makes a client disconnect cancel its handler (and so abort
    # the backend request); aiohttp leaves it off by default.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_timeout
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # NOTE: handlers go in before the start line: whoever reads it may signal us at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        print(f"frontend start at http://{config.host}:{config.port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
