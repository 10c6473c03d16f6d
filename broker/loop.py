"""The broker's I/O: one pyzmq ROUTER socket around :class:`~remoterl.broker.core.BrokerCore`.

The loop reads the clock, shuttles frames and sleeps in ``poll`` until a message or
the core's next deadline; all decisions are the core's. It stops when :meth:`Broker.stop`
is called from any thread (or a signal handler), tells the workers it is leaving,
and closes its socket.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from remoterl._zmqio import send_frames
from remoterl.broker.core import BrokerConfig, BrokerCore

__all__ = ["Broker"]

log = logging.getLogger(__name__)

# The longest the loop sleeps in poll: how soon it notices stop() (from a thread or a signal).
_MAX_WAIT = 0.25


class Broker:
    """A broker bound to ``url``; call :meth:`run` (blocking) or :meth:`start` (a thread).

    Args:
        url: where to bind, e.g. ``tcp://127.0.0.1:5555`` or ``tcp://127.0.0.1:*``
            for a free port (read :attr:`url` after :meth:`bind`).
        config: heartbeat, liveness and limits.
    """

    def __init__(self, url: str = "tcp://127.0.0.1:5555", config: BrokerConfig | None = None,
                 context: zmq.Context | None = None, also: tuple[str, ...] = (),
                 curve_secret: str | None = None) -> None:
        self.requested_url = url
        self.also = also  # more endpoints on the same socket, e.g. inproc:// for an in-process trainer
        self.curve_secret = curve_secret  # CURVE for tcp peers (inproc ones are exempt)
        self.config = config or BrokerConfig()
        self.core = BrokerCore(self.config, time.monotonic())
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
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
        if self.curve_secret:
            from remoterl.security import apply_curve_server

            apply_curve_server(sock, self.curve_secret)
        sock.bind(self.requested_url)
        self.url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        for endpoint in self.also:
            sock.bind(endpoint)
        self._sock = sock
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
        """Ask the loop to finish within a quarter second (safe from threads and signal handlers)."""
        self._stopping = True
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        """Serve until :meth:`stop`; then DISCONNECT workers and close the socket."""
        if self._sock is None:
            self.bind()
        sock, core = self._sock, self.core
        assert sock is not None
        poll = zmq.Poller()
        poll.register(sock, zmq.POLLIN)
        poll = poll.poll  # a reused Poller: about half the cost of Socket.poll per call
        recv, more, send = sock.recv, sock.getsockopt, sock.send
        receive, outbox, tick = core.receive, core.messages_to_send, core.tick
        RCVMORE = int(zmq.RCVMORE)
        monotonic = time.monotonic
        try:
            while not self._stopping:
                now = monotonic()
                # Wake for the core's next deadline, and at least every _MAX_WAIT to notice stop().
                timeout = min(core.next_deadline() - now, _MAX_WAIT)
                if poll(max(timeout, 0.0) * 1000.0):
                    # Routing id, signature and the next two frames (worker/client id, header)
                    # as bytes (cheaper for small frames); payload frames as zmq.Frame (no copy).
                    sender = recv()
                    frames = []
                    while more(RCVMORE):
                        frames.append(recv(copy=len(frames) < 3))
                    receive(sender, frames, monotonic())
                    # copy=True sends bytes by copying (fast for small frames) and zmq.Frame
                    # objects without a copy, so payload frames pass through untouched.
                    for msg in outbox():
                        send_frames(send, msg)
                tick(monotonic())
                for msg in outbox():
                    send_frames(send, msg)
            core.shutdown()
            for msg in outbox():
                send_frames(send, msg)
        finally:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            # Give the DISCONNECTs a moment to leave, bounded.
            self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.close()
            self._sock = None
        log.info("broker %s stopped", self.core.instance)
