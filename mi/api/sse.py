"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` events, then `data: [DONE]\\n\\n`.

Every event is one `data:` line (JSON never holds a raw newline: msgspec escapes it), so a
client can split the stream on blank lines.
"""

from __future__ import annotations

import msgspec

__all__ = ["DONE", "decode_events", "encode_event"]

DONE = b"data: [DONE]\n\n"


def encode_event(obj: object) -> bytes:
    """One event of `obj`: an answer Struct (mi/api/openai.py, chat.py) or plain data."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


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
        payloads.append(event[len(b"data: ") :])
    return payloads
