"""Codec round-trips for every field type, strict validation, and a corruption property test."""

import gc
import random
import typing
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from mi.actors import messages as m
from mi.api.sampling import SamplingParams
from mi.shm.codec import ARRAY_EXT, Codec, CodecError

# Tags 200+ keep test types clear of the real messages.


class _Msg(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    pass


class Scalars(_Msg, tag=200):
    i: int
    f: float
    s: str
    b: bool
    oi: int | None
    os_: str | None


class Nested(_Msg, tag=201):
    ids: list[int]
    table: dict[str, float]
    pair: tuple[int, ...]
    anything: Any
    raw_list: list
    raw_dict: dict
    maybe: list[str] | None


class Arrays(_Msg, tag=202):
    req_id: int
    token_ids: npt.NDArray[np.int32]
    anything: np.ndarray
    maybe: np.ndarray | None = None


class Empty(_Msg, tag=203):
    pass


class Checked(_Msg, tag=204):
    n: int

    def __post_init__(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")


TestMessage = Scalars | Nested | Arrays | Empty | Checked
CODEC = Codec(TestMessage)


def roundtrip(msg):
    out = CODEC.decode(CODEC.encode(msg))
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
    for msg in [
        Scalars(1, 2.5, "héllo", True, None, None),
        Scalars(-(2**63), -0.0, "", False, 2**63 - 1, "x" * 10_000),
        Scalars(0, 1e300, '\x00\n"', True, 0, ""),
        Scalars(0, float("inf"), "msgpack carries non-finite floats", True, 0, ""),
    ]:
        assert roundtrip(msg) == msg


def test_nested_fields_roundtrip():
    msg = Nested([1, 2, 3], {"a": 1.5, "b": -2.0}, (4, 5), {"x": [1, None, "y"]}, [1, "a"], {}, None)
    assert roundtrip(msg) == msg
    msg = Nested([], {}, (), None, [], {"k": {"n": [True]}}, ["a", "b"])
    assert roundtrip(msg) == msg


def test_numpy_scalars_and_ints_are_normalised():
    out = roundtrip(Scalars(np.int64(7), 3, "s", np.bool_(True), np.int32(2), None))
    assert out == Scalars(7, 3.0, "s", True, 2, None)
    assert type(out.i) is int and type(out.f) is float and type(out.b) is bool


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.uint8, np.bool_])
def test_array_dtypes(dtype):
    rng = np.random.default_rng(0)
    anything = (
        rng.integers(0, 2, size=(3, 5)) if dtype is np.bool_ else rng.integers(0, 100, size=(3, 5))
    ).astype(dtype)
    msg = Arrays(1, np.arange(7, dtype=np.int32), anything, None)
    assert_arrays_equal(roundtrip(msg), msg)


def test_arrays_empty_2d_0d_big_and_noncontiguous():
    rng = np.random.default_rng(1)
    cases = [
        Arrays(0, np.zeros(0, np.int32), np.zeros((0, 4), np.float32), np.zeros((3, 0), np.int64)),
        Arrays(1, np.arange(12, dtype=np.int32).reshape(3, 4), np.array(5, np.int64)),
        Arrays(
            2,
            rng.integers(0, 2**31 - 1, 1_000_003).astype(np.int32),
            rng.standard_normal((512, 1024)).astype(np.float32),
            np.ones(17, np.uint8),
        ),
        Arrays(3, np.arange(20, dtype=np.int32)[::3], np.arange(30, dtype=np.int64).reshape(5, 6).T),
    ]
    for msg in cases:
        out = roundtrip(msg)
        assert_arrays_equal(out, msg)
        assert out.req_id == msg.req_id


def test_decoded_arrays_are_views_into_the_buffer():
    buf = CODEC.encode(Arrays(1, np.arange(1000, dtype=np.int32), np.zeros(3, np.uint8)))
    out = CODEC.decode(buf)
    assert not out.token_ids.flags.writeable
    assert np.shares_memory(out.token_ids, np.frombuffer(buf, np.uint8))


def test_decoded_views_keep_the_buffer_alive():
    # msgspec hands ext_hook a memoryview of the received buffer; the view holds a reference to
    # it, so the arrays stay valid once the decoder and the caller have dropped theirs.
    out = CODEC.decode(
        CODEC.encode(Arrays(1, np.arange(100_000, dtype=np.int32), np.arange(5, dtype=np.int64)))
    )
    gc.collect()
    np.zeros(200_000, np.int32)  # reuse freed memory, if any were freed
    assert out.token_ids.tolist() == list(range(100_000))
    assert out.anything.tolist() == [0, 1, 2, 3, 4]


def test_empty_message_and_members_only():
    assert roundtrip(Empty()) == Empty()

    class Stranger(_Msg, tag=205):
        x: int

    with pytest.raises(CodecError):
        CODEC.encode(Stranger(1))
    with pytest.raises(CodecError):  # a member of another union is not one of this codec's
        CODEC.decode(Codec(Stranger).encode(Stranger(1)))


