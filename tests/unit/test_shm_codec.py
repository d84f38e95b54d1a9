"""Codec round-trips for every field type, strict validation, and a corruption property test."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mi.shm.codec import CodecError, decode, encode, encode_bytes, message, registered_types

# Tags 200+ keep test types clear of the real message registry.


@message(200)
@dataclasses.dataclass(frozen=True)
class Scalars:
    i: int
    f: float
    s: str
    b: bool
    oi: int | None
    os_: str | None


@message(201)
@dataclasses.dataclass(frozen=True)
class Jsony:
    ids: list[int]
    table: dict[str, float]
    pair: tuple[int, ...]
    anything: Any
    raw_list: list
    raw_dict: dict
    maybe: list[str] | None


@message(202)
@dataclasses.dataclass(frozen=True)
class Arrays:
    req_id: int
    token_ids: npt.NDArray[np.int32]
    anything: np.ndarray
    maybe: np.ndarray | None = None


@message(203)
@dataclasses.dataclass(frozen=True)
class Empty:
    pass


@message(204)
@dataclasses.dataclass(frozen=True)
class Checked:
    n: int

    def __post_init__(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")


def roundtrip(msg):
    out = decode(encode_bytes(msg))
    assert type(out) is type(msg)
    return out


def assert_arrays_equal(a: Arrays, b: Arrays):
    for name in ("token_ids", "anything", "maybe"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_scalars_roundtrip():
    for msg in [Scalars(1, 2.5, "héllo", True, None, None),
                Scalars(-(2**63), -0.0, "", False, 2**63 - 1, "x" * 10_000),
                Scalars(0, 1e300, "\x00\n\"", True, 0, "")]:
        assert roundtrip(msg) == msg


def test_json_fields_roundtrip():
    msg = Jsony([1, 2, 3], {"a": 1.5, "b": -2.0}, (4, 5), {"x": [1, None, "y"]}, [1, "a"], {},
                None)
    assert roundtrip(msg) == msg
    msg = Jsony([], {}, (), None, [], {"k": {"n": [True]}}, ["a", "b"])
    assert roundtrip(msg) == msg


def test_numpy_scalars_and_ints_are_normalised():
    out = roundtrip(Scalars(np.int64(7), 3, "s", np.bool_(True), np.int32(2), None))
    assert out == Scalars(7, 3.0, "s", True, 2, None)
    assert type(out.i) is int and type(out.f) is float and type(out.b) is bool


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.uint8, np.bool_])
def test_array_dtypes(dtype):
    rng = np.random.default_rng(0)
    anything = (rng.integers(0, 2, size=(3, 5)) if dtype is np.bool_
                else rng.integers(0, 100, size=(3, 5))).astype(dtype)
    msg = Arrays(1, np.arange(7, dtype=np.int32), anything, None)
    assert_arrays_equal(roundtrip(msg), msg)


def test_arrays_empty_2d_0d_big_and_noncontiguous():
    rng = np.random.default_rng(1)
    cases = [
        Arrays(0, np.zeros(0, np.int32), np.zeros((0, 4), np.float32), np.zeros((3, 0), np.int64)),
        Arrays(1, np.arange(12, dtype=np.int32).reshape(3, 4), np.array(5, np.int64)),
        Arrays(2, rng.integers(0, 2**31 - 1, 1_000_003).astype(np.int32),
               rng.standard_normal((512, 1024)).astype(np.float32),
               np.ones(17, np.uint8)),
        Arrays(3, np.arange(20, dtype=np.int32)[::3],
               np.arange(30, dtype=np.int64).reshape(5, 6).T),
    ]
    for msg in cases:
        out = roundtrip(msg)
        assert_arrays_equal(out, msg)
        assert out.req_id == msg.req_id


def test_big_array_is_not_copied_on_encode():
    big = np.arange(100_000, dtype=np.int64)
    parts = encode(Arrays(1, np.arange(3, dtype=np.int32), big))
    views = [p for p in parts if isinstance(p, memoryview)]
    assert views and np.shares_memory(np.frombuffer(views[0], np.int64), big)


def test_decoded_arrays_are_views_into_the_buffer():
    buf = encode_bytes(Arrays(1, np.arange(1000, dtype=np.int32), np.zeros(3, np.uint8)))
    out = decode(buf)
    assert not out.token_ids.flags.writeable
    assert np.shares_memory(out.token_ids, np.frombuffer(buf, np.uint8))


def test_empty_message_and_registry():
    assert roundtrip(Empty()) == Empty()
    assert registered_types()[203] is Empty


def test_registration_errors():
    with pytest.raises(ValueError):
        @message(200)
        @dataclasses.dataclass(frozen=True)
        class Dup:
            x: int

    for bad in (0, 256, -1, True, "3"):
        with pytest.raises(ValueError):
            message(bad)

    with pytest.raises(TypeError):
        @message(250)
        @dataclasses.dataclass
        class NotFrozen:
            x: int

    with pytest.raises(TypeError):
        @message(251)
        @dataclasses.dataclass(frozen=True)
        class BadType:
            x: set

    with pytest.raises(TypeError):
        @message(252)
        @dataclasses.dataclass(frozen=True)
        class BadDtype:
            x: npt.NDArray[np.float64]

    with pytest.raises(ValueError):
        message(203)(Scalars)  # a class registers once
    assert 250 not in registered_types() and 251 not in registered_types()


def test_encode_rejects_bad_values():
    arr = np.arange(3, dtype=np.int32)
    bad = [
        Scalars("1", 1.0, "s", True, None, None),
        Scalars(True, 1.0, "s", True, None, None),
        Scalars(1, float("nan"), "s", True, None, None),
        Scalars(1, 1.0, b"s", True, None, None),
        Scalars(1, 1.0, "s", 1, None, None),
        Scalars(2**64, 1.0, "s", True, None, None),
        Jsony([1, "2"], {}, (), None, [], {}, None),
        Jsony([], {1: 2.0}, (), None, [], {}, None),
        Jsony([], {}, (), {1, 2}, [], {}, None),
        Arrays(1, arr.astype(np.int64), arr),
        Arrays(1, arr, arr.astype(np.float64)),
        Arrays(1, arr, arr.astype(">i4")),
        Arrays(1, [1, 2], arr),
        Arrays(1, None, arr),
    ]
    for msg in bad:
        with pytest.raises(CodecError):
            encode(msg)
    with pytest.raises(CodecError):
        encode(object())


def _meta_message(tag: int, meta: bytes, tail: bytes = b"") -> bytes:
    head = bytes([0xB7, tag, 0, 0]) + len(meta).to_bytes(4, "little") + meta
    return head + bytes(-len(head) % 8) + tail


def test_decode_rejects_bad_buffers():
    good = encode_bytes(Scalars(1, 2.0, "s", True, None, None))
    assert decode(good) == Scalars(1, 2.0, "s", True, None, None)
    cases = [
        b"",
        good[:7],
        bytes([0xB8]) + good[1:],  # magic
        good[:1] + bytes([199]) + good[2:],  # unknown tag
        good[:3] + b"\x01" + good[4:],  # reserved byte
        good + bytes(8),  # trailing bytes
        _meta_message(200, b'{"i":1,"f":2.0,"s":"s","b":true,"oi":null}'),  # missing field
        _meta_message(200, b'{"i":1,"f":2.0,"s":"s","b":true,"oi":null,"os_":null,"x":1}'),
        _meta_message(200, b'{"i":"1","f":2.0,"s":"s","b":true,"oi":null,"os_":null}'),
        _meta_message(200, b'{"i":true,"f":2.0,"s":"s","b":true,"oi":null,"os_":null}'),
        _meta_message(200, b'{"i":1,"f":2.0,"s":"s","b":1,"oi":null,"os_":null}'),
        _meta_message(200, b'[1, 2]'),
        _meta_message(200, b'{"i":1,'),
        _meta_message(204, b'{"n":-1}'),  # __post_init__ rejects
        _meta_message(202, b'{"req_id":1,"token_ids":[1],"anything":null,"maybe":null}'),
    ]
    for buf in cases:
        with pytest.raises(CodecError):
            decode(buf)
    with pytest.raises(CodecError):
        decode(12345)


def test_decode_rejects_bad_array_sections():
    msg = Arrays(1, np.arange(4, dtype=np.int32), np.zeros((2, 2), np.uint8))
    good = bytearray(encode_bytes(msg))
    meta_len = int.from_bytes(good[4:8], "little")
    desc = 8 + meta_len + (-(8 + meta_len) % 8)  # first array descriptor
    assert good[desc] == 1  # field index of token_ids
    patches = [
        (desc, 0),  # field index of a non-array field
        (desc, 9),  # field index out of range
        (desc + 1, 2),  # int64 where NDArray[int32] is required
        (desc + 1, 77),  # unknown dtype code
        (desc + 2, 40),  # ndim too large
        (desc + 3, 1),  # reserved
        (desc + 8, 200),  # shape larger than the buffer
        (2, 3),  # more arrays than present
        (2, 1),  # fewer arrays: trailing bytes
    ]
    for off, value in patches:
        bad = bytearray(good)
        bad[off] = value
        with pytest.raises(CodecError):
            decode(bytes(bad))
    # the same array field twice
    arr_len = 8 + 8 + 16
    twice = bytearray(good)
    twice[2] = 3
    twice += good[desc:desc + arr_len]
    with pytest.raises(CodecError):
        decode(bytes(twice))


def _sample_messages():
    rng = np.random.default_rng(2)
    return [
        Scalars(12, -3.25, "abc", False, 5, "z"),
        Jsony([1, 2], {"k": 0.5}, (9,), {"a": [1, {"b": None}]}, ["x"], {"y": 1}, ["q"]),
        Arrays(7, np.arange(9, dtype=np.int32).reshape(3, 3),
               rng.standard_normal(5).astype(np.float32), np.array([True, False])),
        Arrays(8, np.zeros(0, np.int32), np.arange(300, dtype=np.int64)),
        Empty(),
    ]


def test_random_corruption_only_raises_codec_error():
    seed = random.randrange(2**32)
    print(f"corruption seed={seed}")
    rng = random.Random(seed)
    registered = tuple(registered_types().values())
    num_valid = 0
    for msg in _sample_messages():
        good = encode_bytes(msg)
        for _ in range(400):
            buf = bytearray(good)
            kind = rng.randrange(3)
            if kind == 0:
                for _ in range(rng.randint(1, 4)):
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif kind == 1:
                del buf[rng.randrange(len(buf)):]
            else:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                buf += bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
            try:
                out = decode(bytes(buf))
            except CodecError:
                continue
            assert isinstance(out, registered), f"seed={seed}: decoded {type(out)}"
            num_valid += 1
    print(f"corruption: {num_valid} mutated buffers still decoded to valid messages")
