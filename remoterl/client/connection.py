"""A trainer's connection to a broker: the session (sans-I/O) over a transport.

:class:`Client` is what ``RemoteEnv`` and ``RemoteEnvVec`` are built on. It says
HELLO, opens slots, sends batched calls to the workers that hold them (one message
per worker) and waits for the replies, every wait bounded by a timeout. What the
messages say is the session's business (:class:`~remoterl.client.session.ClientCore`);
how they travel is the transport's (:mod:`remoterl.io.transport`): a DEALER socket, or,
for a broker running in this process (the embedded default), the broker's own loop
(:class:`~remoterl.io.inprocess.InProcessTransport`, picked by :func:`connect_client`).

A heartbeat thread pings the broker every ``heartbeat`` seconds from its own socket
(:mod:`remoterl.io.heartbeat`), naming the main socket's routing id, so a trainer busy
for minutes in a gradient update keeps its slots. It also notices a broker that went
silent or forgot this session (restarted); pending and later calls then fail with a
typed error instead of hanging.

A ``Client`` is used by one thread at a time (a lock guards it); each process makes
its own.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import Any

import zmq

from remoterl.client.metrics import ClientMetrics
from remoterl.client.session import ClientCore, Opened, Pending
from remoterl.errors import BrokerUnavailableError, ProtocolError, WorkerLostError
from remoterl.io.dealer import connect_dealer, no_answer_hint
from remoterl.io.heartbeat import HeartbeatSocket
from remoterl.io.inprocess import InProcessBroker, InProcessTransport, broker_at
from remoterl.io.process import keep_signals_for_main_thread
from remoterl.io import shm
from remoterl.io.security import curve_serverkey_from_env
from remoterl.io.transport import Transport, ZmqTransport
from remoterl.io.wsgateway import resolve_endpoint
from remoterl.wire import calls
from remoterl.wire import protocol as p
from remoterl.wire.envdesc import EnvDescription
from remoterl.wire.protocol import ClientCommand as C

__all__ = ["Client", "Opened", "connect_client"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
# Messages queued per direction on the main socket before zmq blocks (a vector of many
# workers sends one message per worker per step).
_HWM = 10_000


class Client:
    """A trainer's connection to a broker.

    Args:
        url: the broker's address (``tcp://HOST:PORT``).
        timeout: default seconds to wait for a reply.
        connect_timeout: seconds to wait for the broker's WELCOME.
        name: shown in ``remoterl status``.
        api_key: presented in HELLO; default ``$REMOTERL_API_KEY`` via ``remoterl.init``.
        curve_serverkey: the broker's CURVE public key (default ``$REMOTERL_CURVE_SERVERKEY``):
            tcp traffic is then encrypted and the broker authenticated.
        in_process: a broker running in this process, bound at ``url``: reached without a
            socket (:func:`connect_client` finds it).
        shared_memory: let workers on this host put big observations in shared memory
            (:mod:`remoterl.io.shm`; tried after each OPEN whose replies are big, falling back
            to sockets by itself). False: always sockets.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, name: str | None = None,
                 api_key: str | None = None, curve_serverkey: str | bytes | None = None,
                 context: zmq.Context | None = None, in_process: InProcessBroker | None = None,
                 shared_memory: bool = True) -> None:
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._api_key = api_key
        self._curve = curve_serverkey if curve_serverkey is not None else curve_serverkey_from_env()
        self._ctx = context or zmq.Context.instance()
        self._in_process = in_process
        self.shared_memory = shared_memory and shm.available()
        self.core = ClientCore()
        # Round trips per worker, calls, env-steps, errors: remoterl.metrics() (remoterl.client.metrics).
        self.metrics = ClientMetrics()
        self.identity = b"C" + os.urandom(15)
        self.heartbeat = 1.0
        self.liveness = 3
        self.max_message_size = p.MAX_MESSAGE_SIZE
        self.broker_instance: str | None = None
        self._lock = threading.RLock()
        self._transport: Transport | None = None
        self._connected = False  # between connect() and close()
        self._closed = False
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._plain = False  # PLAIN credentials got the main socket through the handshake

    @property
    def in_process(self) -> bool:
        """True when the broker runs in this process and is reached without a socket."""
        return self._in_process is not None

    # --- session --------------------------------------------------------------------------------

    def connect(self) -> Client:
        """Say HELLO and wait for WELCOME; start heartbeats.

        Raises:
            BrokerUnavailableError: no answer within ``connect_timeout`` (says the URL, what
                to check and how to start a broker), or the in-process broker has stopped.
            AuthenticationError: the broker refused the API key, at the connection handshake
                (``remoterl.io.dealer.connect_dealer``) or in answer to HELLO.
        """
        hello = self.core.hello({"name": self.name, "pid": os.getpid(), "host": socket.gethostname()},
                                self._api_key)
        try:
            if self._in_process is not None:
                first = self._connect_in_process(self._in_process, hello)
            else:
                first = self._connect_socket(hello)
            self._welcomed(first)
        except BaseException:
            self.close()
            raise
        return self

    def _connect_socket(self, hello: list) -> list:
        seen: set[str] = set()
        try:
            # ws:// and wss:// go through this process's WebSocket gateway (an inproc endpoint).
            endpoint = resolve_endpoint(self.url, context=self._ctx)
            # Sends HELLO and waits for the answer, watching the tcp handshake (a key-mode
            # broker checks the key there): AuthenticationError at once on a refused key.
            connected = connect_dealer(
                self._ctx, self.url, endpoint, hello, self.connect_timeout,
                api_key=self._api_key, serverkey=self._curve, seen=seen,
                options=((zmq.ROUTING_ID, self.identity), (zmq.SNDHWM, _HWM), (zmq.RCVHWM, _HWM)))
        except (zmq.ZMQError, ValueError) as exc:
            raise BrokerUnavailableError(f"invalid broker URL {self.url!r}: {exc}") from exc
        if connected is None:
            raise BrokerUnavailableError(
                f"no remoterl broker answered at {self.url} within {self.connect_timeout:g} s: "
                f"{no_answer_hint(self.url, seen)} Start one with: remoterl-broker --bind {self.url}  "
                f"(or call remoterl.init() without a broker URL to use an embedded one)")
        sock, self._plain = connected
        self._transport = ZmqTransport(sock)
        self._connected = True
        return sock.recv_multipart()

    def _connect_in_process(self, broker: InProcessBroker, hello: list) -> list:
        transport = InProcessTransport(broker, self.identity)
        self._transport = transport
        self._connected = True
        transport.send(hello)
        first = transport.receive(0)  # the core answers HELLO at once
        if first is None:
            raise ProtocolError(f"the broker at {self.url} did not answer HELLO")
        return first

    def _welcomed(self, frames: list) -> None:
        """Take the broker's answer to HELLO; start heartbeats."""
        welcome = self.core.welcome(frames, self.url)  # AuthenticationError, LimitExceededError...
        if welcome.identity is not None:
            self.identity = welcome.identity
        self.heartbeat, self.liveness = welcome.heartbeat, welcome.liveness
        self.max_message_size, self.broker_instance = welcome.max_message_size, welcome.broker
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="remoterl-client-heartbeat", daemon=True)
        self._hb_thread.start()

    @property
    def lost(self) -> str | None:
        """Why this client lost its broker (silent, restarted, stopped), or None while it has it.

        A lost client stays lost: every call raises ``BrokerUnavailableError``. The process's
        client registry (``remoterl.client.registry.get_client``) replaces it with a fresh one
        on the next env, so a new env after a broker restart just works."""
        return self.core.lost

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Leave: the broker closes every slot this client holds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._connected = False
        self._hb_stop.set()
        with self._lock:
            transport, self._transport = self._transport, None
            if transport is not None:
                say_goodbye = os.getpid() == self._pid and self.core.lost is None
                transport.close(self.core.disconnect() if say_goodbye else None)
            for worker in list(self.core.shared):
                self.core.unshare(worker)
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(2.0)

    def reconnected(self) -> Client:
        """A new client with this one's settings, connected (to replace a lost one).

        Raises:
            BrokerUnavailableError: no broker answers (yet).
        """
        return Client(self.url, timeout=self.timeout, connect_timeout=self.connect_timeout, name=self.name,
                      api_key=self._api_key, curve_serverkey=self._curve, context=self._ctx,
                      in_process=broker_at(self.url), shared_memory=self.shared_memory).connect()

    def __enter__(self) -> Client:
        return self if self._connected else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- slots ------------------------------------------------------------------------------------

    def open(self, env_id: str, n: int = 1, kwargs: dict | None = None, *, opts: dict | None = None,
             max_workers: int | None = None, timeout: float | None = None) -> Opened:
        """Open ``n`` slots of ``env_id``; the broker places them on the least-loaded workers.

        Args:
            env_id: a gymnasium env id.
            n: how many slots (env instances).
            kwargs: for ``gymnasium.make`` on the worker.
            opts: hosting options for the worker (``{"bare": True}``: no wrappers).
            max_workers: spread the slots over at most this many workers.
            timeout: seconds to wait (env construction may be slow).

        Raises:
            NoWorkerError: no worker serves ``env_id`` (the message lists what is served).
            CapacityError: too few free slots.
            RemoteEnvError: the env failed to construct on a worker.
        """
        with self._lock:
            entry, frames = self.core.open(env_id, n, kwargs, opts, max_workers)
            self._send(frames)
            reply = self._wait_one(entry, timeout if timeout is not None else max(self.timeout, 120.0))
            opened = self.core.opened(reply)
            if self.shared_memory:
                self._share(opened)
            return opened

    def _share(self, opened: Opened) -> None:
        """Offer a shared-memory segment to each worker of ``opened`` whose replies are big
        (:mod:`remoterl.io.shm`); a worker on another host declines and keeps to sockets."""
        try:
            per_env = shm.space_nbytes(EnvDescription.from_wire(opened.env).observation_space)
        except Exception:  # an env description this end cannot read has failed the OPEN already
            return
        if per_env * len(opened.slots) < shm.MIN_SHARED:
            return
        held = collections.Counter(state.worker for state in self.core.slots.values())
        for worker in dict.fromkeys(opened.workers):
            # Room for two batches (a SAME_STEP step's final observations beside the new ones).
            need = 2 * held[worker] * (per_env + 64)
            current = self.core.shared.get(worker)
            if held[worker] * per_env < shm.MIN_SHARED or (current is not None and current.size >= need):
                continue
            slot = opened.slots[opened.workers.index(worker)]
            try:
                segment = shm.Segment(self.core.new_segment_id(), -(-need // 65536) * 65536)
            except OSError as exc:  # /dev/shm full or not writable: sockets
                log.debug("no shared memory for worker %r: %s", worker, exc)
                return
            try:
                entry, frames = self.core.call(worker, [slot], calls.shm(segment.id, segment.name, segment.size), "shm")
                self._send(frames)
                answer = self._wait_one(entry, self.timeout)
            except Exception as exc:  # the worker is gone, or too old to know "shm": sockets
                answer = {calls.OK: False, calls.WHY: str(exc)}
            finally:
                segment.unlink()  # mapped at both ends (or refused): the name is no longer needed
            if answer.get(calls.OK) is True:
                self.core.share(worker, segment)
            else:
                log.debug("worker %r keeps to sockets: %s", worker, answer.get(calls.WHY))
                segment.close()

    def close_slots(self, slots: list[int], timeout: float | None = None) -> None:
        """Close slots; their envs are closed on the workers. Lost slots are just forgotten."""
        with self._lock:
            request = self.core.close(slots)
            if request is None or not self._connected:
                return
            entry, frames = request
            self._send(frames)
            try:
                self._wait_one(entry, timeout if timeout is not None else self.timeout)
            except (BrokerUnavailableError, WorkerLostError):
                pass

    def register(self, spec: dict, timeout: float | None = None) -> dict:
        """Mirror a gymnasium registration to the workers (entry-point string, kwargs, spec fields).

        Returns:
            ``{"id", "accepted": [worker names], "refused": {worker name: reason}}``.
        """
        with self._lock:
            entry, frames = self.core.register(spec)
            self._send(frames)
            return self._wait_one(entry, timeout if timeout is not None else self.timeout)

    # --- calls ----------------------------------------------------------------------------------------

    def send_call(self, worker: bytes, slots: list[int], request: dict, name: str = "call") -> Pending:
        """Send one batched call to ``worker`` for ``slots``; return its pending entry.

        ``request`` is a map (``op``, arrays...) that the worker's slot host understands;
        ``r`` and ``slots`` are filled in here.

        Raises:
            EnvClosedError, WorkerLostError: a slot cannot be used (nothing is sent).
            CodecError: a value cannot travel (names the key).
            MessageTooLargeError: the message is over the broker's limit.
        """
        with self._lock:
            entry, frames = self.core.call(worker, slots, request, name)
            entry.sent = time.monotonic()
            try:
                self._send(frames)
            except BaseException:
                self.core.forget(entry)  # nothing sent: no reply will ever come for it
                raise
            return entry

    def wait(self, entries: list[Pending], timeout: float | None = None) -> list[Any]:
        """Wait for every entry; return their results in order.

        Raises:
            RemoteTimeoutError: not all answered within ``timeout``.
            The first entry's error (RemoteEnvError, WorkerLostError, ...) otherwise.
        """
        with self._lock:
            deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
            self._wait_until(entries, deadline)
            out = []
            for entry in entries:
                if entry.error is not None:
                    raise entry.error
                out.append(entry.result)
            return out

    def call(self, worker: bytes, slots: list[int], request: dict, timeout: float | None = None) -> Any:
        """Send one call and wait for its reply."""
        return self.wait([self.send_call(worker, slots, request)], timeout)[0]

    # --- internals -----------------------------------------------------------------------------------

    def _send(self, frames: list) -> None:
        transport = self._transport
        if not self._connected or transport is None:
            raise BrokerUnavailableError("this client is closed" if self._closed else "this client is not connected")
        self.core.check_send(frames, self.max_message_size)
        try:
            transport.send(frames)
        except BrokerUnavailableError as exc:  # the in-process broker has stopped
            self.core.mark_lost(str(exc))
            raise

    def _wait_one(self, entry: Pending, timeout: float) -> Any:
        self._wait_until([entry], time.monotonic() + timeout)
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _wait_until(self, entries: list[Pending], deadline: float) -> None:
        transport = self._transport
        if not self._connected or transport is None:
            raise BrokerUnavailableError("this client is closed")
        core, receive, take, monotonic = self.core, transport.receive, self._take, time.monotonic
        try:
            with transport.waiting():
                for entry in entries:
                    while not entry.done:
                        if core.lost is not None:
                            frames = receive(0)  # what has arrived still counts
                            if frames is None:
                                core.lose_all(core.lost, BrokerUnavailableError)
                                break
                            take(frames)
                            continue
                        remaining = deadline - monotonic()
                        if remaining <= 0:
                            self.metrics.failed("RemoteTimeoutError")
                            raise core.timed_out(entries, entry, self.url)
                        # Wake at least once a heartbeat to notice a lost broker.
                        frames = receive(min(remaining, self.heartbeat))
                        if frames is not None:
                            take(frames)
        except BrokerUnavailableError as exc:  # the in-process broker has stopped
            core.mark_lost(str(exc))
            core.lose_all(str(exc), BrokerUnavailableError)

    def _take(self, frames: list) -> None:
        try:
            entry = self.core.receive(frames)
        except ProtocolError as exc:
            log.warning("dropping a malformed message from the broker: %s", exc)
            return
        if entry is not None and entry.sent:
            self.metrics.answered(entry.worker, entry.op, entry.n, time.monotonic() - entry.sent, entry.error)

    def _heartbeat_loop(self) -> None:
        """Ping the broker; notice when it goes silent or forgets this session."""
        keep_signals_for_main_thread()
        # The credentials that got the main socket through the handshake.
        beats = HeartbeatSocket(self._ctx, self.url, serverkey=self._curve,
                                api_key=self._api_key if self._plain else None)
        frame, ping = p.client_frame(C.HEARTBEAT), self.core.ping(self.identity, self._api_key)
        last_pong = time.monotonic()
        try:
            while not self._hb_stop.is_set():
                beats.ping(frame, ping)
                deadline = time.monotonic() + self.heartbeat
                for pong in beats.pongs(deadline, self._hb_stop.is_set):
                    last_pong = time.monotonic()
                    if not pong.get("known", True) and not self._hb_stop.is_set():
                        # (While closing, our own DISCONNECT may already have ended the session.)
                        self.core.mark_lost(f"the broker at {self.url} no longer knows this client "
                                            f"(it restarted, or expired the session); its slots are gone")
                if time.monotonic() - last_pong > self.heartbeat * self.liveness:
                    self.core.mark_lost(f"lost contact with the broker at {self.url}: no heartbeat for "
                                        f"{time.monotonic() - last_pong:.1f} s")
                if self.core.lost is not None:
                    log.warning("%s", self.core.lost)
                    return
                self._hb_stop.wait(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("client heartbeat thread failed")
        finally:
            beats.close()


def connect_client(url: str, **kwargs: Any) -> Client:
    """A connected client for ``url``, reaching a broker that runs in this process (bound at
    that ``inproc://`` endpoint: the embedded default) without a socket.

    Args:
        **kwargs: as for :class:`Client`.
    """
    return Client(url, in_process=broker_at(url), **kwargs).connect()
