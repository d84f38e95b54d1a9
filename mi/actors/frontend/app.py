"""Frontend actor: the OpenAI HTTP API (aiohttp) in front of the backend's token-level API.

    client ─► CORS preflight ─► errors + metrics ─► API key ─► route handler
                                                               (frontend_generate, frontend_info)

State lives in one `FrontendState` per app (frontend_state.py): the backend client, the
tokenizer, the metrics. The frontend keeps no model state.

Invariants:
- every answer that is not a 200 carries the OpenAI error body; nothing leaks a traceback,
  a path or an address;
- with an API key, every route but /health (and CORS preflights, which carry no credentials)
  needs `Authorization: Bearer KEY`, compared in constant time;
- a client that goes away cancels its handler (handler cancellation is on), which aborts its
  backend requests;
- after the first SIGTERM/SIGINT, /health and every new request answer 503 while the requests in
  flight run on for up to `drain_timeout` s; then (or on a second signal) they end with a 503
  `shutting_down` (a stream: its error event, then [DONE]) and the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from mi.actors.frontend.generate import chat_completions, completions
from mi.actors.frontend.info import ROUTES
from mi.actors.frontend.state import SHUTTING_DOWN, STATE, FrontendConfig, FrontendState, json_response
from mi.actors.http_deadlines import RUNNER_OPTIONS, body_deadline
from mi.api.errors import ApiError, default_error_type, error_body
from mi.api.info import HealthResponse

log = logging.getLogger("mi.frontend")

__all__ = ["FrontendConfig", "create_app", "serve"]

_PUBLIC_PATHS = frozenset({"/health"})
_WARM_UP: web.AppKey[asyncio.Task] = web.AppKey("warm_up", asyncio.Task)


def _error_response(err: ApiError) -> web.Response:
    return json_response(err.body(), err.status, err.headers())


def _endpoint(request: web.Request) -> str:
    """The route's path template, a bounded label set for metrics."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _errors(request: web.Request, handler: Callable[..., Awaitable]) -> web.StreamResponse:
    try:
        response = await handler(request)
    except ApiError as err:
        response = _error_response(err)
    except web.HTTPException as exc:  # routing (404, 405) and body size (413)
        if exc.status < 400:
            raise
        message = {
            404: "Unknown route.",
            405: f"Method {request.method[:16]} is not allowed on this route.",
            413: "The request body is too large.",
        }.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = json_response(error_body(message, default_error_type(exc.status)), exc.status, headers)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        response = _error_response(ApiError(500, "The server had an error processing your request."))
    request.app[STATE].metrics.observe_request(_endpoint(request), response.status)
    return response


@web.middleware
async def _api_key(request: web.Request, handler: Callable[..., Awaitable]) -> web.StreamResponse:
    key = request.app[STATE].config.api_key
    if key is None or request.path in _PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiError(
            401,
            "You didn't provide an API key (Authorization: Bearer KEY).",
            code="missing_api_key",
            type="invalid_request_error",
        )
    # NOTE: compare_digest on bytes of both: constant time whatever the lengths' content.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(
            401, "Incorrect API key provided.", code="invalid_api_key", type="invalid_request_error"
        )
    return await handler(request)


@web.middleware
async def _intake(request: web.Request, handler: Callable[..., Awaitable]) -> web.StreamResponse:
    """Counts the requests in flight; while draining, answers new ones 503 at once."""
    state = request.app[STATE]
    if state.is_draining:
        if request.path == "/health":
            return json_response(HealthResponse("stopping"), 503, {"Retry-After": "1"})
        raise SHUTTING_DOWN
    if request.path == "/health":
        return await handler(request)
    state.num_in_flight += 1
    try:
        return await handler(request)
    finally:
        state.num_in_flight -= 1


def _allowed_origin(config: FrontendConfig, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for `origin`, or None when it is not allowed."""
    if origin is None or not config.allowed_origins:
        return None
    if "*" in config.allowed_origins:
        return "*"
    return origin if origin in config.allowed_origins else None


@web.middleware
async def _cors_preflight(request: web.Request, handler: Callable[..., Awaitable]) -> web.StreamResponse:
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return await handler(request)
    allowed = _allowed_origin(request.app[STATE].config, request.headers.get("Origin"))
    if allowed is None:
        err = ApiError(
            403, "This origin is not allowed (see mi-frontend --allowed-origins).", code="cors_denied"
        )
        return _error_response(err)
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": allowed,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            )[:1024],
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: also streams get their CORS headers before the first byte."""
    allowed = _allowed_origin(request.app[STATE].config, request.headers.get("Origin"))
    if allowed is not None:
        response.headers["Access-Control-Allow-Origin"] = allowed
        if allowed != "*":
            response.headers["Vary"] = "Origin"


def create_app(config: FrontendConfig) -> web.Application:
    app = web.Application(
        middlewares=[_cors_preflight, _errors, _intake, _api_key, body_deadline],
        client_max_size=config.max_body_bytes,
    )
    state = FrontendState(config)
    app[STATE] = state

    async def on_startup(app: web.Application) -> None:
        await state.backend.start()
        app[_WARM_UP] = asyncio.get_running_loop().create_task(state.tokenizers.warm_up())

    async def on_cleanup(app: web.Application) -> None:
        app[_WARM_UP].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app[_WARM_UP]
        await state.backend.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.on_response_prepare.append(_add_cors_headers)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _drain(state: FrontendState, stop_now: asyncio.Event) -> None:
    """Until the requests in flight are done, `drain_timeout` passes or `stop_now` is set; then
    the ones left end with 503 shutting_down."""
    state.is_draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.drain_timeout
    if state.num_in_flight:
        log.info("draining %d requests for up to %g s", state.num_in_flight, state.config.drain_timeout)
    # NOTE: a 20 Hz check, only while stopping; counting on every request end would put an
    # event on the hot path.
    while state.num_in_flight and loop.time() < deadline and not stop_now.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop_now.wait(), 0.05)
    state.stop_requests.set()
    for queue in state.open_streams:
        queue.put_nowait((-1, SHUTTING_DOWN))
    for _ in range(40):  # the error events go out before the handlers are cancelled
        if not state.num_in_flight:
            break
        await asyncio.sleep(0.05)


async def serve(config: FrontendConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain (see the module invariants) and return."""
    app = create_app(config)
    runner = web.AppRunner(app, **RUNNER_OPTIONS, shutdown_timeout=1.0)
    await runner.setup()
    stop, stop_now = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (stop_now if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    # NOTE: handlers go in before the start line: whoever reads it may signal us at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        if not _is_loopback(config.host) and config.api_key is None:
            log.warning("serving on %s without --api-key: anyone who can reach it may use it", config.host)
        print(f"frontend start at http://{config.host}:{config.port}", flush=True)
        await stop.wait()
        await _drain(app[STATE], stop_now)
    finally:
        await runner.cleanup()
        # NOTE: a signal after the teardown must not kill us with its default action (exit -15).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
