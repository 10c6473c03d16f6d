"""A remoterl client spoken frame by frame, for the hostile peers of bench/abuse.py that hold a key.

:class:`Session` says HELLO, OPENs a slot, sends CALLs and waits for their answers (with
HEARTBEATs meanwhile) and says DISCONNECT, over any :class:`abuse_peers.Peer`, counting into
a :class:`abuse_peers.Sent`. The frames it and the abuses send are here too: the commands'
first frames, the goodbyes, a step CALL's header, and one written by hand whose action is
a zero-size array (remoterl's encoder refuses to write it).
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable

import msgpack

from abuse_peers import Peer, Sent, read_until, reply_kind
from remoterl.wire import codec
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["CALL", "CLIENT_BYE", "ENV_ID", "HEARTBEAT", "HELLO", "OPEN", "WORKER_BYE", "Session", "step_header",
           "zero_size_header"]

ENV_ID = "CartPole-v1"  # the env the trial's worker serves and the keyed abuses open

HELLO, OPEN, CALL, HEARTBEAT = (p.client_frame(c) for c in (C.HELLO, C.OPEN, C.CALL, C.HEARTBEAT))
CLIENT_BYE = [p.client_frame(C.DISCONNECT), p.encode_header({})]
WORKER_BYE = [p.worker_frame(W.DISCONNECT)]


def _r_of(frames: list) -> Any:
    """``r`` of a REPLY (codec header) or an ERROR (control header); None if unreadable."""
    try:
        if bytes(frames[0]) == p.client_frame(C.REPLY):
            return codec.decode(bytes(frames[1]), frames, 2).get("r")
        return p.decode_header(bytes(frames[1])).get("r")
    except Exception:
        return None


def _answer_to(r: int) -> Callable[[list], bool]:
    """Accepts the REPLY or ERROR of request ``r``, or a WORKER_LOST."""
    kinds = {p.client_frame(C.REPLY), p.client_frame(C.ERROR)}
    lost = p.client_frame(C.WORKER_LOST)
    return lambda frames: bytes(frames[0]) == lost or (bytes(frames[0]) in kinds and _r_of(frames) == r)


class Session:
    """A keyed remoterl client spoken frame by frame: HELLO, OPEN, calls, HEARTBEAT, DISCONNECT."""

    def __init__(self, peer: Peer, key: str | None, sent: Sent, deadline: float) -> None:
        self.peer, self.key, self.sent, self.deadline = peer, key, sent, deadline
        self.you: bytes | None = None

    def _wait(self, timeout: float) -> float:
        """``timeout``, but at most a quarter of what is left before the deadline."""
        return min(timeout, max(0.0, self.deadline - time.monotonic()) / 4)

    def send(self, frames: list) -> bool:
        """Send one message before the deadline and count it; False if it could not go."""
        ok = self.peer.send(frames, self.deadline)
        if ok:
            self.sent.count(frames)
        return ok

    def _ask(self, frames: list, answer: C, timeout: float,
             heartbeat: Callable[[], None] | None = None) -> dict | None:
        """Send ``frames``, then wait for ``answer`` or an ERROR: the answer's header, or None."""
        if not self.send(frames):
            return None
        want, error = p.client_frame(answer), p.client_frame(C.ERROR)
        reply = read_until(self.peer, self.sent, lambda f: bytes(f[0]) in (want, error), self._wait(timeout),
                           heartbeat)
        if reply is None or bytes(reply[0]) != want:
            return None
        return p.decode_header(bytes(reply[1]))

    def hello(self, name: str, timeout: float = 5.0) -> bool:
        """HELLO (with the key, if any); True once WELCOMEd."""
        header = {"v": p.PROTOCOL_VERSION, "name": name}
        if self.key:
            header["key"] = self.key
        welcome = self._ask([HELLO, p.encode_header(header)], C.WELCOME, timeout)
        if welcome is None:
            return False
        you = welcome.get("you")
        self.you = you if isinstance(you, bytes) else None
        return True

    def beat(self) -> None:
        """A HEARTBEAT naming this session (not counted in ``sent``)."""
        if self.you is not None:
            header = {"id": self.you, **({"key": self.key} if self.key else {})}
            self.peer.send([HEARTBEAT, p.encode_header(header)], self.deadline)

    def open_one(self, env_id: str, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """OPEN one slot of ``env_id``: ``(slot, worker)``, or None if not OPENED."""
        opened = self._ask([OPEN, p.encode_header({"r": 1, "env": env_id, "n": 1, "kwargs": {}})], C.OPENED, timeout,
                           self.beat)
        if opened is None:
            return None
        slot, worker = opened["slots"][0]
        return int(slot), bytes(worker)

    def call(self, worker: bytes, header: bytes, frames: list, r: int, timeout: float) -> tuple[str, float]:
        """Send one CALL and wait for its answer: ``(what came back, seconds)``."""
        started = time.monotonic()
        if not self.send([CALL, worker, header, *frames]):
            return "not sent", 0.0
        reply = read_until(self.peer, self.sent, _answer_to(r), timeout, self.beat)
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
        sent.recount()
        return opened

    def bye(self) -> None:
        """DISCONNECT (not counted)."""
        self.peer.send(CLIENT_BYE, self.deadline)


def step_header(slot: int, r: int, action: Any) -> tuple[bytes, list]:
    """A step call on ``slot`` with request id ``r``: its codec header and data frames."""
    return codec.encode({"op": "step", "a": action, "m": 0, "r": r, "slots": [slot]}, name="call")


def zero_size_header(slot: int, r: int, rows: int) -> bytes:
    """A step call's codec header whose action is an int64 array of shape ``(rows, 0)``:
    written by hand (codec ext 1, no data bytes), since remoterl's own encoder refuses it."""
    meta = msgpack.packb(["<i8", [rows, 0]])
    action = msgpack.ExtType(1, struct.pack("<H", len(meta)) + meta)
    return msgpack.packb({"op": "step", "a": action, "m": 0, "r": r, "slots": [slot]}, use_bin_type=True)

