"""Typed ring messages: a closed registry of frozen dataclasses and their wire codec. No pickle.

A message class is a frozen dataclass registered with ``@message(tag)``. Field types:
int, float, str, bool, list / dict / tuple of JSON values (optionally parametrised, e.g.
``list[int]``, ``dict[str, float]``, ``tuple[int, ...]``), ``typing.Any`` (any JSON value),
``numpy.ndarray`` or ``numpy.typing.NDArray[dtype]`` (dtypes int32, int64, float32, uint8, bool),
and ``X | None`` of any of these. Non-finite floats are not JSON: send them in float32 arrays.

Wire layout (little-endian; every section starts at a multiple of 8 from the buffer start):

    0   u8   magic 0xB7
    1   u8   tag (1..255)
    2   u8   num_arrays
    3   u8   reserved, 0
    4   u32  meta_len
    8   meta: orjson object {field name: value} of the non-array fields and of None arrays
        zero padding to a multiple of 8
    per array, in field order:
        u8 field index | u8 dtype code | u8 ndim | u8 reserved 0 | u32 reserved 0
        ndim x u64 shape
        C-order raw bytes, zero padding to a multiple of 8
    end of buffer (nothing may follow)

decode() builds only registered classes and checks every length, offset, field name, type,
dtype and shape against the buffer; anything else raises CodecError. Decoded arrays are
read-only views into the received buffer when it is immutable (bytes).
"""

from __future__ import annotations

import dataclasses
import math
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

MAGIC = 0xB7
MAX_NDIM = 32

_HEAD = struct.Struct("<BBBBI")  # magic, tag, num_arrays, reserved, meta_len
_ARRAY = struct.Struct("<BBBBI")  # field index, dtype code, ndim, reserved, reserved
_SMALL_ARRAY_LEN = 2048  # arrays up to this many bytes are copied inline, larger ones sent as views
_PAD = bytes(8)

_DTYPES = {1: np.dtype("<i4"), 2: np.dtype("<i8"), 3: np.dtype("<f4"), 4: np.dtype("u1"),
           5: np.dtype("?")}
_DTYPE_CODES = {dt: code for code, dt in _DTYPES.items()}


class CodecError(ValueError):
    """A message cannot be encoded, or a buffer is not a valid encoded message."""


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    index: int
    is_array: bool
    is_optional: bool
    check: Callable[[Any, str], Any] | None  # JSON fields: validates/normalises a value
    dtype: np.dtype | None  # array fields: required dtype, or None for any supported dtype


@dataclasses.dataclass(frozen=True)
class _Spec:
    cls: type
    tag: int
    fields: tuple[_Field, ...]
    by_name: dict[str, _Field]


_BY_TAG: dict[int, _Spec] = {}
_BY_CLASS: dict[type, _Spec] = {}


def _pad8(n: int) -> int:
    return (n + 7) & ~7


# ---- field type checkers (used on encode and on decode) ----

def _fail(path: str, expected: str, value: Any) -> CodecError:
    return CodecError(f"{path}: expected {expected}, got {type(value).__name__}")


def _check_int(v, path):
    if type(v) is int:
        return v
    if isinstance(v, np.integer):
        return int(v)
    raise _fail(path, "int", v)


def _check_float(v, path):
    if type(v) is float:
        f = v
    elif (type(v) is int) or isinstance(v, (np.floating, np.integer)):
        f = float(v)
    else:
        raise _fail(path, "float", v)
    if not math.isfinite(f):
        raise CodecError(f"{path}: non-finite float {f} is not JSON")
    return f


def _check_str(v, path):
    if type(v) is str:
        return v
    raise _fail(path, "str", v)


def _check_bool(v, path):
    if type(v) is bool:
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    raise _fail(path, "bool", v)


def _check_any(v, path):
    return v  # orjson rejects what it cannot encode; decoded JSON is JSON by construction


def _list_checker(item):
    def check(v, path):
        if type(v) is not list and type(v) is not tuple:
            raise _fail(path, "list", v)
        return v if item is None else [item(x, path) for x in v]
    return check


def _tuple_checker(item):
    def check(v, path):
        if type(v) is not list and type(v) is not tuple:
            raise _fail(path, "tuple", v)
        return tuple(v) if item is None else tuple(item(x, path) for x in v)
    return check


def _dict_checker(value):
    def check(v, path):
        if type(v) is not dict:
            raise _fail(path, "dict", v)
        for k in v:
            if type(k) is not str:
                raise CodecError(f"{path}: dict keys must be str, got {type(k).__name__}")
        return v if value is None else {k: value(x, path) for k, x in v.items()}
    return check


def _optional(inner):
    def check(v, path):
        return None if v is None else inner(v, path)
    return check


