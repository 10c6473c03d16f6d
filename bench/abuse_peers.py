"""Connections to a remoterl broker for the hostile peers of bench/abuse.py, and what went over them.

A :class:`Peer` is one connection: a ZeroMQ DEALER for ``tcp://HOST:PORT`` (:class:`ZmqPeer`)
or a WebSocket for ``ws://HOST:PORT`` (:class:`WsPeer`, the framing of docs/WEBSOCKET.md: one
binary message per multipart message, each frame length-prefixed). :func:`open_peers` opens
as many as an abuse needs and closes them all on exit; :class:`Sent` counts what an abuse sent
and, through :func:`drain` and :func:`read_until`, what came back.

Keys over tcp: a broker in key mode may authenticate tcp peers at the ZeroMQ handshake
(PLAIN, username ``remoterl``, password the API key). ``auth="auto"`` tries PLAIN once
(:func:`detect_auth`) and falls back to no credentials when the broker speaks the NULL
mechanism (a PLAIN client cannot connect to it: libzmq reports a mechanism mismatch);
``"plain"`` and ``"none"`` force one. Over ws:// there is no handshake mechanism.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import zmq

from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["Peer", "Sent", "WsPeer", "ZmqPeer", "connect", "detect_auth", "drain", "open_peers", "pack",
           "read_until", "reply_kind", "transport", "unpack"]

PLAIN_USERNAME = b"remoterl"
_LEN = struct.Struct("<I")


# --- what an abuse sent, and what came back ----------------------------------------------------------

@dataclass
class Sent:
    """What one abuse sent, and what came back."""

    kind: str
    transport: str
    auth: str = "none"  # tcp handshake: "plain" or "none"
    messages: int = 0  # whole messages handed to the transport
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    stopped: str = "done"  # "done", "time limit", "connection closed", "stopped: ..." or "error: ..."
    replies: dict[str, int] = field(default_factory=dict)  # what came back, by message kind
    notes: dict[str, Any] = field(default_factory=dict)

    def count(self, frames: list) -> None:
        """One whole message handed to the transport."""
        self.messages += 1
        self.frames += len(frames)
        self.bytes += sum(len(f) for f in frames)

    def recount(self) -> None:
        """Count from zero again: what set up the abuse (a HELLO, an OPEN) is not part of it."""
        self.messages = self.frames = self.bytes = 0

    def cut_short(self, deadline: float) -> None:
        """Sending stopped before the end: the time limit passed, or the connection closed."""
        self.stopped = "time limit" if time.monotonic() >= deadline else "connection closed"

    def heard(self, frames: list | None) -> str | None:
        """Count one message that came back, by :func:`reply_kind`."""
        if frames is None:
            return None
        kind = reply_kind(frames)
        self.replies[kind] = self.replies.get(kind, 0) + 1
        return kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reply_kind(frames: list) -> str:
    """``"WELCOME"``, ``"ERROR:auth"``, ``"REPLY"``, ``"W.ERROR:protocol"``, ``"MDP"``... for counting."""
    f0 = bytes(frames[0]) if frames else b""
    if len(f0) == 5 and f0[:4] in (p.RL_CLIENT, p.RL_WORKER):
        enum_ = C if f0[:4] == p.RL_CLIENT else W
        try:
            name = enum_(f0[4]).name
        except ValueError:
            name = f"0x{f0[4]:02x}"
        if name == "ERROR" and len(frames) > 1:
            try:
                name += f":{p.decode_header(bytes(frames[1])).get('code')}"
            except Exception:
                name += ":?"
        return name if enum_ is C else f"W.{name}"
    if f0 in p.MDP_CLIENT or (not f0 and len(frames) > 1 and bytes(frames[1]) in p.MDP_CLIENT):
        return "MDP"
    if f0 in p.MDP_WORKER or (not f0 and len(frames) > 1 and bytes(frames[1]) in p.MDP_WORKER):
        return "MDP worker"
    return "other"


# --- peers ---------------------------------------------------------------------------------------

class Peer:
    """One connection to the broker: a ZeroMQ DEALER (tcp://) or a WebSocket (ws://)."""

    transport = ""

    def send(self, frames: list, deadline: float) -> bool:
        """Send one multipart message; False if it could not go before ``deadline`` (monotonic)."""
        raise NotImplementedError

    def recv(self, timeout: float) -> list[bytes] | None:
        """The next message, or None after ``timeout`` seconds (or once the connection is gone)."""
        raise NotImplementedError

    def close(self, linger: float = 0.5) -> None:
        """Close; messages still queued get up to ``linger`` seconds to leave."""
        raise NotImplementedError


class ZmqPeer(Peer):
    """A DEALER to a tcp:// broker; PLAIN credentials with ``key`` when ``auth == "plain"``."""

    transport = "tcp"

    def __init__(self, context: zmq.Context, url: str, *, key: str | None = None, auth: str = "none",
                 identity: bytes | None = None) -> None:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 100)  # a send waits at most this long per try (see send)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if auth == "plain" and key:
            sock.plain_username = PLAIN_USERNAME
            sock.plain_password = key.encode()
        sock.connect(url)
        self.sock = sock

    def send(self, frames: list, deadline: float) -> bool:
        big = any(len(f) > 65536 for f in frames)
        while True:
            try:
                self.sock.send_multipart(frames, copy=not big)
                return True
            except zmq.Again:  # our queue is full: the broker is not reading
                if time.monotonic() >= deadline:
                    return False
            except zmq.ZMQError:
                return False

    def send_stream(self, first: bytes, empty_frames: int, deadline: float) -> int:
        """One message: ``first`` then ``empty_frames`` empty frames, with a plain
        ``send(b"", SNDMORE)`` each; returns the frames sent (fewer: the deadline passed, and
        the message is incomplete; closing the socket with no linger discards it)."""
        send, more = self.sock.send, zmq.SNDMORE
        try:
            send(first, more if empty_frames else 0)
        except zmq.ZMQError:
            return 0
        sent = 1
        last = empty_frames - 1
        monotonic = time.monotonic
        for i in range(empty_frames):
            send(b"", more if i < last else 0)  # within a message libzmq never blocks on the HWM
            sent += 1
            if i & 0xFFFF == 0xFFFF and monotonic() >= deadline:
                break
        return sent

    def recv(self, timeout: float) -> list[bytes] | None:
        try:
            if self.sock.poll(max(timeout, 0.0) * 1000):
                return self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        return None

    def close(self, linger: float = 0.5) -> None:
        if not self.sock.closed:
            self.sock.setsockopt(zmq.LINGER, int(linger * 1000))
            self.sock.close()


