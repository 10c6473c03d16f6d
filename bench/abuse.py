"""Hostile peers for a remoterl broker, and the trial that measures what they cost a trainer.

Five abuses, each a plain function that connects, sends, cleans up and returns what it sent
(a :class:`Sent`). Every one is bounded in count **and** time (``time_limit``) and stops by
itself; nothing here keeps state between calls. The broker's address picks the transport:
``tcp://HOST:PORT`` speaks ZeroMQ (a DEALER), ``ws://HOST:PORT`` speaks the WebSocket
framing of docs/WEBSOCKET.md (one binary message per multipart message).

========= =========================================================================================
kind      what it sends
========= =========================================================================================
frames    (a) one message of ``frames`` frames (``b"JUNK"``, then empty frames) from a peer
          holding no key at all
malformed (b) ``count`` malformed messages from a peer holding a valid key (of any tenant): junk
          signatures, broken msgpack headers, unknown commands, worker READYs with bad fields,
          Majordomo requests for unknown services from throwaway connections, CALLs naming
          workers it has no slots on, and oversized headers the size limit still lets through
flood     (c) ``calls`` step CALLs on one slot of its own, sent without reading a single reply,
          from a client of the key's tenant (so on that tenant's workers)
zero_size (d) step CALLs whose action is a zero-size array of shape ``(rows, 0)`` (int64),
          ``repeats`` times, each waiting (bounded) for its answer
names     (e) ``hellos`` HELLOs whose ``name`` is ``name_bytes`` long, then a ``remoterl.status``
          request from the last of those peers
========= =========================================================================================

Keys over tcp: a broker in key mode may authenticate tcp peers at the ZeroMQ handshake
(PLAIN, username ``remoterl``, password the API key). ``auth="auto"`` (the default) tries
PLAIN once and falls back to no credentials when the broker speaks the NULL mechanism (a
PLAIN client cannot connect to it: libzmq reports a mechanism mismatch); ``"plain"`` and
``"none"`` force one. The key also travels in HELLO, as for every remoterl client. Over
ws:// there is no handshake mechanism: the key travels in HELLO only.

:func:`trial` runs one abuse against a fresh broker and worker (subprocesses, key mode) while
a well-behaved trainer (``RemoteEnvVec("CartPole-v1", 8)`` in a thread of this process)
steps throughout, and reports what the trainer saw (errors, lost steps, worst step
latency), whether a healthy peer expired, and the broker's RSS idle / peak / after. It is
what ``python bench/run.py --case abuse`` runs (bench/cases.py), once per kind, over tcp;
``python bench/abuse.py --transport ws`` runs the same trials with the hostile peers on
ws:// (the trainer and worker stay on tcp). Every process a trial starts is killed before
it returns, even on error, and dies with this process if it is killed
(``PR_SET_PDEATHSIG``).

    python bench/abuse.py                       # every kind, full sizes, tcp
    python bench/abuse.py --quick --transport ws --kind frames
    python bench/abuse.py --url tcp://127.0.0.1:5555 --key KEY --kind malformed --quick   # just send
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from remoterl import codec
from remoterl import protocol as p
from remoterl.protocol import ClientCommand as C
from remoterl.protocol import WorkerCommand as W

__all__ = ["KINDS", "LABELS", "Deployment", "Peer", "Sent", "Trainer", "call_flood", "connect", "detect_auth",
           "huge_names", "malformed", "many_frames", "sizes", "trial", "zero_size_actions"]

# The order trials run in, and how the table names them.
KINDS = ("frames", "malformed", "flood", "zero_size", "names")
LABELS = {
    "frames": "(a) keyless peer, 1 message of {frames:,} frames",
    "malformed": "(b) other tenant's key, {count:,} malformed messages",
    "flood": "(c) same tenant, {calls:,} CALLs never read",
    "zero_size": "(d) same tenant, {repeats}× step with an action of shape ({rows:,}, 0)",
    "names": "(e) other tenant's key, {hellos} HELLOs named {name_bytes:,} B + status",
}

PLAIN_USERNAME = b"remoterl"
ENV_ID = "CartPole-v1"

_HELLO, _OPEN, _CALL, _HEARTBEAT = (p.client_frame(c) for c in (C.HELLO, C.OPEN, C.CALL, C.HEARTBEAT))
_CLIENT_BYE = [p.client_frame(C.DISCONNECT), p.encode_header({})]
_WORKER_BYE = [p.worker_frame(W.DISCONNECT)]
_LEN = struct.Struct("<I")


def sizes(quick: bool = False) -> dict[str, dict[str, Any]]:
    """Each kind's keyword arguments: the full sizes, or much smaller ones with ``quick``."""
    if quick:
        return {
            "frames": {"frames": 100_000, "time_limit": 5.0, "linger": 0.5},  # still over MAX_FRAMES
            "malformed": {"count": 1_000, "big_header": 1 << 20, "big_every": 500, "throwaway_every": 50,
                          "time_limit": 5.0},
            "flood": {"calls": 5_000, "time_limit": 5.0},
            "zero_size": {"rows": 1 << 18, "repeats": 1, "reply_timeout": 3.0, "time_limit": 5.0},
            "names": {"hellos": 10, "name_bytes": 1_000_000, "status_timeout": 3.0, "time_limit": 5.0},
        }
    return {
        "frames": {"frames": 3_000_000, "time_limit": 30.0},
        "malformed": {"count": 20_000, "big_header": 1 << 20, "big_every": 1_000, "throwaway_every": 20,
                      "time_limit": 60.0},
        "flood": {"calls": 200_000, "time_limit": 60.0},
        "zero_size": {"rows": 1 << 25, "repeats": 3, "reply_timeout": 30.0, "time_limit": 100.0},
        "names": {"hellos": 10, "name_bytes": 40_000_000, "status_timeout": 15.0, "time_limit": 60.0},
    }


