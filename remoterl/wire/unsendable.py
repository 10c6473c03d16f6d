"""Why a value cannot travel: the slow path of :func:`remoterl.wire.codec.encode`.

The codec's fast path packs a value in one ``Packer.pack`` and walks nothing first.
Only when that fails does :func:`explain` walk the value, in the order the packer
visits it, and name the first value that cannot travel by its key path:
``cannot send info['stats'][2]: type 'set' is not supported (...)``. The walk mirrors
what the codec accepts — leaf types, plain-memory numpy dtypes, the zero-size bound of
:mod:`remoterl.wire.arrays`, and the nesting limits held here (:data:`MAX_DEPTH`,
:data:`MAX_TUPLE_DEPTH`, which the codec enforces on both ends) — so the value it names
is the one that made packing fail. It is iterative, because the values it must explain
include ones nested deeper than Python's recursion limit.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from remoterl.errors import CodecError
from remoterl.wire.arrays import MAX_EMPTY_SPAN, empty_span, plain_dtype

__all__ = ["MAX_DEPTH", "MAX_TUPLE_DEPTH", "explain"]

# msgpack's unpacker reads at most this many nested containers (its packer
# allows one more, then raises "recursion limit exceeded").
MAX_DEPTH = 1024

# Each tuple level is a nested pack/unpack call that recurses through Python
# *and* C: on decode, a few thousand levels overflow the C stack (a segfault,
# not a RecursionError). Real values nest tuples a few levels at most.
MAX_TUPLE_DEPTH = 32

_ALLOWED = "allowed: numbers, strings, bools, None, numpy arrays, lists/tuples/dicts of those"


def explain(obj: Any, name: str, exc: BaseException) -> CodecError:
    """Build the error for a failed :func:`~remoterl.wire.codec.encode`, naming the first bad value."""
    found = _find_unsendable(obj, name)
    if found is None:
        return CodecError(f"cannot send {name}: {exc}")
    path, reason = found
    return CodecError(f"cannot send {path}: {reason}")


_LEAVE = object()  # stack marker: the walk is done with a container


def _find_unsendable(obj: Any, name: str) -> tuple[str, str] | None:
    """Return ``(path, reason)`` for the first value in ``obj`` that cannot travel.

    Mirrors what ``Packer.pack`` with the codec's ``default`` hook accepts, in the
    same (depth-first) order, so the value it names is the one that made
    packing fail. Iterative, because the values it must explain include ones
    nested deeper than Python's recursion limit.
    """
    ancestors: set[int] = set()  # ids of the containers around the current value
    # (value, path, containers around it, tuples among them)
    stack: list[tuple[Any, str, int, int]] = [(obj, name, 0, 0)]
    while stack:
        value, path, depth, tuples = stack.pop()
        if value is _LEAVE:
            ancestors.discard(depth)  # for a _LEAVE entry, depth holds the id
            continue
        cls = type(value)
        if not (cls is list or cls is tuple or isinstance(value, dict)):
            reason = _leaf_reason(value)
            if reason is not None:
                return path, reason
            continue
        if id(value) in ancestors:
            return path, "it contains itself (a reference cycle)"
        tuples += cls is tuple
        if depth >= MAX_DEPTH or tuples > MAX_TUPLE_DEPTH:
            return path, f"nested too deeply (limits: {MAX_DEPTH} levels, {MAX_TUPLE_DEPTH} of them tuples)"
        ancestors.add(id(value))
        stack.append((_LEAVE, path, id(value), 0))
        children: list[tuple[Any, str, int, int]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                children.append((key, f"{path} key {key!r}", depth + 1, tuples))
                children.append((item, f"{path}[{key!r}]", depth + 1, tuples))
        else:
            children.extend((item, f"{path}[{i}]", depth + 1, tuples) for i, item in enumerate(value))
        stack.extend(reversed(children))  # popped in order: first child first
    return None


def _leaf_reason(value: Any) -> str | None:
    """Why a value that is not a list, tuple or dict cannot travel (None if it can)."""
    cls = type(value)
    if value is None or cls is bool or cls is float:
        return None
    if cls is int:
        return None if -(2**63) <= value < 2**64 else f"int {value} does not fit in 64 bits"
    if cls is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"str is not valid UTF-8 ({exc.reason})"
        return None
    if cls in (bytes, bytearray, memoryview):
        view = memoryview(value)
        if not view.c_contiguous:
            return "memoryview is not contiguous"
        if view.nbytes >= 2**32:
            return f"{cls.__name__} of {view.nbytes} bytes exceeds msgpack's 4 GiB limit"
        return None
    if cls is msgpack.ExtType or cls is msgpack.Timestamp:
        return None
    if cls is np.ndarray or isinstance(value, np.generic):
        what = "numpy array" if cls is np.ndarray else "numpy scalar"
        if not plain_dtype(value.dtype):
            return f"{what} of dtype {value.dtype} is not supported ({_ALLOWED})"
        span = empty_span(value.dtype, value.shape)
        if span > MAX_EMPTY_SPAN:
            return (f"zero-size {what} of shape {value.shape} spans {span} elements"
                    f" (at most {MAX_EMPTY_SPAN} travel)")
        return None
    return f"type {cls.__name__!r} is not supported ({_ALLOWED})"
