"""Slots: placing a client's envs on workers (OPEN), closing them (CLOSE), losing them.

Theory of operation
-------------------
A slot is one live env instance on one worker, held by one client.

* *Placement.* OPEN puts ``n`` slots on the least-loaded workers of the client's tenant
  that serve the env id (or ``"*"``, any id gymnasium can make there), at most
  ``max_workers`` of them if the client asks (:func:`_place`). A client that cannot be
  served is told why: no worker (with a did-you-mean for a likely typo, and what workers
  refused when they were asked to register the id), not enough free slots, or its
  tenant's limit (``max_slots_per_tenant``).
* *All or nothing.* The chosen workers are asked to create the envs; the client hears
  OPENED with every slot and its worker's routing id once all of them answered, or one
  ERROR (and every created env is closed again) when any of them failed, left, or did
  not answer within ``open_timeout``.
* *Sticky slots.* A slot never moves. Every CALL names the worker that holds the slot
  (``remoterl.broker.sessions``); when a worker goes, its clients hear WORKER_LOST for
  their slots there, sent by the session code once the worker is gone from every table.

Open requests to workers are numbered from the same sequence as registrations
(``remoterl.broker.registry``), so an ``r`` names one request across both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from remoterl.broker.base import BrokerConfig, Outbox, Refusal, header
from remoterl.broker.peers import Peers, RLClient, RLWorker, check_env_id, decrement, peer_name
from remoterl.broker.tenants import Tenants
from remoterl.errors import ProtocolError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["PendingOpen", "Placement", "Slot"]


@dataclass(eq=False)
class Slot:
    id: int
    client: bytes
    worker: bytes
    env: str
    open: bool = False


@dataclass(eq=False)
class PendingOpen:
    """An OPEN waiting for the workers that were asked to create its slots."""

    client: bytes
    client_r: Any
    env: str
    order: list            # slot ids in the order the client will see them
    waiting: set           # worker ids that have not answered yet
    deadline: float
    env_desc: Any = None
    error: dict | None = None


class Placement:
    """The slots and the OPENs in progress.

    Args:
        config: ``open_timeout``.
        outbox: where messages go.
        tenants: the per-tenant slot limit and counts.
        peers: the workers to place on and the clients that hold slots.
        request_ids: numbers for the OPENs sent to workers (shared with registrations).
    """

    def __init__(self, config: BrokerConfig, outbox: Outbox, tenants: Tenants, peers: Peers,
                 request_ids: Iterator[int]) -> None:
        self.slots: dict[int, Slot] = {}
        self.pending: dict[int, PendingOpen] = {}  # request id sent to the workers -> the OPEN
        self._config = config
        self._outbox = outbox
        self._out = outbox.messages
        self._tenants = tenants
        self._peers = peers
        self._request_ids = request_ids
        self._next_slot = config.first_slot or 1

    # --- OPEN ------------------------------------------------------------------------------------

    def on_open(self, sender: bytes, frames: list, now: float, role: str) -> None:
        fields = header(frames, 1)
        r = fields.get("r")
        env = fields.get("env")
        n = fields.get("n", 1)
        kwargs = fields.get("kwargs") or {}
        opts = fields.get("opts") or {}
        max_workers = fields.get("max_workers")
        check_env_id(env, "OPEN", r)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise Refusal(r, "protocol", f"OPEN needs n >= 1 slots, got {n!r}")
        if not isinstance(kwargs, dict) or not isinstance(opts, dict):
            raise Refusal(r, "protocol", "OPEN kwargs and opts must be maps")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise Refusal(r, "protocol", f"max_workers must be a positive integer, got {max_workers!r}")
        client = self._peers.client(sender, now, r)
        # "*": a worker that serves any env id gymnasium can make there (the embedded default).
        # Only the client's own tenant's workers are candidates, or even mentioned.
        workers, env_index = self._peers.workers, self._peers.env_index
        serving = [workers[w] for w in env_index.get(env, set()) | env_index.get("*", set())
                   if workers[w].tenant == client.tenant]
        if not serving:
            raise Refusal(r, "no_worker", self._no_worker_message(env, client.tenant))
        self._tenants.check_slots(client.tenant, n, r)
        placement = _place(serving, n, max_workers)
        if placement is None:
            free = sum(max(w.free, 0) for w in serving)
            raise Refusal(r, "capacity", (
                f"{len(serving)} worker(s) serve {env!r} but only {free} of their slots are free "
                f"({n} asked for); start more with: remoterl-worker --env {env} -n {n}"))
        open_r = next(self._request_ids)
        order: list[int] = []
        by_worker: dict[bytes, list[int]] = {}
        for worker in placement:
            slot = Slot(self._next_slot, sender, worker.id, env)
            self._next_slot += 1
            self.slots[slot.id] = slot
            worker.slots.add(slot.id)
            worker.clients[sender] += 1
            client.slots.add(slot.id)
            client.workers[worker.id] += 1
            self._tenants.slots[client.tenant] += 1
            order.append(slot.id)
            by_worker.setdefault(worker.id, []).append(slot.id)
        self.pending[open_r] = PendingOpen(sender, r, env, order, set(by_worker), now + self._config.open_timeout)
        for worker_id, slot_ids in by_worker.items():
            self._out.append([worker_id, p.worker_frame(W.OPEN), sender, p.encode_header(
                {"r": open_r, "env": env, "kwargs": kwargs, "opts": opts, "slots": slot_ids})])
        self._outbox.counters["opens"] += 1

    def _no_worker_message(self, env: str, tenant: str) -> str:
        workers = self._peers.workers
        served = sorted(e for e, ids in self._peers.env_index.items() if any(workers[w].tenant == tenant for w in ids))
        listing = ", ".join(served) if served else "nothing (no worker is connected)"
        refusals = [f"worker {peer_name(w.id, w.info)} refused to register it: {w.refused[env]}"
                    for w in workers.values() if env in w.refused and w.tenant == tenant]
        why = (" " + "; ".join(refusals) + ".") if refusals else ""
        close = difflib.get_close_matches(env, served, n=3, cutoff=0.75)
        if close and not refusals:  # a typo, most likely: say so first
            return (f"no worker serves env id {env!r}: did you mean {' or '.join(map(repr, close))}? "
                    f"Workers serve: {listing}.")
        return (f"no worker serves env id {env!r}; workers serve: {listing}.{why} "
                f"Start one with: remoterl-worker --env {env} --broker URL")

    def on_opened(self, sender: bytes, frames: list, now: float, role: str) -> None:
        if self._peers.known_worker(sender, "OPENED", now) is None:
            return
        fields = header(frames, 2, limit=None)  # carries the env's description (spaces)
        r = fields.get("r")
        pending = self.pending.get(r) if isinstance(r, int) else None
        if pending is None or sender not in pending.waiting:
            raise ProtocolError(f"OPENED for unknown open request {r!r}")
        pending.waiting.discard(sender)
        error = fields.get("error")
        if error is not None:
            pending.error = pending.error or (error if isinstance(error, dict) else {"code": "protocol", "msg": repr(error)})
        elif pending.env_desc is None:
            pending.env_desc = fields.get("env")
        if not pending.waiting:
            self._finish_open(r, pending)

    def _finish_open(self, r: int, pending: PendingOpen) -> None:
        del self.pending[r]
        client = self._peers.clients.get(pending.client)
        live = [self.slots[s] for s in pending.order if s in self.slots]
        if pending.error is None and client is not None and len(live) == len(pending.order):
            for slot in live:
                slot.open = True
            self._out.append([pending.client, p.client_frame(C.OPENED), p.encode_header({
                "r": pending.client_r,
                "slots": [[slot.id, slot.worker] for slot in live],
                "env": pending.env_desc,
            })])
            return
        # All or nothing: release what was created, then report the first error.
        self.close(live)
        if client is not None:
            error = pending.error or {"code": "worker_lost", "msg": "a worker was lost while opening slots"}
            self._out.append([pending.client, p.client_frame(C.ERROR), p.encode_header({**error, "r": pending.client_r})])

    def expire(self, now: float) -> None:
        """Fail the OPENs whose workers did not all answer within ``open_timeout``."""
        for r, pending in list(self.pending.items()):
            if now >= pending.deadline:
                pending.error = pending.error or {"code": "timeout", "msg": (
                    f"workers did not create {pending.env!r} within {self._config.open_timeout:g} s")}
                pending.waiting.clear()
                self._finish_open(r, pending)

    # --- CLOSE and release -----------------------------------------------------------------------

    def on_close(self, sender: bytes, frames: list, now: float, role: str) -> None:
        fields = header(frames, 1)
        r = fields.get("r")
        wanted = fields.get("slots")
        if not isinstance(wanted, list):
            raise Refusal(r, "protocol", "CLOSE needs a list of slots")
        client = self._peers.client(sender, now, r)
        mine = [self.slots[s] for s in dict.fromkeys(s for s in wanted if type(s) is int and s in client.slots)]
        self.close(mine)
        self._out.append([sender, p.client_frame(C.CLOSED), p.encode_header({"r": r, "closed": [s.id for s in mine]})])

    def close(self, slots: list[Slot]) -> None:
        """Free slots in the tables and tell their workers to close the envs."""
        by_worker: dict[tuple[bytes, bytes], list[int]] = {}
        for slot in slots:
            self._forget(slot)
            by_worker.setdefault((slot.worker, slot.client), []).append(slot.id)
        for (worker_id, client_id), ids in by_worker.items():
            if worker_id in self._peers.workers:
                self._out.append([worker_id, p.worker_frame(W.CLOSE), client_id, p.encode_header({"slots": ids})])

    def _forget(self, slot: Slot) -> None:
        if self.slots.pop(slot.id, None) is None:
            return  # already forgotten: the counters below must drop once per slot
        worker = self._peers.workers.get(slot.worker)
        if worker is not None:
            worker.slots.discard(slot.id)
            decrement(worker.clients, slot.client)
        client = self._peers.clients.get(slot.client)
        if client is not None:
            client.slots.discard(slot.id)
            decrement(client.workers, slot.worker)
            if slot.worker not in client.workers:
                client.inflight.pop(slot.worker, None)  # its replies are dropped from now on
            decrement(self._tenants.slots, client.tenant)

    def release_worker(self, worker: RLWorker, reason: str) -> dict[bytes, list[int]]:
        """Forget the slots of a worker that is going (it is still in the tables), and fail the
        OPENs waiting for it. Returns the open slots lost, by client, for WORKER_LOST."""
        lost: dict[bytes, list[int]] = {}
        for slot_id in list(worker.slots):
            slot = self.slots[slot_id]
            if slot.open:
                lost.setdefault(slot.client, []).append(slot_id)
            self._forget(slot)
        for r, pending in list(self.pending.items()):
            if worker.id in pending.waiting:
                pending.waiting.discard(worker.id)
                pending.error = pending.error or {"code": "worker_lost", "msg": (
                    f"worker {peer_name(worker.id, worker.info)} {reason} while opening {pending.env!r}")}
                if not pending.waiting:
                    self._finish_open(r, pending)
        return lost

    def release_client(self, client: RLClient) -> None:
        """Close the slots of a client that is going; its OPENs in progress end with no answer."""
        self.close([self.slots[s] for s in list(client.slots)])
        for pending in self.pending.values():
            if pending.client == client.id:
                pending.error = {"code": "closed", "msg": "client left"}


def _place(workers: list[RLWorker], n: int, max_workers: int | None) -> list[RLWorker] | None:
    """Choose a worker for each of ``n`` slots, least loaded first; None if they don't fit."""
    candidates = sorted((w for w in workers if w.free > 0), key=lambda w: (len(w.slots) / max(w.capacity, 1), w.id))
    if max_workers is not None:
        candidates = candidates[:max_workers]
    free = {w.id: w.free for w in candidates}
    if sum(free.values()) < n:
        return None
    load = {w.id: len(w.slots) for w in candidates}
    chosen: list[RLWorker] = []
    for _ in range(n):
        best = min((w for w in candidates if free[w.id] > 0), key=lambda w: (load[w.id] / max(w.capacity, 1), w.id))
        chosen.append(best)
        free[best.id] -= 1
        load[best.id] += 1
    return chosen
