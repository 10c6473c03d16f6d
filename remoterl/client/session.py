"""Client state, sans-I/O: slots, request ids, pending calls and what replies mean.

Theory of operation
-------------------
A trainer's :class:`~remoterl.client.connection.Client` owns the sockets; this core owns the
bookkeeping. Every request gets an id ``r`` and a :class:`Pending` entry naming the
worker it went to (``None`` for broker requests: OPEN, CLOSE). :meth:`ClientCore.receive`
takes a message from the broker and completes pending entries:

* REPLY (a worker's answer to a CALL; codec-encoded) and OPENED / CLOSED / ERROR
  (the broker's answers; msgpack) complete the entry with the same ``r``.
* WORKER_LOST marks the named slots lost and fails every pending call to that
  worker with :class:`~remoterl.errors.WorkerLostError`; later calls on those slots
  fail the same way before anything is sent (:meth:`ClientCore.check_slots`).
* A reply for an ``r`` nobody waits for (it timed out) is dropped.

Slot states: open → closed (by the owner: :class:`EnvClosedError` on use) or
open → lost (worker or broker gone: :class:`WorkerLostError` on use). Neither goes
back to open.

The session also builds every message a client sends (HELLO, OPEN, CLOSE, REGISTER,
CALL, DISCONNECT, the heartbeat's ping) and reads the broker's WELCOME, and it owns the
session's fate: :attr:`ClientCore.lost` says why the broker is gone (set by whoever
notices: the heartbeat thread, a stopped in-process broker), after which every pending
and later request fails with ``BrokerUnavailableError``; a request not answered in time
is forgotten (:meth:`ClientCore.timed_out`) so that its late answer is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from remoterl.wire import codec
from remoterl.wire import protocol as p
from remoterl.wire.calls import SHARED
from remoterl.errors import (
    BrokerUnavailableError,
    EnvClosedError,
    MessageTooLargeError,
    ProtocolError,
    RemoteRLError,
    RemoteTimeoutError,
    WorkerLostError,
    error_from_wire,
)
from remoterl.wire.protocol import ClientCommand as C

__all__ = ["ClientCore", "Opened", "Pending", "Welcome"]

log = logging.getLogger(__name__)

_REPLY = p.client_frame(C.REPLY)
_CALL = p.client_frame(C.CALL)
_ERROR = p.client_frame(C.ERROR)
_WELCOME = p.client_frame(C.WELCOME)


@dataclass
class Welcome:
    """What the broker said in WELCOME: how it names this client, its timing and limits."""

    identity: bytes | None
    heartbeat: float
    liveness: int
    max_message_size: int
    broker: str | None


@dataclass
class Opened:
    """The answer to an OPEN: slots in order, their workers, the env's description."""

    slots: list[int]
    workers: list[bytes]
    env: dict


@dataclass(eq=False)
class Pending:
    """A request waiting for its answer."""

    r: int
    worker: bytes | None
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    segment: Any = None  # the shared-memory segment this call's reply may use (claimed)
    op: str | None = None  # a CALL's op and slot count, and when it was sent (remoterl.client.metrics)
    n: int = 0
    sent: float = 0.0

    def complete(self, result: Any = None, error: BaseException | None = None) -> None:
        self.done, self.result, self.error = True, result, error
        self.release()

    def release(self) -> None:
        if self.segment is not None:
            self.segment.release()
            self.segment = None


@dataclass
class _SlotState:
    worker: bytes
    lost: str | None = None
    closed: bool = False


