"""The backend's HTTP face (docs/backend-api.md): routes over a Supervisor, and the serve loop.

Every answer is one of the Structs of mi/api/backend_answers.py (or an error body), written with
msgspec, so what the clients' decoder accepts is what this module sends. Every failure, expected
or not, is an OpenAI error body: an unexpected exception in a handler becomes a 500 with a fixed
message (never a traceback, a path or an address; the traceback goes to the log, once), and in a
stream that has started, its last line.
"""

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import msgspec
from aiohttp import web

from mi.actors.http_deadlines import RUNNER_OPTIONS, body_deadline
from mi.actors.supervisor.supervisor import Supervisor
from mi.api.backend import (
    BackendStats,
    GenerateResult,
    ModelInfo,
    StreamStart,
    TokenizerFiles,
    encode_answer,
    parse_generate_request,
)
from mi.api.errors import ApiError, invalid
from mi.auth import is_authorized, load_or_create_secret
from mi.config import BackendConfig
from mi.local_socket import SocketError, bind_private_socket, socket_path

log = logging.getLogger("mi.backend")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_MAX_BODY_BYTES = 64 << 20
# After an engine failure, with the children gone, /health answers 503 this long before the
# listener closes: a health checker sees the failure, not only a refused connection.
_FAILED_HEALTH_S = 1.0


def _json(obj, status: int = 200, headers=None) -> web.Response:
    return web.Response(
        body=encode_answer(obj), status=status, headers=headers, content_type="application/json"
    )


def _error(exc: ApiError) -> web.Response:
    return _json(exc.body(), exc.status, exc.headers())


