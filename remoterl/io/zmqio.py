"""Two small pyzmq helpers for the per-message paths of every loop.

``Socket.send_multipart`` combines ``zmq.SNDMORE | flags`` as enum members on every
frame, which costs more than sending the frames themselves (measured: 5.2 µs vs
1.4 µs for a 3-frame message). These helpers use plain int flags.
"""

from __future__ import annotations

from typing import Any, Callable

import zmq

__all__ = ["recv_frames", "send_frames"]

_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)


def send_frames(send: Callable[..., Any], frames: list, copy: bool = True, flags: int = 0) -> None:
    """Send ``frames`` as one multipart message with ``send`` (a ``Socket.send``).

    With ``copy=True`` bytes are copied (cheapest for small frames) and ``zmq.Frame``
    objects are still sent without a copy; pass ``copy=False`` for big buffers.
    ``flags`` (``zmq.NOBLOCK``) go with every frame; a ROUTER raises on the first frame
    or not at all (a multipart message is queued whole).
    """
    more, last = _SNDMORE | flags, len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, more if i < last else flags, copy=copy)


def recv_frames(sock: zmq.Socket, as_bytes: int, first: Any = None) -> list:
    """Receive the rest of a multipart message: the first ``as_bytes`` frames as bytes
    (cheap for small frames), later ones as ``zmq.Frame`` (no copy of payloads).

    Args:
        first: the first frame if already received (it counts towards ``as_bytes``).
    """
    recv, more = sock.recv, sock.getsockopt
    frames = [sock.recv()] if first is None else [first]
    while more(_RCVMORE):
        frames.append(recv(copy=len(frames) < as_bytes))
    return frames
