"""Tests for remoterl.wire.codec: values ⇄ msgpack header + raw frames (no sockets)."""

from __future__ import annotations

import collections
import random
import threading

import msgpack
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence

from remoterl.wire.codec import decode, encode
from remoterl.errors import CodecError, ProtocolError


def round_trip(value, **kwargs):
    header, frames = encode(value, **kwargs)
    assert type(header) is bytes
    return decode(header, frames)


def assert_same(a, b):
    """Exact equality, types included (data_equivalence checks type() at every level)."""
    assert data_equivalence(a, b, exact=True), (a, b)


# ----------------------------------------------------------------------------
# Round trips


VALUES = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int": -12345,
    "int64_min": -(2**63),
    "uint64_max": 2**64 - 1,
    "float": 1.5,
    "inf": float("inf"),
    "str": "héllo ✓",
    "empty_str": "",
    "bytes": b"\x00\xff raw",
    "empty_list": [],
    "list": [1, "a", None, 2.5],
    "empty_tuple": (),
    "tuple": (1, "a", (2, 3.0)),
    "list_of_tuples": [(1,), (2, 3)],
    "dict": {"a": 1, "b": [True, False]},
    "int_keys": {0: "zero", -1: "minus one", 7: {"nested": 1}},
    "empty_dict": {},
    "bools_in_list": [True, 1, False, 0],  # bool must not become int (nor int bool)
    "np_float64": np.float64(0.1),
    "np_float32": np.float32(0.1),
    "np_float16": np.float16(0.5),
    "np_int64": np.int64(-7),
    "np_int8": np.int8(-7),
    "np_uint64": np.uint64(2**64 - 1),
    "np_bool_true": np.bool_(True),
    "np_bool_false": np.bool_(False),
    "np_complex": np.complex128(1 + 2j),
    "np_str": np.str_("abc"),
    "np_empty_str": np.str_(""),
    "np_bytes": np.bytes_(b"ab"),
    "np_datetime": np.datetime64("2024-01-02T03:04:05", "s"),
    "array_in_tuple": (np.arange(3), {"x": np.zeros((2, 2), np.float32)}),
    "infos": [{} for _ in range(8)],
    "step_reply": {
        "obs": np.random.default_rng(0).random((8, 4), dtype=np.float32),
        "rewards": np.ones(8),
        "terminated": np.zeros(8, bool),
        "truncated": np.ones(8, bool),
        "infos": [{"episode": {"r": 1.0, "l": 3}}, {}, {"final_obs": np.zeros(4, np.float32)}],
    },
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_round_trip(value):
    assert_same(value, round_trip(value))


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_round_trip_every_array_in_a_frame(value):
    assert_same(value, round_trip(value, frame_threshold=-1))


DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
    ">f4", ">i8", "<u2", ">c16", "U5", "S3", "M8[ns]", "m8[s]", "V4",
]  # fmt: skip
SHAPES = [(), (0,), (3,), (2, 3, 4), (0, 5), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [2048, -1], ids=["inline", "frame"])
def test_array_round_trip(dtype, shape, threshold):
    rng = np.random.default_rng(1)
    array = np.frombuffer(rng.bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype).reshape(shape)
    if np.dtype(dtype).kind in "fc":  # random bits may be NaN, which never compares equal
        array = np.arange(array.size).astype(dtype).reshape(shape)
    if np.dtype(dtype).kind == "b":
        array = (np.arange(array.size) % 3 == 0).reshape(shape)
    out = round_trip(array, frame_threshold=threshold)
    assert type(out) is np.ndarray
    assert out.dtype == array.dtype and out.dtype.str == array.dtype.str
    assert out.shape == array.shape
    assert out.tobytes() == array.tobytes()


@pytest.mark.parametrize(
    "scalar",
    [np.float64(3.25), np.float32(-1), np.int16(9), np.uint32(7), np.bool_(True), np.complex64(1j)],
    ids=repr,
)
def test_numpy_scalars_stay_numpy_scalars(scalar):
    out = round_trip({"x": [scalar]})["x"][0]
    assert type(out) is type(scalar) and out.dtype == scalar.dtype and out == scalar


