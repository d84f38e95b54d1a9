"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` events, then `data: [DONE]\\n\\n`.

Every event is one `data:` line (orjson never emits a raw newline), so a client can split the
stream on blank lines.
"""

from __future__ import annotations

import orjson

__all__ = ["DONE", "encode_event", "decode_events"]

DONE = b"data: [DONE]\n\n"


def encode_event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def decode_events(raw: bytes) -> list[bytes]:
    """The `data` payloads of a complete SSE byte stream, in order (for clients and tests).

    Raises ValueError on anything but `data:` lines separated by blank lines.
    """
    if raw and not raw.endswith(b"\n\n"):
        raise ValueError("the stream does not end with a blank line")
    payloads = []
    for event in raw.split(b"\n\n")[:-1]:
        if not event.startswith(b"data: ") or b"\n" in event:
            raise ValueError(f"not a single 'data: ' line: {event[:80]!r}")
        payloads.append(event[len(b"data: "):])
    return payloads