# --- what an abuse returns ------------------------------------------------------------------------

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
    stopped: str = "done"  # "done", "time limit", or "error: ..." (nothing more could be sent)
    replies: dict[str, int] = field(default_factory=dict)  # what came back, by message kind
    notes: dict[str, Any] = field(default_factory=dict)

    def count(self, frames: list) -> None:
        self.messages += 1
        self.frames += len(frames)
        self.bytes += sum(len(f) for f in frames)

    def heard(self, frames: list | None) -> str | None:
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
        return self.send_packed(_pack(frames), deadline)

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
        return _unpack(data)

    def close(self, linger: float = 0.5) -> None:
        self._done.set()
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.ws.close()
        self._watchdog.join(2.0)


def _pack(frames: list) -> bytes:
    out = []
    for f in frames:
        out.append(_LEN.pack(len(f)))
        out.append(f)
    return b"".join(out)


def _unpack(data: bytes) -> list[bytes] | None:
    frames, pos, end = [], 0, len(data)
    while pos + 4 <= end:
        (n,) = _LEN.unpack_from(data, pos)
        frames.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames if pos == end and frames else None


def _transport(url: str) -> str:
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
    if _transport(url) == "ws":
        return WsPeer(url, deadline if deadline is not None else time.monotonic() + 30.0)
    assert context is not None, "a tcp:// peer needs a zmq context"
    return ZmqPeer(context, url, key=key, auth=auth, identity=identity)


@contextlib.contextmanager
def _peers(url: str, key: str | None, auth: str, deadline: float, linger: float, sent: Sent):
    """Yield ``open_peer(identity=None) -> Peer``; every peer is closed on exit (with
    ``linger``) and the private zmq context destroyed, so nothing outlives the abuse."""
    transport = _transport(url)
    context = zmq.Context() if transport == "tcp" else None
    opened: list[Peer] = []
    try:
        if transport == "tcp" and key and auth == "auto":
            auth = detect_auth(context, url, key)  # type: ignore[arg-type]
        sent.auth = auth if transport == "tcp" and key else "none"

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


def _finish(sent: Sent, started: float) -> Sent:
    sent.seconds = round(time.monotonic() - started, 3)
    return sent


def _drain(peer: Peer, sent: Sent, seconds: float, limit: int = 100_000) -> None:
    """Count whatever came back, for at most ``seconds`` and ``limit`` messages."""
    end = time.monotonic() + seconds
    for _ in range(limit):
        frames = peer.recv(max(0.0, end - time.monotonic()))
        if frames is None:
            return
        sent.heard(frames)