def test_python_types_are_kept_apart():
    # strict_types: np.float64 is a float subclass, yet must not arrive as float
    # (and the reverse); bool must not arrive as int; tuples must not become lists.
    out = round_trip([1.0, np.float64(1.0), True, 1, (1,), [1]])
    assert [type(v) for v in out] == [float, np.float64, bool, int, tuple, list]


def test_byte_order_is_kept():
    array = np.arange(5, dtype=">i4")
    out = round_trip(array)
    assert out.dtype.str == ">i4"
    assert out.tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------
# Frames: big arrays pass through


def test_big_arrays_go_to_frames_small_ones_inline():
    big = np.arange(1000, dtype=np.float64)  # 8000 bytes
    small = np.arange(10, dtype=np.float64)
    header, frames = encode({"big": big, "small": small, "big2": big * 2})
    assert len(frames) == 2
    assert len(header) < 500  # the big arrays are not in the header
    assert_same(decode(header, frames), {"big": big, "small": small, "big2": big * 2})


def test_frame_threshold_is_strict_greater_than():
    array = np.zeros(256, np.float64)  # exactly 2048 bytes
    assert len(encode(array)[1]) == 0
    assert len(encode(array, frame_threshold=2047)[1]) == 1


def test_frame_arrays_are_views_not_copies():
    array = np.arange(1000, dtype=np.int32)
    header, frames = encode({"a": array})
    buffer = bytearray(frames[0].tobytes())  # what a receiving socket hands us
    out = decode(header, [buffer])["a"]
    assert np.shares_memory(out, np.frombuffer(buffer, np.uint8))
    assert out.flags.writeable  # the frame buffer is writeable, so is the view
    buffer[:4] = (42).to_bytes(4, "little")
    assert out[0] == 42


def test_frame_from_readonly_bytes_gives_readonly_view():
    header, frames = encode(np.arange(1000.0))
    out = decode(header, [frames[0].tobytes()])
    assert not out.flags.writeable
    assert out.tolist() == list(np.arange(1000.0))


def test_frames_are_found_from_start():
    header, frames = encode((np.arange(600.0), np.ones(600)))
    routing = [b"client-id", b"", b"header"]
    out = decode(header, [*routing, *(f.tobytes() for f in frames)], start=len(routing))
    assert_same(out, (np.arange(600.0), np.ones(600)))


def test_frames_in_nested_tuples_keep_their_order():
    a, b, c = np.full(600, 1.0), np.full(600, 2.0), np.full(600, 3.0)
    value = {"x": (a, [b, (c,)]), "y": a}
    header, frames = encode(value)
    assert len(frames) == 4
    assert_same(value, decode(header, frames))


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.arange(2000.0).reshape(40, 50)),
        lambda: np.arange(8000.0).reshape(80, 100)[::2, ::3],
        lambda: np.arange(3000.0)[::-1],
        lambda: np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),  # inline
    ],
    ids=["fortran", "strided", "reversed", "fortran-inline"],
)
def test_non_contiguous_arrays_arrive_in_order(make):
    array = make()
    header, frames = encode(array)
    for frame in frames:
        assert frame.flags.c_contiguous
    out = decode(header, [bytes(f) for f in frames])
    assert np.array_equal(out, array)
    assert out.flags.c_contiguous


def test_inline_arrays_are_writeable_fresh_copies():
    header, frames = encode({"obs": np.zeros((8, 4), np.float32), "s": np.float64(1)})
    assert frames == []
    out = decode(header)
    assert out["obs"].flags.writeable
    out["obs"][0, 0] = 5.0  # what an agent may do to a local env's observation
    assert decode(header)["obs"][0, 0] == 0.0


