"""gymnasium spaces ⇄ a msgpack-able description.

Theory of operation
-------------------
A worker tells the client what its env's observation and action spaces are, so
that :class:`~remoterl.RemoteEnv` can expose real gymnasium spaces. Spaces are
objects with behaviour; nothing executable goes on the wire (no pickle), so
each supported space class is described by the data that rebuilds it::

    {"type": "Box", "low": ndarray, "high": ndarray, "shape": [..], "dtype": "<f4"}
        (+ "bounded_below"/"bounded_above" bool arrays for signed-int boxes
        with infinite bounds, which int arrays cannot hold as -inf/inf)
    {"type": "Discrete", "n": int, "start": int, "dtype": "<i8"}
    {"type": "MultiDiscrete", "nvec": ndarray, "start": ndarray, "dtype": "<i8"}
    {"type": "MultiBinary", "n": int or [int, ...]}
    {"type": "Dict", "spaces": [[key, description], ...]}     (order kept)
    {"type": "Tuple", "spaces": [description, ...]}
    {"type": "Text", "max_length": int, "min_length": int, "charset": str}

The description may hold numpy arrays: it is meant to travel through
:func:`remoterl.wire.codec.encode`, which keeps dtypes (and so the bounds) exact.
:func:`space_from_wire` rebuilds the space so that it compares equal to the
original (gymnasium's ``__eq__``, dtypes included) and samples the same way:
Text keeps its charset order, a Box its boundedness.

Rules
~~~~~
- Only these exact classes travel. A subclass (say ``class Image(Box)``) may
  add behaviour that a description cannot carry, so it is refused rather than
  silently rebuilt as its base class; so are Graph, Sequence, OneOf and any
  other space. :class:`~remoterl.errors.UnsupportedSpaceError` names the class
  and the path: ``observation_space['camera']: gymnasium space Graph is not
  supported on the wire (...)``.
- A description comes from a peer, so :func:`space_from_wire` trusts nothing:
  a malformed one raises :class:`~remoterl.errors.ProtocolError`, whatever
  gymnasium would have raised.

What it does not do
~~~~~~~~~~~~~~~~~~~
Seeds and RNG state do not travel: a rebuilt space is unseeded.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from gymnasium import spaces

from remoterl.errors import ProtocolError, UnsupportedSpaceError

__all__ = ["space_from_wire", "space_to_wire"]

_SUPPORTED = "supported: Box, Discrete, MultiDiscrete, MultiBinary, Dict, Tuple, Text"

# A real space nests a few levels; the cap keeps a hostile description from
# exhausting the stack (a RecursionError would escape as the wrong type).
_MAX_DEPTH = 64


# ----------------------------------------------------------------------------
# To the wire


def space_to_wire(space: spaces.Space, *, name: str = "space") -> dict:
    """Describe ``space`` as a dict that :func:`remoterl.wire.codec.encode` can send.

    Args:
        space: a Box, Discrete, MultiDiscrete, MultiBinary, Text, or a Dict or
            Tuple of those (the exact classes, not subclasses).
        name: what to call ``space`` in error messages, e.g.
            ``"observation_space"``; the root of the path.

    Returns:
        The description (may contain numpy arrays, shared with ``space``).

    Raises:
        UnsupportedSpaceError: ``space`` or a space nested in it has no wire
            description; the message names its class and path.
    """
    describe = _TO_WIRE.get(type(space))
    if describe is None:
        raise _unsupported(space, name)
    return describe(space, name)


def _unsupported(space: Any, name: str) -> UnsupportedSpaceError:
    """The error for a value with no wire description, naming its class."""
    cls = type(space)
    if not isinstance(space, spaces.Space):
        return UnsupportedSpaceError(f"{name}: a {cls.__name__!r} object is not a gymnasium space")
    for base in _TO_WIRE:
        if isinstance(space, base):
            # Rebuilding it as its base class would drop what the subclass adds.
            what = f"{cls.__name__} (a subclass of {base.__name__})"
            break
    else:
        what = cls.__name__
    return UnsupportedSpaceError(
        f"{name}: gymnasium space {what} is not supported on the wire ({_SUPPORTED})"
    )


def _box_to_wire(space: spaces.Box, name: str) -> dict:
    desc = {
        "type": "Box",
        "low": space.low,
        "high": space.high,
        "shape": list(space.shape),
        "dtype": space.dtype.str,
    }
    # A signed-int Box stores -inf/inf as the dtype's min/max and remembers the
    # infinity only in bounded_below/above (which sample() reads); the arrays
    # alone would rebuild it as bounded.
    if space.dtype.kind == "i" and not (space.bounded_below.all() and space.bounded_above.all()):
        desc["bounded_below"] = space.bounded_below
        desc["bounded_above"] = space.bounded_above
    return desc


def _discrete_to_wire(space: spaces.Discrete, name: str) -> dict:
    return {"type": "Discrete", "n": int(space.n), "start": int(space.start), "dtype": space.dtype.str}


def _multi_discrete_to_wire(space: spaces.MultiDiscrete, name: str) -> dict:
    return {"type": "MultiDiscrete", "nvec": space.nvec, "start": space.start, "dtype": space.dtype.str}


def _multi_binary_to_wire(space: spaces.MultiBinary, name: str) -> dict:
    n = space.n
    return {"type": "MultiBinary", "n": int(n) if isinstance(n, (int, np.integer)) else [int(i) for i in n]}


def _text_to_wire(space: spaces.Text, name: str) -> dict:
    return {
        "type": "Text",
        "max_length": int(space.max_length),
        "min_length": int(space.min_length),
        # character_list keeps the order sample() indexes into.
        "charset": "".join(space.character_list),
    }


def _dict_to_wire(space: spaces.Dict, name: str) -> dict:
    return {
        "type": "Dict",
        "spaces": [[key, space_to_wire(sub, name=f"{name}[{key!r}]")] for key, sub in space.spaces.items()],
    }


def _tuple_to_wire(space: spaces.Tuple, name: str) -> dict:
    return {
        "type": "Tuple",
        "spaces": [space_to_wire(sub, name=f"{name}[{i}]") for i, sub in enumerate(space.spaces)],
    }


# Exact classes only: looked up by type(space), so subclasses miss on purpose.
_TO_WIRE: dict[type, Callable[[Any, str], dict]] = {
    spaces.Box: _box_to_wire,
    spaces.Discrete: _discrete_to_wire,
    spaces.MultiDiscrete: _multi_discrete_to_wire,
    spaces.MultiBinary: _multi_binary_to_wire,
    spaces.Dict: _dict_to_wire,
    spaces.Tuple: _tuple_to_wire,
    spaces.Text: _text_to_wire,
}


# ----------------------------------------------------------------------------
# From the wire


def space_from_wire(desc: Any) -> spaces.Space:
    """Rebuild the space that :func:`space_to_wire` described.

    Args:
        desc: the description, as :func:`remoterl.wire.codec.decode` returned it.

    Returns:
        A new, unseeded gymnasium space equal to the one described.

    Raises:
        ProtocolError: ``desc`` is malformed, names an unknown space type, or
            describes a space gymnasium refuses to build.
    """
    return _from_wire(desc, "space", 0)


def _from_wire(desc: Any, path: str, depth: int) -> spaces.Space:
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"{path}: space description nested more than {_MAX_DEPTH} levels deep")
    if type(desc) is not dict:
        raise ProtocolError(f"{path}: space description must be a map, got {type(desc).__name__}")
    kind = desc.get("type")
    build = _FROM_WIRE.get(kind) if type(kind) is str else None
    if build is None:
        raise ProtocolError(f"{path}: unknown space type {kind!r} ({_SUPPORTED})")
    try:
        return build(desc, path, depth)
    except ProtocolError:
        raise
    except Exception as exc:
        # gymnasium validates with ValueError, TypeError and AssertionError;
        # whatever it raised, the peer sent a space that cannot exist.
        raise ProtocolError(f"{path}: invalid {kind} description: {type(exc).__name__}: {exc}") from exc


def _field(desc: dict, key: str, types: type | tuple[type, ...], path: str) -> Any:
    """``desc[key]``, checked to be of exactly one of ``types``."""
    if key not in desc:
        raise ProtocolError(f"{path}: {desc['type']} description lacks {key!r}")
    value = desc[key]
    if type(value) not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(f"{path}: {desc['type']} field {key!r} has type {type(value).__name__}")
    return value


def _dtype(desc: dict, path: str) -> np.dtype:
    text = _field(desc, "dtype", str, path)
    try:
        return np.dtype(text)
    except Exception as exc:
        raise ProtocolError(f"{path}: unknown dtype {text!r}") from exc


def _int_list(value: Any, what: str, path: str) -> list[int]:
    if type(value) not in (list, tuple) or not all(type(i) is int for i in value):
        raise ProtocolError(f"{path}: {what} must be a list of ints, got {value!r}")
    return list(value)


def _box_from_wire(desc: dict, path: str, depth: int) -> spaces.Box:
    dtype = _dtype(desc, path)
    shape = tuple(_int_list(_field(desc, "shape", (list, tuple), path), "Box shape", path))
    low = _field(desc, "low", np.ndarray, path)
    high = _field(desc, "high", np.ndarray, path)
    # space_to_wire sends the bounds in the Box's own dtype and shape; anything
    # else would make gymnasium cast (and warn) instead of rebuild.
    for bound in (low, high):
        if bound.dtype != dtype or bound.shape != shape:
            raise ProtocolError(
                f"{path}: Box bounds must be {dtype.str} arrays of shape {shape},"
                f" got {bound.dtype.str} {bound.shape}"
            )
    # Box may write into low/high while casting: give it arrays of its own,
    # never views onto a received frame.
    space = spaces.Box(low=low.copy(), high=high.copy(), shape=shape, dtype=dtype)
    for key in ("bounded_below", "bounded_above"):
        if key in desc:
            bounded = _field(desc, key, np.ndarray, path)
            if bounded.dtype != np.bool_ or bounded.shape != shape:
                raise ProtocolError(f"{path}: Box {key} must be a bool array of shape {shape}")
            setattr(space, key, bounded.copy())
    return space


def _discrete_from_wire(desc: dict, path: str, depth: int) -> spaces.Discrete:
    n = _field(desc, "n", int, path)
    start = _field(desc, "start", int, path)
    return spaces.Discrete(n, start=start, dtype=_dtype(desc, path))


def _multi_discrete_from_wire(desc: dict, path: str, depth: int) -> spaces.MultiDiscrete:
    nvec = _field(desc, "nvec", np.ndarray, path)
    start = _field(desc, "start", np.ndarray, path)
    return spaces.MultiDiscrete(nvec, dtype=_dtype(desc, path), start=start)


def _multi_binary_from_wire(desc: dict, path: str, depth: int) -> spaces.MultiBinary:
    n = _field(desc, "n", (int, list, tuple), path)
    if type(n) is not int:
        n = tuple(_int_list(n, "MultiBinary n", path))
    return spaces.MultiBinary(n)


def _text_from_wire(desc: dict, path: str, depth: int) -> spaces.Text:
    return spaces.Text(
        _field(desc, "max_length", int, path),
        min_length=_field(desc, "min_length", int, path),
        charset=_field(desc, "charset", str, path),
    )


def _dict_from_wire(desc: dict, path: str, depth: int) -> spaces.Dict:
    items = _field(desc, "spaces", (list, tuple), path)
    pairs = []
    for item in items:
        if type(item) not in (list, tuple) or len(item) != 2 or type(item[0]) not in (str, int):
            raise ProtocolError(f"{path}: Dict entries must be [key, description] with a str or int key")
        key, sub = item
        pairs.append((key, _from_wire(sub, f"{path}[{key!r}]", depth + 1)))
    if len({key for key, _ in pairs}) != len(pairs):
        raise ProtocolError(f"{path}: Dict description repeats a key")
    # A sequence of pairs (not a dict) so gymnasium keeps our order unsorted.
    return spaces.Dict(pairs)


def _tuple_from_wire(desc: dict, path: str, depth: int) -> spaces.Tuple:
    items = _field(desc, "spaces", (list, tuple), path)
    return spaces.Tuple([_from_wire(sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(items)])


_FROM_WIRE: dict[str, Callable[[dict, str, int], spaces.Space]] = {
    "Box": _box_from_wire,
    "Discrete": _discrete_from_wire,
    "MultiDiscrete": _multi_discrete_from_wire,
    "MultiBinary": _multi_binary_from_wire,
    "Dict": _dict_from_wire,
    "Tuple": _tuple_from_wire,
    "Text": _text_from_wire,
}