def _await(peer: Peer, sent: Sent, want: Callable[[list], bool], timeout: float,
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


def _r_of(frames: list) -> Any:
    """``r`` of a REPLY (codec header) or an ERROR (control header); None if unreadable."""
    try:
        if bytes(frames[0]) == p.client_frame(C.REPLY):
            return codec.decode(bytes(frames[1]), frames, 2).get("r")
        return p.decode_header(bytes(frames[1])).get("r")
    except Exception:
        return None


def _answer_to(r: int) -> Callable[[list], bool]:
    kinds = {p.client_frame(C.REPLY), p.client_frame(C.ERROR)}
    lost = p.client_frame(C.WORKER_LOST)
    return lambda frames: bytes(frames[0]) == lost or (bytes(frames[0]) in kinds and _r_of(frames) == r)


class _Session:
    """A keyed remoterl client spoken frame by frame: HELLO, OPEN, calls, HEARTBEAT, DISCONNECT."""

    def __init__(self, peer: Peer, key: str | None, sent: Sent, deadline: float) -> None:
        self.peer, self.key, self.sent, self.deadline = peer, key, sent, deadline
        self.you: bytes | None = None

    def _wait(self, timeout: float) -> float:
        """``timeout``, but at most a quarter of what is left before the deadline."""
        return min(timeout, max(0.0, self.deadline - time.monotonic()) / 4)

    def send(self, frames: list) -> bool:
        ok = self.peer.send(frames, self.deadline)
        if ok:
            self.sent.count(frames)
        return ok

    def hello(self, name: str, timeout: float = 5.0) -> bool:
        header = {"v": p.PROTOCOL_VERSION, "name": name}
        if self.key:
            header["key"] = self.key
        if not self.send([_HELLO, p.encode_header(header)]):
            return False
        reply = _await(self.peer, self.sent, lambda f: bytes(f[0]) in (p.client_frame(C.WELCOME),
                                                                       p.client_frame(C.ERROR)), self._wait(timeout))
        if reply is None or bytes(reply[0]) != p.client_frame(C.WELCOME):
            return False
        you = p.decode_header(bytes(reply[1])).get("you")
        self.you = you if isinstance(you, bytes) else None
        return True

    def beat(self) -> None:
        """A HEARTBEAT naming this session (not counted in ``sent``)."""
        if self.you is not None:
            header = {"id": self.you, **({"key": self.key} if self.key else {})}
            self.peer.send([_HEARTBEAT, p.encode_header(header)], self.deadline)

    def open_one(self, env_id: str, timeout: float = 10.0) -> tuple[int, bytes] | None:
        if not self.send([_OPEN, p.encode_header({"r": 1, "env": env_id, "n": 1, "kwargs": {}})]):
            return None
        reply = _await(self.peer, self.sent, lambda f: bytes(f[0]) in (p.client_frame(C.OPENED),
                                                                       p.client_frame(C.ERROR)),
                       self._wait(timeout), self.beat)
        if reply is None or bytes(reply[0]) != p.client_frame(C.OPENED):
            return None
        slot, worker = p.decode_header(bytes(reply[1]))["slots"][0]
        return int(slot), bytes(worker)

    def call(self, worker: bytes, header: bytes, frames: list, r: int, timeout: float) -> tuple[str, float]:
        """Send one CALL and wait for its answer: ``(what came back, seconds)``."""
        started = time.monotonic()
        if not self.send([_CALL, worker, header, *frames]):
            return "not sent", 0.0
        reply = _await(self.peer, self.sent, _answer_to(r), timeout, self.beat)
        seconds = round(time.monotonic() - started, 3)
        if reply is None:
            return "no answer", seconds
        kind = reply_kind(reply)
        if kind == "REPLY":
            try:
                error = codec.decode(bytes(reply[1]), reply, 2).get("error")
            except Exception:
                error = None
            if isinstance(error, dict):
                kind = f"REPLY error:{error.get('code')}"
        return kind, seconds

    def start(self, name: str, env_id: str) -> tuple[int, bytes] | None:
        """HELLO, OPEN one slot of ``env_id`` and reset it; return ``(slot, worker)``, or None
        with ``sent.stopped`` saying what failed. What was sent until then is not counted."""
        sent = self.sent
        if not self.hello(name):
            sent.stopped = "error: no WELCOME"
            return None
        opened = self.open_one(env_id)
        if opened is None:
            sent.stopped = "error: OPEN not answered with OPENED"
            return None
        slot, worker = opened
        sent.notes.update(slot=slot, worker=worker.hex())
        header, frames = codec.encode({"op": "reset", "seeds": [0], "options": None, "r": 2, "slots": [slot]})
        sent.notes["reset"] = self.call(worker, header, frames, 2, self._wait(10.0))[0]
        sent.messages = sent.frames = sent.bytes = 0
        return opened

    def bye(self) -> None:
        self.peer.send(_CLIENT_BYE, self.deadline)


def _step_header(slot: int, r: int, action: Any) -> tuple[bytes, list]:
    return codec.encode({"op": "step", "a": action, "m": 0, "r": r, "slots": [slot]}, name="call")


def _zero_size_header(slot: int, r: int, rows: int) -> bytes:
    """A step call's codec header whose action is an int64 array of shape ``(rows, 0)``:
    written by hand (codec ext 1, no data bytes), since remoterl's own encoder refuses it."""
    meta = msgpack.packb(["<i8", [rows, 0]])
    action = msgpack.ExtType(1, struct.pack("<H", len(meta)) + meta)
    return msgpack.packb({"op": "step", "a": action, "m": 0, "r": r, "slots": [slot]}, use_bin_type=True)


# --- the five abuses --------------------------------------------------------------------------------

def many_frames(url: str, frames: int = 3_000_000, *, first: bytes = b"JUNK", time_limit: float = 30.0,
                linger: float = 2.0) -> Sent:
    """(a) One message of ``frames`` frames (``first``, then empty ones) from a peer with no
    key and no credentials. Over tcp, a plain ``send(b"", SNDMORE)`` per frame; over ws,
    one binary message of that many length-prefixed frames."""
    started = time.monotonic()
    deadline = started + time_limit
    sent = Sent("frames", _transport(url))
    try:
        with _peers(url, None, "none", deadline, linger, sent) as open_peer:
            peer = open_peer()
            if isinstance(peer, ZmqPeer):
                n = peer.send_stream(first, frames - 1, deadline)
                sent.frames, sent.bytes = n, len(first)
                if n == frames:
                    sent.messages = 1
                else:
                    sent.stopped = "time limit"
                    peer.close(0)  # discards the incomplete message
            else:
                data = _LEN.pack(len(first)) + first + b"\0\0\0\0" * (frames - 1)
                if peer.send_packed(data, deadline):  # type: ignore[attr-defined]
                    sent.messages, sent.frames, sent.bytes = 1, frames, len(first)
                else:
                    sent.stopped = "connection closed" if time.monotonic() < deadline else "time limit"
            _drain(peer, sent, 0.05)
    except Exception as exc:
        sent.stopped = f"error: {type(exc).__name__}: {exc}"
    return _finish(sent, started)


def _malformed_templates(key: str, worker_ids: list[bytes]) -> list[tuple[str, Callable[[int], list]]]:
    """(target, i -> frames): target ``client`` (the HELLO'd peer) or ``worker`` (READYs)."""
    h = p.encode_header
    ready = p.worker_frame(W.READY)
    wids = worker_ids or [b"W" + os.urandom(15)]
    good_hello = h({"v": p.PROTOCOL_VERSION, "key": key, "name": "malformed"})
    return [
        # junk signatures
        ("client", lambda i: [b"JUNK" + i.to_bytes(4, "little"), b"payload"]),
        ("client", lambda i: [b"\xff" * 40]),
        ("client", lambda i: [b"MDPX99", b"\x01", b"svc"]),
        ("client", lambda i: [b"RLC2\x01", good_hello]),  # another protocol version
        # truncated or garbage msgpack headers
        ("client", lambda i: [p.client_frame(C.OPEN), b"\x85\xa1r"]),  # a map cut short
        ("client", lambda i: [p.client_frame(C.OPEN), b"\xc1\xc1\xc1"]),  # never-used bytes
        ("client", lambda i: [p.client_frame(C.REGISTER), msgpack.packb([1, 2, 3])]),  # not a map
        ("client", lambda i: [p.client_frame(C.CLOSE), b"\xdf\xff\xff\xff\xff"]),  # a map of 4G entries, empty
        ("client", lambda i: [p.client_frame(C.CLOSE), h({"r": i, "slots": "not a list"})]),
        ("client", lambda i: [p.client_frame(C.HEARTBEAT), b""]),
        # unknown remoterl commands
        ("client", lambda i: [b"RLC1\x7f", h({})]),
        ("client", lambda i: [b"RLW1\x7f", h({})]),
        ("client", lambda i: [b"RLC1\x00"]),
        # worker READYs with bad fields (from a socket of their own)
        ("worker", lambda i: [ready, h({"v": 1, "envs": ENV_ID, "capacity": 8, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 1, "envs": [ENV_ID], "capacity": -1, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 1, "envs": ["x" * 300], "capacity": 8, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 1, "envs": [1, None], "capacity": True, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 99, "envs": [], "capacity": "8", "key": key})]),
        ("worker", lambda i: [ready, b"\x93\x01"]),
        # CALLs naming workers this peer holds no slot on
        ("client", lambda i: [_CALL, wids[i % len(wids)], h({"r": i, "op": "step", "slots": [0], "m": 0})]),
        ("client", lambda i: [_CALL, wids[i % len(wids)]]),
        ("client", lambda i: [_CALL, os.urandom(16), h({"r": i, "op": "reset", "slots": [i]})]),
    ]


def malformed(url: str, key: str, count: int = 20_000, *, worker_ids: list[bytes] = (),
              big_header: int = 1 << 20, big_every: int = 1_000, throwaway_every: int = 20,
              time_limit: float = 60.0, linger: float = 1.0, auth: str = "auto") -> Sent:
    """(b) Exactly ``count`` malformed messages (fewer only if ``time_limit`` passes) from a
    peer holding ``key``: it says HELLO first (a session of the key's tenant) and DISCONNECT
    last, neither counted. Every ``throwaway_every``-th message is a Majordomo request for
    an unknown service from a new connection closed right after; every ``big_every``-th a
    header of ``big_header`` bytes (a HELLO with a huge ``host``, or an OPEN with huge
    kwargs for an env nobody serves). ``worker_ids``: real workers to name in CALLs."""
    started = time.monotonic()
    deadline = started + time_limit
    sent = Sent("malformed", _transport(url))
    templates = _malformed_templates(key, list(worker_ids))
    big = [
        [_HELLO, p.encode_header({"v": p.PROTOCOL_VERSION, "key": key, "name": "big", "host": "h" * big_header})],
        [_OPEN, p.encode_header({"r": 1, "env": "NoSuchEnv-v0", "n": 1, "kwargs": {"blob": "k" * big_header}})],
    ]
    kinds: dict[str, int] = {}
    try:
        with _peers(url, key, auth, deadline, linger, sent) as open_peer:
            client = _Session(open_peer(), key, sent, deadline)
            sent.notes["hello"] = client.hello("malformed")
            sent.messages = sent.frames = sent.bytes = 0  # the count is of malformed messages only
            worker = open_peer()
            done = 0
            while done < count:
                if time.monotonic() >= deadline:
                    sent.stopped = "time limit"
                    break
                if big_every and done % big_every == big_every - 1:
                    what, target, frames = "big_header", "client", big[(done // big_every) % 2]
                elif throwaway_every and done % throwaway_every == throwaway_every - 1:
                    what, target = "mdp_unknown_service", "throwaway"
                    service = f"no.such.service.{done}".encode()
                    frames = ([b"MDPC02", b"\x01", service, b"body"] if (done // throwaway_every) % 2
                              else [b"", b"MDPC01", service, b"body"])
                else:
                    target, make = templates[done % len(templates)]
                    what, frames = f"template_{done % len(templates)}", make(done)
                if target == "throwaway":
                    peer = open_peer()
                    ok = peer.send(frames, deadline)
                    peer.close(0.2 if ok else 0)
                else:
                    ok = (client.peer if target == "client" else worker).send(frames, deadline)
                if not ok:
                    sent.stopped = "time limit" if time.monotonic() >= deadline else "connection closed"
                    break
                sent.count(frames)
                kinds[what] = kinds.get(what, 0) + 1
                done += 1
                if done % 256 == 0:  # read what piled up, so the replies can be counted
                    _drain(client.peer, sent, 0.0, 512)
                    _drain(worker, sent, 0.0, 512)
            _drain(client.peer, sent, 0.2)
            _drain(worker, sent, 0.05)
            client.bye()
            worker.send(_WORKER_BYE, deadline)
    except Exception as exc:
        sent.stopped = f"error: {type(exc).__name__}: {exc}"
    sent.notes["sent_by_kind"] = {"throwaway_mdp": kinds.pop("mdp_unknown_service", 0),
                                  "big_header": kinds.pop("big_header", 0), "templates": sum(kinds.values())}
    return _finish(sent, started)


def call_flood(url: str, key: str, calls: int = 200_000, *, env_id: str = ENV_ID, time_limit: float = 60.0,
               linger: float = 2.0, heartbeat: float = 0.5, auth: str = "auto") -> Sent:
    """(c) A client of ``key``'s tenant says HELLO, OPENs one slot of ``env_id``, resets it
    once, sends ``calls`` step CALLs on it without reading any reply (HEARTBEATs every
    ``heartbeat`` seconds, as a live client does), then DISCONNECT. Only the CALLs count in
    ``messages``."""
    started = time.monotonic()
    deadline = started + time_limit
    sent = Sent("flood", _transport(url))
    try:
        with _peers(url, key, auth, deadline, linger, sent) as open_peer:
            client = _Session(open_peer(), key, sent, deadline)
            opened = client.start("flood", env_id)
            if opened is None:
                return _finish(sent, started)
            slot, worker = opened
            header, frames = _step_header(slot, 3, np.zeros(1, np.int64))
            message = [_CALL, worker, header, *frames]
            size = sum(len(f) for f in message)
            send, monotonic = client.peer.send, time.monotonic
            next_beat = monotonic() + heartbeat
            for i in range(calls):
                if not send(message, deadline):
                    sent.stopped = "time limit" if monotonic() >= deadline else "connection closed"
                    break
                sent.messages += 1
                if i & 255 == 255:
                    now = monotonic()
                    if now >= deadline:
                        sent.stopped = "time limit"
                        break
                    if now >= next_beat:
                        client.beat()
                        next_beat = now + heartbeat
            sent.frames, sent.bytes = sent.messages * len(message), sent.messages * size
            client.bye()
    except Exception as exc:
        sent.stopped = f"error: {type(exc).__name__}: {exc}"
    return _finish(sent, started)


def zero_size_actions(url: str, key: str, rows: int = 1 << 25, repeats: int = 3, *, env_id: str = ENV_ID,
                      reply_timeout: float = 30.0, time_limit: float = 100.0, linger: float = 0.5,
                      auth: str = "auto") -> Sent:
    """(d) A client of ``key``'s tenant opens one slot of ``env_id`` and sends ``repeats``
    step CALLs on it whose action is an int64 array of shape ``(rows, 0)`` (zero bytes),
    each waiting up to ``reply_timeout`` for its answer (HEARTBEATs meanwhile); stops early
    when a worker is lost or an answer does not come. ``notes["answers"]``: what each got."""
    started = time.monotonic()
    deadline = started + time_limit
    sent = Sent("zero_size", _transport(url))
    answers: list[dict] = []
    sent.notes["answers"] = answers
    try:
        with _peers(url, key, auth, deadline, linger, sent) as open_peer:
            client = _Session(open_peer(), key, sent, deadline)
            opened = client.start("zero-size", env_id)
            if opened is None:
                return _finish(sent, started)
            slot, worker = opened
            for i in range(repeats):
                r = 10 + i
                wait = min(reply_timeout, deadline - time.monotonic())
                if wait <= 0:
                    sent.stopped = "time limit"
                    break
                what, seconds = client.call(worker, _zero_size_header(slot, r, rows), [], r, wait)
                answers.append({"answer": what, "seconds": seconds})
                if what in ("not sent", "no answer", "WORKER_LOST"):
                    sent.stopped = f"stopped: {what}"
                    break
            client.bye()
    except Exception as exc:
        sent.stopped = f"error: {type(exc).__name__}: {exc}"
    return _finish(sent, started)


def huge_names(url: str, key: str, hellos: int = 10, name_bytes: int = 40_000_000, *,
               status_timeout: float = 15.0, time_limit: float = 60.0, linger: float = 1.0,
               auth: str = "auto") -> Sent:
    """(e) ``hellos`` peers holding ``key`` each say HELLO with a ``name`` of ``name_bytes``
    characters; then the last of them asks ``remoterl.status`` (Majordomo, the key as body)
    and waits up to ``status_timeout``; then all say DISCONNECT. ``notes``: the answers to
    the HELLOs, and the status answer's size and time (``None``: no answer)."""
    started = time.monotonic()
    deadline = started + time_limit
    sent = Sent("names", _transport(url))
    header = p.encode_header({"v": p.PROTOCOL_VERSION, "key": key, "name": "n" * name_bytes})
    try:
        with _peers(url, key, auth, deadline, linger, sent) as open_peer:
            peers = []
            for _ in range(hellos):
                if time.monotonic() >= deadline:
                    sent.stopped = "time limit"
                    break
                peer = open_peer()
                frames = [_HELLO, header]
                if not peer.send(frames, deadline):
                    sent.stopped = "time limit" if time.monotonic() >= deadline else "connection closed"
                    break
                sent.count(frames)
                peers.append(peer)
            answered = 0
            for peer in peers:  # WELCOME or ERROR each, all within one status_timeout
                left = max(0.05, min(status_timeout, deadline - time.monotonic()) / max(1, len(peers)))
                if _await(peer, sent, lambda f: reply_kind(f) != "other", left):
                    answered += 1
            sent.notes["hello_answers"] = answered
            status = None
            if peers:
                request = [b"MDPC02", b"\x01", b"remoterl.status", key.encode()]
                asked = time.monotonic()
                if peers[-1].send(request, deadline):
                    sent.count(request)
                    wait = max(0.05, min(status_timeout, deadline - time.monotonic()))
                    reply = _await(peers[-1], sent, lambda f: reply_kind(f) == "MDP", wait)
                    if reply is not None:
                        status = {"seconds": round(time.monotonic() - asked, 3), "bytes": len(reply[-1])}
            sent.notes["status"] = status
            for peer in peers:
                peer.send(_CLIENT_BYE, deadline)
    except Exception as exc:
        sent.stopped = f"error: {type(exc).__name__}: {exc}"
    return _finish(sent, started)


ABUSES: dict[str, Callable[..., Sent]] = {
    "frames": many_frames,
    "malformed": malformed,
    "flood": call_flood,
    "zero_size": zero_size_actions,
    "names": huge_names,
}
# Whose key each abuse holds in a trial: the trainer's tenant, another tenant's, or none.
_KEY_OF = {"frames": None, "malformed": "other", "flood": "trainer", "zero_size": "trainer", "names": "other"}


# --- the trial: a fresh broker and worker, a trainer stepping, one abuse ---------------------------------

_CHILD = ("import runpy, sys\n"
          "from remoterl._process import die_with_parent\n"
          "die_with_parent(int(sys.argv[1]))\n"
          "module = sys.argv[2]\n"
          "sys.argv = [module, *sys.argv[3:]]\n"
          "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """``remoterl-broker --bind tcp://127.0.0.1:PORT --api-keys FILE`` (plus ``--ws`` when
    asked) and one ``remoterl-worker --env CartPole-v1 -n SLOTS --procs 1`` holding the
    trainer tenant's key, as subprocesses that die with this process. Two tenants: the
    trainer's (``key``) and another (``other_key``). :meth:`close` kills both process trees
    (SIGTERM, then SIGKILL) and removes the key file."""

    def __init__(self, *, ws: bool = False, slots: int = 16, heartbeat: float = 1.0, liveness: int = 3) -> None:
        self.ws, self.slots, self.heartbeat, self.liveness = ws, slots, heartbeat, liveness
        self.key = "k-" + secrets.token_hex(16)
        self.other_key = "k-" + secrets.token_hex(16)
        self.tcp_url = f"tcp://127.0.0.1:{_free_port()}"
        self.ws_url = f"ws://127.0.0.1:{_free_port()}" if ws else None
        self.broker: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="remoterl-abuse-")
        self._procs: list[subprocess.Popen] = []
        self._logs: dict[str, str] = {}

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        path = os.pathsep.join(q for q in sys.path if q and os.path.isdir(q))
        log = self._logs[name] = os.path.join(self._dir, f"{name}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(os.getpid()), module, *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": path, **(env or {})}, start_new_session=True)
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        try:
            with open(self._logs[name], "rb") as f:
                return f.read()[-chars:].decode("utf-8", "replace")
        except (KeyError, OSError):
            return ""

    def start(self, timeout: float = 30.0) -> Deployment:
        """Start both; return once the worker is registered. Raises RuntimeError otherwise."""
        keys = os.path.join(self._dir, "keys.txt")
        with open(keys, "w") as f:
            f.write(f"{self.key} trainers\n{self.other_key} others\n")
        os.chmod(keys, 0o600)
        extra = ["--ws", self.ws_url.removeprefix("ws://")] if self.ws_url else []
        self.broker = self._spawn("broker", "remoterl.broker.cli", "--bind", self.tcp_url, "--api-keys", keys,
                                  "--heartbeat", repr(self.heartbeat), "--liveness", str(self.liveness), *extra)
        self.worker = self._spawn("worker", "remoterl.workers.cli", "--env", ENV_ID, "-n", str(self.slots),
                                  "--procs", "1", "--broker", self.tcp_url, "--name", "abuse-bench-worker",
                                  "--heartbeat", repr(self.heartbeat), "--liveness", str(self.liveness),
                                  env={"REMOTERL_API_KEY": self.key})  # not on the command line
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in (("broker", self.broker), ("worker", self.worker)):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if self.status(timeout=0.5)["workers"]:
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not register within {timeout:g} s:\n{self.log_tail('worker')}")
            time.sleep(0.02)

    def status(self, timeout: float = 5.0) -> dict:
        """The broker's ``remoterl.status`` for the trainer's tenant (``remoterl status --json``)."""
        from remoterl.cli import fetch_status

        return fetch_status(self.tcp_url, timeout=timeout, api_key=self.key)

    def rss(self) -> int | None:
        """The broker's resident set, bytes (None once it is gone)."""
        import psutil

        try:
            return psutil.Process(self.broker.pid).memory_info().rss if self.broker else None
        except psutil.Error:
            return None

    def alive(self) -> dict[str, bool]:
        return {name: proc is not None and proc.poll() is None
                for name, proc in (("broker", self.broker), ("worker", self.worker))}

    def close(self, grace: float = 1.0) -> None:
        """Kill every process started (their children too): SIGTERM, ``grace`` s, SIGKILL."""
        import psutil

        procs, self._procs = self._procs[::-1], []
        tree: list[psutil.Process] = []
        for proc in procs:
            try:
                parent = psutil.Process(proc.pid)
                tree += [*parent.children(recursive=True), parent]
            except psutil.Error:
                pass
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5.0)
        for proc in procs:  # reap, so no zombie is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class Trainer:
    """A well-behaved trainer in a thread: ``RemoteEnvVec(env_id, num_envs)`` on its own
    client, stepping back to back with pre-drawn actions until :meth:`stop` (or an error,
    or ``max_steps``). Counts every step it starts and every step that returns, and times
    each; a step that raises ends the loop (``error``)."""

    def __init__(self, url: str, key: str, *, env_id: str = ENV_ID, num_envs: int = 8, step_timeout: float = 30.0,
                 max_steps: int = 5_000_000) -> None:
        self.url, self.key, self.env_id, self.num_envs = url, key, env_id, num_envs
        self.step_timeout, self.max_steps = step_timeout, max_steps
        self.attempted = 0
        self.returned = 0
        self.error: str | None = None
        self.identity: str | None = None
        self._worst_since: tuple[float, float] = (float("inf"), 0.0)  # (mark, worst step since it)
        self._step_started: float | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abuse-trainer", daemon=True)

    def start(self, timeout: float) -> Trainer:
        """Start stepping; return once the first step returned. Raises RuntimeError otherwise."""
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            self.stop(1.0)
            raise RuntimeError(f"the trainer did not start stepping: {self.error or 'timed out'}")
        return self

    def mark(self) -> None:
        """Worst latency is counted from now on (warm-up excluded)."""
        self._worst_since = (time.monotonic(), 0.0)

    @property
    def worst(self) -> float:
        """Worst step latency since :meth:`mark`, the step in flight included (seconds)."""
        mark, worst = self._worst_since
        started = self._step_started
        if started is not None:
            worst = max(worst, time.monotonic() - max(started, mark))
        return worst

    def stop(self, timeout: float) -> bool:
        """Stop after the step in flight; False if it did not return within ``timeout``."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        from remoterl import Client, RemoteEnvVec

        client = None
        try:
            client = Client(self.url, api_key=self.key, name="abuse-trainer", timeout=self.step_timeout).connect()
            self.identity = client.identity.hex()
            envs = RemoteEnvVec(self.env_id, self.num_envs, client=client, max_workers=1, timeout=self.step_timeout)
            envs.reset(seed=0)
            envs.action_space.seed(0)
            actions = [envs.action_space.sample() for _ in range(64)]
            for i in range(self.max_steps):
                if self._stop.is_set():
                    break
                self._step(envs, actions[i & 63])
                self._ready.set()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
            # Keep the session until told to stop, so that the broker's status still lists
            # it (a client that left after an error is not a client the broker expired).
            self._stop.wait(600.0)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

    def _step(self, envs: Any, action: Any) -> None:
        clock = time.monotonic
        self.attempted += 1
        self._step_started = t = clock()
        try:
            obs = envs.step(action)[0]
        finally:
            end = clock()
            self._step_started = None
            mark, worst = self._worst_since
            if end - max(t, mark) > worst:  # a step begun before the mark counts from the mark
                self._worst_since = (mark, end - max(t, mark))
        if getattr(obs, "shape", None) != (self.num_envs, 4):
            raise RuntimeError(f"a step returned observations of shape {getattr(obs, 'shape', None)}")
        self.returned += 1


class _RssSampler:
    """The broker's RSS every ``interval`` seconds in a thread (bounded count), until stopped."""

    def __init__(self, read: Callable[[], int | None], interval: float = 0.02, limit: int = 200_000) -> None:
        self.samples: list[tuple[float, int]] = []
        self._read, self._interval, self._limit = read, interval, limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abuse-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self._limit:
            rss = self._read()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._stop.wait(self._interval)

    def between(self, start: float, end: float = float("inf")) -> list[int]:
        return [rss for t, rss in list(self.samples) if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _timing(quick: bool) -> dict[str, float]:
    # settle: at least settle_min seconds and settle_steps trainer steps after the abuse, until
    # the RSS is back (at most settle_max); grace: SIGTERM to SIGKILL at the end.
    if quick:
        return {"start": 20.0, "warm": 0.05, "idle": 0.05, "settle_min": 0.05, "settle_steps": 20, "settle_max": 1.0,
                "step_timeout": 5.0, "grace": 0.05}
    return {"start": 30.0, "warm": 1.0, "idle": 0.5, "settle_min": 1.0, "settle_steps": 200, "settle_max": 8.0,
            "step_timeout": 30.0, "grace": 1.0}


LATENCY_LIMIT_S = 1.0
RSS_LIMIT_MB = 20.0


def trial(kind: str, *, quick: bool = False, transport: str = "tcp", params: dict | None = None,
          note: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """One abuse against a fresh :class:`Deployment` while a :class:`Trainer` steps.

    Warm-up, the broker's idle RSS (trainer stepping), the abuse (in this thread), a settle
    period (until the RSS is back within ``RSS_LIMIT_MB`` of idle, at least ``settle_min``
    and at most ``settle_max`` seconds), then the trainer stops and the broker's counters
    are read. Returns the figures and ``checks`` (each True when met) and ``passed``.

    Args:
        kind: one of :data:`KINDS`.
        quick: the small sizes of :func:`sizes` and short phases.
        transport: ``"tcp"`` or ``"ws"`` for the hostile peers (the trainer and the worker
            always use tcp).
        params: overrides for the abuse's keyword arguments.
    """
    args = {**sizes(quick)[kind], **(params or {})}
    timing = _timing(quick)
    started = time.monotonic()
    result: dict[str, Any] = {"kind": kind, "label": LABELS[kind].format(**{**sizes(quick)[kind], **args}),
                              "transport": transport, "params": args}
    dep = Deployment(ws=transport == "ws")
    try:
        note(f"{kind}: start broker and worker")
        dep.start(timing["start"])
        t_started = time.monotonic()
        trainer = Trainer(dep.tcp_url, dep.key, step_timeout=timing["step_timeout"])
        sampler = None
        try:
            note(f"{kind}: trainer warm-up")
            trainer.start(timing["start"])
            time.sleep(timing["warm"])
            before = dep.status()
            workers = [w["id"] for w in before["workers"]]  # the deployment's one worker: the trainer's
            sampler = _RssSampler(dep.rss)
            t_idle = time.monotonic()
            time.sleep(timing["idle"])
            idle = sorted(sampler.between(t_idle))
            idle_rss = idle[len(idle) // 2] if idle else dep.rss()
            steps_before = trainer.returned
            trainer.mark()
            url = dep.ws_url if transport == "ws" else dep.tcp_url
            key = {"trainer": dep.key, "other": dep.other_key, None: None}[_KEY_OF[kind]]
            call_args = dict(args)
            if kind == "malformed":
                call_args.setdefault("worker_ids", [bytes.fromhex(w) for w in workers])
            note(f"{kind}: abuse")
            t_abuse = time.monotonic()
            try:
                sent = ABUSES[kind](url, key, **call_args) if key else ABUSES[kind](url, **call_args)
            except Exception as exc:  # the generator should not raise; if it does, say so
                sent = Sent(kind, transport, stopped=f"error: {type(exc).__name__}: {exc}")
            t_settle = time.monotonic()
            note(f"{kind}: settle")
            steps_at_end = trainer.returned
            while True:
                elapsed = time.monotonic() - t_settle
                after_rss = dep.rss()
                if after_rss is None or elapsed >= timing["settle_max"]:
                    break
                recovered = trainer.error is not None or trainer.returned - steps_at_end >= timing["settle_steps"]
                if elapsed >= timing["settle_min"] and after_rss - idle_rss <= RSS_LIMIT_MB * 1e6 and recovered:
                    break
                time.sleep(0.05)
            t_end = time.monotonic()
            steps_during = trainer.returned - steps_before
            worst = trainer.worst
            try:
                after = dep.status(timeout=min(5.0, timing["step_timeout"]))
                status_error = None
            except Exception as exc:
                after, status_error = None, f"{type(exc).__name__}: {exc}"
            t_stop = time.monotonic()
            stopped = trainer.stop(timing["step_timeout"] + 2.0)
            worst = max(worst, trainer.worst)
            alive = dep.alive()
            peak = max(sampler.between(t_abuse), default=idle_rss)
        finally:
            trainer.stop(0.5)
            if sampler is not None:
                sampler.stop()
    finally:
        t_close = time.monotonic()
        dep.close(timing["grace"])
    counters_before = before.get("counters", {})
    counters_after = (after or {}).get("counters", {})
    expired = {name: counters_after.get(name, 0) - counters_before.get(name, 0)
               for name in ("workers_expired", "clients_expired")} if after is not None else None
    gone = []
    if after is not None:
        listed_workers = {w["id"] for w in after.get("workers", [])}
        listed_clients = {c["id"] for c in after.get("clients", [])}
        gone = [f"worker {w[:8]}" for w in workers if w not in listed_workers]
        if trainer.identity not in listed_clients:
            gone.append("trainer client")
    lost = trainer.attempted - trainer.returned
    mb = 1e6
    result.update({
        "sent": sent.to_dict(),
        "steps": {"attempted": trainer.attempted, "returned": trainer.returned, "lost": lost,
                  "during_abuse_and_settle": steps_during, "trainer_stopped": stopped},
        "error": trainer.error,
        "worst_latency_s": worst,
        "expired": expired,
        "healthy_gone": gone,
        "status_error": status_error,
        "rss_mb": {"idle": (idle_rss or 0) / mb, "peak": (peak or 0) / mb,
                   "after": after_rss / mb if after_rss is not None else None},
        "alive": alive,
        "seconds": {"start": round(t_started - started, 3), "abuse": round(t_settle - t_abuse, 3),
                    "settle": round(t_end - t_settle, 3), "stop": round(t_close - t_stop, 3),
                    "close": round(time.monotonic() - t_close, 3), "trial": round(time.monotonic() - started, 3)},
    })
    checks = {
        "no error": trainer.error is None,
        "no lost step": lost == 0 and stopped,
        "latency": worst <= LATENCY_LIMIT_S,
        # Healthy peers are the trainer's client and its worker: still listed, under the same
        # ids. The counters may also count an abuser's own sessions (the flooder's, or all
        # tenants' on a broker whose status counters are broker-wide).
        "no expiry": after is not None and not gone,
        "rss": after_rss is not None and idle_rss is not None and (after_rss - idle_rss) / mb <= RSS_LIMIT_MB,
        "alive": all(alive.values()),
        "abuse sent": not sent.stopped.startswith("error"),
    }
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def summary(result: dict[str, Any]) -> str:
    """One line: the trainer's errors, lost steps, expiries and RSS (idle/peak/after), and
    which checks failed (latency is the figure's own column)."""
    steps = result["steps"]
    rss = result["rss_mb"]
    expired = result["expired"]
    text = f"{'1 error' if result['error'] else '0 errors'}, {steps['lost']} of {steps['attempted']:,} steps lost, "
    if expired is None:
        text += "expired: ? (no status)"
    else:
        gone, counted = result["healthy_gone"], sum(expired.values())
        text += f"expired: {', '.join(gone)}" if gone else "0 expired"
        if counted > len(gone):
            text += f" (+{counted - len(gone)} other{'s' if counted - len(gone) > 1 else ''} in the counters)"
    after = "gone" if rss["after"] is None else f"{rss['after']:.0f}"
    text += f", RSS {rss['idle']:.0f}/{rss['peak']:.0f}/{after} MB"
    failed = [name for name, ok in result["checks"].items() if not ok and name != "latency"]
    return text + (f"; failed: {', '.join(failed)}" if failed else "")


# --- command line --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/abuse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", dest="kinds", action="append", choices=KINDS, help="only this kind (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the small sizes")
    parser.add_argument("--transport", choices=("tcp", "ws"), default="tcp", help="the hostile peers' transport")
    parser.add_argument("--url", help="just send the abuse(s) to this broker (tcp:// or ws://), no trial")
    parser.add_argument("--key", help="with --url: the API key the keyed abuses hold")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    args = parser.parse_args(argv)
    kinds = args.kinds or list(KINDS)
    results = []
    for kind in kinds:
        if args.url:
            call = sizes(args.quick)[kind]
            sent = ABUSES[kind](args.url, args.key or "", **call) if _KEY_OF[kind] else ABUSES[kind](args.url, **call)
            results.append(sent.to_dict())
            print(json.dumps(sent.to_dict()), flush=True)
            continue
        result = trial(kind, quick=args.quick, transport=args.transport,
                       note=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
        results.append(result)
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"{result['label']} [{args.transport}]: worst step {result['worst_latency_s'] * 1000:,.0f} ms, "
              f"{summary(result)} — {verdict}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
