"""Shared-memory transport between actors: broadcast rings, the message codec, channels.

Imports nothing else from `mi` and no torch, so every actor (and tests) can use it cheaply.
"""

from mi.shm.channel import Receiver, Sender
from mi.shm.codec import Codec, CodecError
from mi.shm.ring import Ring, RingCorrupt, RingError, RingReader, RingTimeout, RingWriter

__all__ = [
    "Codec",
    "CodecError",
    "Receiver",
    "Ring",
    "RingCorrupt",
    "RingError",
    "RingReader",
    "RingTimeout",
    "RingWriter",
    "Sender",
]