def test_decode_accepts_any_buffer():
    header, frames = encode({"a": np.arange(1000), "b": "x"})
    for wrap in (bytes, bytearray, memoryview):
        assert_same(decode(wrap(header), [wrap(frames[0].tobytes())]), {"a": np.arange(1000), "b": "x"})


def test_decode_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    value = {"obs": np.arange(5000, dtype=np.float32).reshape(50, 100), "r": 1.0}
    header, frames = encode(value)
    out = decode(zmq.Frame(header), [zmq.Frame(f) for f in frames])
    assert_same(value, out)


# ----------------------------------------------------------------------------
# Accepted conversions (documented in the module docstring)


def test_dict_subclasses_travel_as_dicts():
    value = collections.OrderedDict(b=1, a=2)
    out = round_trip({"d": value, "dd": collections.defaultdict(list, x=[1])})
    assert type(out["d"]) is dict and list(out["d"].items()) == [("b", 1), ("a", 2)]
    assert out["dd"] == {"x": [1]}


def test_bytes_likes_travel_as_bytes():
    assert round_trip([bytearray(b"ab"), memoryview(b"cd")]) == [b"ab", b"cd"]


# ----------------------------------------------------------------------------
# Errors on encode name the key path


ALLOWED = "(allowed: numbers, strings, bools, None, numpy arrays, lists/tuples/dicts of those)"


class Custom:
    pass


class IntSubclass(int):
    pass


class MaskedLike(np.ndarray):
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"stats": [1, 2, {3}]}, f"cannot send info['stats'][2]: type 'set' is not supported {ALLOWED}"),
        ({"a": {"b": Custom()}}, "cannot send info['a']['b']: type 'Custom' is not supported"),
        ((1, (2, lambda: 0)), "cannot send info[1][1]: type 'function' is not supported"),
        ({"o": np.array([None, 1])}, "cannot send info['o']: numpy array of dtype object is not supported"),
        ({"s": np.zeros(2, [("x", "i4")])}, "cannot send info['s']: numpy array of dtype"),
        ({"m": np.zeros(3).view(MaskedLike)}, "cannot send info['m']: type 'MaskedLike' is not supported"),
        ({"big": [2**64]}, "cannot send info['big'][0]: int 18446744073709551616 does not fit in 64 bits"),
        ({"neg": -(2**63) - 1}, "cannot send info['neg']: int -9223372036854775809 does not fit in 64 bits"),
        ({"e": IntSubclass(3)}, "cannot send info['e']: type 'IntSubclass' is not supported"),
        ({frozenset(): 1}, "cannot send info key frozenset(): type 'frozenset' is not supported"),
        ({"s": "\ud800"}, "cannot send info['s']: str is not valid UTF-8"),
        (object(), "cannot send info: type 'object' is not supported"),
    ],
    ids=lambda v: "" if isinstance(v, str) else None,
)
def test_encode_error_names_path_and_type(value, message):
    with pytest.raises(CodecError) as excinfo:
        encode(value, name="info")
    assert str(excinfo.value).startswith(message), str(excinfo.value)
    assert isinstance(excinfo.value, TypeError)


def test_encode_error_default_root_name():
    with pytest.raises(CodecError, match=r"^cannot send value\[0\]: type 'set'"):
        encode([set()])


def test_encode_error_on_reference_cycle():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(CodecError, match=r"cannot send action\['l'\]\[0\]: it contains itself"):
        encode({"l": cycle}, name="action")


def nested_tuples(levels):
    value = "leaf"
    for _ in range(levels):
        value = (value,)
    return value


def test_tuples_nest_32_deep_but_no_deeper():
    assert_same(nested_tuples(32), round_trip(nested_tuples(32)))
    with pytest.raises(CodecError, match=r"cannot send obs(\[0\]){32}: nested too deeply"):
        encode(nested_tuples(33), name="obs")


