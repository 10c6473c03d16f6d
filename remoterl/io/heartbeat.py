"""The one heartbeat helper: a side DEALER that pings a broker and reads its pongs.

Trainers and workers ping from a socket of their own, in a thread of their own, naming
the main socket's routing id: a trainer busy for minutes in a gradient update, or a
worker in a slow ``step``, keeps its session. The broker answers each ping with a pong
saying whether it still knows the session (``known``); each owner decides what silence
or a forgotten session means (a trainer's calls fail, a worker registers again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import zmq

from remoterl.io.dealer import dealer
from remoterl.io.wsgateway import resolve_endpoint
from remoterl.wire import protocol as p

__all__ = ["HeartbeatSocket"]

# How often a wait for pongs looks at its stop flag.
_SLICE = 0.1


class HeartbeatSocket:
    """A DEALER to the broker at ``url`` for pings and pongs.

    Args:
        context: the zmq context.
        url: the broker's URL (ws:// and wss:// go through this process's gateway).
        serverkey: the broker's CURVE public key, if it uses CURVE.
        api_key: PLAIN credentials: pass the key only if they got the main socket through
            the handshake (``connect_dealer`` says so), as the side socket must match it.
    """

    def __init__(self, context: zmq.Context, url: str, *, serverkey: str | bytes | None = None,
                 api_key: str | None = None) -> None:
        self._sock = dealer(context, resolve_endpoint(url, context=context), serverkey=serverkey, api_key=api_key)

    def ping(self, frame: bytes, header: dict) -> None:
        """Send one ping: the HEARTBEAT command ``frame`` and its header."""
        self._sock.send_multipart([frame, p.encode_header(header)])

    def pongs(self, until: float, stop: Callable[[], bool]) -> Iterator[dict]:
        """The pongs' headers that arrive before ``until`` (a ``time.monotonic()`` time);
        ends early, within 0.1 s, once ``stop()`` is true."""
        sock = self._sock
        while not stop() and (remaining := until - time.monotonic()) > 0:
            if sock.poll(min(remaining, _SLICE) * 1000):
                yield p.decode_header(sock.recv_multipart()[1])

    def close(self) -> None:
        self._sock.close(0)
