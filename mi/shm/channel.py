"""Typed channels: a codec on top of a ring endpoint (one message per ring record)."""

from __future__ import annotations

from mi.shm.codec import Codec
from mi.shm.ring import RingReader, RingWriter


class Sender:
    """Encodes the codec's messages onto a ring writer."""

    def __init__(self, writer: RingWriter, codec: Codec):
        self._writer = writer
        self._encode = codec.encode

    def send(self, msg, timeout: float | None = None) -> None:
        """Blocks while the ring is full; RingTimeout past `timeout`, CodecError if unencodable."""
        self._writer.write(self._encode(msg), timeout)

    def try_send(self, msg) -> bool:
        """Sends at once if the ring has room for the whole message, else False; never blocks."""
        return self._writer.try_write(self._encode(msg))

    async def send_async(self, msg) -> None:
        """Sends, waiting for room on the running loop (never blocking it)."""
        await self._writer.write_async(self._encode(msg))


class Receiver:
    """Decodes messages from a ring reader; a bad record raises CodecError or RingCorrupt."""

    def __init__(self, reader: RingReader, codec: Codec):
        self._reader = reader
        self._decode = codec.decode

    def fileno(self) -> int:
        return self._reader.fileno()

    def recv(self, timeout: float | None = None):
        return self._decode(self._reader.read(timeout))

    def try_recv(self):
        buf = self._reader.try_read()
        return None if buf is None else self._decode(buf)

    async def recv_async(self):
        return self._decode(await self._reader.read_async())