_SCALARS = {int: _check_int, float: _check_float, str: _check_str, bool: _check_bool}


def _json_checker(tp) -> Callable:
    """Checker for a JSON-carried type; TypeError for unsupported annotations."""
    if tp is Any:
        return _check_any
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return _optional(_json_checker(next(a for a in args if a is not type(None))))
    if tp is list or origin is list:
        return _list_checker(_json_checker(args[0]) if args else None)
    if tp is tuple or origin is tuple:
        if args and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"only tuple[T, ...] is supported, not {tp}")
        return _tuple_checker(_json_checker(args[0]) if args else None)
    if tp is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"dict keys must be str in {tp}")
        return _dict_checker(_json_checker(args[1]) if args else None)
    raise TypeError(f"unsupported message field type {tp!r}")


def _array_dtype(tp) -> tuple[bool, np.dtype | None]:
    """(is an ndarray annotation, required dtype or None)."""
    if tp is np.ndarray:
        return True, None
    if typing.get_origin(tp) is not np.ndarray:
        return False, None
    dtype_args = typing.get_args(typing.get_args(tp)[1]) if len(typing.get_args(tp)) == 2 else ()
    if not dtype_args or dtype_args[0] is Any:
        return True, None
    dtype = np.dtype(dtype_args[0])
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"unsupported array dtype {dtype} in {tp}")
    return True, dtype


def _make_field(name: str, index: int, tp) -> _Field:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    is_optional = origin in (typing.Union, types.UnionType) and type(None) in args
    inner = next((a for a in args if a is not type(None)), None) if is_optional else tp
    if is_optional and len(args) != 2:
        raise TypeError(f"field {name}: only X | None unions are supported, not {tp}")
    is_array, dtype = _array_dtype(inner)
    if is_array:
        return _Field(name, index, True, is_optional, None, dtype)
    return _Field(name, index, False, is_optional, _json_checker(tp), None)


def message(tag: int):
    """Register a frozen dataclass as the message type with this one-byte tag (1..255)."""
    if type(tag) is not int or not 1 <= tag <= 255:
        raise ValueError(f"message tag must be an int in 1..255, got {tag!r}")

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        if tag in _BY_TAG:
            raise ValueError(f"message tag {tag} already used by {_BY_TAG[tag].cls.__name__}")
        if cls in _BY_CLASS:
            raise ValueError(f"{cls.__name__} is already registered")
        fields = dataclasses.fields(cls)
        if len(fields) > 255 or any(not f.init for f in fields):
            raise TypeError(f"{cls.__name__}: at most 255 fields, all of them init fields")
        hints = typing.get_type_hints(cls)
        specs = tuple(_make_field(f.name, i, hints[f.name]) for i, f in enumerate(fields))
        spec = _Spec(cls, tag, specs, {f.name: f for f in specs})
        _BY_TAG[tag] = spec
        _BY_CLASS[cls] = spec
        return cls

    return register


def registered_types() -> dict[int, type]:
    """Tag -> class of every registered message type."""
    return {tag: spec.cls for tag, spec in _BY_TAG.items()}


# ---- encode ----

def _array_bytes(field: _Field, arr, cls_name: str) -> tuple[np.ndarray, int]:
    if not isinstance(arr, np.ndarray):
        raise _fail(f"{cls_name}.{field.name}", "numpy.ndarray", arr)
    code = _DTYPE_CODES.get(arr.dtype)
    if code is None or (field.dtype is not None and arr.dtype != field.dtype):
        want = field.dtype or "int32/int64/float32/uint8/bool (native)"
        raise CodecError(f"{cls_name}.{field.name}: dtype {arr.dtype}, expected {want}")
    if arr.ndim > MAX_NDIM:
        raise CodecError(f"{cls_name}.{field.name}: ndim {arr.ndim} > {MAX_NDIM}")
    return (arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)), code


