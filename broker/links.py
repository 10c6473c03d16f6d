"""Local links: worker processes of the trainer's host, served over one end of a socketpair.

Theory of operation
-------------------
A worker process started by the trainer talks to the broker over one end of a
socketpair (:meth:`remoterl.broker.loop.Broker.add_link`, ``remoterl.io.link``) instead
of zmq, whose I/O threads would add two wake-ups on each side of every message. The
core cannot tell: a link's messages reach :meth:`~remoterl.broker.core.BrokerCore.receive`
as a ROUTER peer's would, under a routing id made here (``W`` and 15 random bytes).

:class:`Links` keeps the links of one broker and their fds in the broker loop's poll.
Writes that the kernel does not take at once wait in the link's queue until the fd is
writable, so a busy worker never blocks the loop. A link that closes, breaks or
carries a malformed message is dropped, and the broker is told at once (``lost``), so
its worker's slots fail now instead of at the heartbeat timeout.

Everything here runs in whichever thread holds the broker's loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from remoterl.errors import ProtocolError
from remoterl.io.link import Link, LinkClosed

__all__ = ["Links"]

log = logging.getLogger(__name__)

_POLLIN, _POLLOUT, _POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)


class Links:
    """The local links of one broker, by the routing id the core knows each by.

    Args:
        poll: the broker loop's poller; each link's fd is registered there.
        max_message_size: the largest message a link accepts.
        receive: the core's ``receive(peer, frames, now)``.
        lost: called with a link's routing id after the link was dropped.
    """

    def __init__(self, poll: zmq.Poller, max_message_size: int,
                 receive: Callable[[bytes, list, float], None], lost: Callable[[bytes], None]) -> None:
        self.by_peer: dict[bytes, Link] = {}  # read on the send path: keep it a plain dict
        self._by_fd: dict[int, bytes] = {}
        self._poll = poll
        self._max_message_size = max_message_size
        self._receive = receive
        self._lost = lost

    def __len__(self) -> int:
        return len(self.by_peer)

    def add(self, sock: Any) -> bytes:
        """Serve the peer on ``sock``, one end of a local stream socket; return its routing id."""
        link = Link(sock, self._max_message_size)
        identity = b"W" + os.urandom(15)
        self.by_peer[identity] = link
        self._by_fd[link.fileno()] = identity
        self._poll.register(link.fileno(), zmq.POLLIN)
        return identity

    def send(self, peer: bytes, frames: list) -> bool:
        """Send (or queue) one message to ``peer``; False when its link broke."""
        link = self.by_peer[peer]
        try:
            link.send(frames)
        except LinkClosed:
            return False
        if link.wants_write:
            self._poll.modify(link.fileno(), _POLLIN | _POLLOUT)
        return True

    def on_ready(self, fd: int, events: int) -> None:
        """The poll found ``fd`` ready: write what waits, hand what arrived to the core."""
        peer = self._by_fd.get(fd)
        if peer is None:
            return
        link = self.by_peer[peer]
        try:
            if events & _POLLOUT and link.flush():
                self._poll.modify(fd, _POLLIN)
            if events & (_POLLIN | _POLLERR):
                for frames in link.receive():
                    self._receive(peer, frames, time.monotonic())
        except LinkClosed:
            self.drop(peer, "its link closed")
        except ProtocolError as exc:
            log.warning("dropping the local link of worker %s: %s", peer.hex(), exc)
            self.drop(peer, str(exc))

    def drop(self, peer: bytes, reason: str) -> None:
        """Close ``peer``'s link (if it still has one) and tell the broker."""
        link = self.by_peer.pop(peer, None)
        if link is None:
            return
        self._by_fd.pop(link.fileno(), None)
        self._poll.unregister(link.fileno())
        link.close()
        log.info("local worker %s: %s", peer.hex(), reason)
        self._lost(peer)

    def close(self) -> None:
        """Send what the kernel takes now (the DISCONNECTs) and close every link."""
        for link in self.by_peer.values():
            try:
                link.flush()
            except LinkClosed:
                pass
            link.close()
        for fd in self._by_fd:
            self._poll.unregister(fd)
        self.by_peer.clear()
        self._by_fd.clear()
