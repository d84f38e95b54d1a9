"""The frontend's configuration and the one state object its handlers share.

`FrontendState` is created once per app and owns: the backend client (the SDK's transport, its
failures turned into the `ApiError` a client of the frontend sees, by `backend_error`), the
tokenizer store, the metrics registry and the `created` time of /v1/models. Handlers reach it
as `request.app[STATE]`; nothing else is shared between requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import orjson
from aiohttp import web

from mi.actors.frontend.metrics import FrontendMetrics
from mi.actors.frontend.tokenizer import TokenizerStore
from mi.api.errors import ApiError
from mi.api.openai_common import Limits
from mi.config import DEFAULT_CERT_PATH
from mi.sdk.transport import Backend, address, parse_backend
from mi.sdk.types import AuthenticationError, MIError, RequestTimeout

__all__ = [
    "SHUTTING_DOWN",
    "STATE",
    "FrontendConfig",
    "FrontendState",
    "backend_error",
    "json_response",
    "read_json",
]

log = logging.getLogger("mi.frontend")


@dataclass(frozen=True)
class FrontendConfig:
    backend: str  # "PORT" (unix socket if present, else 127.0.0.1:PORT) or "HOST:PORT"
    host: str = "127.0.0.1"
    port: int = 13000
    api_key: str | None = None  # clients must send `Authorization: Bearer KEY` (all but /health)
    served_model_names: tuple[str, ...] = ()  # aliases; empty: the backend's model name
    allowed_origins: tuple[str, ...] = ()  # CORS; "*" allows any origin
    chat_template: str | None = None  # Jinja text overriding the tokenizer's template
    backend_cert: Path = DEFAULT_CERT_PATH  # the backend's secret file (mi-frontend: or $MI_CERT)
    max_body_bytes: int = 2 * 2**20  # larger request bodies get a 413
    limits: Limits = field(default_factory=Limits)
    # On SIGTERM requests in flight get this long to finish (new ones get 503 shutting_down);
    # those still running then end with that error and their backend requests are aborted.
    drain_timeout: float = 30.0
    # The longest wait for the backend's next bytes (a stream's next line); then 504 and an abort.
    # Above the backend's --step-timeout (60 s), so a hung engine is the backend's to report. 0: none.
    backend_read_timeout: float = 120.0

    def __post_init__(self) -> None:
        parse_backend(self.backend)  # fails loudly on a bad spec
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.max_body_bytes < 1024 or self.drain_timeout < 0 or self.backend_read_timeout < 0:
            raise ValueError(
                "max_body_bytes >= 1024, drain_timeout >= 0 and backend_read_timeout >= 0 are required"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")
        if any(not name or len(name) > 256 for name in self.served_model_names):
            raise ValueError("served model names must have 1 to 256 characters")


SHUTTING_DOWN = ApiError(503, "The server is shutting down.", code="shutting_down", retry_after=1)


def backend_error(err: MIError) -> ApiError:
    """What a client sees of a failed backend call: the backend's own error (its `prompt_ids`
    being the client's `prompt`), or a 503 to retry when the backend cannot be reached or
    refuses our secret. Messages never name the backend's address."""
    if isinstance(err, AuthenticationError):
        log.error("the backend refused our secret: check --backend-cert / MI_CERT")
        return ApiError(
            503, "The frontend cannot authenticate to the backend.", code="backend_auth_failed", retry_after=1
        )
    if isinstance(err, RequestTimeout) and err.api_error is None:
        return ApiError(
            504,
            "The backend sent nothing for longer than this server's limit (mi-frontend "
            "--backend-read-timeout); the request was stopped.",
            type="server_error",
            code="backend_timeout",
        )
    if err.api_error is None:
        return ApiError(
            503,
            "The backend is not available. Please retry later.",
            code="backend_unavailable",
            retry_after=1,
        )
    if err.api_error.param == "prompt_ids":
        err.api_error.param = "prompt"
    return err.api_error


class FrontendState:
    def __init__(self, config: FrontendConfig) -> None:
        self.config = config
        url, unix_socket = address(config.backend)
        self.backend = Backend(
            url,
            config.backend_cert.expanduser(),
            unix_socket=unix_socket,
            read_timeout=config.backend_read_timeout or None,
            errors=backend_error,
        )
        self.tokenizers = TokenizerStore(self.backend, config.chat_template)
        self.metrics = FrontendMetrics()
        self.created = int(time.time())
        self.is_draining = False  # SIGTERM: new requests get 503 shutting_down
        self.num_in_flight = 0  # requests other than /health being handled
        self.stop_requests = asyncio.Event()  # the drain is over: requests in flight fail now
        self.open_streams: set[asyncio.Queue] = set()  # each stream's event queue

    async def served_names(self) -> tuple[str, ...]:
        if self.config.served_model_names:
            return self.config.served_model_names
        return ((await self.backend.model_info()).model_name,)


STATE: web.AppKey[FrontendState] = web.AppKey("state", FrontendState)


def json_response(obj: object, status: int = 200, headers: dict | None = None) -> web.Response:
    """`obj` (an answer Struct of mi/api, or plain data) as a JSON response."""
    return web.Response(
        body=msgspec.json.encode(obj), status=status, headers=headers, content_type="application/json"
    )


async def read_json(request: web.Request) -> object:
    """The decoded body; 415 unless Content-Type is JSON (or absent), 400 on invalid JSON."""
    content_type = request.headers.get("Content-Type")
    if content_type is not None:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise ApiError(
                415,
                "The request body must be JSON (Content-Type: application/json).",
                code="unsupported_media_type",
            )
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
