"""One ZeroMQ multipart message ⇄ one binary WebSocket message (docs/WEBSOCKET.md). ◇

A WebSocket message is a byte string; a multipart message is a list of frames. The
message carries the frames back to back, each as a 4-byte little-endian unsigned
length followed by that many bytes::

    [u32 len0][frame0 bytes][u32 len1][frame1 bytes] ...

Rules (what :func:`unpack` enforces; the bridge closes the connection on a violation):

* at least one frame (ZeroMQ has no empty multipart message); zero-length frames are fine;
* the lengths must account for every byte: no partial prefix, no frame running past
  the end, nothing left over;
* at most :data:`MAX_FRAMES` frames.

No sockets here: :func:`pack` is used by both ends to build messages, :func:`unpack`
returns ``memoryview`` slices of the received bytes (no payload copy; pyzmq sends big
ones without copying them again).

This belongs in ``remoterl/wire/protocol.py`` (the wire in one place); it sits apart until
that module is free to change.
"""

from __future__ import annotations

import struct
from typing import Any

from remoterl.errors import ProtocolError
from remoterl.wire.protocol import MAX_FRAMES

__all__ = ["MAX_FRAMES", "pack", "unpack"]

# MAX_FRAMES (remoterl.wire.protocol): the broker's own limit, so the bridge never builds a
# message of millions of frames for it.

_LEN = struct.Struct("<I")
_pack_len = _LEN.pack
_unpack_len = _LEN.unpack_from


def pack(frames: list[Any]) -> bytes:
    """Join ``frames`` (bytes, memoryview, ``zmq.Frame`` or any buffer) into one message.

    Raises:
        ValueError: a frame is 4 GiB or larger (the length prefix is 32 bits).
    """
    parts: list[Any] = []
    append = parts.append
    for frame in frames:
        buf = getattr(frame, "buffer", frame)  # zmq.Frame → its memoryview (no copy)
        n = buf.nbytes if isinstance(buf, memoryview) else len(buf)
        if n > 0xFFFFFFFF:
            raise ValueError(f"a frame of {n} bytes does not fit a WebSocket message (limit 4 GiB - 1)")
        append(_pack_len(n))
        append(buf)
    return b"".join(parts)


def unpack(data: bytes | bytearray | memoryview) -> list[memoryview]:
    """Split one received message into its frames (views onto ``data``).

    Raises:
        ProtocolError: the message breaks a rule above (the text says which).
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    end = view.nbytes
    if end == 0:
        raise ProtocolError("empty WebSocket message (a multipart message needs at least one frame)")
    frames: list[memoryview] = []
    append = frames.append
    pos = 0
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(f"truncated frame length at byte {pos} of {end}")
        (n,) = _unpack_len(view, pos)
        pos += 4
        if n > end - pos:
            raise ProtocolError(f"frame {len(frames)} declares {n} bytes but only {end - pos} remain")
        append(view[pos:pos + n])
        pos += n
        if len(frames) > MAX_FRAMES:
            raise ProtocolError(f"more than {MAX_FRAMES} frames in one message")
    return frames
