"""The fd an in-process peer makes readable to wake the broker's thread from ``poll``.

An in-process peer (``remoterl.broker.loop``, "in-process peers") that finds the
broker's thread asleep in ``poll`` wakes it through this fd, which that poll also
watches: an eventfd on Linux, a pipe elsewhere. Both ends are nonblocking: a wake-up
that finds the fd readable already is enough as it is, and clearing reads until empty.
"""

from __future__ import annotations

import os
import sys
import weakref

__all__ = ["Waker"]

_ONE = (1).to_bytes(8, sys.byteorder)  # an eventfd adds this number; a pipe takes 8 bytes


class Waker:
    """A readable fd (:attr:`fd`, for the poll) and the means to make it readable.

    The fds are closed with the object, never before: a peer may still wake a broker that
    has stopped.
    """

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.fd = self._write = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self.fd, self._write = os.pipe()
            for fd in (self.fd, self._write):
                os.set_blocking(fd, False)
        weakref.finalize(self, _close_fds, {self.fd, self._write})

    def wake(self) -> None:
        """Make :attr:`fd` readable (from any thread)."""
        try:
            os.write(self._write, _ONE)
        except BlockingIOError:
            pass  # already readable: enough to wake the poll

    def clear(self) -> None:
        """Read :attr:`fd` empty, so the next poll sleeps again."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass


def _close_fds(fds: set[int]) -> None:
    for fd in fds:
        os.close(fd)
