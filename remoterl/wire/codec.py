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
    ext 5  ndarray, compressed rest = u32 frame index | u8 algorithm (1 lz4, 2 zstd);
                               the frame holds the compressed C-order bytes
    ext 6  ndarray, shared mem rest = u32 segment id | u64 offset; the bytes lie in a
                               shared-memory segment both ends mapped

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

Frame sinks
~~~~~~~~~~~
:func:`encode` takes an optional ``sink``: called with each array bound for a frame of its
own, it may place the array elsewhere and return its ext instead (ext 5: the
worker compresses, :mod:`remoterl.wire.compress`; ext 6: the worker writes it into a
segment its client mapped, :mod:`remoterl.io.shm`), or return None to send the frame raw.
:func:`decode` reverses both: compressed arrays are decompressed into fresh buffers
(bounded: exactly the declared size, at most ``MAX_DECOMPRESSED`` per message), and arrays
in shared memory are *copied out* of the segment given in ``segments`` (its next reply
may overwrite it), after checking they lie inside it.

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

Where the code lives
~~~~~~~~~~~~~~~~~~~~
This module holds :func:`encode` and :func:`decode` (the per-thread packers, the
``default`` and ``ext_hook`` hooks, the ext codes). The array payload (the
``u16 L | meta`` prefix, which dtypes and shapes may travel, inline arrays and
scalars) is in :mod:`remoterl.wire.arrays`; the slow path that names the value
that cannot travel, and the nesting limits, are in :mod:`remoterl.wire.unsendable`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from remoterl.errors import ProtocolError
from remoterl.wire.arrays import (
    EXT_COMPRESSED,
    EXT_SHARED,
    Unsupported,
    inline_array,
    meta_cache,
    meta_prefix,
    parse_meta,
    scalar,
)
from remoterl.wire.compress import MAX_DECOMPRESSED, decompress
from remoterl.wire.unsendable import MAX_TUPLE_DEPTH, explain

__all__ = ["decode", "encode"]

# Extension type codes (see the module docstring for their payloads).
_EXT_ARRAY = 1
_EXT_FRAME = 2
_EXT_SCALAR = 3
_EXT_TUPLE = 4
_EXT_COMPRESSED = EXT_COMPRESSED  # 5, written by remoterl.wire.compress.Compressor
_EXT_SHARED = EXT_SHARED  # 6, written by remoterl.io.shm's sink

# A thread's packers keep their buffers between calls. Start them small (the
# default is 256 KiB each, times up to 33 per thread), and drop them after a
# header this big so one huge value does not pin its buffer for ever.
_PACKER_BUF_SIZE = 16 * 1024
_PACKER_KEEP_LIMIT = 1024 * 1024

# tuple.__new__ skips ExtType.__new__'s argument checks (~3x cheaper); our
# codes and payloads are valid by construction.
_new_tuple = tuple.__new__
_ExtType = msgpack.ExtType

# The prefix cache's lookup, bound once: Python 3.11 compiles ``name.get(...)`` on a name
# imported with ``from ... import`` as an attribute load plus a call, not a method call,
# which cost ~10% of the hook below. arrays.meta_cache is cleared, never rebound.
_cached_prefix = meta_cache.get


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    return _new_tuple(_ExtType, (code, data))


# ----------------------------------------------------------------------------
# Encoding


class _Encoder:
    """One thread's packers and the state of the encode call in progress.

    ``msgpack.packb`` builds a new ``Packer`` (and its buffer) on every call,
    which costs more than packing a whole step reply; a ``Packer`` is not
    thread-safe, so each thread keeps its own. ``packers[d]`` packs at tuple
    depth ``d``: a tuple's items are packed while its parent's packer is busy.
    """

    __slots__ = ("depth", "frames", "packers", "sink", "threshold")

    def __init__(self) -> None:
        self.depth = 0  # 0: idle; n: n packers are busy (outermost + tuples)
        self.frames: list[np.ndarray] = []
        self.threshold = 0
        self.sink: Callable[[np.ndarray, bytes, list], Any] | None = None
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
            # The hot path of encode: the cache lookup of meta_prefix inlined.
            prefix = _cached_prefix((obj.dtype, obj.shape)) or meta_prefix(obj.dtype, obj.shape)
            if obj.nbytes > self.threshold:
                index = len(self.frames)
                # Raw bytes of a Fortran-ordered (or strided) array
                # would arrive scrambled, so frames are always C-contiguous.
                frame = np.ascontiguousarray(obj)
                if frame.dtype.kind in "Mm":
                    # datetime64/timedelta64 refuse the buffer protocol that
                    # zmq and memoryview use; the same 8 bytes as uint64 do not.
                    frame = frame.view(np.uint64)
                sink = self.sink
                if sink is not None and frame.nbytes:
                    placed = sink(frame, prefix, self.frames)
                    if placed is not None:
                        return placed
                self.frames.append(frame)
                return _new_tuple(_ExtType, (_EXT_FRAME, prefix + index.to_bytes(4, "little")))
            return _new_tuple(_ExtType, (_EXT_ARRAY, prefix + obj.tobytes()))
        if cls is tuple:
            depth = self.depth
            if depth > MAX_TUPLE_DEPTH:  # depth 1 is the outermost packer
                raise Unsupported
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
            return _ext(_EXT_SCALAR, meta_prefix(dtype, ()) + data)
        if isinstance(obj, dict):
            return dict(obj)  # OrderedDict, defaultdict: travel as a plain dict
        raise Unsupported


