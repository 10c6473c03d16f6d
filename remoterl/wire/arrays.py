"""The array payload of :mod:`remoterl.wire.codec`: numpy arrays and scalars ⇄ bytes.

Ext 1 (inline array), ext 2 (array in a frame) and ext 3 (numpy scalar) share one
payload layout (the codec's docstring has the whole wire format)::

    u16 little-endian L | meta: msgpack [dtype.str, [dim0, dim1, ...]] (L bytes) | rest

This module holds what that layout needs on both ends: which dtypes may travel (plain
memory that ``dtype.str`` names exactly), the bound on what a zero-byte array may span,
building the ``u16 L | meta`` prefix on encode and parsing and validating it on decode
(both cached per shape), and rebuilding inline arrays and scalars from their payloads.
The encoder's ``default`` hook and the decoder's ``ext_hook`` stay in the codec; they
call in here, and the encoder looks :data:`meta_cache` up directly on its hot path.

Anything a peer sent is untrusted: a malformed prefix, a dtype that is not plain memory,
a shape that spans too much without data or a wrong length raises
:class:`~remoterl.errors.ProtocolError`. On encode, what decode would refuse raises
:class:`Unsupported`, the codec's marker for "explain this value and refuse it".
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np

from remoterl.errors import ProtocolError

__all__ = [
    "EXT_COMPRESSED",
    "EXT_SHARED",
    "MAX_EMPTY_SPAN",
    "Unsupported",
    "empty_span",
    "inline_array",
    "meta_cache",
    "meta_prefix",
    "parse_meta",
    "plain_dtype",
    "scalar",
]

# dtype kinds that are plain memory: bool, int, uint, float, complex, bytes,
# str, void (unstructured), datetime64, timedelta64. Object ('O') and numpy 2's
# StringDType ('T') hold pointers and would be garbage (or worse) as raw bytes.
_PLAIN_KINDS = frozenset("biufcSUVMm")

# The ext codes a frame sink writes (remoterl.wire.codec's docstring has the layouts): an
# array compressed into a frame, and an array in a shared-memory segment.
EXT_COMPRESSED = 5
EXT_SHARED = 6

# numpy's own limit on dimensions; bounds what a peer can make us allocate.
_MAX_NDIM = 64

# The most elements a zero-byte array may span, zero dimensions counted as 1. An array with
# data has at most one element per byte received; one with none (a zero dimension, or a dtype
# of size 0 such as '<U0') costs a few bytes whatever its shape, yet iterating it makes one
# Python object per row: (2**25, 0) float64, 42 bytes on the wire, took 2.4 GB and seconds to
# walk. Real zero-size values are small (a batch of Box(0,) observations has one row per env).
MAX_EMPTY_SPAN = 1 << 16

# Per-(dtype, shape) and per-meta caches. A training loop sends the same few
# shapes every step; caching saves building and parsing the meta each time.
# Bounded because shapes (and, on decode, a peer's input) may vary without end.
_CACHE_LIMIT = 1024


class Unsupported(TypeError):
    """Raised inside the encoder's ``default`` hook; the slow path then explains it."""


def plain_dtype(dtype: np.dtype) -> bool:
    """True if ``dtype`` is raw memory that ``dtype.str`` describes exactly."""
    return (
        dtype.kind in _PLAIN_KINDS
        and dtype.fields is None  # structured: dtype.str would drop the fields
        and dtype.subdtype is None
        and not dtype.hasobject
    )


def empty_span(dtype: np.dtype, shape: Sequence[int]) -> int:
    """Elements a zero-byte array spans, zero dimensions counted as 1 (0 if it has data)."""
    nbytes = dtype.itemsize
    span = 1
    for n in shape:
        nbytes *= n
        span *= n or 1
    return 0 if nbytes else span


# ----------------------------------------------------------------------------
# Encoding


# (dtype, shape) -> "u16 L | meta" prefix. Cleared, never rebound: the codec holds it too.
meta_cache: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}


