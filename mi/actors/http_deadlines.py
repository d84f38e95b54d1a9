"""Deadlines both HTTP servers (mi-backend, mi-frontend) give a client to send its request.

aiohttp waits for a request head and body as long as the client likes, so a client sending a
byte a second (slow-loris) holds a connection and its file descriptor for good. Here:
- the request head: aiohttp's `keepalive_timeout` also runs from the moment a connection opens
  (and from each answer) until a whole request head has arrived, and then closes the connection;
  `RUNNER_OPTIONS` sets it to `REQUEST_HEAD_TIMEOUT_S`, above the 15 s after which aiohttp's
  client (the frontend's backend client, the SDK) drops an idle pooled connection itself;
- the body: `body_deadline` reads it within `BODY_TIMEOUT_S`, else answers 408 with the OpenAI
  error body and closes the connection.
"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from mi.api.errors import ApiError

__all__ = ["BODY_TIMEOUT_S", "REQUEST_HEAD_TIMEOUT_S", "RUNNER_OPTIONS", "body_deadline"]

REQUEST_HEAD_TIMEOUT_S = 20.0
BODY_TIMEOUT_S = 20.0
# NOTE: handler_cancellation makes a client disconnect cancel its handler (and so abort its
# backend requests); aiohttp leaves it off by default.
RUNNER_OPTIONS = {
    "handler_cancellation": True,
    "access_log": None,
    "keepalive_timeout": REQUEST_HEAD_TIMEOUT_S,
}

_TOO_SLOW = ApiError(
    408, f"The request body did not arrive within {BODY_TIMEOUT_S:.0f} s.", code="request_timeout"
)


@web.middleware
async def body_deadline(request: web.Request, handler) -> web.StreamResponse:
    """Reads the body (aiohttp keeps it for the handler's `read()`) within `BODY_TIMEOUT_S`."""
    if request.body_exists:
        try:
            await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            response = web.Response(
                body=msgspec.json.encode(_TOO_SLOW.body()), status=408, content_type="application/json"
            )
            response.force_close()
            return response
    return await handler(request)
