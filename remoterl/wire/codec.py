"""Values ⇄ one msgpack header and raw array frames.

Theory of operation
-------------------
Everything an env call sends or returns (actions, observations, rewards, infos,
space descriptions) travels as one msgpack *header* plus zero or more raw
*frames*. :func:`encode` packs a value into the header; numpy arrays bigger than
``frame_threshold`` bytes are not copied into it but handed back as separate
buffers, which the caller sends as extra zmq frames with ``copy=False`` (C-contiguous only:
payloads pass through). The header refers to such an array by its index in the
returned list. :func:`decode` is the exact inverse: given the header and the
frames it rebuilds the value, with the big arrays as zero-copy views onto the
received frames.

msgpack has no tuples, arrays or numpy scalars, so four extension types carry
them. The array-like ones share one payload layout::

    u16 little-endian L | meta: msgpack [dtype.str, [dim0, dim1, ...]] (L bytes) | rest

    ext 1  ndarray, inline     rest = the C-order bytes of the array, exactly
    ext 2  ndarray, in a frame rest = u32 little-endian frame index (relative to
                               ``start``); the frame holds exactly the C-order bytes
    ext 3  numpy scalar        like ext 1 with shape []; decodes to a numpy scalar
    ext 4  tuple               payload = a msgpack array of the items

``dtype.str`` (``'<f4'``, ``'>i8'``, ``'|b1'``, ``'<U5'``, ``'<M8[ns]'``) keeps
the byte order, so dtypes round-trip exactly.

Packing runs with ``strict_types=True``: without it msgpack would pack a tuple as
a list, ``np.float64`` (a ``float`` subclass) as a plain float, and ``np.str_``
as a plain str — the types would not survive the trip. ``True``/``False`` are
matched by identity before ints, so bools stay bools.

Rules
~~~~~
- Round trip is exact, types included: ``None``, ``bool``, ``int`` (64-bit signed
  or unsigned), ``float``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``,
  numpy arrays of any dtype that is plain memory (bool, ints, floats, complex,
  fixed-width strings, datetimes; any byte order, any shape including 0-d) and
  numpy scalars of those dtypes, nested arbitrarily.
- Arrays decoded from inline data are fresh and writeable, like a local env's
  return values. Arrays decoded from frames are views onto the frames: writeable
  only if the frame buffer is, and alive as long as the array is.
- The fast path is one ``Packer.pack`` with a ``default`` hook for the types
  above; nothing walks the value first. Only when packing fails does a second
  walk look for the first value that cannot travel and name its key path:
  ``cannot send info['stats'][2]: type 'set' is not supported (...)``.
- Anything a peer may have sent is untrusted: malformed headers, unknown ext
  codes, bad dtypes, wrong lengths and bad frame indices raise
  :class:`~remoterl.errors.ProtocolError` and nothing else (a peer can never crash us).
- What a decoded array can cost is bounded by the bytes that carried it: an
  array with data holds at most one element per byte received, and a zero-byte
  one (a zero dimension, or a dtype of size 0) may span at most 65536 elements,
  zero dimensions counted as 1 (``(2**25, 0)`` is refused, ``(64, 0)`` is not).

What it does not do
~~~~~~~~~~~~~~~~~~~
- No pickle, ever: arbitrary objects, sets, object arrays and structured dtypes
  raise :class:`~remoterl.errors.CodecError`.
- Type conversions it accepts rather than refuses, because msgpack packs them
  natively or refusing would break common envs: ``bytearray`` and
  ``memoryview`` arrive as ``bytes``; ``dict`` subclasses (``OrderedDict``,
  ``defaultdict``) arrive as plain ``dict``. Dict keys may be any value that
  itself travels and is hashable when decoded (str and int in practice).
- It does not copy big arrays: a buffer in the returned frame list may be the
  caller's own array, so the caller must not write into it until zmq has sent
  it (a ``copy=False`` send completes later, on zmq's I/O thread).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import msgpack
import numpy as np

from remoterl.errors import CodecError, ProtocolError

__all__ = ["decode", "encode"]

# Extension type codes (see the module docstring for their payloads).
_EXT_ARRAY = 1
_EXT_FRAME = 2
_EXT_SCALAR = 3
_EXT_TUPLE = 4

# dtype kinds that are plain memory: bool, int, uint, float, complex, bytes,
# str, void (unstructured), datetime64, timedelta64. Object ('O') and numpy 2's
# StringDType ('T') hold pointers and would be garbage (or worse) as raw bytes.
_PLAIN_KINDS = frozenset("biufcSUVMm")

# numpy's own limit on dimensions; bounds what a peer can make us allocate.
_MAX_NDIM = 64

# The most elements a zero-byte array may span, zero dimensions counted as 1. An array with
# data has at most one element per byte received; one with none (a zero dimension, or a dtype
# of size 0 such as '<U0') costs a few bytes whatever its shape, yet iterating it makes one
# Python object per row: (2**25, 0) float64, 42 bytes on the wire, took 2.4 GB and seconds to
# walk. Real zero-size values are small (a batch of Box(0,) observations has one row per env).
_MAX_EMPTY_SPAN = 1 << 16

# msgpack's unpacker reads at most this many nested containers (its packer
# allows one more, then raises "recursion limit exceeded").
_MAX_DEPTH = 1024

# Each tuple level is a nested pack/unpack call that recurses through Python
# *and* C: on decode, a few thousand levels overflow the C stack (a segfault,
# not a RecursionError). Real values nest tuples a few levels at most.
_MAX_TUPLE_DEPTH = 32

# Per-(dtype, shape) and per-meta caches. A training loop sends the same few
# shapes every step; caching saves building and parsing the meta each time.
# Bounded because shapes (and, on decode, a peer's input) may vary without end.
_CACHE_LIMIT = 1024

# A thread's packers keep their buffers between calls. Start them small (the
# default is 256 KiB each, times up to 33 per thread), and drop them after a
# header this big so one huge value does not pin its buffer for ever.
_PACKER_BUF_SIZE = 16 * 1024
_PACKER_KEEP_LIMIT = 1024 * 1024

_ALLOWED = "allowed: numbers, strings, bools, None, numpy arrays, lists/tuples/dicts of those"

# tuple.__new__ skips ExtType.__new__'s argument checks (~3x cheaper); our
# codes and payloads are valid by construction.
_new_tuple = tuple.__new__
_ExtType = msgpack.ExtType


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    return _new_tuple(_ExtType, (code, data))


class _Unsupported(TypeError):
    """Raised inside the ``default`` hook; the slow path then explains it."""


# ----------------------------------------------------------------------------
# Encoding


_meta_cache: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}


def _plain_dtype(dtype: np.dtype) -> bool:
    """True if ``dtype`` is raw memory that ``dtype.str`` describes exactly."""
    return (
        dtype.kind in _PLAIN_KINDS
        and dtype.fields is None  # structured: dtype.str would drop the fields
        and dtype.subdtype is None
        and not dtype.hasobject
    )


def _empty_span(dtype: np.dtype, shape: Sequence[int]) -> int:
    """Elements a zero-byte array spans, zero dimensions counted as 1 (0 if it has data)."""
    nbytes = dtype.itemsize
    span = 1
    for n in shape:
        nbytes *= n
        span *= n or 1
    return 0 if nbytes else span


def _meta_prefix(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``u16 L | meta`` prefix shared by ext 1, 2 and 3 (cached)."""
    key = (dtype, shape)
    prefix = _meta_cache.get(key)
    if prefix is None:
        # What decode would refuse is refused here too, so a round trip never fails half way.
        if not _plain_dtype(dtype) or _empty_span(dtype, shape) > _MAX_EMPTY_SPAN:
            raise _Unsupported
        meta = msgpack.packb([dtype.str, list(shape)])
        prefix = len(meta).to_bytes(2, "little") + meta
        if len(_meta_cache) >= _CACHE_LIMIT:
            _meta_cache.clear()
        _meta_cache[key] = prefix
    return prefix