def test_declaration_errors():
    class Dup(_Msg, tag=200):
        x: int

    class Untagged(_Msg):
        x: int

    class NotFrozen(msgspec.Struct, array_like=True, tag=250):
        x: int

    class BadDtype(_Msg, tag=252):
        x: npt.NDArray[np.float64]

    class NestsBadDtype(_Msg, tag=253):
        inner: list[BadDtype]

    for union in (Scalars | Dup, Scalars | Untagged, NotFrozen, BadDtype, Empty | NestsBadDtype):
        with pytest.raises(TypeError):
            Codec(union)


def test_bad_values_never_arrive():
    # msgspec does not check field types when it encodes: a bad value fails at the latest when
    # the receiver decodes it (the wire is typed), always as a CodecError.
    arr = np.arange(3, dtype=np.int32)
    bad = [
        Scalars("1", 1.0, "s", True, None, None),
        Scalars(True, 1.0, "s", True, None, None),
        Scalars(1, "1.0", "s", True, None, None),
        Scalars(1, 1.0, b"s", True, None, None),
        Scalars(1, 1.0, "s", 1, None, None),
        Scalars(2**64, 1.0, "s", True, None, None),
        Nested([1, "2"], {}, (), None, [], {}, None),
        Nested([], {1: 2.0}, (), None, [], {}, None),
        Nested([], {}, (), object(), [], {}, None),
        Arrays(1, arr.astype(np.int64), arr),
        Arrays(1, arr, arr.astype(np.float64)),
        Arrays(1, arr, arr.astype(">i4")),
        Arrays(1, [1, 2], arr),
        Arrays(1, None, arr),
        Arrays(1, arr, np.zeros((1,) * 33, np.uint8)),
    ]
    for msg in bad:
        with pytest.raises(CodecError):
            CODEC.decode(CODEC.encode(msg))
    with pytest.raises(CodecError):
        CODEC.encode(object())


def _raw(*fields) -> bytes:
    """A message written field by field (array_like: [tag, field, ...]), valid or not."""
    return msgspec.msgpack.encode(list(fields))


def test_decode_rejects_bad_buffers():
    good = CODEC.encode(Scalars(1, 2.0, "s", True, None, None))
    assert CODEC.decode(good) == Scalars(1, 2.0, "s", True, None, None)
    assert _raw(200, 1, 2.0, "s", True, None, None) == good
    cases = [
        b"",
        good[:5],
        good[:-1],
        b"\xc1" + good[1:],  # never-used msgpack opcode
        _raw(199, 1, 2.0, "s", True, None, None),  # unknown tag
        _raw("Scalars", 1, 2.0, "s", True, None, None),  # tags are ints
        good + bytes(8),  # trailing bytes
        _raw(200, 1, 2.0, "s", True, None),  # missing field
        _raw(200, 1, 2.0, "s", True, None, None, 1),  # unknown (extra) field
        _raw(200, "1", 2.0, "s", True, None, None),
        _raw(200, True, 2.0, "s", True, None, None),
        _raw(200, 1, 2.0, "s", 1, None, None),
        msgspec.msgpack.encode({"i": 1, "f": 2.0, "s": "s", "b": True, "oi": None, "os_": None}),
        _raw(1, 2),
        _raw(204, -1),  # __post_init__ rejects
        _raw(202, 1, [1], None, None),  # a list where an array is declared
        _raw(202, 1, b"\x01\x01" + bytes(8), None, None),  # bin where an array is declared
    ]
    for buf in cases:
        with pytest.raises(CodecError):
            CODEC.decode(buf)
    with pytest.raises(CodecError):
        CODEC.decode(12345)


def _array_payload(code: int, shape: tuple, raw: bytes, ndim: int | None = None) -> bytes:
    ndim = len(shape) if ndim is None else ndim
    return bytes([code, ndim]) + b"".join(n.to_bytes(8, "little") for n in shape) + raw