def test_deep_lists_are_refused_with_a_path():
    value: list = []
    for _ in range(1023):  # 1024 lists with the innermost: the most msgpack unpacks
        value = [value]
    out, levels = round_trip(value), 1
    while out:  # data_equivalence and == would hit Python's recursion limit
        (out,), levels = out, levels + 1
    assert out == [] and levels == 1024
    for _ in range(100):
        value = [value]
    with pytest.raises(CodecError, match=r"cannot send obs(\[0\]){1024}: nested too deeply"):
        encode(value, name="obs")


def test_encoder_recovers_after_an_error():
    with pytest.raises(CodecError):
        encode({"a": np.arange(1000), "b": {1, 2}})
    header, frames = encode({"ok": np.arange(1000)})
    assert len(frames) == 1
    assert_same(decode(header, frames), {"ok": np.arange(1000)})


def test_encode_is_thread_safe():
    errors = []

    def work(seed):
        try:
            for i in range(300):
                value = {"seed": seed, "i": i, "t": (np.full(300 + seed, i), [np.float32(seed)])}
                assert_same(value, decode(*encode(value)))
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors


# ----------------------------------------------------------------------------
# Malformed input: ProtocolError, never anything else


def _ext(code, payload):
    return msgpack.packb(msgpack.ExtType(code, payload))


def _array_payload(dtype_str, shape, rest):
    meta = msgpack.packb([dtype_str, shape])
    return len(meta).to_bytes(2, "little") + meta + rest


def _tuple_header(levels):
    """A header holding 1 wrapped in ``levels`` one-item tuples, ext 4 by hand."""
    header = msgpack.packb(1)
    for _ in range(levels):
        header = _ext(4, b"\x91" + header)  # 0x91: a msgpack array of one item
    return header


MALFORMED = {
    "empty": b"",
    "truncated_map": b"\x82\xa1a\x01",
    "trailing_data": msgpack.packb(1) + b"\x00",
    "bad_utf8": b"\xa2\xff\xfe",
    "unknown_ext": _ext(99, b"abc"),
    "empty_ext_array": _ext(1, b""),
    "short_meta": _ext(1, b"\x10\x00\x92"),
    "meta_not_msgpack": _ext(1, b"\x02\x00\xc1\xc1"),
    "meta_not_a_pair": _ext(1, b"\x01\x00\x01"),
    "meta_wrong_types": _ext(1, _array_payload(3, "x", b"")),
    "negative_dim": _ext(1, _array_payload("<f4", [-1], b"")),
    "too_many_dims": _ext(1, _array_payload("<f4", [1] * 65, b"\0" * 4)),
    "unknown_dtype": _ext(1, _array_payload("<zz", [1], b"\0")),
    "object_dtype": _ext(1, _array_payload("|O", [1], b"\0" * 8)),
    "structured_dtype": _ext(1, _array_payload("i4,i4", [1], b"\0" * 8)),
    "subarray_dtype": _ext(1, _array_payload("(2,)i4", [1], b"\0" * 8)),
    "string_dtype": _ext(1, _array_payload("T", [1], b"\0" * 16)),
    "inline_too_short": _ext(1, _array_payload("<f8", [2, 2], b"\0" * 31)),
    "inline_too_long": _ext(1, _array_payload("<f8", [2], b"\0" * 17)),
    "huge_shape": _ext(1, _array_payload("<f8", [2**62, 2**62], b"\0")),
    "frame_index_no_frames": _ext(2, _array_payload("<f8", [2], (0).to_bytes(4, "little"))),
    "frame_ref_short": _ext(2, _array_payload("<f8", [2], b"\0")),
    "scalar_with_shape": _ext(3, _array_payload("<f8", [1], b"\0" * 8)),
    "scalar_short": _ext(3, _array_payload("<f8", [], b"\0" * 7)),
    "tuple_not_array": _ext(4, msgpack.packb({"a": 1})),
    "tuple_garbage": _ext(4, b"\xc1"),
    "unhashable_key": b"\x81\x90\x01",  # {[]: 1}
    "array_as_key": b"\x81" + _ext(1, _array_payload("<f8", [1], b"\0" * 8)) + b"\x01",
    # Zero-size arrays carry no data to check a shape against: their span is capped.
    "zero_size_rows": _ext(1, _array_payload("<i8", [2**25, 0], b"")),
    "zero_size_huge_dim": _ext(1, _array_payload("|u1", [2**64 - 1, 0], b"")),
    "zero_size_many_dims": _ext(1, _array_payload("<f4", [0] + [2] * 63, b"")),
    "zero_size_in_a_frame": _ext(2, _array_payload("<i8", [0, 2**20], (0).to_bytes(4, "little"))),
    "size_zero_dtype": _ext(1, _array_payload("<U0", [2**28], b"")),
    "zero_size_scalar_shape": _ext(3, _array_payload("<U0", [2**20], b"")),
    "deep_nesting": b"\x91" * 100_000,
    "tuples_33_deep": _tuple_header(33),
    "tuples_2000_deep": _tuple_header(2000),  # crashed the C stack before the cap
}