@dataclass
class ClientCore:
    """Bookkeeping of one client session, and every message it sends."""

    slots: dict[int, _SlotState] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    lost: str | None = None
    _next_r: int = 1
    # Shared memory with workers on this host (remoterl.io.shm; the Client makes and maps the
    # segments): worker -> the segment its replies may use, and id -> its view for decoding.
    shared: dict[bytes, Any] = field(default_factory=dict)
    segments: dict[int, memoryview] = field(default_factory=dict)
    _next_segment: int = 1

    # --- messages --------------------------------------------------------------------------

    @staticmethod
    def hello(info: dict, api_key: str | None = None) -> list[bytes]:
        """HELLO: ``info`` (name, pid, host) as ``remoterl status`` shows it, and the key."""
        header = {"v": p.PROTOCOL_VERSION, **info}
        if api_key:
            header["key"] = api_key
        return [p.client_frame(C.HELLO), p.encode_header(header)]

    @staticmethod
    def welcome(frames: list, url: str) -> Welcome:
        """Read the broker's answer to HELLO.

        Raises:
            AuthenticationError, LimitExceededError: the broker refused this client.
            ProtocolError: the peer does not answer like a remoterl broker.
        """
        if p.as_bytes(frames[0]) == _ERROR and len(frames) >= 2:
            raise error_from_wire(p.decode_header(frames[1]))
        if p.as_bytes(frames[0]) != _WELCOME or len(frames) < 2:
            raise ProtocolError(f"the peer at {url} did not answer like a remoterl broker")
        header = p.decode_header(frames[1])
        you = header.get("you")  # the broker names us as it sees us (a WebSocket bridge assigns ids)
        return Welcome(you if isinstance(you, bytes) and you else None, float(header.get("heartbeat", 1.0)),
                       int(header.get("liveness", 3)), int(header.get("max_message_size", p.MAX_MESSAGE_SIZE)),
                       header.get("broker"))

    @staticmethod
    def ping(identity: bytes, api_key: str | None = None) -> dict:
        """The heartbeat's ping header: it names the main socket's routing id."""
        return {"id": identity, "key": api_key} if api_key else {"id": identity}

    @staticmethod
    def disconnect() -> list[bytes]:
        return [p.client_frame(C.DISCONNECT), p.encode_header({})]

    def open(self, env_id: str, n: int, kwargs: dict | None, opts: dict | None,
             max_workers: int | None) -> tuple[Pending, list[bytes]]:
        """OPEN ``n`` slots of ``env_id`` (read the answer with :meth:`opened`)."""
        entry = self.new_request()
        header = {"r": entry.r, "env": env_id, "n": n, "kwargs": kwargs or {}}
        if max_workers is not None:
            header["max_workers"] = max_workers
        if opts:
            header["opts"] = opts
        return entry, [p.client_frame(C.OPEN), p.encode_header(header)]

    def opened(self, reply: dict) -> Opened:
        """Take OPENED: the slots are this session's from now on."""
        slots = [s for s, _ in reply["slots"]]
        workers = [w for _, w in reply["slots"]]
        self.add_slots(slots, workers)
        env = codec.decode(reply["env"]) if reply.get("env") is not None else {}
        return Opened(slots, workers, env)

    def close(self, slots: list[int]) -> tuple[Pending, list[bytes]] | None:
        """Mark ``slots`` closed; CLOSE for the live ones, or None when there is nothing to tell
        the broker (all lost, or the session is)."""
        live = [s for s in slots if s in self.slots and self.slots[s].lost is None]
        self.mark_closed(slots)
        if not live or self.lost is not None:
            return None
        entry = self.new_request()
        return entry, [p.client_frame(C.CLOSE), p.encode_header({"r": entry.r, "slots": live})]

    def register(self, spec: dict) -> tuple[Pending, list[bytes]]:
        """REGISTER a gymnasium registration (entry-point string, kwargs, spec fields)."""
        entry = self.new_request()
        return entry, [p.client_frame(C.REGISTER), p.encode_header({"r": entry.r, "spec": spec})]

    def call(self, worker: bytes, slots: list[int], request: dict, name: str = "call") -> tuple[Pending, list]:
        """CALL ``worker`` for ``slots`` with ``request`` (``r`` and ``slots`` filled in here).

        Raises:
            EnvClosedError, WorkerLostError: a slot cannot be used.
            CodecError: a value cannot travel (names the key). Nothing is left pending.
        """
        self.check_slots(slots)
        entry = self.new_request(worker)
        request["r"] = entry.r
        request["slots"] = slots
        entry.op, entry.n = request.get("op"), len(slots)
        if self.shared:
            segment = self.shared.get(worker)
            if segment is not None and segment.claim():  # one call at a time may use it
                request[SHARED] = segment.id
                entry.segment = segment
        try:
            header, frames = codec.encode(request, name=name)
        except BaseException:
            self.forget(entry)  # nothing sent: no reply will ever come for it
            raise
        return entry, [_CALL, worker, header, *frames]

    def check_send(self, frames: list, max_message_size: int) -> None:
        """Raise before sending on a lost session or an oversized message.

        Raises:
            BrokerUnavailableError: the session is lost.
            MessageTooLargeError: the message is over the broker's limit.
        """
        if self.lost is not None:
            raise BrokerUnavailableError(self.lost)
        size = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        if size > max_message_size:
            raise MessageTooLargeError(
                f"message of {size} bytes exceeds the broker's limit of {max_message_size} bytes "
                f"(remoterl-broker --max-message-size)")

    # --- fate ------------------------------------------------------------------------------

    def mark_lost(self, reason: str) -> None:
        """The broker is gone (safe from any thread: the waiting thread fails what is pending)."""
        if self.lost is None:
            self.lost = reason

    def timed_out(self, entries: list[Pending], entry: Pending, url: str) -> RemoteTimeoutError:
        """Forget every unanswered entry (late answers are dropped); the error to raise."""
        for e in entries:
            if not e.done:
                self.forget(e)
        return RemoteTimeoutError(
            f"no reply from {'worker ' + entry.worker.hex()[:12] if entry.worker else 'the broker'} "
            f"within the timeout (broker {url})")

    # --- bookkeeping -----------------------------------------------------------------------

    def new_request(self, worker: bytes | None = None) -> Pending:
        """Register a request and return its pending entry (send ``entry.r`` in the header)."""
        r = self._next_r
        self._next_r += 1
        entry = self.pending[r] = Pending(r, worker)
        return entry

    def forget(self, entry: Pending) -> None:
        """Stop waiting for ``entry`` (it timed out); a late answer will be dropped."""
        self.pending.pop(entry.r, None)
        entry.release()

    # --- shared-memory segments ------------------------------------------------------------------

    def new_segment_id(self) -> int:
        ident, self._next_segment = self._next_segment, self._next_segment + 1
        return ident

    def share(self, worker: bytes, segment: Any) -> None:
        """From now on ``worker``'s replies may use ``segment`` (the worker has mapped it)."""
        old = self.shared.get(worker)
        self.shared[worker] = segment
        self.segments[segment.id] = segment.view
        if old is not None:
            self._retire(old)

    def unshare(self, worker: Any) -> None:
        """Forget ``worker``'s segment (its worker is gone, or holds no slot of ours)."""
        segment = self.shared.pop(worker, None)
        if segment is not None:
            self._retire(segment)

    def _retire(self, segment: Any) -> None:
        # A segment a call still uses stays mapped (for that reply) until the client closes.
        if not segment.busy:
            self.segments.pop(segment.id, None)
            segment.close()

    def add_slots(self, slots: list[int], workers: list[bytes]) -> None:
        for slot, worker in zip(slots, workers):
            self.slots[slot] = _SlotState(worker)

    def check_slots(self, slots: list[int]) -> None:
        """Raise before sending if a slot is closed or lost.

        Raises:
            EnvClosedError: the owner closed the slot.
            WorkerLostError: the slot's worker (or the broker session) is gone.
        """
        for slot in slots:
            state = self.slots.get(slot)
            if state is None or state.closed:
                raise EnvClosedError(f"slot {slot} is closed")
            if state.lost is not None:
                raise WorkerLostError(state.lost)

    def mark_closed(self, slots: list[int]) -> None:
        for slot in slots:
            state = self.slots.pop(slot, None)
            if state is not None:
                state.closed = True
        if self.shared:
            holding = {state.worker for state in self.slots.values()}
            for worker in [w for w in self.shared if w not in holding]:
                self.unshare(worker)

    def lose_all(self, reason: str, error: type[RemoteRLError] = WorkerLostError) -> None:
        """The session is gone (broker lost or restarted): every slot and request fails."""
        for state in self.slots.values():
            if state.lost is None:
                state.lost = reason
        for entry in list(self.pending.values()):
            entry.complete(error=error(reason))
        self.pending.clear()
        for worker in list(self.shared):
            self.unshare(worker)

    def receive(self, frames: list) -> Pending | None:
        """Handle one message from the broker (routing frames already stripped); returns the
        call a REPLY completed, if any.

        Raises:
            ProtocolError: the message is malformed (the caller logs and carries on).
        """
        if not frames:
            raise ProtocolError("empty message from the broker")
        frame0 = p.as_bytes(frames[0])
        if frame0 == _REPLY:
            if len(frames) < 2:
                raise ProtocolError("REPLY without a header")
            reply = codec.decode(frames[1], frames, 2, self.segments)
            if not isinstance(reply, dict):
                raise ProtocolError("REPLY header is not a map")
            entry = self.pending.pop(_request_id(reply), None)
            if entry is None:
                return None
            error = reply.get("error")
            if error is not None:
                entry.complete(error=error_from_wire(error))
            else:
                entry.complete(reply)
            return entry
        kind, command = p.signature(frame0)
        if kind != "rl-client" or len(frames) < 2:
            raise ProtocolError(f"unexpected message {frame0[:8]!r} from the broker")
        header = p.decode_header(frames[1])
        if command == C.WORKER_LOST:
            self._worker_lost(header)
            return None
        if command in (C.OPENED, C.CLOSED, C.ERROR, C.REGISTERED):
            entry = self.pending.pop(_request_id(header), None)
            if entry is None:
                if command == C.ERROR:
                    log.warning("broker error: %s", header.get("msg"))
                return None
            if command == C.ERROR:
                error = error_from_wire(header)
                entry.complete(error=error)
                if isinstance(error, WorkerLostError) and entry.worker is not None:
                    # A CALL refused because its worker is gone: every slot there is lost now,
                    # not only once the broker's WORKER_LOST (which may follow) is read.
                    self._lose_worker(entry.worker, str(error), [s for s, st in self.slots.items()
                                                                 if st.worker == entry.worker])
            else:
                entry.complete(header)
            return None
        if command == C.WELCOME:
            return None  # a repeated HELLO's answer
        raise ProtocolError(f"unexpected client command 0x{command:02x}")

    def _worker_lost(self, header: dict) -> None:
        worker = header.get("worker")
        reason = str(header.get("msg") or "worker lost")
        slots = header.get("slots") or []
        if not isinstance(slots, list) or not all(isinstance(s, int) for s in slots):
            raise ProtocolError("WORKER_LOST slots must be a list of integers")
        self._lose_worker(worker, reason, slots)

    def _lose_worker(self, worker: Any, reason: str, slots: list[int]) -> None:
        """Mark ``slots`` lost and fail every call pending on ``worker``."""
        for slot in slots:
            state = self.slots.get(slot)
            if state is not None and state.lost is None:
                state.lost = reason
        for r, entry in list(self.pending.items()):
            if entry.worker is not None and entry.worker == worker:
                del self.pending[r]
                entry.complete(error=WorkerLostError(reason))
        if isinstance(worker, bytes):
            self.unshare(worker)


def _request_id(header: dict) -> int | None:
    r = header.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool)):
        raise ProtocolError(f"request id must be an integer, got {type(r).__name__}")
    return r
