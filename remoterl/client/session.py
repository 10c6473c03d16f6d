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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from remoterl.wire import codec
from remoterl.wire import protocol as p
from remoterl.errors import (
    EnvClosedError,
    ProtocolError,
    RemoteRLError,
    WorkerLostError,
    error_from_wire,
)
from remoterl.wire.protocol import ClientCommand as C

__all__ = ["ClientCore", "Pending"]

log = logging.getLogger(__name__)

_REPLY = p.client_frame(C.REPLY)


@dataclass(eq=False)
class Pending:
    """A request waiting for its answer."""

    r: int
    worker: bytes | None
    done: bool = False
    result: Any = None
    error: BaseException | None = None

    def complete(self, result: Any = None, error: BaseException | None = None) -> None:
        self.done, self.result, self.error = True, result, error


@dataclass
class _SlotState:
    worker: bytes
    lost: str | None = None
    closed: bool = False


@dataclass
class ClientCore:
    """Bookkeeping of one client session."""

    slots: dict[int, _SlotState] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    _next_r: int = 1

    def new_request(self, worker: bytes | None = None) -> Pending:
        """Register a request and return its pending entry (send ``entry.r`` in the header)."""
        r = self._next_r
        self._next_r += 1
        entry = self.pending[r] = Pending(r, worker)
        return entry

    def forget(self, entry: Pending) -> None:
        """Stop waiting for ``entry`` (it timed out); a late answer will be dropped."""
        self.pending.pop(entry.r, None)

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

    def lose_all(self, reason: str, error: type[RemoteRLError] = WorkerLostError) -> None:
        """The session is gone (broker lost or restarted): every slot and request fails."""
        for state in self.slots.values():
            if state.lost is None:
                state.lost = reason
        for entry in list(self.pending.values()):
            entry.complete(error=error(reason))
        self.pending.clear()

    def receive(self, frames: list) -> None:
        """Handle one message from the broker (routing frames already stripped).

        Raises:
            ProtocolError: the message is malformed (the caller logs and carries on).
        """
        if not frames:
            raise ProtocolError("empty message from the broker")
        frame0 = p.as_bytes(frames[0])
        if frame0 == _REPLY:
            if len(frames) < 2:
                raise ProtocolError("REPLY without a header")
            reply = codec.decode(frames[1], frames, 2)
            if not isinstance(reply, dict):
                raise ProtocolError("REPLY header is not a map")
            entry = self.pending.pop(_request_id(reply), None)
            if entry is None:
                return
            error = reply.get("error")
            if error is not None:
                entry.complete(error=error_from_wire(error))
            else:
                entry.complete(reply)
            return
        kind, command = p.signature(frame0)
        if kind != "rl-client" or len(frames) < 2:
            raise ProtocolError(f"unexpected message {frame0[:8]!r} from the broker")
        header = p.decode_header(frames[1])
        if command == C.WORKER_LOST:
            self._worker_lost(header)
            return
        if command in (C.OPENED, C.CLOSED, C.ERROR, C.REGISTERED):
            entry = self.pending.pop(_request_id(header), None)
            if entry is None:
                if command == C.ERROR:
                    log.warning("broker error: %s", header.get("msg"))
                return
            if command == C.ERROR:
                entry.complete(error=error_from_wire(header))
            else:
                entry.complete(header)
            return
        if command == C.WELCOME:
            return  # a repeated HELLO's answer
        raise ProtocolError(f"unexpected client command 0x{command:02x}")

    def _worker_lost(self, header: dict) -> None:
        worker = header.get("worker")
        reason = str(header.get("msg") or "worker lost")
        slots = header.get("slots") or []
        if not isinstance(slots, list) or not all(isinstance(s, int) for s in slots):
            raise ProtocolError("WORKER_LOST slots must be a list of integers")
        for slot in slots:
            state = self.slots.get(slot)
            if state is not None and state.lost is None:
                state.lost = reason
        for r, entry in list(self.pending.items()):
            if entry.worker is not None and entry.worker == worker:
                del self.pending[r]
                entry.complete(error=WorkerLostError(reason))


def _request_id(header: dict) -> int | None:
    r = header.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool)):
        raise ProtocolError(f"request id must be an integer, got {type(r).__name__}")
    return r
