"""Registration mirroring: env ids a trainer registers, passed on to its tenant's workers.

Theory of operation
-------------------
A trainer that registers an env id in its own process (``remoterl.register``) sends the
spec to the broker in REGISTER: an id and an importable entry point (callables cannot
travel). The broker sends it to every worker of the client's tenant and answers the
client with REGISTERED once all of them accepted or refused it (or ``open_timeout``
passed): which workers did which, and why. A worker that accepts serves the id from
then on (it is added to ``env_index``); one that refuses keeps the reason, which the
no-worker error of a later OPEN for the id reports.

Registrations are kept, per tenant, for workers that join later: each READY is answered
with the tenant's registrations (request id 0: nobody waits for those answers). They
are bounded (``_MAX_REGISTRATIONS``) and last as long as a connected client that made
them: when the last one leaves, new workers stop getting the spec and the refusals it
caused are forgotten. Workers that accepted it keep serving the id (its slots stay
open) until they restart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from remoterl.broker.base import BrokerConfig, Outbox, Refusal, header
from remoterl.broker.peers import Peers, check_env_id, peer_name
from remoterl.errors import ProtocolError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["PendingRegister", "RegistrationKey", "Registry"]

log = logging.getLogger(__name__)

# Registrations are kept for workers that join later; this bounds what clients can store.
_MAX_REGISTRATIONS = 1000


class RegistrationKey(NamedTuple):
    """Registrations are per tenant: two tenants may register the same id differently."""

    tenant: str
    env: str


@dataclass(eq=False)
class PendingRegister:
    """A REGISTER waiting for the workers' answers."""

    client: bytes
    client_r: Any
    env: str
    waiting: set
    deadline: float
    accepted: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)


class Registry:
    """The registrations of every tenant, who made them, and the REGISTERs in progress.

    Args:
        config: ``open_timeout`` (a REGISTER waits that long for workers).
        outbox: where messages go.
        peers: the workers to ask and the clients to answer.
        request_ids: numbers for the REGISTERs sent to workers (shared with OPENs).
    """

    def __init__(self, config: BrokerConfig, outbox: Outbox, peers: Peers, request_ids: Iterator[int]) -> None:
        self.specs: dict[RegistrationKey, dict] = {}
        # The connected clients that registered each: the registration is forgotten when the
        # last of them leaves, so new workers do not get (and perhaps refuse) it forever after
        # the trainers that needed it are gone.
        self.registrants: dict[RegistrationKey, set[bytes]] = {}
        self.pending: dict[int, PendingRegister] = {}  # request id sent to the workers -> the REGISTER
        self._config = config
        self._out = outbox.messages
        self._peers = peers
        self._request_ids = request_ids

    def on_register(self, sender: bytes, frames: list, now: float, role: str) -> None:
        fields = header(frames, 1)
        r = fields.get("r")
        spec = fields.get("spec")
        if not isinstance(spec, dict):
            raise Refusal(r, "protocol", "REGISTER needs a spec with an env id")
        check_env_id(spec.get("id"), "REGISTER", r)
        entry = spec.get("entry_point")
        if not isinstance(entry, str) or ":" not in entry:
            raise Refusal(r, "protocol", "REGISTER needs an entry point string 'package.module:Attribute' "
                                         "(callables cannot travel)")
        env = spec["id"]
        client = self._peers.client(sender, now, r)
        key = RegistrationKey(client.tenant, env)
        if key not in self.specs and len(self.specs) >= _MAX_REGISTRATIONS:
            raise Refusal(r, "protocol", f"too many registrations (at most {_MAX_REGISTRATIONS})")
        self.specs[key] = spec
        self.registrants.setdefault(key, set()).add(sender)
        register_r = next(self._request_ids)
        mine = {w.id for w in self._peers.workers.values() if w.tenant == client.tenant}
        pending = PendingRegister(sender, r, env, set(mine), now + self._config.open_timeout)
        self.pending[register_r] = pending
        for worker_id in mine:
            self._out.append([worker_id, p.worker_frame(W.REGISTER), p.encode_header({"r": register_r, "spec": spec})])
        if not pending.waiting:
            self._finish(register_r, pending)

    def on_registered(self, sender: bytes, frames: list, now: float, role: str) -> None:
        worker = self._peers.known_worker(sender, "REGISTERED", now)
        if worker is None:
            return
        fields = header(frames, 1, limit=None)
        env, ok, msg, r = fields.get("id"), fields.get("ok"), fields.get("msg"), fields.get("r")
        if not isinstance(env, str):
            raise ProtocolError(f"REGISTERED for an env id that is not a string: {env!r}")
        name = peer_name(worker.id, worker.info)
        why = str(msg or "refused")[:p.MAX_NAME * 4]
        pending = self.pending.get(r) if isinstance(r, int) else None
        registered = RegistrationKey(worker.tenant, env) in self.specs
        if registered or (pending is not None and pending.env == env):
            if ok is True:
                worker.refused.pop(env, None)
                if env not in worker.envs:
                    self._peers.serve(worker, env)
            elif registered:
                worker.refused[env] = why
            # else: forgotten while this answer was on its way (its trainers left): moot.
        elif r == 0:  # an answer to a registration sent on READY, forgotten since
            return
        else:
            raise ProtocolError(f"REGISTERED for an env id nobody registered: {env!r}")
        if pending is not None and sender in pending.waiting:
            pending.waiting.discard(sender)
            if ok is True:
                pending.accepted.append(name)
            else:
                pending.refused[name] = why
            if not pending.waiting:
                self._finish(r, pending)

    def _finish(self, r: int, pending: PendingRegister) -> None:
        del self.pending[r]
        if pending.client in self._peers.clients:
            self._out.append([pending.client, p.client_frame(C.REGISTERED), p.encode_header({
                "r": pending.client_r, "id": pending.env, "accepted": pending.accepted, "refused": pending.refused})])

    def offer(self, worker_id: bytes, tenant: str) -> None:
        """Send a new worker its tenant's registrations (r=0: nobody waits for the answer)."""
        for key, spec in self.specs.items():
            if key.tenant == tenant:
                self._out.append([worker_id, p.worker_frame(W.REGISTER), p.encode_header({"r": 0, "spec": spec})])

    def expire(self, now: float) -> None:
        """Answer the REGISTERs whose workers did not all answer within ``open_timeout``."""
        for r, pending in list(self.pending.items()):
            if now >= pending.deadline:
                self._finish(r, pending)

    def worker_gone(self, worker_id: bytes) -> None:
        """A worker left: the REGISTERs waiting for it wait no more."""
        for r, pending in list(self.pending.items()):
            if worker_id in pending.waiting:
                pending.waiting.discard(worker_id)
                if not pending.waiting:
                    self._finish(r, pending)

    def client_gone(self, client_id: bytes) -> None:
        """A client left: forget the registrations no connected client needs any more."""
        for key, owners in list(self.registrants.items()):
            owners.discard(client_id)
            if not owners:
                self._forget(key)

    def _forget(self, key: RegistrationKey) -> None:
        """No connected client needs registration ``key`` any more: new workers stop getting it
        and the refusals it caused are no longer reported. Workers that accepted it keep serving
        the id (its slots stay open) until they restart."""
        del self.specs[key], self.registrants[key]
        for worker in self._peers.workers.values():
            if worker.tenant == key.tenant:
                worker.refused.pop(key.env, None)
        log.info("registration of %r forgotten: the trainers that made it have left", key.env)