class _Encoder:
    """One thread's packers and the state of the encode call in progress.

    ``msgpack.packb`` builds a new ``Packer`` (and its buffer) on every call,
    which costs more than packing a whole step reply; a ``Packer`` is not
    thread-safe, so each thread keeps its own. ``packers[d]`` packs at tuple
    depth ``d``: a tuple's items are packed while its parent's packer is busy.
    """

    __slots__ = ("depth", "frames", "packers", "threshold")

    def __init__(self) -> None:
        self.depth = 0  # 0: idle; n: n packers are busy (outermost + tuples)
        self.frames: list[np.ndarray] = []
        self.threshold = 0
        self.packers: list[msgpack.Packer] = []

    def packer(self, depth: int) -> msgpack.Packer:
        while len(self.packers) <= depth:
            self.packers.append(
                msgpack.Packer(
                    default=self.default,
                    use_bin_type=True,
                    strict_types=True,
                    datetime=False,
                    buf_size=_PACKER_BUF_SIZE,
                )
            )
        return self.packers[depth]

    def default(self, obj: Any) -> Any:
        """msgpack's hook for every type it does not pack natively."""
        cls = type(obj)
        if cls is np.ndarray:
            # The hot path of encode: the cache lookup of _meta_prefix inlined.
            prefix = _meta_cache.get((obj.dtype, obj.shape)) or _meta_prefix(obj.dtype, obj.shape)
            if obj.nbytes > self.threshold:
                index = len(self.frames)
                # Raw bytes of a Fortran-ordered (or strided) array
                # would arrive scrambled, so frames are always C-contiguous.
                frame = np.ascontiguousarray(obj)
                if frame.dtype.kind in "Mm":
                    # datetime64/timedelta64 refuse the buffer protocol that
                    # zmq and memoryview use; the same 8 bytes as uint64 do not.
                    frame = frame.view(np.uint64)
                self.frames.append(frame)
                return _new_tuple(_ExtType, (_EXT_FRAME, prefix + index.to_bytes(4, "little")))
            return _new_tuple(_ExtType, (_EXT_ARRAY, prefix + obj.tobytes()))
        if cls is tuple:
            depth = self.depth
            if depth > _MAX_TUPLE_DEPTH:  # depth 1 is the outermost packer
                raise _Unsupported
            packer = self.packer(depth)
            self.depth = depth + 1
            try:
                return _ext(_EXT_TUPLE, packer.pack(list(obj)))
            finally:
                self.depth = depth
        if isinstance(obj, np.generic):
            dtype, data = obj.dtype, obj.tobytes()
            if len(data) != dtype.itemsize:
                # np.str_("") claims dtype '<U0' but holds one (empty) char.
                array = np.array(obj)
                dtype, data = array.dtype, array.tobytes()
            return _ext(_EXT_SCALAR, _meta_prefix(dtype, ()) + data)
        if isinstance(obj, dict):
            return dict(obj)  # OrderedDict, defaultdict: travel as a plain dict
        raise _Unsupported


