"""One transport interface for a peer's main messages, whatever carries them.

A trainer's :class:`~remoterl.client.connection.Client` sends and receives through a
:class:`Transport`; which one is picked once, when it connects:

* :class:`ZmqTransport` — a DEALER socket (tcp://, ipc://, inproc://, and ws:// / wss://
  through this process's gateway);
* :class:`~remoterl.io.inprocess.InProcessTransport` — a broker running in this process
  (the embedded default), reached without a socket.

Workers speak the same interface over a DEALER or over a local link to the embedded
broker (:class:`~remoterl.io.link.LinkTransport`).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import zmq

from remoterl.io.zmqio import recv_frames, send_frames

__all__ = ["Transport", "ZmqTransport"]


class Transport(Protocol):
    """A peer's main channel to the broker."""

    def send(self, frames: list) -> None:
        """Send one message (bytes frames, and buffers for big arrays: sent without a copy)."""

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """Held around a wait made of :meth:`receive` calls."""

    def receive(self, timeout: float) -> list | None:
        """The next message (first two frames as bytes, the rest as buffers), or None when
        none came within ``timeout`` seconds."""

    def close(self, goodbye: list | None = None) -> None:
        """Close, after sending ``goodbye`` if given (best effort, bounded)."""


class ZmqTransport:
    """A :class:`Transport` over a connected DEALER socket.

    Args:
        sock: the socket.
        head: leading frames received as bytes (a trainer's: signature and header; a
            worker's: signature, client id and header); the rest, arrays, as zmq frames.
        blocking: wait in ``recv`` with a receive timeout instead of polling first: one
            call per message where messages usually wait (a busy worker), where polling
            first saves an exception when they usually do not (a trainer waiting for a reply).
        linger: seconds :meth:`close` lets a goodbye leave.
    """

    def __init__(self, sock: zmq.Socket, head: int = 2, blocking: bool = False, linger: float = 0.2) -> None:
        self.sock = sock
        self._linger = linger
        self._head = head
        self._blocking = blocking
        self._rcvtimeo = -1
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        self._poll = poller.poll  # reused: half the cost of Socket.poll per call
        self._send = sock.send

    def send(self, frames: list) -> None:
        # copy=True is cheaper for small frames; arrays (only present when big, after the three
        # frames every call and reply starts with) go without a copy.
        send_frames(self._send, frames, copy=len(frames) <= 3)

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def receive(self, timeout: float) -> list | None:
        sock = self.sock
        if self._blocking:
            ms = max(1, int(timeout * 1000))
            if ms != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self._rcvtimeo = ms
            try:
                first = sock.recv()
            except zmq.Again:
                return None
            return recv_frames(sock, self._head, first)
        if not self._poll(timeout * 1000):
            return None
        return recv_frames(sock, self._head)

    def close(self, goodbye: list | None = None) -> None:
        if goodbye is not None:
            try:
                self.sock.send_multipart(goodbye, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.sock.setsockopt(zmq.LINGER, int(self._linger * 1000))  # a moment to leave, bounded
        self.sock.close()
