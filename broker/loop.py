"""The broker's I/O: one pyzmq ROUTER socket around :class:`~remoterl.broker.core.BrokerCore`.

The loop reads the clock, shuttles frames and sleeps in ``poll`` until a message or
the core's next deadline; all decisions are the core's. It stops when :meth:`Broker.stop`
is called from any thread (or a signal handler), tells the workers it is leaving,
and closes its socket.

Theory of operation: in-process peers and local links
-----------------------------------------------------
A broker that runs in a thread of a trainer (the embedded default) takes two
shortcuts; both carry the same messages as the socket, and the core cannot tell.

*In-process peers.* A client of the same process (a ``remoterl.client.connection.Client``
over ``remoterl.io.inprocess.InProcessTransport``) skips its own socket: it hands its frames straight to the core (:meth:`Broker.submit`)
and, while it waits for a reply, runs this loop itself in its own thread
(:meth:`Broker.serve`). Per step that saves the two thread wake-ups of a hop through
the broker's thread. The socket and the core belong to whichever thread holds
:attr:`Broker._loop` (a lock): the broker's own thread, or a peer inside
:meth:`Broker.driving`. A peer that finds the broker's thread asleep in ``poll``
wakes it through an fd that the poll also watches (``remoterl.broker.waker``).
The broker's thread does not take the loop back while a peer is inside ``driving``
or left it less than :data:`LINGER` ago, so a trainer stepping back to back keeps
the loop from one step to the next and never pays that wake-up; once it pauses for
longer (a gradient update), the broker's thread serves everyone else again.
Messages for an in-process peer go to its ``deliver`` function, in whichever thread
runs the loop at the time.

*Local links.* A worker process started by the trainer talks to the broker over one
end of a socketpair (:meth:`Broker.add_link`) instead of zmq; the link's fd sits in
the same poll (``remoterl.broker.links``).

``bench/timeline.py`` shows where a step's time goes on this path.

Keys at the handshake (key mode)
--------------------------------
With API keys and no CURVE, the socket is a PLAIN server (ZeroMQ RFC 24, ZAP domain
``remoterl``) and this loop is its ZAP handler (RFC 27): a REP socket at
``inproc://zeromq.zap.01`` of the broker's context, in the same poll as everything else
(:meth:`_zap_reply`). libzmq asks it once per tcp/ipc connection, before the connection
may deliver anything; it accepts username ``remoterl`` with a valid API key as password
(checked like HELLO's key: hashed, constant time, against the keys of the moment, so a
SIGHUP reload applies to the next connection) and answers 400 otherwise; counted as
``handshakes_accepted`` / ``handshakes_refused``. A peer without credentials never gets
that far: libzmq refuses the mechanism mismatch in its I/O thread. Either way a peer
without a valid key cannot put one message in front of this loop. That matters
because libzmq's MAXMSGSIZE bounds a frame, not the number of frames, and hands over a
multipart message whole: before, one message of 3,000,000 empty frames (6 MB on the
wire) from a keyless peer kept this loop reading (and :meth:`_drain` discarding) for
7.8 s on the test machine: a trainer's step took 7.8 s, and in one run of two the
trainer lost its session (its heartbeats went unanswered for longer than liveness). With the handshake check the same message
is never delivered: no ``too_many_frames``, and the trainer's steps stay at p50 0.65 ms,
max 18 ms, during the attack (CLI broker and worker, a RemoteEnvVec of 8 CartPole envs,
all on 127.0.0.1; a wrong key instead: one ``handshakes_refused``, max step 14 ms). A ZAP
answer costs this loop about 7 µs (100 keys); a client learns of a refused key within a
millisecond, of a missing key within 0.1-0.2 s (``remoterl.io.security.connect_dealer``).
HELLO/READY still carry the key too, and the core still checks it: in-process peers,
local links and the WebSocket bridge (all inproc, where ZeroMQ has no handshake) are
checked there, as is every peer in CURVE mode.

With ``curve_secret`` the socket is a CURVE server instead, and a socket has one
mechanism: no PLAIN and no ZAP there. CURVE refuses peers that lack the broker's public
key, but that key is handed to every trainer and worker: a peer that has it and no API
key still gets its messages to this loop, where the key is checked in HELLO/READY and
the frame limit and :meth:`_drain` bound an oversized message (the stall measured above).

A ZAP handler belongs to a zmq context: two key-mode brokers of one process need two
contexts (``Broker(..., context=zmq.Context())``); binding the second raises.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from typing import Any, Callable

import zmq

from remoterl.broker.core import BrokerConfig, BrokerCore
from remoterl.broker.links import Links
from remoterl.broker.waker import Waker
from remoterl.errors import BrokerUnavailableError
from remoterl.io import inprocess
from remoterl.io.security import PLAIN_USERNAME, ZAP_DOMAIN
from remoterl.io.zmqio import send_frames
from remoterl.wire import protocol as p
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["Broker", "LINGER"]

log = logging.getLogger(__name__)

# The longest the loop sleeps in poll: how soon it notices stop() (from a thread or a signal).
_MAX_WAIT = 0.25
# How long the broker's thread leaves the loop to an in-process peer after its last call:
# longer than a trainer's work between two steps (a policy's forward pass), shorter than
# anything the other peers would notice.
LINGER = 0.002

class Broker:
    """A broker bound to ``url``; call :meth:`run` (blocking) or :meth:`start` (a thread).

    Args:
        url: where to bind, e.g. ``tcp://127.0.0.1:5555`` or ``tcp://127.0.0.1:*``
            for a free port (read :attr:`url` after :meth:`bind`).
        config: heartbeat, liveness and limits.
        also: more endpoints on the same socket; an ``inproc://`` one also makes the broker
            reachable by in-process peers (``remoterl.io.inprocess``).
        curve_secret: CURVE for tcp peers (inproc ones are exempt).

    With ``config.api_keys`` and no ``curve_secret``, tcp/ipc peers must present a valid
    API key at the ZeroMQ handshake (PLAIN, answered by this loop as the context's ZAP
    handler: module docstring); the context must have no other ZAP handler.
    """

    def __init__(self, url: str = "tcp://127.0.0.1:5555", config: BrokerConfig | None = None,
                 context: zmq.Context | None = None, also: tuple[str, ...] = (),
                 curve_secret: str | None = None) -> None:
        self.requested_url = url
        self.also = also
        self.curve_secret = curve_secret
        self.config = config or BrokerConfig()
        if self.config.first_slot is None:
            # Slot ids no other instance of this broker gave out (BrokerConfig.first_slot): a
            # random 31-bit prefix, then 2**20 ids of its own (still exact as JSON numbers).
            self.config = dataclasses.replace(self.config, first_slot=(secrets.randbelow(1 << 31) << 20) + 1)
        self.core = BrokerCore(self.config, time.monotonic(), wall_started=time.time())
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._zap: zmq.Socket | None = None  # the ZAP handler in key mode (bind)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        self.bound = threading.Event()
        # In-process peers: see the module docstring.
        self._loop = threading.Lock()
        self._local: dict[bytes, Callable[[list], None]] = {}
        self._drivers = 0  # in-process peers inside driving() (or queued to enter)
        self._drivers_lock = threading.Lock()
        self._driving = _Driving(self)
        self._released = 0.0  # when the last one left
        self._waker = Waker()  # what an in-process peer makes readable to wake the broker's thread
        self._idle = threading.Event()  # set by stop(): ends the broker thread's lingering
        # The sockets, the wake-up fd and the local links' fds, all in one poll.
        self._poll = zmq.Poller()
        self._links = Links(self._poll, self.config.max_message_size, self.core.receive, self._link_lost)

    def bind(self) -> str:
        """Create and bind the ROUTER socket; return the bound URL (with the real port).

        Raises:
            RuntimeError: key mode, and this context already has a ZAP handler (another
                key-mode broker of this process): give this one its own context.
            zmq.ZMQError: the endpoint cannot be bound.
        """
        zap = None
        if self.config.api_keys is not None and not self.curve_secret:
            # Key mode: tcp/ipc peers must show a valid key at the handshake (module docstring).
            zap = self._bind_zap()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops a peer that sends a frame over this size; the core checks whole messages.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        # A message for a peer that is gone or whose queue is full raises instead of vanishing,
        # so the core can answer for it (BrokerCore.undeliverable): nothing is dropped unsaid.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            if self.curve_secret:
                from remoterl.io.security import apply_curve_server

                apply_curve_server(sock, self.curve_secret)
            elif zap is not None:
                sock.plain_server = True
                sock.zap_domain = ZAP_DOMAIN
            sock.bind(self.requested_url)
            self.url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            for endpoint in self.also:
                sock.bind(endpoint)
        except BaseException:
            sock.close(0)
            if zap is not None:
                zap.close(0)
            raise
        self._sock = sock
        self._zap = zap
        self._poll.register(sock, zmq.POLLIN)
        self._poll.register(self._waker.fd, zmq.POLLIN)
        if zap is not None:
            self._poll.register(zap, zmq.POLLIN)
        self._poll_poll = self._poll.poll
        self._hot = (sock, sock.recv, sock.getsockopt, self.core.receive)
        for endpoint in self.also:
            if endpoint.startswith("inproc://"):
                inprocess.register(endpoint, self)
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
        self._idle.set()
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called or the socket is closed."""
        return self._stopping or self._sock is None

    def run(self) -> None:
        """Serve until :meth:`stop`; then DISCONNECT workers and close the socket."""
        if self._sock is None:
            self.bind()
        core, loop, monotonic = self.core, self._loop, time.monotonic
        try:
            while not self._stopping:
                # An in-process peer stepping back to back keeps the loop (module docstring).
                while self._drivers or (self._released and (wait := self._released + LINGER - monotonic()) > 0):
                    if self._idle.wait(LINGER if self._drivers else wait):
                        break
                if self._stopping:
                    break
                with loop:
                    # Wake for the core's next deadline, and at least every _MAX_WAIT to notice stop().
                    self.serve(min(core.next_deadline() - monotonic(), _MAX_WAIT))
        finally:
            with loop:
                core.shutdown()
                self._flush()
                self._close()

    def serve(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for one message, handle it and run the core's timers.

        The caller holds the loop: the broker's own thread, or an in-process peer inside
        :meth:`driving`.
        """
        sock, recv, more, receive = self._hot  # bound once in bind(): the per-message path
        for target, flags in self._poll_poll(max(timeout, 0.0) * 1000.0):  # (socket or fd, poll flags)
            if target is sock:
                # Routing id, signature and the next two frames (worker/client id, header)
                # as bytes (cheaper for small frames); payload frames as zmq.Frame (no copy).
                sender = recv()
                frames = []
                while more(_RCVMORE):
                    if len(frames) == _MAX_FRAMES:
                        self._drain(sender, frames)
                        break
                    frames.append(recv(copy=len(frames) < 3))
                else:
                    receive(sender, frames, time.monotonic())
            elif target is self._zap:  # a tcp/ipc peer's handshake, in key mode
                self._on_zap()
            elif target == self._waker.fd:  # an in-process peer wants the loop: just leave poll
                self._waker.clear()
            else:
                self._links.on_ready(target, flags)
        self.core.tick(time.monotonic())
        self._flush()

    def _drain(self, sender: bytes, head: list) -> None:
        """Discard the rest of a message of more than MAX_FRAMES frames without keeping it.

        libzmq hands over a multipart message whole, so nobody else's message can be read
        until this one is; meanwhile the core's timers keep running (MDP heartbeats, open
        deadlines), and the time spent here is excused to every peer (none expires for a
        silence the broker could not hear) and answered with pongs to their heartbeat sockets
        (none gives the broker up): :meth:`BrokerCore.excuse`.
        """
        sock, core, monotonic = self._sock, self.core, time.monotonic
        into, more, scratch = sock.recv_into, sock.getsockopt, bytearray(64)  # type: ignore[union-attr]
        started = mark = monotonic()
        count = len(head)
        while more(_RCVMORE):
            into(scratch)  # frames longer than scratch are truncated: they are dropped anyway
            count += 1
            if count & 0x1FFF == 0 and (now := monotonic()) - mark >= self.config.heartbeat / 4:
                core.excuse(now - mark)
                mark = now
                core.tick(now)
                self._flush()
        now = monotonic()
        core.excuse(now - mark)
        core.refuse_frames(sender, head[:3], count, now - started)

    # --- authentication at the handshake (ZAP, key mode) ----------------------------------------------

    def _bind_zap(self) -> zmq.Socket:
        """This context's ZAP handler socket (RFC 27): a REP at ``inproc://zeromq.zap.01``."""
        zap = self._ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        try:
            zap.bind(_ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            zap.close(0)
            if exc.errno != zmq.EADDRINUSE:
                raise
            raise RuntimeError(
                f"another ZAP handler is bound at {_ZAP_ENDPOINT} in this zmq context (a second broker with "
                f"API keys in this process?): give each such broker its own context, "
                f"Broker(..., context=zmq.Context())") from exc
        return zap

    def _on_zap(self) -> None:
        """Answer one ZAP request: PLAIN, username ``remoterl``, a valid API key as password."""
        zap = self._zap
        try:
            request = zap.recv_multipart(_NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            return
        zap.send_multipart(self._zap_reply(request))  # type: ignore[union-attr]

    def _zap_reply(self, request: list[bytes]) -> list[bytes]:
        """The reply frames for one ZAP request (never naming the key)."""
        core = self.core
        if len(request) < 6 or request[0] != b"1.0":
            core.counters["handshakes_refused"] += 1
            request_id = request[1] if len(request) >= 2 else b""
            return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        _version, request_id, domain, address, _identity, mechanism, *credentials = request
        tenant = None
        if domain != ZAP_DOMAIN:
            reason = "unknown ZAP domain"
        elif mechanism != b"PLAIN" or len(credentials) != 2 or credentials[0] != PLAIN_USERNAME:
            reason = "remoterl peers authenticate with PLAIN, username remoterl"
        else:
            try:
                tenant = core.tenant_of(credentials[1].decode())  # hashed, constant time; current keys
            except UnicodeDecodeError:
                tenant = None
            reason = "wrong API key"
        if tenant is None:
            core.counters["handshakes_refused"] += 1
            core.outbox.warn("refused a connection from %s at the handshake: %s",
                             address.decode("utf-8", "replace"), reason)
            return [b"1.0", request_id, b"400", reason.encode(), b"", b""]
        core.tenants.count("handshakes_accepted", tenant)
        return [b"1.0", request_id, b"200", b"OK", tenant.encode(), b""]

    def _flush(self) -> None:
        # copy=True sends bytes by copying (fast for small frames) and zmq.Frame objects
        # without a copy, so payload frames pass through untouched.
        for _ in range(3):  # what the core answers for undeliverable messages, and no more rounds
            failed = self._send_out()
            if not failed:
                return
            for msg, full in failed:
                self.core.undeliverable(msg, full)

    def _send_out(self) -> list:
        out = self.core.messages_to_send()
        if not out:
            return out
        send, local, links = self._sock.send, self._local, self._links.by_peer  # type: ignore[union-attr]
        broken, failed = None, []
        sent = 0  # message bytes after the routing id (for the metrics), counted once per flush
        for msg in out:
            peer = msg[0]
            sent += sum(map(len, msg)) - len(peer)
            if local and peer in local:
                local[peer](msg[1:])
            elif links and peer in links:
                if not self._links.send(peer, msg[1:]):
                    broken = [*(broken or ()), peer]
            else:
                try:
                    send_frames(send, msg, flags=_NOBLOCK)
                except zmq.Again:  # the peer's queue is full (ROUTER_MANDATORY)
                    failed.append((msg, True))
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    failed.append((msg, False))  # no such peer (any more)
        self.core.counters["bytes_out"] += sent
        for peer in broken or ():
            self._links.drop(peer, "its link broke")
        return failed

    # --- local links ------------------------------------------------------------------------------

    def add_link(self, sock: Any) -> bytes:
        """Serve a peer on one end of a local stream socket (``remoterl.io.link``); return its id.

        Call from any thread but one inside :meth:`driving`. The peer is the same to the
        core as one on the ROUTER socket; when the link closes, the core hears DISCONNECT.
        """
        with self.driving():
            return self._links.add(sock)

    def _link_lost(self, peer: bytes) -> None:
        """A local link was dropped: its worker leaves the core at once."""
        if peer in self.core.workers:  # its slots fail now instead of at the heartbeat timeout
            self.core.receive(peer, [p.worker_frame(W.DISCONNECT)], time.monotonic())
            self._flush()

    # --- in-process peers ----------------------------------------------------------------------

    def attach(self, identity: bytes, deliver: Callable[[list], None]) -> None:
        """Register an in-process peer: messages for ``identity`` go to ``deliver(frames)``,
        called in whichever thread runs the loop at the time (keep it short and thread-safe)."""
        self._local[identity] = deliver

    def detach(self, identity: bytes) -> None:
        """Forget an in-process peer (its messages are sent to the socket again, and dropped there)."""
        self._local.pop(identity, None)

    def driving(self) -> _Driving:
        """Hold the loop in this thread (``with broker.driving():``): then :meth:`submit`
        and :meth:`serve` may be called.

        Raises:
            BrokerUnavailableError: the broker has stopped.
        """
        return self._driving

    def _take_loop(self) -> None:
        with self._drivers_lock:
            self._drivers += 1
        if not self._loop.acquire(blocking=False):
            self._waker.wake()  # the broker's thread sleeps in poll: wake it
            self._loop.acquire()
        if self._sock is None:
            self._give_loop()
            raise BrokerUnavailableError(f"the broker at {self.url} has stopped")

    def _give_loop(self) -> None:
        self._released = time.monotonic()
        self._loop.release()
        with self._drivers_lock:
            self._drivers -= 1

    def submit(self, sender: bytes, frames: list) -> None:
        """Hand one message from an in-process peer to the core (inside :meth:`driving`)."""
        self.core.receive(sender, frames, time.monotonic())
        self._flush()

    def _close(self) -> None:
        self._links.close()
        for endpoint in self.also:
            inprocess.unregister(endpoint, self)
        if self._sock is not None:
            self._poll.unregister(self._sock)
            # Give the DISCONNECTs a moment to leave, bounded.
            self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.close()
            self._sock = None
        if self._zap is not None:  # after the socket it answers for
            self._poll.unregister(self._zap)
            self._zap.close(0)
            self._zap = None
        log.info("broker %s stopped", self.core.instance)


class _Driving:
    """``with broker.driving():`` — a plain object, cheaper than a generator per call."""

    __slots__ = ("broker",)

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def __enter__(self) -> Broker:
        self.broker._take_loop()
        return self.broker

    def __exit__(self, *exc: object) -> None:
        self.broker._give_loop()


# Plain ints: zmq's flag enums cost a microsecond per operation on the per-message path.
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_MAX_FRAMES = p.MAX_FRAMES
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a context's ZAP handler (RFC 27)