_local = threading.local()


def encode(
    obj: Any, *, name: str = "value", frame_threshold: int = 2048
) -> tuple[bytes, list[np.ndarray]]:
    """Pack ``obj`` into a msgpack header plus raw frames for its big arrays.

    Args:
        obj: the value to send (see the module docstring for what may travel).
        name: what to call ``obj`` in error messages, e.g. ``"info"`` or
            ``"action"``; the root of the key path.
        frame_threshold: arrays with more than this many bytes go to a frame
            of their own instead of into the header.

    Returns:
        ``(header, frames)``: the header bytes, and the C-contiguous numpy
        arrays to send after it, in order, as frames (``copy=False``). A frame
        may share memory with an array in ``obj``: do not modify that array
        until the frames are sent.

    Raises:
        CodecError: ``obj`` holds something that cannot travel; the message
            names its key path and type.
    """
    encoder = getattr(_local, "encoder", None)
    if encoder is None:
        encoder = _local.encoder = _Encoder()
    elif encoder.depth:
        # Re-entered on this thread while an encode is in progress (from a
        # signal handler or a __del__): its packers are busy, use fresh ones.
        encoder = _Encoder()
    frames: list[np.ndarray] = []
    encoder.frames = frames
    encoder.threshold = frame_threshold
    packer = encoder.packer(0)
    encoder.depth = 1
    try:
        header = packer.pack(obj)
    except (TypeError, ValueError, OverflowError, BufferError, RecursionError) as exc:
        encoder.packers.clear()  # a failed pack may have grown a buffer: start afresh
        error = _explain(obj, name, exc)
        if isinstance(exc, _Unsupported):
            raise error from None  # the marker is no news: the message says it all
        raise error from exc
    finally:
        encoder.depth = 0
        encoder.frames = []  # drop references to the caller's arrays
    if len(header) > _PACKER_KEEP_LIMIT:
        encoder.packers.clear()
    return header, frames


# ----------------------------------------------------------------------------
# The slow path: find what could not be packed


def _explain(obj: Any, name: str, exc: BaseException) -> CodecError:
    """Build the error for a failed :func:`encode`, naming the first bad value."""
    found = _find_unsendable(obj, name)
    if found is None:
        return CodecError(f"cannot send {name}: {exc}")
    path, reason = found
    return CodecError(f"cannot send {path}: {reason}")


_LEAVE = object()  # stack marker: the walk is done with a container