_INTERNAL_ERROR = ApiError(500, "The backend had an error processing this request.", code="internal_error")
_HTTP_MESSAGES = {
    404: "Unknown route.",
    405: "This method is not allowed on this route.",
    413: "The body is too large.",
}


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """The OpenAI error body for aiohttp's own errors (routing, body size) and for any exception
    a handler did not expect."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _json(ApiError(exc.status, message).body(), exc.status, headers)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path[:200])
        return _error(_INTERNAL_ERROR)


class BackendRoutes:
    def __init__(self, sup: Supervisor, model_name: str):
        self.sup = sup
        self.model_name = model_name

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": self.sup.state}, 200 if self.sup.state == "ok" else 503)

    async def model(self, request: web.Request) -> web.Response:
        cfg, model = self.sup.cfg, self.sup.mi_config["model"]
        return _json(
            ModelInfo(
                model_name=self.model_name,
                max_model_len=cfg.max_model_len,
                vocab_size=model["vocab_size"],
                architecture=self.sup.mi_config["architecture"],
                bos_token_id=model.get("bos_token_id"),
                eos_token_ids=tuple(self.sup.eos_token_ids),
                tp=cfg.tp,
                num_replicas=cfg.num_replicas,
                block_size=cfg.block_size,
                num_kv_blocks=self.sup.num_kv_blocks,
                max_prompt_bytes=self.sup.prompts.max_prompt_bytes,
            )
        )

    async def tokenizer(self, request: web.Request) -> web.Response:
        model_dir = Path(self.sup.cfg.model_dir)
        files = {
            name: (model_dir / name).read_text() for name in _TOKENIZER_FILES if (model_dir / name).is_file()
        }
        return _json(TokenizerFiles(files))

    async def _body(self, request: web.Request) -> object:
        content_type = request.headers.get("Content-Type")
        if content_type is not None and content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(
                415, "The body must be JSON (Content-Type: application/json).", code="unsupported_media_type"
            )
        try:
            return msgspec.json.decode(await request.read())
        except msgspec.DecodeError as exc:
            raise invalid("body", f"The body is not valid JSON: {exc}.") from None
        except RecursionError:  # msgspec's decoder recurses once per nesting level
            raise invalid("body", "The body is nested too deeply.") from None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            req = parse_generate_request(await self._body(request), vocab_size=self.sup.vocab_size)
            live = await self.sup.admit(req)
        except ApiError as exc:
            return _error(exc)
        try:
            if not req.stream:
                return await self._collect(live)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            try:
                await self._stream_lines(response, live)
            except ConnectionResetError:
                raise
            except Exception:  # the status line is gone: the error is the stream's last line
                log.exception("unexpected error in a generate stream")
                await response.write(encode_answer(_INTERNAL_ERROR.body()) + b"\n")
            await response.write_eof()
            return response
        finally:
            # The client went away (handler cancelled) or writing failed: free its KV blocks now.
            self.sup.cancel(live)

    async def _stream_lines(self, response: web.StreamResponse, live) -> None:
        # Prompt logprobs ride on the first line, so it waits for the prompt to be computed.
        first = await live.events.get() if live.num_prompt_logprobs is not None else None
        start = StreamStart(
            live.request_id,
            tuple(live.prompt_ids),
            live.prompt_logprobs if live.num_prompt_logprobs is not None else None,
        )
        await response.write(encode_answer(start) + b"\n")
        while True:
            event = first if first is not None else await live.events.get()
            first = None
            if isinstance(event, ApiError):
                await response.write(encode_answer(event.body()) + b"\n")
                return
            await response.write(encode_answer(event) + b"\n")
            if event.finish_reason is not None:
                return

    async def _collect(self, live) -> web.Response:
        texts, logprobs = [], []
        while True:
            event = await live.events.get()
            if isinstance(event, ApiError):
                return _error(event)
            texts.append(event.text)
            logprobs += event.logprobs or []
            if event.finish_reason is not None:
                return _json(
                    GenerateResult(
                        live.request_id,
                        tuple(live.prompt_ids),
                        tuple(live.ids),
                        "".join(texts),
                        event.finish_reason,
                        event.usage or live.usage(),
                        logprobs=logprobs if live.num_logprobs is not None else None,
                        prompt_logprobs=live.prompt_logprobs
                        if live.num_prompt_logprobs is not None
                        else None,
                    )
                )

    async def abort(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
                raise invalid("request_id", 'Expected {"request_id": string}.')
        except ApiError as exc:
            return _error(exc)
        return _json({"aborted": self.sup.abort(body["request_id"])})

    async def stats(self, request: web.Request) -> web.Response:
        return _json(msgspec.convert(self.sup.stats(), BackendStats))


def _auth_middleware(secret: str):
    @web.middleware
    async def check(request: web.Request, handler):
        if request.path != "/health" and not is_authorized(request.headers.get("Authorization"), secret):
            return _error(
                ApiError(
                    401,
                    "Missing or wrong backend secret (Authorization: Bearer, from the backend's cert file).",
                    code="unauthorized",
                )
            )
        return await handler(request)

    return check


def make_app(sup: Supervisor, model_name: str, secret: str) -> web.Application:
    routes = BackendRoutes(sup, model_name)
    app = web.Application(
        client_max_size=_MAX_BODY_BYTES, middlewares=[_errors, _auth_middleware(secret), body_deadline]
    )
    app.router.add_get("/health", routes.health)
    app.router.add_get("/v1/model", routes.model)
    app.router.add_get("/v1/tokenizer", routes.tokenizer)
    app.router.add_post("/v1/generate", routes.generate)
    app.router.add_post("/v1/abort", routes.abort)
    app.router.add_get("/v1/stats", routes.stats)
    return app


async def serve(cfg: BackendConfig, mi_config: dict, tokenizer) -> int:
    """Runs until SIGTERM/SIGINT (exit code 0) or an engine failure (exit code 1: a failed or
    hung child, or a failed output reader, under --on-failure exit; a restart budget spent under
    restart). The first signal drains (/health and new requests 503 at once, requests in flight
    run on for up to --drain-timeout s, the rest fail with 503 shutting_down); a second one
    stops at once."""
    sup = Supervisor(cfg, mi_config, tokenizer)
    secret = load_or_create_secret(cfg.cert_path)
    model_name = mi_config["model"].get("model_name") or Path(cfg.model_dir).name
    runner = web.AppRunner(make_app(sup, model_name, secret), **RUNNER_OPTIONS)
    await runner.setup()
    unix_path = socket_path(cfg.port, cfg.socket_dir)
    unix_bound = False
    stop, stop_now = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (stop_now if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    exit_code = 0
    try:
        try:
            await web.TCPSite(runner, cfg.host, cfg.port).start()
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
        # NOTE: after the TCP bind, which proved the port free: a socket at the path is then a
        # dead backend's, and bind_private_socket replaces it.
        unix_sock = bind_private_socket(unix_path)
        unix_bound = True
        await web.SockSite(runner, unix_sock).start()

        start = asyncio.create_task(sup.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            start.result()  # raises on a failed start
            print(f"service start at localhost:{cfg.port}", flush=True)
            failed = asyncio.create_task(sup.failure.wait())
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
            if sup.failure.is_set() and not stop.is_set():
                exit_code = 1
            else:
                await sup.drain(cfg.drain_timeout, stop_now)
        else:
            start.cancel()
        stopped.cancel()
    except (RuntimeError, SocketError) as exc:
        log.error("%s", exc)
        exit_code = 1
    finally:
        await sup.shutdown()
        if sup.state == "dead" and not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), _FAILED_HEALTH_S)
        await runner.cleanup()
        if unix_bound:  # never the socket of the backend whose port we failed to bind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path)
        # NOTE: a signal after the teardown must not kill us with its default action (exit -15)
        # once the loop, closing, gives its handlers back.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    return exit_code
