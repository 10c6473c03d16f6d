"""The remoterl peers the broker knows: workers, clients, and which workers serve each env id.

:class:`Peers` holds the tables that the parts handling remoterl messages share
(``sessions``, ``placement``, ``registry``), and the lookups their handlers start with.
It decides nothing about sessions itself: peers are added and removed by
:class:`~remoterl.broker.sessions.Sessions`.

A routing id has one role at a time: a remoterl worker, a remoterl client or a
Majordomo worker. A message that would give a known peer a second role is bad input.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remoterl.broker.base import Outbox, Refusal
from remoterl.broker.metrics import Histogram
from remoterl.broker.tenants import Tenants
from remoterl.errors import ProtocolError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["CallRoute", "Peers", "RLClient", "RLWorker", "check_env_id", "decrement", "peer_name"]


@dataclass(eq=False)
class RLWorker:
    """A remoterl worker: the env ids it serves and the slots it hosts."""

    id: bytes
    envs: set
    capacity: int
    last_seen: float
    tenant: str = ""
    info: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)  # env id -> why the worker refused its registration
    slots: set = field(default_factory=set)
    clients: collections.Counter = field(default_factory=collections.Counter)
    calls: int = 0
    stats: dict = field(default_factory=dict)
    hb_from: bytes | None = None  # the socket its heartbeats come from (a side socket)
    # For the metrics (remoterl.broker.metrics): calls by env id, CALL -> REPLY times, and
    # (last_seen, heartbeat intervals counted as missed since then) for Sessions._count_misses.
    env_calls: dict = field(default_factory=dict)  # env id -> [calls] (a cell CallRoute counts in)
    call_time: Histogram = field(default_factory=Histogram)
    missed: tuple = (0.0, 0)

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots)


@dataclass(eq=False)
class RLClient:
    """A remoterl client (trainer) session."""

    id: bytes
    last_seen: float
    tenant: str = ""
    info: dict = field(default_factory=dict)
    slots: set = field(default_factory=set)
    workers: collections.Counter = field(default_factory=collections.Counter)
    inflight: dict = field(default_factory=dict)  # worker id -> calls forwarded, not yet answered
    hb_from: bytes | None = None  # the socket its heartbeats come from (a side socket)
    routes: dict = field(default_factory=dict)  # worker id -> CallRoute (for the metrics)
    missed: tuple = (0.0, 0)  # as RLWorker.missed

    def answered(self, worker: bytes) -> float | None:
        """One call to ``worker`` is no longer in flight (answered, or undeliverable); returns
        when the broker forwarded it (the oldest in flight: a worker answers in order), if known."""
        inflight = self.inflight
        n = inflight.get(worker, 0)
        if n > 1:
            inflight[worker] = n - 1
        else:
            inflight.pop(worker, None)
        route = self.routes.get(worker)
        return route.sent.popleft() if route is not None and route.sent else None


@dataclass(eq=False)
class CallRoute:
    """A client's calls to one worker, as the metrics see them: the env id they are counted
    under (that of ``slot``, one of the client's slots there, found again once it closes; a
    client holding slots of two env ids on one worker has its calls there counted under
    one), and when each call in flight was forwarded, oldest first."""

    slot: int
    env: str
    calls: list  # [count]: the worker's env_calls cell for env
    sent: collections.deque = field(default_factory=collections.deque)


class Peers:
    """The remoterl workers and clients, by routing id, and ``env_index``: env id -> the
    ids of the workers serving it.

    Args:
        outbox: where DISCONNECTs to unknown workers go.
        tenants: whether new clients need a key first (key mode).
        is_mdp_worker: whether a routing id is a Majordomo worker's (that role excludes these).
    """

    def __init__(self, outbox: Outbox, tenants: Tenants, is_mdp_worker: Callable[[bytes], bool]) -> None:
        self.workers: dict[bytes, RLWorker] = {}
        self.clients: dict[bytes, RLClient] = {}
        self.env_index: dict[str, set[bytes]] = {}
        self.is_mdp_worker = is_mdp_worker
        self._outbox = outbox
        self._tenants = tenants

    def has(self, peer: bytes) -> bool:
        """Whether ``peer`` is a remoterl worker or client."""
        return peer in self.workers or peer in self.clients

    def client(self, client_id: bytes, now: float, r: Any = None) -> RLClient:
        """The sender's client session, refreshed; in open mode one is made for a client that
        skipped HELLO.

        Raises:
            ProtocolError: the sender is a worker.
            Refusal: ``auth``, key mode and no HELLO yet.
        """
        client = self.clients.get(client_id)
        if client is None:
            if client_id in self.workers or self.is_mdp_worker(client_id):
                raise ProtocolError("this peer is registered as a worker")
            if not self._tenants.open_mode:
                raise Refusal(r, "auth", "say HELLO with your API key first")
            client = self.clients[client_id] = RLClient(client_id, now)
        client.last_seen = now
        return client

    def known_worker(self, sender: bytes, what: str, now: float) -> RLWorker | None:
        """The registered worker that sent ``what`` (refreshed), or None after telling it to re-register."""
        worker = self.workers.get(sender)
        if worker is None:
            self.unknown_worker(sender, what)
            return None
        worker.last_seen = now
        return worker

    def unknown_worker(self, sender: bytes, what: str) -> None:
        """RFC 7: a message from an unregistered worker gets DISCONNECT, which makes it re-register."""
        self._outbox.counters["unknown_worker_messages"] += 1
        self._outbox.warn("%s from unknown worker %s; telling it to re-register", what, sender.hex())
        self._outbox.messages.append([sender, p.worker_frame(W.DISCONNECT)])

    def serve(self, worker: RLWorker, env: str) -> None:
        """Record that ``worker`` serves ``env``."""
        worker.envs.add(env)
        self.env_index.setdefault(env, set()).add(worker.id)

    def add_worker(self, worker: RLWorker) -> None:
        """Add a worker that said READY, indexed under the env ids it announced."""
        self.workers[worker.id] = worker
        for env in worker.envs:
            self.env_index.setdefault(env, set()).add(worker.id)

    def remove_worker(self, worker: RLWorker) -> None:
        """Forget a worker and its env ids (its slots are released before)."""
        del self.workers[worker.id]
        for env in worker.envs:
            ids = self.env_index.get(env)
            if ids is not None:
                ids.discard(worker.id)
                if not ids:
                    del self.env_index[env]


def check_env_id(env: Any, what: str, r: Any = None) -> str:
    """``env`` if it is an env id string of acceptable length; else a ``protocol`` refusal."""
    if not isinstance(env, str) or not env or len(env) > p.MAX_NAME:
        raise Refusal(r, "protocol", f"{what} needs an env id string of 1 to {p.MAX_NAME} characters")
    return env


def decrement(counter: collections.Counter, key: Any) -> None:
    """Count one less of ``key``, dropping it at zero (the tables keep no empty entries)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def peer_name(peer_id: bytes, info: dict) -> str:
    """How logs and messages name a peer: its name (from HELLO or READY) and a short id."""
    name = info.get("name")
    return f"{name} ({peer_id.hex()[:8]})" if name else peer_id.hex()[:12]
