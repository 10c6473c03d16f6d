"""The broker's I/O: one pyzmq ROUTER socket around :class:`~remoterl.broker.core.BrokerCore`.

The loop reads the clock, shuttles frames and sleeps in ``poll`` until a message or
the core's next deadline; all decisions are the core's. It stops when :meth:`Broker.stop`
is called from any thread (or a signal handler), tells the workers it is leaving,
and closes its socket.
"""

from __future__ import annotations

import logging
import socket as _socket
import threading
import time

import zmq

from remoterl.broker.core import BrokerConfig, BrokerCore

__all__ = ["Broker"]

log = logging.getLogger(__name__)

# Messages handled per wake-up before timers get a look-in.
_BATCH = 256


class Broker:
    """A broker bound to ``url``; call :meth:`run` (blocking) or :meth:`start` (a thread).

    Args:
        url: where to bind, e.g. ``tcp://127.0.0.1:5555`` or ``tcp://127.0.0.1:*``
            for a free port (read :attr:`url` after :meth:`bind`).
        config: heartbeat, liveness and limits.
    """

    def __init__(self, url: str = "tcp://127.0.0.1:5555", config: BrokerConfig | None = None,
                 context: zmq.Context | None = None) -> None:
        self.requested_url = url
        self.config = config or BrokerConfig()
        self.core = BrokerCore(self.config, time.monotonic())
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._wake_r, self._wake_w = _socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        self.bound = threading.Event()

    def bind(self) -> str:
        """Create and bind the ROUTER socket; return the bound URL (with the real port)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops a peer that sends a frame over this size; the core checks whole messages.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.bind(self.requested_url)
        self._sock = sock
        self.url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound.set()
        log.info("broker %s listening on %s", self.core.instance, self.url)
        return self.url

    def start(self) -> str:
        """Bind and run the loop in a daemon thread; return the bound URL."""
        url = self.bind()
        self._thread = threading.Thread(target=self.run, name="remoterl-broker", daemon=True)
        self._thread.start()
        return url

    def stop(self, join: bool = True, timeout: float = 5.0) -> None:
        """Ask the loop to finish (safe from other threads and from signal handlers)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def wakeup_fd(self) -> int:
        """A file descriptor for ``signal.set_wakeup_fd``: a signal then wakes the loop."""
        return self._wake_w.fileno()

    def run(self) -> None:
        """Serve until :meth:`stop`; then DISCONNECT workers and close the socket."""
        if self._sock is None:
            self.bind()
        sock, core = self._sock, self.core
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        recv, send = sock.recv_multipart, sock.send_multipart
        receive, outbox = core.receive, core.messages_to_send
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout_ms = max(0.0, core.next_deadline() - now) * 1000.0
                events = dict(poller.poll(timeout_ms))
                if self._wake_r.fileno() in events:
                    self._drain_wakeups()
                if sock in events:
                    for _ in range(_BATCH):
                        try:
                            frames = recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        receive(frames[0].bytes, frames[1:], time.monotonic())
                        for msg in outbox():
                            send(msg, copy=False)
                core.tick(time.monotonic())
                for msg in outbox():
                    send(msg, copy=False)
            core.shutdown()
            for msg in outbox():
                send(msg, copy=False)
        finally:
            self._close()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _close(self) -> None:
        if self._sock is not None:
            # Give the DISCONNECTs a moment to leave, bounded.
            self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.close()
            self._sock = None
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass
        log.info("broker %s stopped", self.core.instance)