_local = threading.local()


def encode(
    obj: Any, *, name: str = "value", frame_threshold: int = 2048,
    sink: Callable[[np.ndarray, bytes, list], Any] | None = None,
) -> tuple[bytes, list[np.ndarray]]:
    """Pack ``obj`` into a msgpack header plus raw frames for its big arrays.

    Args:
        obj: the value to send (see the module docstring for what may travel).
        name: what to call ``obj`` in error messages, e.g. ``"info"`` or
            ``"action"``; the root of the key path.
        frame_threshold: arrays with more than this many bytes go to a frame
            of their own instead of into the header.
        sink: places such arrays elsewhere (compressed, or in shared memory):
            ``sink(array, prefix, frames)`` returns the ``msgpack.ExtType`` to pack
            instead (ext 5 or 6, its payload the prefix and what follows it; a
            compressed array's bytes appended to ``frames``) or None to send the
            array as a raw frame (see "Frame sinks" above).

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
    encoder.sink = sink
    packer = encoder.packer(0)
    encoder.depth = 1
    try:
        header = packer.pack(obj)
    except (TypeError, ValueError, OverflowError, BufferError, RecursionError) as exc:
        encoder.packers.clear()  # a failed pack may have grown a buffer: start afresh
        error = explain(obj, name, exc)
        if isinstance(exc, Unsupported):
            raise error from None  # the marker is no news: the message says it all
        raise error from exc
    finally:
        encoder.depth = 0
        encoder.frames = []  # drop references to the caller's arrays
        encoder.sink = None
    if len(header) > _PACKER_KEEP_LIMIT:
        encoder.packers.clear()
    return header, frames


# ----------------------------------------------------------------------------
# Decoding


def decode(header: Any, frames: Sequence[Any] = (), start: int = 0,
           segments: Mapping[int, memoryview] | None = None) -> Any:
    """Rebuild the value that :func:`encode` packed.

    Args:
        header: the header, as any bytes-like object (``bytes``,
            ``memoryview``, ``zmq.Frame``).
        frames: the message's frames, each bytes-like; a frame reference ``i``
            in the header means ``frames[start + i]``.
        start: index in ``frames`` of the first array frame.
        segments: the shared-memory segments ext 6 arrays may lie in, by id
            (None: an ext 6 array is refused).

    Returns:
        The value. Arrays that travelled in frames are views onto those frames
        (no copy): keep the frames alive and do not hand them to anyone else.

    Raises:
        ProtocolError: the header or frames are malformed (bad msgpack, unknown
            ext code, bad dtype or shape, wrong length, bad frame index).
        TypeError: ``header`` is not bytes-like (a bug in the caller, not the peer).
    """
    tuple_depth = 0
    inflated = 0

    def ext_hook(code: int, data: bytes) -> Any:
        nonlocal tuple_depth, inflated
        if code == _EXT_ARRAY:
            return inline_array(data)
        if code == _EXT_FRAME or code == _EXT_COMPRESSED:
            dtype, shape, nbytes, offset = parse_meta(data)
            if len(data) - offset != (4 if code == _EXT_FRAME else 5):
                raise ProtocolError("malformed frame reference")
            index = int.from_bytes(data[offset:offset + 4], "little")
            if not 0 <= start + index < len(frames):
                raise ProtocolError(
                    f"array refers to frame {index} but only {len(frames) - start} were sent"
                )
            if code == _EXT_COMPRESSED:
                inflated += nbytes
                if inflated > MAX_DECOMPRESSED:
                    raise ProtocolError(f"compressed arrays of one message decompress to more than "
                                        f"{MAX_DECOMPRESSED} bytes")
                if nbytes == 0:
                    raise ProtocolError("a compressed array must hold data")
                return np.ndarray(shape, dtype, decompress(data[-1], frames[start + index], nbytes))
            buffer = memoryview(frames[start + index])
            if buffer.nbytes != nbytes:
                raise ProtocolError(
                    f"frame {index} holds {buffer.nbytes} bytes,"
                    f" array {dtype.str}{list(shape)} needs {nbytes}"
                )
            if nbytes == 0:
                return np.empty(shape, dtype)
            return np.ndarray(shape, dtype, buffer)
        if code == _EXT_SHARED:
            return _shared_array(data, segments)
        if code == _EXT_SCALAR:
            return scalar(data)
        if code == _EXT_TUPLE:
            if tuple_depth >= MAX_TUPLE_DEPTH:
                raise ProtocolError(f"tuples nested more than {MAX_TUPLE_DEPTH} deep")
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


def _shared_array(data: bytes, segments: Mapping[int, memoryview] | None) -> np.ndarray:
    """An ext 6 array, copied out of its segment (the segment's next use overwrites it)."""
    dtype, shape, nbytes, offset = parse_meta(data)
    if len(data) - offset != 12:
        raise ProtocolError("malformed shared-memory reference")
    segment = None if segments is None else segments.get(int.from_bytes(data[offset:offset + 4], "little"))
    if segment is None:
        raise ProtocolError("an array refers to a shared-memory segment this end has not mapped")
    at = int.from_bytes(data[offset + 4:], "little")
    if at + nbytes > segment.nbytes or nbytes == 0:
        raise ProtocolError(f"a shared-memory array of {nbytes} bytes at {at} does not lie inside "
                            f"its segment of {segment.nbytes}")
    return np.ndarray(shape, dtype, bytearray(segment[at:at + nbytes]))


def _is_bytes_like(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True