def encode(msg) -> list:
    """Buffers (bytes / bytearray / memoryview) whose concatenation is the encoded message.

    Arrays larger than a small threshold are returned as views of their memory, not copied.
    """
    spec = _BY_CLASS.get(type(msg))
    if spec is None:
        raise CodecError(f"{type(msg).__name__} is not a registered message type")
    cls_name = spec.cls.__name__
    meta = {}
    arrays = []
    for f in spec.fields:
        v = getattr(msg, f.name)
        if f.is_array:
            if v is None:
                if not f.is_optional:
                    raise CodecError(f"{cls_name}.{f.name}: None for a non-optional array")
                meta[f.name] = None
            else:
                arrays.append((f.index, *_array_bytes(f, v, cls_name)))
        else:
            meta[f.name] = f.check(v, f"{cls_name}.{f.name}")
    try:
        meta_bytes = orjson.dumps(meta)
    except orjson.JSONEncodeError as e:
        raise CodecError(f"{cls_name}: fields are not JSON-encodable: {e}") from e

    head = bytearray(_HEAD.pack(MAGIC, spec.tag, len(arrays), 0, len(meta_bytes)))
    head += meta_bytes
    head += _PAD[:_pad8(len(head)) - len(head)]
    out: list = [head]
    for index, arr, code in arrays:
        cur = out[-1] if type(out[-1]) is bytearray else None
        if cur is None:
            out.append(cur := bytearray())
        cur += _ARRAY.pack(index, code, arr.ndim, 0, 0)
        cur += struct.pack(f"<{arr.ndim}Q", *arr.shape)
        raw = memoryview(arr.reshape(-1).view(np.uint8))
        if len(raw) <= _SMALL_ARRAY_LEN:
            cur += raw
            cur += _PAD[:_pad8(len(raw)) - len(raw)]
        else:
            out.append(raw)
            pad = _pad8(len(raw)) - len(raw)
            out.append(bytearray(_PAD[:pad]))  # later descriptors append here
    if type(out[-1]) is bytearray and not out[-1]:
        out.pop()
    return out


def encode_bytes(msg) -> bytes:
    """encode() joined into one bytes object."""
    return b"".join(encode(msg))


# ---- decode ----

def decode(buf):
    """The message encoded in `buf` (bytes-like); CodecError if it is not a valid one."""
    try:
        mv = memoryview(buf)
    except TypeError as e:
        raise CodecError(f"cannot decode a {type(buf).__name__}") from e
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    n = len(mv)
    if n < _HEAD.size:
        raise CodecError(f"buffer of {n} bytes is shorter than the header")
    magic, tag, num_arrays, reserved, meta_len = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC or reserved:
        raise CodecError(f"bad header: magic={magic:#x} reserved={reserved}")
    spec = _BY_TAG.get(tag)
    if spec is None:
        raise CodecError(f"unknown message tag {tag}")
    cls_name = spec.cls.__name__
    meta_end = _HEAD.size + meta_len
    if meta_end > n:
        raise CodecError(f"{cls_name}: meta of {meta_len} bytes runs past the buffer ({n})")
    try:
        meta = orjson.loads(mv[_HEAD.size:meta_end])
    except orjson.JSONDecodeError as e:
        raise CodecError(f"{cls_name}: bad meta JSON: {e}") from e
    if type(meta) is not dict:
        raise CodecError(f"{cls_name}: meta is not a JSON object")

    values = {}
    for name, v in meta.items():
        f = spec.by_name.get(name)
        if f is None:
            raise CodecError(f"{cls_name}: unknown field {name!r}")
        if f.is_array:
            if v is not None or not f.is_optional:
                raise CodecError(f"{cls_name}.{name}: array field in meta must be a None")
            values[name] = None
        else:
            values[name] = f.check(v, f"{cls_name}.{name}")

    pos = _pad8(meta_end)
    for _ in range(num_arrays):
        if pos + _ARRAY.size > n:
            raise CodecError(f"{cls_name}: array descriptor runs past the buffer")
        index, code, ndim, r1, r2 = _ARRAY.unpack_from(mv, pos)
        pos += _ARRAY.size
        if r1 or r2 or index >= len(spec.fields) or not spec.fields[index].is_array:
            raise CodecError(f"{cls_name}: bad array descriptor (field index {index})")
        f = spec.fields[index]
        dtype = _DTYPES.get(code)
        if dtype is None or (f.dtype is not None and dtype != f.dtype):
            raise CodecError(f"{cls_name}.{f.name}: bad dtype code {code}")
        if f.name in values:
            raise CodecError(f"{cls_name}.{f.name}: given twice")
        if ndim > MAX_NDIM or pos + 8 * ndim > n:
            raise CodecError(f"{cls_name}.{f.name}: bad ndim {ndim}")
        shape = struct.unpack_from(f"<{ndim}Q", mv, pos)
        pos += 8 * ndim
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes > n - pos or max(shape, default=0) >= 1 << 62:
            raise CodecError(f"{cls_name}.{f.name}: shape {shape} runs past the buffer")
        try:
            values[f.name] = np.frombuffer(mv, dtype, count, pos).reshape(shape)
        except ValueError as e:
            raise CodecError(f"{cls_name}.{f.name}: {e}") from e
        pos += _pad8(nbytes)
    if pos != n:
        raise CodecError(f"{cls_name}: {n - pos} bytes after the last section")
    if len(values) != len(spec.fields):
        missing = [f.name for f in spec.fields if f.name not in values]
        raise CodecError(f"{cls_name}: missing fields {missing}")
    try:
        return spec.cls(**values)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{cls_name}: {e}") from e