def _find_unsendable(obj: Any, name: str) -> tuple[str, str] | None:
    """Return ``(path, reason)`` for the first value in ``obj`` that cannot travel.

    Mirrors what ``Packer.pack`` with :meth:`_Encoder.default` accepts, in the
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
        if depth >= _MAX_DEPTH or tuples > _MAX_TUPLE_DEPTH:
            return path, f"nested too deeply (limits: {_MAX_DEPTH} levels, {_MAX_TUPLE_DEPTH} of them tuples)"
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
        if not _plain_dtype(value.dtype):
            return f"{what} of dtype {value.dtype} is not supported ({_ALLOWED})"
        span = _empty_span(value.dtype, value.shape)
        if span > _MAX_EMPTY_SPAN:
            return (f"zero-size {what} of shape {value.shape} spans {span} elements"
                    f" (at most {_MAX_EMPTY_SPAN} travel)")
        return None
    return f"type {cls.__name__!r} is not supported ({_ALLOWED})"


# ----------------------------------------------------------------------------
# Decoding


# "u16 L | meta" prefix -> (dtype, shape, nbytes); only prefixes that passed
# validation are cached.
_parsed_meta_cache: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _parse_meta(data: bytes) -> tuple[np.dtype, tuple[int, ...], int, int]:
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
    """Validate and cache a prefix that :func:`_parse_meta` has not seen yet."""
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
    if not _plain_dtype(dtype):
        raise ProtocolError(f"array header names an unsupported dtype {dtype_str!r}")
    if _empty_span(dtype, shape) > _MAX_EMPTY_SPAN:
        raise ProtocolError(
            f"array header {dtype_str!r}{shape!r} spans {_empty_span(dtype, shape)} elements"
            f" without data (a zero-size array may span at most {_MAX_EMPTY_SPAN})"
        )
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    parsed = (dtype, tuple(shape), nbytes)
    if len(_parsed_meta_cache) >= _CACHE_LIMIT:
        _parsed_meta_cache.clear()
    _parsed_meta_cache[prefix] = parsed
    return parsed


def _inline_array(data: bytes) -> np.ndarray:
    # The hot path of decode: _parse_meta inlined (a call costs ~10% here).
    offset = 2 + (data[0] | data[1] << 8) if len(data) >= 2 else 0
    parsed = _parsed_meta_cache.get(data[:offset])
    if parsed is None:
        dtype, shape, nbytes, offset = _parse_meta(data)
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


def _scalar(data: bytes) -> np.generic:
    dtype, shape, nbytes, offset = _parse_meta(data)
    if shape != () or len(data) - offset != nbytes:
        raise ProtocolError(f"malformed numpy scalar of dtype {dtype.str}")
    if nbytes == 0:
        return np.zeros((), dtype)[()]
    return np.ndarray((), dtype, data, offset)[()]


def decode(header: Any, frames: Sequence[Any] = (), start: int = 0) -> Any:
    """Rebuild the value that :func:`encode` packed.

    Args:
        header: the header, as any bytes-like object (``bytes``,
            ``memoryview``, ``zmq.Frame``).
        frames: the message's frames, each bytes-like; a frame reference ``i``
            in the header means ``frames[start + i]``.
        start: index in ``frames`` of the first array frame.

    Returns:
        The value. Arrays that travelled in frames are views onto those frames
        (no copy): keep the frames alive and do not hand them to anyone else.

    Raises:
        ProtocolError: the header or frames are malformed (bad msgpack, unknown
            ext code, bad dtype or shape, wrong length, bad frame index).
        TypeError: ``header`` is not bytes-like (a bug in the caller, not the peer).
    """
    tuple_depth = 0

    def ext_hook(code: int, data: bytes) -> Any:
        nonlocal tuple_depth
        if code == _EXT_ARRAY:
            return _inline_array(data)
        if code == _EXT_FRAME:
            dtype, shape, nbytes, offset = _parse_meta(data)
            if len(data) - offset != 4:
                raise ProtocolError("malformed frame reference")
            index = int.from_bytes(data[offset:], "little")
            if not 0 <= start + index < len(frames):
                raise ProtocolError(
                    f"array refers to frame {index} but only {len(frames) - start} were sent"
                )
            buffer = memoryview(frames[start + index])
            if buffer.nbytes != nbytes:
                raise ProtocolError(
                    f"frame {index} holds {buffer.nbytes} bytes,"
                    f" array {dtype.str}{list(shape)} needs {nbytes}"
                )
            if nbytes == 0:
                return np.empty(shape, dtype)
            return np.ndarray(shape, dtype, buffer)
        if code == _EXT_SCALAR:
            return _scalar(data)
        if code == _EXT_TUPLE:
            if tuple_depth >= _MAX_TUPLE_DEPTH:
                raise ProtocolError(f"tuples nested more than {_MAX_TUPLE_DEPTH} deep")
            tuple_depth += 1
            try:
                items = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
            finally:
                tuple_depth -= 1
            if type(items) is not list:
                raise ProtocolError("malformed tuple: payload is not an array")
            return tuple(items)
        raise ProtocolError(f"unknown msgpack ext type {code}")

    try:
        # unpackb takes any buffer itself; wrapping it in a memoryview first
        # costs ~8% of a small step reply.
        return msgpack.unpackb(header, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:
        if isinstance(exc, TypeError) and not _is_bytes_like(header):
            raise TypeError(f"header must be bytes-like, not {type(header).__name__}") from None
        # msgpack raises ValueError subclasses (ExtraData, FormatError,
        # StackError, UnicodeDecodeError) and TypeError (unhashable map key).
        raise ProtocolError(f"malformed message header: {type(exc).__name__}: {exc}") from exc


def _is_bytes_like(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True
