"""Ring message codec: msgpack (msgspec) for one closed union of tagged Structs. No pickle.

`Codec(A | B | ...)` encodes any member of the union and decodes only members of it; the
union's Structs carry the tags and the field types, and msgspec checks every type, tag and
`Meta` bound in C while it decodes. This module knows no message: the union is the caller's.

numpy arrays (dtypes int32, int64, float32, uint8, bool; little-endian, ndim <= 32) travel
through one msgpack extension, code `ARRAY_EXT`, whose payload is

    u8 dtype code | u8 ndim | ndim x u64 shape (little-endian) | C-order raw bytes

and nothing else: the raw bytes must be exactly prod(shape) * itemsize long. No other extension
is decoded and no other custom type is encoded (numpy scalars become Python numbers).

Decoded arrays are zero-copy views of the received buffer (read-only when it is `bytes`, as the
ring's are): the memoryview msgspec hands to the extension hook is a slice of that buffer and
holds a reference to it, so the views stay valid after `decode` returns. They are not aligned
(msgpack puts a payload wherever it falls; about half of a step's arrays are not): numpy reads
them correctly, but torch.from_numpy takes unaligned memory without a check and its kernels may
assume alignment, so whoever hands one to torch copies it first if `not a.flags.aligned`.

Every failure of `decode` (a truncated or corrupt buffer, an unknown tag, a wrong type, a bound,
a bad extension payload) is one `CodecError`; so is a message `encode` cannot carry.
"""

from __future__ import annotations

import math
import struct
import typing
from typing import Any

import msgspec
import numpy as np

ARRAY_EXT = 1
MAX_NDIM = 32

_DTYPES = {1: np.dtype("<i4"), 2: np.dtype("<i8"), 3: np.dtype("<f4"), 4: np.dtype("u1"), 5: np.dtype("?")}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}  # dtype == keeps the byte order
_HEADS = [struct.Struct(f"<BB{ndim}Q") for ndim in range(MAX_NDIM + 1)]
_HEAD_1D = _HEADS[1]


class CodecError(ValueError):
    """A message cannot be encoded, or a buffer is not a valid encoded message."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        code = _DTYPE_CODES.get(obj.dtype)
        if code is None:
            raise CodecError(f"arrays of dtype {obj.dtype} cannot cross a ring")
        ndim = obj.ndim
        if ndim == 1:
            head = _HEAD_1D.pack(code, 1, len(obj))
        elif ndim <= MAX_NDIM:
            head = _HEADS[ndim].pack(code, ndim, *obj.shape)
        else:
            raise CodecError(f"array of ndim {ndim} > {MAX_NDIM}")
        return msgspec.msgpack.Ext(ARRAY_EXT, head + obj.tobytes())  # tobytes: C order
    if isinstance(obj, np.generic):
        return obj.item()
    raise CodecError(f"{type(obj).__name__} cannot cross a ring")


def _ext_hook(code: int, data: memoryview) -> np.ndarray:
    size = len(data)
    if code != ARRAY_EXT or size < 2:
        raise CodecError(f"bad msgpack extension: code {code}, {size} bytes")
    dtype, ndim = _DTYPES.get(data[0]), data[1]
    if dtype is None or ndim > MAX_NDIM:
        raise CodecError(f"bad array header: dtype code {data[0]}, ndim {ndim}")
    head = _HEADS[ndim]
    if size < head.size:
        raise CodecError(f"array shape of ndim {ndim} runs past its payload")
    shape = head.unpack_from(data)[2:]
    count = shape[0] if ndim == 1 else math.prod(shape)
    if count * dtype.itemsize != size - head.size:
        raise CodecError(
            f"array of shape {shape} and dtype {dtype} does not fill its {size - head.size} bytes"
        )
    array = np.frombuffer(data, dtype, count, head.size)
    if ndim == 1:
        return array
    try:
        return array.reshape(shape)
    except ValueError as e:  # a zero-sized shape numpy cannot represent
        raise CodecError(f"array of shape {shape}: {e}") from e


def _declared_dtype(tp: Any) -> np.dtype | None:
    """X of an `NDArray[X]` annotation; None for a bare `np.ndarray` (any dtype)."""
    args = typing.get_args(tp)
    scalar = typing.get_args(args[1])[0] if len(args) == 2 and typing.get_args(args[1]) else Any
    if scalar is Any:
        return None
    if np.dtype(scalar) not in _DTYPE_CODES:
        raise TypeError(f"arrays of dtype {np.dtype(scalar)} cannot cross a ring")
    return np.dtype(scalar)


def _collect_arrays(tp: Any, dtypes: dict, seen: set) -> None:
    """Walks the Structs reachable from `tp`: TypeError for one that is not frozen or an array
    of a dtype the codec does not carry; fills `dtypes` (array annotation -> dtype or None)."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if tp in seen:
            return
        seen.add(tp)
        if not tp.__struct_config__.frozen:
            raise TypeError(f"{tp.__name__} must be a frozen Struct")
        for field in msgspec.structs.fields(tp):
            _collect_arrays(field.type, dtypes, seen)
    elif tp is np.ndarray or typing.get_origin(tp) is np.ndarray:
        dtypes[tp] = _declared_dtype(tp)
    else:
        for arg in typing.get_args(tp):
            _collect_arrays(arg, dtypes, seen)


class Codec:
    """Encoder and decoder of the messages in one closed union of tagged frozen Structs.

    TypeError up front for a union msgspec cannot decode (say two members with one tag), a
    Struct that is not frozen, or an array field of a dtype the extension does not carry.
    """

    def __init__(self, union: Any):
        self._types = frozenset(typing.get_args(union) or (union,))
        dtypes: dict[Any, np.dtype | None] = {}
        _collect_arrays(union, dtypes, set())

        def dec_hook(tp: Any, obj: Any) -> Any:
            # Checks, never builds: an `NDArray[X]` field takes only arrays of dtype X (msgspec
            # then checks that the value is an ndarray at all).
            if type(obj) is np.ndarray:
                want = dtypes.get(tp)
                if want is not None and obj.dtype != want:
                    raise ValueError(f"Expected an array of {want}, got {obj.dtype}")
            return obj

        self._encode = msgspec.msgpack.Encoder(enc_hook=_enc_hook).encode
        self._decode = msgspec.msgpack.Decoder(union, ext_hook=_ext_hook, dec_hook=dec_hook).decode

    def encode(self, msg: Any) -> bytes:
        if type(msg) not in self._types:
            raise CodecError(f"{type(msg).__name__} is not a message of this codec")
        try:
            return self._encode(msg)
        except CodecError:
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise CodecError(f"{type(msg).__name__}: {e}") from e

    def decode(self, buf: Any) -> Any:
        """The message in `buf` (bytes-like; its arrays are views of it)."""
        try:
            return self._decode(buf)
        except CodecError:
            raise
        except (msgspec.DecodeError, TypeError) as e:  # ValidationError is a DecodeError
            raise CodecError(str(e)) from e
