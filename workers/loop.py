"""The worker's I/O: a DEALER to the broker around a :class:`~remoterl.workers.runtime.SlotHost`.

One thread owns the main socket and runs env calls; a heartbeat thread with its own
socket pings the broker every ``heartbeat`` seconds, naming the main socket's routing
id, so a long env call does not make the worker look dead. When the broker goes
silent for ``heartbeat × liveness`` seconds, says it does not know this worker, or
sends DISCONNECT, the worker closes its envs (their clients are gone with the old
broker session), opens a new socket and sends READY again (RFC 7's reconnect rule).

Stopping (:meth:`WorkerLoop.stop`, e.g. from SIGTERM) lets the call in flight finish,
sends DISCONNECT and closes the socket.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import zmq

from remoterl.wire import protocol as p
from remoterl.io.link import Link, LinkClosed, LinkTransport
from remoterl.io.process import keep_signals_for_main_thread
from remoterl.errors import AuthenticationError, LimitExceededError, error_from_wire
from remoterl.io.dealer import connect_dealer, no_answer_hint
from remoterl.io.heartbeat import HeartbeatSocket
from remoterl.io.security import curve_serverkey_from_env
from remoterl.io.transport import Transport, ZmqTransport
from remoterl.io.wsgateway import resolve_endpoint
from remoterl.wire.protocol import WorkerCommand as W
from remoterl.workers.runtime import SlotHost

__all__ = ["WorkerLoop"]

log = logging.getLogger(__name__)

_CALL = p.worker_frame(W.CALL)
_REPLY = p.worker_frame(W.REPLY)


class _Stop(Exception):
    """Raised from a signal handler to leave an idle ``poll`` at once."""


class WorkerLoop:
    """Serve a slot host through the broker at ``url`` until stopped.

    Args:
        url: the broker's address, e.g. ``tcp://127.0.0.1:5555``.
        host: the slot host to serve.
        heartbeat: seconds between heartbeats (the broker's WELCOME overrides it).
        liveness: heartbeats missed before the broker is considered lost.
        name: shown in the broker's status.
    """

    def __init__(self, url: str, host: SlotHost, *, heartbeat: float = 1.0, liveness: int = 3,
                 name: str | None = None, api_key: str | None = None, curve_serverkey: str | bytes | None = None,
                 context: zmq.Context | None = None, link: Link | None = None) -> None:
        self.url = url
        self.host = host
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._ctx = context or zmq.Context.instance()
        # The main channel: a local link to the embedded broker (remoterl.io.link; it stays for
        # the worker's life, and heartbeats still go over zmq to ``url``), or a DEALER made
        # afresh by each _connect().
        self._transport: Transport | None = LinkTransport(link, heartbeat * liveness) if link is not None else None
        self.identity = b""
        self.registered = threading.Event()
        self._stopping = False
        self._in_poll = False
        self._run_thread: threading.Thread | None = None
        self._reconnect = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._api_key = api_key
        self._curve = curve_serverkey if curve_serverkey is not None else curve_serverkey_from_env()
        self._plain = False  # PLAIN credentials got the main socket through the handshake
        self.error: BaseException | None = None  # why run() gave up (e.g. AuthenticationError)
        # Attempts without an answer since the broker last answered, and when they began.
        self._unanswered = 0
        self._unanswered_since = 0.0

    # --- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the call in flight, then DISCONNECT and close (safe from signal handlers and threads)."""
        self._stopping = True
        # From a signal handler interrupting run()'s own thread while it sleeps in recv: leave now.
        if self._in_poll and threading.current_thread() is self._run_thread:
            raise _Stop

    def run(self) -> None:
        """Register with the broker and serve until :meth:`stop`.

        Raises:
            AuthenticationError, LimitExceededError: the broker refused this worker.
        """
        self._run_thread = threading.current_thread()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="remoterl-worker-heartbeat", daemon=True)
        self._hb_thread.start()
        try:
            while not self._stopping:
                if self._connect():
                    self._serve()
        except _Stop:
            pass
        except LinkClosed:  # a local link's broker is gone, and with it everything we served
            log.info("worker %s: the broker closed our link; stopping", self.name)
        finally:
            self._disconnect()
        if self.error is not None:
            raise self.error

    # --- registration -----------------------------------------------------------------------------

    def _connect(self) -> bool:
        """A fresh socket and identity (or the local link), then READY; True once the broker
        answered (always, on a link). False: no answer within ``heartbeat × liveness`` (run()
        tries again), or the broker refused us at the handshake (``self.error``; stopping)."""
        self.host.close_all()
        self._close_socket()
        self.registered.clear()
        self._reconnect.clear()
        if isinstance(self._transport, LinkTransport):
            self._transport.drop_received()  # calls of the session that ended die with it
        ready_header = {
            "v": p.PROTOCOL_VERSION, "envs": self.host.served(), "capacity": self.host.capacity,
            "name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
        }
        if self._api_key:
            ready_header["key"] = self._api_key
        ready = [p.worker_frame(W.READY), p.encode_header(ready_header)]
        if isinstance(self._transport, LinkTransport):  # the broker names us in WELCOME
            self._send(ready)
            log.info("worker %s: READY sent to %s", self.name, self.url)
            return True
        self.identity = b"W" + os.urandom(15)
        endpoint = resolve_endpoint(self.url, context=self._ctx)  # ws(s):// via the gateway
        seen: set[str] = set()
        try:
            self._in_poll = True  # SIGTERM leaves the wait at once (stop() raises _Stop)
            # Sends READY and waits for the answer, watching the tcp handshake: a key-mode
            # broker refuses a wrong key there, and we stop as for a refused READY.
            connected = connect_dealer(self._ctx, self.url, endpoint, ready, self.heartbeat * self.liveness,
                                       api_key=self._api_key, serverkey=self._curve,
                                       options=((zmq.ROUTING_ID, self.identity),), stop=lambda: self._stopping,
                                       seen=seen)
        except AuthenticationError as error:
            log.error("worker %s: the broker at %s refused us: %s", self.name, self.url, error)
            self.error = error
            self._stopping = True
            return False
        finally:
            self._in_poll = False
        if connected is None:
            if not self._stopping:
                self._no_answer(no_answer_hint(self.url, seen))
            return False
        sock, self._plain = connected
        self._transport = ZmqTransport(sock, head=3, blocking=True, linger=0.5)
        log.info("worker %s: READY sent to %s", self.name, self.url)
        return True

    def _send(self, frames: list) -> None:
        assert self._transport is not None
        self._transport.send(frames)

    def _receive(self) -> list | None:
        """The next message, or None when none came within a heartbeat."""
        assert self._transport is not None
        return self._transport.receive(self.heartbeat)

    def _welcome(self, frames: list) -> None:
        header = p.decode_header(frames[1])
        heartbeat = header.get("heartbeat")
        liveness = header.get("liveness")
        if isinstance(heartbeat, (int, float)) and heartbeat > 0:
            self.heartbeat = float(heartbeat)
        if isinstance(liveness, int) and liveness > 0:
            self.liveness = liveness
        you = header.get("you")
        if isinstance(you, bytes) and you:
            self.identity = you  # the broker's name for us (a WebSocket bridge assigns its own)
        self._last_pong = time.monotonic()
        self.registered.set()
        self._unanswered = 0
        log.info("worker %s registered with broker %s", self.name, header.get("broker"))

    def _no_answer(self, hint: str) -> None:
        """READY went unanswered (run() sends it again): say what to check, first at once, then
        at the 2nd, 4th, 8th... attempt, so a worker waiting for its broker does not flood the log."""
        if self._unanswered == 0:
            self._unanswered_since = time.monotonic()
        self._unanswered += 1
        if self._unanswered & (self._unanswered - 1) == 0:  # 1, 2, 4, 8, ...
            waited = time.monotonic() - self._unanswered_since + self.heartbeat * self.liveness
            log.warning("worker %s: no broker answered at %s for %.0f s (%d attempt%s; still trying): %s",
                        self.name, self.url, waited, self._unanswered, "" if self._unanswered == 1 else "s", hint)

    # --- serving --------------------------------------------------------------------------------------

    def _serve(self) -> None:
        # Receives wait at most a heartbeat, so stop and reconnect flags are seen.
        host, receive, send = self.host, self._receive, self._send
        reconnect = self._reconnect.is_set
        deadline = time.monotonic() + self.heartbeat * self.liveness
        while not self._stopping and not reconnect():
            self._in_poll = True
            try:
                frames = receive()
            finally:
                self._in_poll = False
            if frames is None:
                if not self.registered.is_set() and time.monotonic() > deadline:
                    self._no_answer("the broker took READY but did not welcome us: is it overloaded?")
                    return
                continue
            if frames[0] == _CALL and len(frames) >= 3:
                client = frames[1]
                header, out = host.call(client, frames[2], frames, 3)
                # Big arrays go without a copy: they are fresh per reply, so nothing changes
                # them while zmq sends.
                send([_REPLY, client, header, *out])
            else:
                self._control(frames[0], frames)

    def _control(self, frame0: bytes, frames: list) -> None:
        kind, command = p.signature(frame0)
        if kind != "rl-worker":
            log.warning("worker %s: ignoring a message with signature %r", self.name, frame0[:8])
            return
        try:
            if command == W.OPEN:
                client = frames[1]
                reply = self.host.open(client, p.decode_header(frames[2]))
                self._send([p.worker_frame(W.OPENED), client, p.encode_header(reply)])
            elif command == W.CLOSE:
                header = p.decode_header(frames[2])
                self.host.close(frames[1], header.get("slots") or [])
            elif command == W.REGISTER:
                header = p.decode_header(frames[1])
                spec = header.get("spec") if isinstance(header.get("spec"), dict) else {}
                ok, msg = self.host.register(spec)
                if not ok:
                    log.warning("worker %s: refused to register %r: %s", self.name, spec.get("id"), msg)
                self._send([p.worker_frame(W.REGISTERED), p.encode_header(
                    {"r": header.get("r"), "id": spec.get("id"), "ok": ok, "msg": msg})])
            elif command == W.WELCOME:
                self._welcome(frames)
            elif command == W.DISCONNECT:
                log.warning("worker %s: broker asked us to re-register", self.name)
                self._reconnect.set()
            elif command == W.ERROR:
                error = error_from_wire(p.decode_header(frames[1]))
                if isinstance(error, LimitExceededError):
                    # Too many new connections at the broker right now: still unregistered, the
                    # serve loop sends READY again once its registration deadline passes.
                    log.warning("worker %s: %s; trying again in %.1f s", self.name, error,
                                self.heartbeat * self.liveness)
                    return
                log.error("worker %s: the broker at %s refused us: %s", self.name, self.url, error)
                self.error = error
                self._stopping = True
            else:
                log.warning("worker %s: unexpected command 0x%02x from broker", self.name, command)
        except Exception:  # bad control input must not stop the worker
            log.exception("worker %s: failed to handle command 0x%02x", self.name, command or 0)

    # --- heartbeats -----------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Ping the broker on a side socket; flag a reconnect when it is lost or forgot us."""
        keep_signals_for_main_thread()
        beats: HeartbeatSocket | None = None
        plain = False
        frame = p.worker_frame(W.HEARTBEAT)
        stopping = lambda: self._stopping  # noqa: E731
        self._last_pong = time.monotonic()
        try:
            while not self._stopping:
                if not self.registered.wait(0.05):
                    continue
                if beats is None or plain != self._plain:
                    # Once registered: with the credentials that got the main socket through.
                    if beats is not None:
                        beats.close()
                    plain = self._plain
                    beats = HeartbeatSocket(self._ctx, self.url, serverkey=self._curve,
                                            api_key=self._api_key if plain else None)
                identity = self.identity
                ping = {"id": identity, "stats": dict(self.host.stats, slots=len(self.host.slots))}
                if self._api_key:
                    ping["key"] = self._api_key
                beats.ping(frame, ping)
                for pong in beats.pongs(time.monotonic() + self.heartbeat, stopping):
                    if pong.get("id", identity) != self.identity:
                        continue  # a pong for an identity we no longer use
                    self._last_pong = time.monotonic()
                    if not pong.get("known", True) and self.registered.is_set():
                        log.warning("worker %s: broker %s does not know us (restarted?); re-registering",
                                    self.name, pong.get("broker"))
                        self._reconnect.set()
                if self.registered.is_set() and time.monotonic() - self._last_pong > self.heartbeat * self.liveness:
                    log.warning("worker %s: broker %s silent for %.1f s; reconnecting", self.name, self.url,
                                time.monotonic() - self._last_pong)
                    self._reconnect.set()
                    self.registered.clear()
        except Exception:  # the heartbeat thread must not die silently
            log.exception("worker %s: heartbeat thread failed", self.name)
        finally:
            if beats is not None:
                beats.close()

    # --- shutdown ---------------------------------------------------------------------------------------

    def _disconnect(self) -> None:
        self._stopping = True
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close([p.worker_frame(W.DISCONNECT)] if self.registered.is_set() else None)
        self.host.close_all()
        if self._hb_thread is not None:
            self._hb_thread.join(2.0)
        log.info("worker %s stopped", self.name)

    def _close_socket(self) -> None:
        """Close the DEALER of a session that ended (a link stays: it is the worker's for life)."""
        if isinstance(self._transport, ZmqTransport):
            self._transport.close()
            self._transport = None
