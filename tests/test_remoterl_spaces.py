"""Tests for remoterl.wire.spaces: gymnasium spaces ⇄ msgpack-able descriptions (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import data_equivalence

from remoterl.wire.codec import decode, encode
from remoterl.errors import CodecError, ProtocolError, UnsupportedSpaceError
from remoterl.wire.spaces import space_from_wire, space_to_wire

SUPPORTED = "(supported: Box, Discrete, MultiDiscrete, MultiBinary, Dict, Tuple, Text)"


def over_the_wire(space, **kwargs):
    """space → description → codec header + frames → description → space."""
    header, frames = encode(space_to_wire(space, **kwargs), name="space")
    return space_from_wire(decode(header, [bytes(f) for f in frames]))


SPACES = {
    "box_f32": spaces.Box(-1.0, 1.0, (3,), np.float32),
    "box_f64_inf": spaces.Box(-np.inf, np.inf, (2, 2), np.float64),
    "box_f16": spaces.Box(-2.0, 2.0, (4,), np.float16),
    "box_mixed_inf": spaces.Box(
        np.array([-np.inf, 0, -1], np.float32), np.array([1, np.inf, np.inf], np.float32), dtype=np.float32
    ),
    "box_uint8_image": spaces.Box(0, 255, (84, 84, 3), np.uint8),  # bounds big enough for frames
    "box_int8": spaces.Box(-5, 5, (2,), np.int8),
    "box_int64": spaces.Box(-(2**62), 2**62, (2,), np.int64),
    "box_int32_inf": spaces.Box(np.array([-np.inf, 0]), np.array([3, np.inf]), dtype=np.int32),
    "box_bool": spaces.Box(0, 1, (2, 3), np.bool_),
    "box_0d": spaces.Box(-1.0, 1.0, (), np.float32),
    "box_per_element": spaces.Box(np.array([0.0, -1.0]), np.array([1.0, 2.0]), dtype=np.float64),
    "discrete": spaces.Discrete(4),
    "discrete_start_dtype": spaces.Discrete(5, start=-2, dtype=np.int32),
    "discrete_uint8": spaces.Discrete(3, dtype=np.uint8),
    "multi_discrete": spaces.MultiDiscrete([2, 3, 4]),
    "multi_discrete_2d": spaces.MultiDiscrete([[2, 3], [4, 5]], dtype=np.uint8, start=[[0, 1], [2, 3]]),
    "multi_binary": spaces.MultiBinary(5),
    "multi_binary_shape": spaces.MultiBinary([2, 3]),
    "text": spaces.Text(12),
    "text_charset": spaces.Text(8, min_length=0, charset="zyx✓"),
    "dict": spaces.Dict({"pos": spaces.Box(-1.0, 1.0, (2,)), "id": spaces.Discrete(3)}),
    "dict_empty": spaces.Dict({}),
    "tuple": spaces.Tuple((spaces.Discrete(2), spaces.Box(0.0, 1.0, (1,)))),
    "tuple_empty": spaces.Tuple(()),
    "nested": spaces.Dict(
        {
            "camera": spaces.Box(0, 255, (16, 16, 3), np.uint8),
            "state": spaces.Tuple(
                (
                    spaces.MultiBinary(3),
                    spaces.Dict({"goal": spaces.Text(4, charset="ab"), "k": spaces.MultiDiscrete([3, 3])}),
                )
            ),
        }
    ),
}


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES.keys())
def test_round_trip(space):
    out = over_the_wire(space)
    assert type(out) is type(space)
    assert out == space
    assert out.dtype == space.dtype
    assert out.shape == space.shape


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES.keys())
def test_rebuilt_space_samples_like_the_original(space):
    # Same seed, same samples: the rebuilt space is the same space, not just an
    # __eq__-equal one (Text charset order, Box boundedness, Dict key order).
    out = over_the_wire(space)
    space.seed(123)
    out.seed(123)
    for _ in range(5):
        assert data_equivalence(space.sample(), out.sample(), exact=True)


def test_description_without_codec_round_trips():
    for space in SPACES.values():
        assert space_from_wire(space_to_wire(space)) == space


def test_box_dtypes_and_bounds_are_exact():
    space = spaces.Box(np.array([-np.inf, -1.5]), np.array([np.inf, 2.25]), dtype=np.float64)
    out = over_the_wire(space)
    assert out.low.dtype == np.float64 and out.high.dtype == np.float64
    assert np.array_equal(out.low, space.low) and np.array_equal(out.high, space.high)
    assert out.bounded_below.tolist() == [False, True]
    assert out.bounded_above.tolist() == [False, True]


def test_int_box_keeps_its_infinite_bounds():
    # An int Box stores -inf as the dtype minimum: only bounded_below remembers it.
    space = SPACES["box_int32_inf"]
    out = over_the_wire(space)
    assert out.bounded_below.tolist() == space.bounded_below.tolist() == [False, True]
    assert out.bounded_above.tolist() == space.bounded_above.tolist() == [True, False]
    assert not out.is_bounded("below")


def test_big_box_bounds_travel_in_frames():
    header, frames = encode(space_to_wire(spaces.Box(0, 255, (84, 84, 3), np.uint8)))
    assert len(frames) == 2  # low and high, 21 KB each


def test_dict_keeps_key_order():
    space = spaces.Dict([("zeta", spaces.Discrete(2)), ("alpha", spaces.Discrete(3))])
    assert list(space.spaces) == ["zeta", "alpha"]
    assert list(over_the_wire(space).spaces) == ["zeta", "alpha"]


def test_text_keeps_charset_order():
    space = spaces.Text(5, charset="cba")
    assert over_the_wire(space).character_list == ("c", "b", "a")


def test_description_shape():
    desc = space_to_wire(spaces.Dict({"a": spaces.Discrete(3, start=1)}))
    discrete = {"type": "Discrete", "n": 3, "start": 1, "dtype": "<i8"}
    assert desc == {"type": "Dict", "spaces": [["a", discrete]]}


# ----------------------------------------------------------------------------
# Unsupported spaces


class MyBox(spaces.Box):
    pass


class MySpace(spaces.Space):
    pass


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            spaces.Graph(spaces.Box(0.0, 1.0, (2,)), None),
            f"observation_space: gymnasium space Graph is not supported on the wire {SUPPORTED}",
        ),
        (
            spaces.Dict({"camera": spaces.Graph(spaces.Box(0.0, 1.0, (2,)), spaces.Discrete(2))}),
            f"observation_space['camera']: gymnasium space Graph is not supported on the wire {SUPPORTED}",
        ),
        (
            spaces.Tuple((spaces.Discrete(2), spaces.Sequence(spaces.Discrete(2)))),
            "observation_space[1]: gymnasium space Sequence is not supported",
        ),
        (
            spaces.OneOf((spaces.Discrete(2), spaces.Discrete(3))),
            "observation_space: gymnasium space OneOf is not supported",
        ),
        (
            spaces.Dict({"a": spaces.Tuple((MyBox(0.0, 1.0, (1,)),))}),
            "observation_space['a'][0]: gymnasium space MyBox (a subclass of Box) is not supported",
        ),
        (MySpace(), "observation_space: gymnasium space MySpace is not supported"),
        (None, "observation_space: a 'NoneType' object is not a gymnasium space"),
    ],
    ids=["graph", "nested-graph", "sequence", "oneof", "subclass", "custom", "not-a-space"],
)
def test_unsupported_space_names_class_and_path(space, message):
    with pytest.raises(UnsupportedSpaceError) as excinfo:
        space_to_wire(space, name="observation_space")
    assert str(excinfo.value).startswith(message), str(excinfo.value)
    assert isinstance(excinfo.value, CodecError)


def test_default_path_root_is_space():
    with pytest.raises(UnsupportedSpaceError, match=r"^space: gymnasium space Graph"):
        space_to_wire(spaces.Graph(spaces.Discrete(2), None))


# ----------------------------------------------------------------------------
# Malformed descriptions: ProtocolError, never anything else


def _box(**changes):
    desc = space_to_wire(spaces.Box(-1.0, 1.0, (2,), np.float32))
    desc.update(changes)
    return {k: v for k, v in desc.items() if v is not _DROP}


_DROP = object()

MALFORMED = {
    "none": None,
    "list": [],
    "no_type": {},
    "type_not_str": {"type": 3},
    "unknown_type": {"type": "Graph"},
    "box_no_low": _box(low=_DROP),
    "box_low_not_array": _box(low=[-1.0, -1.0]),
    "box_low_wrong_dtype": _box(low=np.zeros(2, np.float64)),
    "box_low_wrong_shape": _box(low=np.zeros(3, np.float32)),
    "box_bad_dtype": _box(dtype="not a dtype"),
    "box_object_dtype": _box(dtype="|O"),
    "box_shape_not_ints": _box(shape=["a"]),
    "box_low_above_high": _box(low=np.full(2, 5.0, np.float32)),
    "box_nan": _box(low=np.array([np.nan, 0.0], np.float32)),
    "box_bounded_wrong_shape": _box(bounded_below=np.ones(3, bool)),
    "box_bounded_wrong_dtype": _box(bounded_below=np.ones(2, np.int8)),
    "discrete_negative": {"type": "Discrete", "n": -1, "start": 0, "dtype": "<i8"},
    "discrete_float_dtype": {"type": "Discrete", "n": 2, "start": 0, "dtype": "<f8"},
    "discrete_n_str": {"type": "Discrete", "n": "2", "start": 0, "dtype": "<i8"},
    "discrete_no_start": {"type": "Discrete", "n": 2, "dtype": "<i8"},
    "multi_discrete_zero": {
        "type": "MultiDiscrete", "nvec": np.array([0]), "start": np.array([0]), "dtype": "<i8"
    },
    "multi_discrete_shapes": {
        "type": "MultiDiscrete", "nvec": np.array([2, 2]), "start": np.array([0]), "dtype": "<i8"
    },
    "multi_binary_zero": {"type": "MultiBinary", "n": 0},
    "multi_binary_float": {"type": "MultiBinary", "n": 2.0},
    "multi_binary_bad_shape": {"type": "MultiBinary", "n": [2, "x"]},
    "text_min_above_max": {"type": "Text", "max_length": 2, "min_length": 3, "charset": "ab"},
    "text_charset_list": {"type": "Text", "max_length": 2, "min_length": 1, "charset": ["a"]},
    "dict_spaces_not_list": {"type": "Dict", "spaces": {"a": {"type": "Discrete"}}},
    "dict_entry_not_pair": {"type": "Dict", "spaces": [["a"]]},
    "dict_key_not_str": {"type": "Dict", "spaces": [[1.5, {"type": "MultiBinary", "n": 1}]]},
    "dict_repeated_key": {
        "type": "Dict",
        "spaces": [["a", {"type": "MultiBinary", "n": 1}], ["a", {"type": "MultiBinary", "n": 2}]],
    },
    "dict_bad_child": {"type": "Dict", "spaces": [["a", {"type": "Nope"}]]},
    "tuple_bad_child": {"type": "Tuple", "spaces": [{"type": "MultiBinary", "n": 1}, 7]},
}  # fmt: skip


@pytest.mark.parametrize("desc", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_description_raises_protocol_error(desc):
    with pytest.raises(ProtocolError):
        space_from_wire(desc)


def test_malformed_error_names_the_path():
    desc = {"type": "Dict", "spaces": [["a", {"type": "Tuple", "spaces": [{"type": "Nope"}]}]]}
    with pytest.raises(ProtocolError, match=r"^space\['a'\]\[0\]: unknown space type 'Nope'"):
        space_from_wire(desc)


def test_deeply_nested_description_raises_protocol_error():
    desc = {"type": "MultiBinary", "n": 1}
    for _ in range(5000):
        desc = {"type": "Tuple", "spaces": [desc]}
    with pytest.raises(ProtocolError, match="nested more than"):
        space_from_wire(desc)
