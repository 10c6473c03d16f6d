"""Brokers running in this process, and the transport that reaches one without a socket.

The embedded default runs its broker in a thread of the trainer's process. A broker
registers the ``inproc://`` endpoints it binds (:func:`register`); a client asks
:func:`broker_at` for its URL and, when one is there, talks to it through an
:class:`InProcessTransport` instead of a socket: it hands each message straight to the
broker's core and, while it waits for a reply, runs the broker's loop in its own thread,
which saves two thread wake-ups per round trip (the broker's side is described in
``remoterl.broker.loop``, "in-process peers"). The registry is explicit: nothing here
imports the broker, and a process that started no broker has none.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import zmq

from remoterl.errors import BrokerUnavailableError

__all__ = ["InProcessBroker", "InProcessTransport", "broker_at", "register", "unregister"]


class InProcessBroker(Protocol):
    """What an in-process transport needs of a broker (``remoterl.broker.loop.Broker``)."""

    url: str

    @property
    def stopping(self) -> bool: ...

    def attach(self, identity: bytes, deliver: Callable[[list], None]) -> None: ...

    def detach(self, identity: bytes) -> None: ...

    def driving(self) -> contextlib.AbstractContextManager[Any]: ...

    def submit(self, sender: bytes, frames: list) -> None: ...

    def serve(self, timeout: float) -> None: ...


_brokers: dict[str, tuple[int, InProcessBroker]] = {}
_lock = threading.Lock()


def register(endpoint: str, broker: InProcessBroker) -> None:
    """``broker`` is bound at ``endpoint`` (an ``inproc://`` endpoint) in this process."""
    with _lock:
        _brokers[endpoint] = (os.getpid(), broker)


def unregister(endpoint: str, broker: InProcessBroker) -> None:
    """``broker`` no longer serves ``endpoint`` (it stopped)."""
    with _lock:
        if _brokers.get(endpoint, (0, None))[1] is broker:
            del _brokers[endpoint]


def broker_at(url: str) -> InProcessBroker | None:
    """The running broker of this process bound at ``url``, if any (a forked child has none)."""
    with _lock:
        pid, broker = _brokers.get(url, (0, None))
    if broker is None or pid != os.getpid() or broker.stopping:
        return None
    return broker


class InProcessTransport:
    """A client's messages to and from an in-process broker (see the module docstring).

    Raises (from every method):
        BrokerUnavailableError: the broker has stopped.
    """

    def __init__(self, broker: InProcessBroker, identity: bytes) -> None:
        self._broker = broker
        self._identity = identity
        # Messages for this client, put here by whichever thread runs the broker's loop.
        self._inbox: collections.deque = collections.deque()
        self._driven: InProcessBroker | None = None
        broker.attach(identity, self._inbox.append)

    def send(self, frames: list) -> None:
        if len(frames) > 3:  # arrays (only present when big) travel on without a copy
            frames = [f if type(f) is bytes else zmq.Frame(f, copy=False) for f in frames]
        if self._driven is not None:
            self._driven.submit(self._identity, frames)
            return
        with self._broker.driving() as broker:
            broker.submit(self._identity, frames)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Hold the broker's loop for a wait: :meth:`receive` runs it."""
        with self._broker.driving() as broker:
            self._driven = broker
            try:
                yield
            finally:
                self._driven = None

    def receive(self, timeout: float) -> list | None:
        """The next message for this client; runs the broker's loop up to ``timeout`` s for it
        (inside :meth:`waiting`). None if nothing came."""
        if self._inbox:
            return self._inbox.popleft()
        broker = self._driven
        if broker is None:
            return None
        if broker.stopping:
            raise BrokerUnavailableError(f"the broker at {broker.url} has stopped")
        broker.serve(timeout)
        return self._inbox.popleft() if self._inbox else None

    def close(self, goodbye: list | None = None) -> None:
        """Detach from the broker, after sending ``goodbye`` (best effort)."""
        if goodbye is not None:
            try:
                self.send(goodbye)
            except BrokerUnavailableError:
                pass
        self._broker.detach(self._identity)