def test_decode_rejects_bad_array_payloads():
    raw = np.arange(4, dtype=np.int32).tobytes()
    anything = msgspec.msgpack.Ext(ARRAY_EXT, _array_payload(4, (2, 2), bytes(4)))

    def with_token_ids(ext) -> bytes:
        return _raw(202, 1, ext, anything, None)

    good = with_token_ids(msgspec.msgpack.Ext(ARRAY_EXT, _array_payload(1, (4,), raw)))
    assert CODEC.decode(good).token_ids.tolist() == [0, 1, 2, 3]
    assert good == CODEC.encode(Arrays(1, np.arange(4, dtype=np.int32), np.zeros((2, 2), np.uint8)))
    payloads = [
        _array_payload(2, (2,), raw),  # int64 where NDArray[int32] is declared
        _array_payload(77, (4,), raw),  # unknown dtype code
        _array_payload(0, (4,), raw),
        _array_payload(1, (4,) * 40, raw),  # ndim too large
        _array_payload(1, (200,), raw),  # shape runs past the data
        _array_payload(1, (3,), raw),  # data runs past the shape
        _array_payload(1, (2**64 - 1,), raw),
        _array_payload(1, (2**62, 2**2), raw),  # count overflows int64
        _array_payload(1, (0, 2**63), b""),  # zero-sized, but too big for numpy
        _array_payload(1, (4,), raw, ndim=2),  # shape shorter than ndim says
        _array_payload(1, (), b"")[:1],  # no ndim
        b"",
    ]
    for payload in payloads:
        with pytest.raises(CodecError):
            CODEC.decode(with_token_ids(msgspec.msgpack.Ext(ARRAY_EXT, payload)))
    for buf in [
        with_token_ids(msgspec.msgpack.Ext(ARRAY_EXT + 1, _array_payload(1, (4,), raw))),
        with_token_ids(msgspec.msgpack.Ext(-1, b"\x00" * 4)),  # msgpack's timestamp extension
        _raw(
            202, msgspec.msgpack.Ext(ARRAY_EXT, _array_payload(1, (4,), raw)), anything, anything
        ),  # an array where an int is declared
    ]:
        with pytest.raises(CodecError):
            CODEC.decode(buf)


def _sample_messages():
    rng = np.random.default_rng(2)
    return [
        Scalars(12, -3.25, "abc", False, 5, "z"),
        Nested([1, 2], {"k": 0.5}, (9,), {"a": [1, {"b": None}]}, ["x"], {"y": 1}, ["q"]),
        Arrays(
            7,
            np.arange(9, dtype=np.int32).reshape(3, 3),
            rng.standard_normal(5).astype(np.float32),
            np.array([True, False]),
        ),
        Arrays(8, np.zeros(0, np.int32), np.arange(300, dtype=np.int64)),
        Empty(),
    ]


def _ring_messages():
    """One of each kind the backend sends, with nested Structs and SamplingParams."""
    i32 = lambda *xs: np.array(xs, np.int32)  # noqa: E731
    params = SamplingParams(
        max_tokens=5,
        temperature=0.5,
        top_k=3,
        seed=11,
        logprobs=2,
        logit_bias={3: -1.5},
        stop=("x", "yz"),
        stop_token_ids=(4,),
    )
    slot = m.NewSlot(
        slot=1, num_prompt_tokens=3, params=params, ban_token_ids=i32(4, 0), cached_token_ids=i32()
    )
    return (
        [
            m.AddRequest(req_id=9, prompt_ids=i32(1, 2, 3), params=params),
            m.StepPlan(
                step_id=3,
                new_slots=[slot, slot],
                freed_slots=i32(0),
                slots=i32(1, 2),
                num_new_tokens=i32(3, 1),
                num_computed_tokens=i32(0, 7),
                input_ids=i32(1, 2, 3, 4),
                do_sample=np.ones(2, np.uint8),
                block_appends=i32(1, 5).reshape(1, 2),
                prompt_logprobs_rows=np.zeros(2, np.uint8),
                prompt_targets=i32(),
            ),
            m.TokenOutputs(
                req_ids=np.arange(2, dtype=np.int64),
                token_ids=i32(5, -1),
                finish_reasons=np.array([0, 3], np.uint8),
                num_cached_tokens=i32(0, 4),
                logprobs=np.zeros(2, np.float32),
                top_ids=np.zeros((2, 2), np.int32),
                top_logprobs=np.zeros((2, 2), np.float32),
            ),
            m.SchedulerStats(stats=m.SchedulerCounters(1, 2, 3, 4, 5, 6, 7)),
            m.ActorFailed(actor="worker 0", reason="boom"),
        ],
        m.CODEC,
        typing.get_args(m.Message),
    )


@pytest.mark.parametrize("which", ["test types", "ring messages"])
def test_random_corruption_only_raises_codec_error(which):
    if which == "test types":
        samples, codec = _sample_messages(), CODEC
        members = (Scalars, Nested, Arrays, Empty, Checked)
    else:
        samples, codec, members = _ring_messages()
    seed = random.randrange(2**32)
    print(f"corruption seed={seed}")
    rng = random.Random(seed)
    num_valid = 0
    for msg in samples:
        good = codec.encode(msg)
        for _ in range(400):
            buf = bytearray(good)
            kind = rng.randrange(3)
            if kind == 0:
                for _ in range(rng.randint(1, 4)):
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif kind == 1:
                del buf[rng.randrange(len(buf)) :]
            else:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                buf += bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
            try:
                out = codec.decode(bytes(buf))
            except CodecError:
                continue
            assert isinstance(out, members), f"seed={seed}: decoded {type(out)}"
            num_valid += 1
    print(f"corruption: {num_valid} mutated buffers still decoded to valid messages")