@pytest.mark.parametrize("header", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_raises_protocol_error(header):
    with pytest.raises(ProtocolError):
        decode(header)


def test_zero_size_arrays_span_at_most_65536_elements():
    # Within the cap, zero-size arrays round trip exactly, inline and in frames; one element
    # more is refused on both ends, by encode (CodecError, naming the key) and decode.
    for shape in [(2**16, 0), (0, 2**16), (16, 0, 4096), (64, 0)]:
        assert_same(round_trip(np.empty(shape, np.float32)), np.empty(shape, np.float32))
        assert_same(round_trip(np.empty(shape), frame_threshold=-1), np.empty(shape))
        assert decode(_ext(2, _array_payload("<f8", list(shape), (0).to_bytes(4, "little"))), [b""]).shape == shape
    for shape in [(2**16 + 1, 0), (0, 2**16, 2)]:
        with pytest.raises(CodecError, match=r"obs\['x'\]: zero-size numpy array"):
            encode({"x": np.empty(shape)}, name="obs")
        with pytest.raises(ProtocolError, match="spans"):
            decode(_ext(1, _array_payload("<f8", list(shape), b"")))
    # An array with data is bounded by its bytes; the cap is not in its way.
    assert round_trip(np.zeros(2**17, np.uint8)).shape == (2**17,)


def test_bad_frame_index_and_length():
    header, frames = encode({"a": np.arange(1000.0)})
    with pytest.raises(ProtocolError, match="frame 0"):
        decode(header, [])
    with pytest.raises(ProtocolError, match="frame 0"):
        decode(header, [b"x", frames[0]], start=2)
    with pytest.raises(ProtocolError, match="frame 0 holds 7999 bytes"):
        decode(header, [frames[0].tobytes()[:-1]])
    with pytest.raises(ProtocolError):
        decode(header, [frames[0].tobytes() + b"\0"])


def test_random_bytes_raise_only_protocol_error():
    rng = random.Random(1234)
    for _ in range(500):
        data = rng.randbytes(rng.randrange(0, 64))
        try:
            decode(data, [rng.randbytes(16)])
        except ProtocolError:
            pass


def test_mutated_messages_raise_only_protocol_error():
    rng = random.Random(4321)
    value = {
        "obs": np.arange(12, dtype=np.float32).reshape(3, 4),
        "t": (np.int64(3), "x", [np.zeros(2, bool)]),
        "big": np.arange(600.0),
    }
    header, frames = encode(value)
    frames = [f.tobytes() for f in frames]
    for _ in range(500):
        mutated = bytearray(header)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.2:
            mutated = mutated[: rng.randrange(len(mutated))]
        try:
            decode(bytes(mutated), frames)
        except ProtocolError:
            pass


def test_non_bytes_header_is_a_caller_error():
    with pytest.raises(TypeError) as excinfo:
        decode("not bytes")
    assert not isinstance(excinfo.value, ProtocolError)
