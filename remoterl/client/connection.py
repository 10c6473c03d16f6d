"""The client's I/O: a DEALER socket to the broker, and a heartbeat thread with its own.

:class:`Client` is what ``RemoteEnv`` and ``RemoteEnvVec`` are built on. It says
HELLO, opens slots, sends batched calls to the workers that hold them (one message
per worker) and waits for the replies, every wait bounded by a timeout.

The heartbeat thread pings the broker every ``heartbeat`` seconds from its own socket,
naming the main socket's routing id, so a trainer busy for minutes in a gradient
update keeps its slots. It also notices a broker that went silent or forgot this
session (restarted); pending and later calls then fail with a typed error instead of
hanging.

A ``Client`` is used by one thread at a time (a lock guards it); each process makes
its own.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from remoterl.wire import codec
from remoterl.io.zmqio import recv_frames, send_frames
from remoterl.wire import protocol as p
from remoterl.io.process import keep_signals_for_main_thread
from remoterl.client.session import ClientCore, Pending
from remoterl.errors import (
    AuthenticationError,
    BrokerUnavailableError,
    error_from_wire,
    MessageTooLargeError,
    ProtocolError,
    RemoteTimeoutError,
    WorkerLostError,
)
from remoterl.wire.protocol import ClientCommand as C
from remoterl.io.dealer import connect_dealer, no_answer_hint
from remoterl.io.heartbeat import HeartbeatSocket
from remoterl.io.security import curve_serverkey_from_env
from remoterl.io.wsgateway import resolve_endpoint

__all__ = ["Client", "LocalClient", "Opened", "connect_client"]

log = logging.getLogger(__name__)

_CALL = p.client_frame(C.CALL)
DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass
class Opened:
    """The answer to :meth:`Client.open`: slots in order, their workers, the env's description."""

    slots: list[int]
    workers: list[bytes]
    env: dict


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
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, name: str | None = None,
                 api_key: str | None = None, curve_serverkey: str | bytes | None = None,
                 context: zmq.Context | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._api_key = api_key
        self._curve = curve_serverkey if curve_serverkey is not None else curve_serverkey_from_env()
        self._ctx = context or zmq.Context.instance()
        self.core = ClientCore()
        self.identity = b"C" + os.urandom(15)
        self.heartbeat = 1.0
        self.liveness = 3
        self.max_message_size = 64 * 1024 * 1024
        self.broker_instance: str | None = None
        self._lock = threading.RLock()
        self._sock: zmq.Socket | None = None
        self._connected = False  # between connect() and close()
        self._lost: str | None = None
        self._closed = False
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._endpoint = url
        self._plain = False  # PLAIN credentials got the main socket through the handshake

    # --- session --------------------------------------------------------------------------------

    def connect(self) -> Client:
        """Say HELLO and wait for WELCOME; start heartbeats.

        Raises:
            BrokerUnavailableError: no answer within ``connect_timeout`` (says the URL and
                how to start a broker).
            AuthenticationError: the broker refused the API key, at the connection handshake
                (``remoterl.io.security.connect_dealer``) or in answer to HELLO.
        """
        seen: set[str] = set()
        try:
            # ws:// and wss:// go through this process's WebSocket gateway (an inproc endpoint).
            self._endpoint = resolve_endpoint(self.url, context=self._ctx)
            # Sends HELLO and waits for the answer, watching the tcp handshake (a key-mode
            # broker checks the key there): AuthenticationError at once on a refused key.
            connected = connect_dealer(
                self._ctx, self.url, self._endpoint, self._hello(), self.connect_timeout,
                api_key=self._api_key, serverkey=self._curve, seen=seen,
                options=((zmq.ROUTING_ID, self.identity), (zmq.SNDHWM, 10_000), (zmq.RCVHWM, 10_000)))
        except (zmq.ZMQError, ValueError) as exc:
            raise BrokerUnavailableError(f"invalid broker URL {self.url!r}: {exc}") from exc
        except AuthenticationError:
            self.close()
            raise
        if connected is None:
            self.close()
            raise BrokerUnavailableError(
                f"no remoterl broker answered at {self.url} within {self.connect_timeout:g} s: "
                f"{no_answer_hint(self.url, seen)}. Start one with: remoterl-broker --bind {self.url}  (or call remoterl.init() "
                f"without a broker URL to use an embedded one)")
        sock, self._plain = connected
        self._sock = sock
        self._connected = True
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        self._poll = poller.poll  # reused: half the cost of Socket.poll per call
        self._welcomed(sock.recv_multipart())
        return self

    def _hello(self) -> list[bytes]:
        hello = {"v": p.PROTOCOL_VERSION, "name": self.name, "pid": os.getpid(), "host": socket.gethostname()}
        if self._api_key:
            hello["key"] = self._api_key
        return [p.client_frame(C.HELLO), p.encode_header(hello)]

    def _welcomed(self, frames: list) -> None:
        """Take the broker's answer to HELLO; start heartbeats (closes and raises on a refusal)."""
        if p.as_bytes(frames[0]) == p.client_frame(C.ERROR) and len(frames) >= 2:
            self.close()
            raise error_from_wire(p.decode_header(frames[1]))  # AuthenticationError, LimitExceededError
        if p.as_bytes(frames[0]) != p.client_frame(C.WELCOME) or len(frames) < 2:
            self.close()
            raise ProtocolError(f"the peer at {self.url} did not answer like a remoterl broker")
        welcome = p.decode_header(frames[1])
        # The broker names us as it sees us (a WebSocket bridge assigns its own ids).
        you = welcome.get("you")
        if isinstance(you, bytes) and you:
            self.identity = you
        self.heartbeat = float(welcome.get("heartbeat", self.heartbeat))
        self.liveness = int(welcome.get("liveness", self.liveness))
        self.max_message_size = int(welcome.get("max_message_size", self.max_message_size))
        self.broker_instance = welcome.get("broker")
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="remoterl-client-heartbeat", daemon=True)
        self._hb_thread.start()

    @property
    def lost(self) -> str | None:
        """Why this client lost its broker (silent, restarted, stopped), or None while it has it.

        A lost client stays lost: every call raises ``BrokerUnavailableError``. The process's
        client registry (``remoterl.client.registry.get_client``) replaces it with a fresh one on the
        next env, so a new env after a broker restart just works."""
        return self._lost

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
            self._leave(os.getpid() == self._pid and self._lost is None)
        if self._hb_thread is not None and self._hb_thread is not threading.current_thread():
            self._hb_thread.join(2.0)

    def _leave(self, say_disconnect: bool) -> None:
        if self._sock is not None:
            if say_disconnect:
                try:
                    self._sock.send_multipart([p.client_frame(C.DISCONNECT), p.encode_header({})], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.close()
            self._sock = None

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
            entry = self.core.new_request()
            header = {"r": entry.r, "env": env_id, "n": n, "kwargs": kwargs or {}}
            if max_workers is not None:
                header["max_workers"] = max_workers
            if opts:
                header["opts"] = opts
            self._send([p.client_frame(C.OPEN), p.encode_header(header)])
            reply = self._wait_one(entry, timeout if timeout is not None else max(self.timeout, 120.0))
            slots = [s for s, _ in reply["slots"]]
            workers = [w for _, w in reply["slots"]]
            self.core.add_slots(slots, workers)
            env = codec.decode(reply["env"]) if reply.get("env") is not None else {}
            return Opened(slots, workers, env)

    def close_slots(self, slots: list[int], timeout: float | None = None) -> None:
        """Close slots; their envs are closed on the workers. Lost slots are just forgotten."""
        with self._lock:
            live = [s for s in slots if s in self.core.slots and self.core.slots[s].lost is None]
            self.core.mark_closed(slots)
            if not live or not self._connected or self._lost is not None:
                return
            entry = self.core.new_request()
            self._send([p.client_frame(C.CLOSE), p.encode_header({"r": entry.r, "slots": live})])
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
            entry = self.core.new_request()
            self._send([p.client_frame(C.REGISTER), p.encode_header({"r": entry.r, "spec": spec})])
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
            self.core.check_slots(slots)
            entry = self.core.new_request(worker)
            request["r"] = entry.r
            request["slots"] = slots
            try:
                header, frames = codec.encode(request, name=name)
                self._send([_CALL, worker, header, *frames])
            except BaseException:
                self.core.forget(entry)  # nothing left: no reply will ever come for it
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

    def _check_send(self, frames: list) -> None:
        if not self._connected:
            raise BrokerUnavailableError("this client is closed" if self._closed else "this client is not connected")
        if self._lost is not None:
            raise BrokerUnavailableError(self._lost)
        size = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        if size > self.max_message_size:
            raise MessageTooLargeError(
                f"message of {size} bytes exceeds the broker's limit of {self.max_message_size} bytes "
                f"(remoterl-broker --max-message-size)")

    def _send(self, frames: list) -> None:
        self._check_send(frames)
        # copy=True is cheaper for small frames; arrays (only present when big) go without a copy.
        send_frames(self._sock.send, frames, copy=len(frames) <= 3)

    def _wait_one(self, entry: Pending, timeout: float) -> Any:
        self._wait_until([entry], time.monotonic() + timeout)
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _wait_until(self, entries: list[Pending], deadline: float) -> None:
        sock = self._sock
        if sock is None:
            raise BrokerUnavailableError("this client is closed")
        core, poll = self.core, self._poll
        for entry in entries:
            while not entry.done:
                if self._lost is not None:
                    core.lose_all(self._lost, BrokerUnavailableError)
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out(entries, entry)
                # Wake at least once a heartbeat to notice a lost broker.
                if not poll(min(remaining, self.heartbeat) * 1000):
                    continue
                # Signature and header as bytes; array frames as zmq.Frame (no copy).
                self._take(recv_frames(sock, 2))

    def _take(self, frames: list) -> None:
        try:
            self.core.receive(frames)
        except ProtocolError as exc:
            log.warning("dropping a malformed message from the broker: %s", exc)

    def _timed_out(self, entries: list[Pending], entry: Pending) -> RemoteTimeoutError:
        for e in entries:
            if not e.done:
                self.core.forget(e)
        return RemoteTimeoutError(
            f"no reply from {'worker ' + entry.worker.hex()[:12] if entry.worker else 'the broker'} "
            f"within the timeout (broker {self.url})")

    def _heartbeat_loop(self) -> None:
        """Ping the broker; notice when it goes silent or forgets this session."""
        keep_signals_for_main_thread()
        # The credentials that got the main socket through the handshake.
        beats = HeartbeatSocket(self._ctx, self.url, serverkey=self._curve,
                                api_key=self._api_key if self._plain else None)
        frame = p.client_frame(C.HEARTBEAT)
        ping = {"id": self.identity}
        if self._api_key:
            ping["key"] = self._api_key
        last_pong = time.monotonic()
        try:
            while not self._hb_stop.is_set():
                beats.ping(frame, ping)
                deadline = time.monotonic() + self.heartbeat
                for pong in beats.pongs(deadline, self._hb_stop.is_set):
                    last_pong = time.monotonic()
                    if not pong.get("known", True) and not self._hb_stop.is_set():
                        # (While closing, our own DISCONNECT may already have ended the session.)
                        self._lost = (f"the broker at {self.url} no longer knows this client "
                                      f"(it restarted, or expired the session); its slots are gone")
                if self._lost is None and time.monotonic() - last_pong > self.heartbeat * self.liveness:
                    self._lost = (f"lost contact with the broker at {self.url}: no heartbeat for "
                                  f"{time.monotonic() - last_pong:.1f} s")
                if self._lost is not None:
                    log.warning("%s", self._lost)
                    return
                self._hb_stop.wait(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("client heartbeat thread failed")
        finally:
            beats.close()


def connect_client(url: str, **kwargs: Any) -> Client:
    """A connected client for ``url``: a :class:`LocalClient` when a broker of this process
    is bound there (the embedded default's ``inproc://`` endpoint), else a :class:`Client`.

    Args:
        **kwargs: as for :class:`Client`.
    """
    local = _in_process_broker(url)
    if local is not None:  # the broker's thread is ours: no socket hop to it
        return LocalClient(local, url, **kwargs).connect()
    return Client(url, **kwargs).connect()


def _in_process_broker(url: str) -> Any:
    # Never imports the broker package: only a process that started a broker has one.
    loop = sys.modules.get("remoterl.broker.loop")
    return loop.in_process(url) if loop is not None and url.startswith("inproc://") else None


class LocalClient(Client):
    """A client of a broker that runs in this process (the embedded default's thread).

    It has no socket of its own for calls: it hands its messages straight to the broker's
    core and, while it waits for a reply, runs the broker's loop in its own thread
    (``remoterl.broker.loop``, "in-process peers"), which saves two thread wake-ups per
    round trip. Heartbeats still travel on the heartbeat thread's own socket over the
    broker's ``inproc://`` endpoint, so a trainer busy for minutes keeps its slots.

    Args:
        broker: the running :class:`remoterl.broker.loop.Broker` of this process.
        url: its ``inproc://`` endpoint (what :func:`remoterl.broker.loop.in_process` found it by).
    """

    def __init__(self, broker: Any, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._broker = broker
        # Messages for this client, put here by whichever thread runs the broker's loop.
        self._inbox: collections.deque = collections.deque()

    def connect(self) -> LocalClient:
        """Say HELLO to the in-process broker and take its WELCOME; start heartbeats.

        Raises:
            BrokerUnavailableError: the broker has stopped.
        """
        self._broker.attach(self.identity, self._inbox.append)
        self._connected = True
        try:
            self._submit(self._hello())
        except BrokerUnavailableError:
            self.close()
            raise
        if not self._inbox:  # the core answers HELLO at once; nothing means it dropped it
            self.close()
            raise ProtocolError(f"the broker at {self.url} did not answer HELLO")
        self._welcomed(self._inbox.popleft())
        return self

    def _submit(self, frames: list) -> None:
        try:
            with self._broker.driving() as broker:
                broker.submit(self.identity, frames)
        except BrokerUnavailableError as exc:
            self._lost = str(exc)
            raise

    def _leave(self, say_disconnect: bool) -> None:
        if say_disconnect:
            try:
                self._submit([p.client_frame(C.DISCONNECT), p.encode_header({})])
            except BrokerUnavailableError:
                pass
        self._broker.detach(self.identity)

    def _send(self, frames: list) -> None:
        self._check_send(frames)
        if len(frames) > 3:  # arrays (only present when big) travel on without a copy
            frames = [f if type(f) is bytes else zmq.Frame(f, copy=False) for f in frames]
        self._submit(frames)

    def _wait_until(self, entries: list[Pending], deadline: float) -> None:
        if not self._connected:
            raise BrokerUnavailableError("this client is closed")
        core, inbox, monotonic = self.core, self._inbox, time.monotonic
        try:
            with self._broker.driving() as broker:
                for entry in entries:
                    while not entry.done:
                        if inbox:
                            self._take(inbox.popleft())
                            continue
                        if self._lost is not None:
                            core.lose_all(self._lost, BrokerUnavailableError)
                            break
                        remaining = deadline - monotonic()
                        if remaining <= 0:
                            raise self._timed_out(entries, entry)
                        if broker.stopping:
                            self._lost = f"the broker at {self.url} has stopped"
                            continue
                        broker.serve(min(remaining, self.heartbeat))
        except BrokerUnavailableError as exc:  # stopped before we got the loop
            self._lost = str(exc)
            core.lose_all(self._lost, BrokerUnavailableError)