class WsPeer(Peer):
    """A WebSocket connection to a ws:// bridge (docs/WEBSOCKET.md framing). A watchdog
    aborts the connection at ``deadline``, so no send can block past it."""

    transport = "ws"

    def __init__(self, url: str, deadline: float, open_timeout: float = 5.0) -> None:
        from websockets.sync.client import connect as ws_connect

        self.closed = False
        options: dict[str, Any] = {"compression": None, "max_size": None, "ping_interval": None, "close_timeout": 0.5,
                                   "open_timeout": max(0.1, min(open_timeout, deadline - time.monotonic()))}
        try:  # no proxy, and the plain connection object (websockets 15 and later know these)
            self.ws = ws_connect(url, proxy=None, legacy=True, **options)
        except TypeError:
            self.ws = ws_connect(url, **options)
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, args=(deadline,), name="abuse-ws-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self, deadline: float) -> None:
        if not self._done.wait(max(0.0, deadline - time.monotonic()) + 1.0):
            self._abort()

    def _abort(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.ws.socket.shutdown(socket.SHUT_RDWR)

    def send(self, frames: list, deadline: float) -> bool:
        return self.send_packed(pack(frames), deadline)

    def send_packed(self, data: bytes, deadline: float) -> bool:
        from websockets.exceptions import ConnectionClosed

        if self.closed or time.monotonic() >= deadline:
            return False
        try:
            self.ws.send(data)
            return True
        except (ConnectionClosed, OSError, RuntimeError):
            self.closed = True
            return False

    def recv(self, timeout: float) -> list[bytes] | None:
        from websockets.exceptions import ConnectionClosed

        if self.closed:
            return None
        try:
            data = self.ws.recv(timeout=max(timeout, 0.0))
        except TimeoutError:
            return None
        except (ConnectionClosed, OSError, RuntimeError):
            self.closed = True
            return None
        if not isinstance(data, bytes):
            return None
        return unpack(data)

    def close(self, linger: float = 0.5) -> None:
        self._done.set()
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.ws.close()
        self._watchdog.join(2.0)


def pack(frames: list) -> bytes:
    """Frames as one WebSocket message: each a little-endian u32 length, then its bytes."""
    out = []
    for f in frames:
        out.append(_LEN.pack(len(f)))
        out.append(f)
    return b"".join(out)


def unpack(data: bytes) -> list[bytes] | None:
    """The frames of one WebSocket message; None if it is not a whole number of frames."""
    frames, pos, end = [], 0, len(data)
    while pos + 4 <= end:
        (n,) = _LEN.unpack_from(data, pos)
        frames.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames if pos == end and frames else None


def transport(url: str) -> str:
    """``"tcp"`` or ``"ws"``, from the broker's address."""
    if url.startswith("tcp://"):
        return "tcp"
    if url.startswith("ws://"):
        return "ws"
    raise ValueError(f"a hostile peer speaks tcp:// or ws://, not {url!r}")


def detect_auth(context: zmq.Context, url: str, key: str, timeout: float = 2.0) -> str:
    """``"none"`` if the tcp broker at ``url`` speaks the NULL mechanism (a PLAIN client
    fails its handshake at once: mechanism mismatch), else ``"plain"``: the handshake
    succeeded or was refused for the credentials, or nothing was heard within ``timeout``
    (a NULL handshake never waits for the broker's own thread; a ZAP check may)."""
    from zmq.utils.monitor import recv_monitor_message

    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.plain_username = PLAIN_USERNAME
    sock.plain_password = key.encode()
    succeeded, failed_protocol = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    failed_auth = zmq.EVENT_HANDSHAKE_FAILED_AUTH
    monitor = sock.get_monitor_socket(succeeded | failed_protocol | failed_auth | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        sock.connect(url)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(left * 1000):
                break
            event = recv_monitor_message(monitor)["event"]
            if event in (succeeded, failed_auth):  # PLAIN spoken (a wrong key still means PLAIN)
                return "plain"
            if event in (failed_protocol, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return "none"  # mechanism mismatch: a NULL broker
        return "plain"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def connect(url: str, *, context: zmq.Context | None = None, key: str | None = None, auth: str = "none",
            identity: bytes | None = None, deadline: float | None = None) -> Peer:
    """A :class:`Peer` for ``url`` (tcp:// needs ``context``; ``auth`` applies to tcp only)."""
    if transport(url) == "ws":
        return WsPeer(url, deadline if deadline is not None else time.monotonic() + 30.0)
    assert context is not None, "a tcp:// peer needs a zmq context"
    return ZmqPeer(context, url, key=key, auth=auth, identity=identity)


@contextlib.contextmanager
def open_peers(url: str, key: str | None, auth: str, deadline: float, linger: float, sent: Sent):
    """Yield ``open_peer(identity=None) -> Peer``; every peer is closed on exit (with
    ``linger``) and the private zmq context destroyed, so nothing outlives the abuse."""
    tcp = transport(url) == "tcp"
    context = zmq.Context() if tcp else None
    opened: list[Peer] = []
    try:
        if tcp and key and auth == "auto":
            auth = detect_auth(context, url, key)  # type: ignore[arg-type]
        sent.auth = auth if tcp and key else "none"

        def open_peer(identity: bytes | None = None) -> Peer:
            peer = connect(url, context=context, key=key, auth=sent.auth, identity=identity, deadline=deadline)
            opened.append(peer)
            return peer

        yield open_peer
    finally:
        for peer in opened:
            with contextlib.suppress(Exception):
                peer.close(linger)
        if context is not None:
            context.destroy(linger=int(linger * 1000))  # bounded by linger


def drain(peer: Peer, sent: Sent, seconds: float, limit: int = 100_000) -> None:
    """Count whatever came back, for at most ``seconds`` and ``limit`` messages."""
    end = time.monotonic() + seconds
    for _ in range(limit):
        frames = peer.recv(max(0.0, end - time.monotonic()))
        if frames is None:
            return
        sent.heard(frames)


def read_until(peer: Peer, sent: Sent, want: Callable[[list], bool], timeout: float,
               heartbeat: Callable[[], None] | None = None, every: float = 0.5) -> list | None:
    """Read until a message ``want`` accepts, or ``timeout``; counts everything read.
    ``heartbeat`` runs every ``every`` seconds while waiting (a client's HEARTBEAT)."""
    end = time.monotonic() + timeout
    next_beat = time.monotonic() + every
    while (left := end - time.monotonic()) > 0:
        if heartbeat is not None and time.monotonic() >= next_beat:
            heartbeat()
            next_beat = time.monotonic() + every
        frames = peer.recv(min(left, every))
        if frames is None:
            if getattr(peer, "closed", False):
                return None
            continue
        sent.heard(frames)
        if want(frames):
            return frames
    return None