def meta_prefix(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``u16 L | meta`` prefix shared by ext 1, 2 and 3 (cached)."""
    key = (dtype, shape)
    prefix = meta_cache.get(key)
    if prefix is None:
        # What decode would refuse is refused here too, so a round trip never fails half way.
        if not plain_dtype(dtype) or empty_span(dtype, shape) > MAX_EMPTY_SPAN:
            raise Unsupported
        meta = msgpack.packb([dtype.str, list(shape)])
        prefix = len(meta).to_bytes(2, "little") + meta
        if len(meta_cache) >= _CACHE_LIMIT:
            meta_cache.clear()
        meta_cache[key] = prefix
    return prefix


# ----------------------------------------------------------------------------
# Decoding


# "u16 L | meta" prefix -> (dtype, shape, nbytes); only prefixes that passed
# validation are cached.
_parsed_meta_cache: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def parse_meta(data: bytes) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Read the ``u16 L | meta`` prefix of an ext 1/2/3 payload.

    Returns:
        ``(dtype, shape, nbytes, offset)``: offset is where the rest begins.

    Raises:
        ProtocolError: the prefix is malformed or names a dtype that is not
            plain memory.
    """
    if len(data) < 2:
        raise ProtocolError("array payload too short for its header")
    offset = 2 + (data[0] | data[1] << 8)
    prefix = data[:offset]
    parsed = _parsed_meta_cache.get(prefix)
    if parsed is None:
        parsed = _parse_meta_slow(prefix, offset)
    return (*parsed, offset)


def _parse_meta_slow(prefix: bytes, offset: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate and cache a prefix that :func:`parse_meta` has not seen yet."""
    if len(prefix) != offset:
        raise ProtocolError("array payload too short for its header")
    try:
        dtype_str, shape = msgpack.unpackb(prefix[2:], raw=False)
    except Exception as exc:
        raise ProtocolError(f"malformed array header: {exc}") from exc
    if (
        type(dtype_str) is not str
        or type(shape) is not list
        or len(shape) > _MAX_NDIM
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise ProtocolError(f"malformed array header: dtype {dtype_str!r}, shape {shape!r}")
    try:
        dtype = np.dtype(dtype_str)
    except Exception as exc:
        raise ProtocolError(f"array header names an unknown dtype {dtype_str!r}") from exc
    # Never build an object array from a peer's bytes: those would be pointers.
    if not plain_dtype(dtype):
        raise ProtocolError(f"array header names an unsupported dtype {dtype_str!r}")
    if empty_span(dtype, shape) > MAX_EMPTY_SPAN:
        raise ProtocolError(
            f"array header {dtype_str!r}{shape!r} spans {empty_span(dtype, shape)} elements"
            f" without data (a zero-size array may span at most {MAX_EMPTY_SPAN})"
        )
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    parsed = (dtype, tuple(shape), nbytes)
    if len(_parsed_meta_cache) >= _CACHE_LIMIT:
        _parsed_meta_cache.clear()
    _parsed_meta_cache[prefix] = parsed
    return parsed


def inline_array(data: bytes) -> np.ndarray:
    """Rebuild an ext 1 array: fresh and writeable, like a local env's return values."""
    # The hot path of decode: parse_meta inlined (a call costs ~10% here).
    offset = 2 + (data[0] | data[1] << 8) if len(data) >= 2 else 0
    parsed = _parsed_meta_cache.get(data[:offset])
    if parsed is None:
        dtype, shape, nbytes, offset = parse_meta(data)
    else:
        dtype, shape, nbytes = parsed
    if len(data) - offset != nbytes:
        raise ProtocolError(
            f"inline array {dtype.str}{list(shape)} needs {nbytes} bytes, got {len(data) - offset}"
        )
    if nbytes == 0:
        return np.empty(shape, dtype)  # also covers itemsize 0 ('<U0')
    # The bytearray is the copy that makes the array writeable (bytes are not);
    # copying the whole payload and skipping the prefix by offset is cheaper
    # than slicing first.
    return np.ndarray(shape, dtype, bytearray(data), offset)


def scalar(data: bytes) -> np.generic:
    """Rebuild an ext 3 numpy scalar."""
    dtype, shape, nbytes, offset = parse_meta(data)
    if shape != () or len(data) - offset != nbytes:
        raise ProtocolError(f"malformed numpy scalar of dtype {dtype.str}")
    if nbytes == 0:
        return np.zeros((), dtype)[()]
    return np.ndarray((), dtype, data, offset)[()]
