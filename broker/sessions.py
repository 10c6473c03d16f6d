"""remoterl sessions: workers' READY, clients' HELLO, heartbeats, calls, and peers leaving.

Theory of operation
-------------------
* **remoterl workers** (``RLW1``) announce the env ids they serve and how many slots
  they host (READY), get WELCOME, and from then on OPEN, CALL, CLOSE and REGISTER
  messages. A second READY restarts the worker's session (RFC 7).
* **remoterl clients** (``RLC1``) say HELLO, then OPEN and CLOSE slots
  (``remoterl.broker.placement``), REGISTER env ids (``remoterl.broker.registry``), and
  CALL the workers that hold their slots.

Rules
-----
* *Calls pass through.* The broker reads frame 0 and the worker/client routing frame
  of a CALL or REPLY, never the msgpack header, and re-sends the payload frames
  untouched. A CALL is forwarded only to a worker where the client holds a slot, and
  only while fewer than ``max_calls_in_flight`` of the client's calls to it await
  replies; a REPLY only to a client that holds a slot on the replying worker. Per-worker
  call counters, and the forwarding time a REPLY turns into a latency (``CallRoute``, read
  by ``remoterl.broker.metrics``), are the only other work on that path.
* *Liveness.* Any message from a peer, or a HEARTBEAT naming it (sent from the peer's
  side socket, so a trainer busy in a gradient update stays alive), refreshes it. In
  key mode only a HEARTBEAT with the peer's own key does. A peer silent for
  ``heartbeat × liveness`` seconds is purged: a worker's clients get WORKER_LOST for its
  slots; a client's slots are closed on their workers.
* *Nothing unsaid.* A CALL the loop cannot deliver gets its client an ERROR
  (``limit`` or ``worker_lost``, :meth:`Sessions.undeliverable`).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from remoterl.broker.base import BrokerConfig, Outbox, Refusal, header, try_header
from remoterl.broker.peers import CallRoute, Peers, RLClient, RLWorker, peer_name
from remoterl.broker.placement import Placement
from remoterl.broker.registry import Registry
from remoterl.broker.tenants import Tenants
from remoterl.errors import ProtocolError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["Sessions"]

log = logging.getLogger(__name__)

_C_REPLY = p.client_frame(C.REPLY)
_W_CALL = p.worker_frame(W.CALL)
_C_HEARTBEAT = p.client_frame(C.HEARTBEAT)
_W_HEARTBEAT = p.worker_frame(W.HEARTBEAT)


class Sessions:
    """The remoterl peers' sessions: admission, liveness, call routing and departure.

    Args:
        config: heartbeat, liveness and limits.
        outbox: where messages, counters and warnings go.
        tenants: admission and per-tenant counters.
        peers: the tables of workers and clients.
        placement: the slots, released when a peer leaves.
        registry: the registrations, offered to new workers and released when a peer leaves.
        instance: the broker run's name (in WELCOME and heartbeat answers).
    """

    def __init__(self, config: BrokerConfig, outbox: Outbox, tenants: Tenants, peers: Peers,
                 placement: Placement, registry: Registry, instance: str) -> None:
        self._config = config
        self._outbox = outbox
        self._out = outbox.messages
        self._counters = outbox.counters
        self._tenants = tenants
        self._peers = peers
        self._workers = peers.workers
        self._clients = peers.clients
        self._placement = placement
        self._registry = registry
        self._instance = instance
        # (peer kind, tenant) -> heartbeat intervals missed (_count_misses; read by the metrics).
        self.heartbeat_misses: collections.Counter = collections.Counter()

    # --- the per-call path -----------------------------------------------------------------------

    def on_call(self, sender: bytes, frames: list, now: float) -> None:
        # CALL: [sig, worker, header, *payload]. The header is not decoded here.
        client = self._clients.get(sender)
        size = sum(map(len, frames))
        self._counters["bytes_in"] += size  # BrokerCore.receive counts the other messages' bytes
        if len(frames) < 3:
            self._outbox.bad(sender, frames, "CALL needs worker and header frames")
            return
        worker_id = p.as_bytes(frames[1])
        if size > self._config.max_message_size:
            self._outbox.bad(sender, frames, f"CALL exceeds the limit of {self._config.max_message_size} bytes",
                             code="too_large")
            return
        if client is None or not client.workers.get(worker_id):
            self._call_refused(sender, frames, worker_id, client)
            return
        client.last_seen = now
        inflight = client.inflight
        n = inflight.get(worker_id, 0)
        if n >= self._config.max_calls_in_flight:
            self._tenants.count("calls_limited", client.tenant)
            self._call_error(sender, frames[2], "limit", (
                f"{n} calls to worker {worker_id.hex()[:12]} are already in flight (at most "
                f"{self._config.max_calls_in_flight}); wait for their replies before sending more"))
            return
        inflight[worker_id] = n + 1
        worker = self._workers[worker_id]
        worker.calls += 1
        # For the metrics: the call's env id, and when it left (its REPLY observes the time).
        route = client.routes.get(worker_id)
        if route is None or route.slot not in client.slots or (not n and route.sent):
            route = self._route(client, worker, route, n)
        route.sent.append(now)
        route.calls[0] += 1
        self._out.append([worker_id, _W_CALL, sender, *frames[2:]])

    def _route(self, client: RLClient, worker: RLWorker, old: CallRoute | None, inflight: int) -> CallRoute:
        """The client's :class:`CallRoute` to ``worker``: made, re-aimed at a slot it still holds
        there, or cleared of calls whose replies were dropped (their slots closed meanwhile)."""
        slots = self._placement.slots
        slot = next((slots[s] for s in client.slots if s in slots and slots[s].worker == worker.id), None)
        sent = old.sent if old is not None else collections.deque()
        if not inflight:
            sent.clear()
        # No slot there cannot happen (on_call checked client.workers); never raise on this path.
        slot_id, env = (slot.id, slot.env) if slot is not None else (-1, "unknown")
        cell = worker.env_calls.get(env)
        if cell is None:
            cell = worker.env_calls[env] = [0]
        route = client.routes[worker.id] = CallRoute(slot_id, env, cell, sent)
        return route

    def on_reply(self, sender: bytes, frames: list, now: float) -> None:
        # REPLY: [sig, client, header, *payload] -> client gets [sig, header, *payload].
        self._counters["bytes_in"] += sum(map(len, frames))
        worker = self._workers.get(sender)
        if worker is None:
            self._peers.unknown_worker(sender, "REPLY")
            return
        if len(frames) < 3:
            self._outbox.bad(sender, frames, "REPLY needs client and header frames")
            return
        worker.last_seen = now
        client_id = p.as_bytes(frames[1])
        if client_id not in worker.clients:
            # Only clients holding slots on this worker get its replies (late replies to
            # closed slots land here too): a worker cannot message arbitrary peers.
            self._outbox.counters["replies_dropped"] += 1
            return
        client = self._clients.get(client_id)  # always there while it holds slots here
        if client is not None:
            sent = client.answered(sender)
            if sent is not None:
                worker.call_time.observe(now - sent)
        self._out.append([client_id, _C_REPLY, *frames[2:]])

    def _call_refused(self, sender: bytes, frames: list, worker_id: bytes, client: RLClient | None) -> None:
        worker = self._workers.get(worker_id)
        if client is None:
            code, msg = "worker_lost", "this client session is unknown to the broker (expired or broker restarted)"
        elif worker is not None and worker.tenant == client.tenant:
            code, msg = "protocol", "this client holds no slot on that worker"
        else:  # gone, or another tenant's: the answer must not tell which
            code, msg = "worker_lost", f"worker {worker_id.hex()} is gone"
        self._tenants.count("calls_refused", client.tenant if client is not None else None)
        self._call_error(sender, frames[2], code, msg)

    def _call_error(self, client_id: bytes, header_frame: Any, code: str, msg: str) -> None:
        """Answer a CALL the broker will not forward: an ERROR with the call's request id."""
        fields = try_header(header_frame) if len(header_frame) <= p.MAX_CONTROL_HEADER else None
        r = fields.get("r") if fields else None
        self._out.append([client_id, p.client_frame(C.ERROR), p.encode_header({"r": r, "code": code, "msg": msg})])

    def undeliverable(self, msg: list, full: bool) -> None:
        """The loop could not send ``msg`` to a remoterl worker (see ``BrokerCore.undeliverable``):
        a CALL's client gets ``limit`` (the worker's queue is full) or ``worker_lost``; a
        worker that is not connected is purged. Nothing for other peers."""
        peer = msg[0]
        worker = self._workers.get(peer)
        if worker is None:
            return
        if len(msg) > 3 and msg[1] == _W_CALL:
            client_id = p.as_bytes(msg[2])
            client = self._clients.get(client_id)
            if client is not None:
                client.answered(peer)
            if full:
                self._tenants.count("calls_limited", worker.tenant)
                self._call_error(client_id, msg[3], "limit", (
                    f"worker {peer_name(peer, worker.info)} has more calls queued than it can take; "
                    f"retry when its replies come back"))
                return
            self._call_error(client_id, msg[3], "worker_lost", f"worker {peer_name(peer, worker.info)} is lost: not connected")
        if not full:
            log.warning("worker %s cannot be reached; purging it", peer_name(peer, worker.info))
            self.purge_worker(worker, "is not connected")

    # --- control messages ------------------------------------------------------------------------

    def on_hello(self, sender: bytes, frames: list, now: float, role: str) -> None:
        fields = header(frames, 1)
        info = _peer_info(fields)
        client = self._clients.get(sender)
        if client is None:
            if sender in self._workers or self._peers.is_mdp_worker(sender):
                raise ProtocolError("this peer is registered as a worker")
            tenant = self._tenants.admit(fields, now)
            client = self._clients[sender] = RLClient(sender, now, tenant)
        elif self._tenants.tenant_of(fields.get("key")) != client.tenant:
            raise Refusal(None, "auth", "wrong or missing API key: the broker refused this peer")
        client.last_seen = now
        client.info = info
        self._out.append([sender, p.client_frame(C.WELCOME), p.encode_header({**self._welcome(), "you": sender})])

    def _welcome(self) -> dict:
        return {
            "v": p.PROTOCOL_VERSION,
            "broker": self._instance,
            "heartbeat": self._config.heartbeat,
            "liveness": self._config.liveness,
            "max_message_size": self._config.max_message_size,
        }

    def on_heartbeat(self, sender: bytes, frames: list, now: float, role: str) -> None:
        fields = header(frames, 1)
        peer_id = fields.get("id", sender)
        if not isinstance(peer_id, bytes):
            raise ProtocolError("HEARTBEAT id must be bytes")
        peer: RLClient | RLWorker | None
        if role == "client":
            peer = self._clients.get(peer_id)
            frame = _C_HEARTBEAT
        else:
            peer = self._workers.get(peer_id)
            frame = _W_HEARTBEAT
        if peer is not None and not self._tenants.open_mode and self._tenants.tenant_of(fields.get("key")) != peer.tenant:
            peer = None  # in key mode only the peer's own key keeps it alive
        if isinstance(peer, RLWorker):
            stats = fields.get("stats")
            if isinstance(stats, dict):
                peer.stats = _plain_stats(stats)
        if peer is not None:
            peer.last_seen = now
            peer.hb_from = sender
        self._out.append([sender, frame, p.encode_header({"broker": self._instance, "known": peer is not None,
                                                          "id": peer_id})])

    def on_ready(self, sender: bytes, frames: list, now: float, role: str) -> None:
        # A worker whose READY is refused cannot work at all: tell it why (W.ERROR ends it)
        # instead of letting it send READY again forever.
        try:
            self._ready(sender, frames, now)
        except ProtocolError as exc:
            self._out.append([sender, p.worker_frame(W.ERROR), p.encode_header({"code": "protocol", "msg": str(exc)})])
            raise

    def _ready(self, sender: bytes, frames: list, now: float) -> None:
        fields = header(frames, 1)
        envs = fields.get("envs")
        capacity = fields.get("capacity")
        if not isinstance(envs, list) or not all(isinstance(e, str) and 0 < len(e) <= p.MAX_NAME for e in envs):
            raise ProtocolError(f"READY needs a list of env id strings of 1 to {p.MAX_NAME} characters")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ProtocolError("READY needs a capacity >= 0")
        info = _peer_info(fields)
        if sender in self._clients or self._peers.is_mdp_worker(sender):
            raise ProtocolError("this peer is already registered in another role")
        try:
            tenant = self._tenants.admit(fields, now)
        except Refusal as exc:  # a worker has no request id: its ERROR carries the code alone
            self._counters[f"refused_{exc.code}"] += 1
            self._out.append([sender, p.worker_frame(W.ERROR), p.encode_header({"code": exc.code, "msg": exc.msg})])
            return
        old = self._workers.get(sender)
        if old is not None:  # RFC 7: a second READY restarts the worker's session
            self.purge_worker(old, "re-registered")
        worker = RLWorker(sender, set(envs), capacity, now, tenant, info)
        self._peers.add_worker(worker)
        log.info("worker %s ready: %d slots of %s", peer_name(sender, info), capacity, ", ".join(sorted(envs)) or "nothing")
        self._out.append([sender, p.worker_frame(W.WELCOME), p.encode_header({**self._welcome(), "you": sender})])
        # Registrations made before this worker arrived.
        self._registry.offer(sender, tenant)

    def on_client_disconnect(self, sender: bytes, frames: list, now: float, role: str) -> None:
        client = self._clients.get(sender)
        if client is not None:
            self.drop_client(client)

    def on_worker_disconnect(self, sender: bytes, frames: list, now: float, role: str) -> None:
        worker = self._workers.get(sender)
        if worker is not None:
            log.info("worker %s disconnected", peer_name(sender, worker.info))
            self.purge_worker(worker, "disconnected")

    # --- timers ----------------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Purge the workers and clients silent for longer than ``heartbeat × liveness``."""
        limit = now - self._config.expiry
        self._count_misses(now)
        for worker in [w for w in self._workers.values() if w.last_seen < limit]:
            log.warning("worker %s missed its heartbeats; purging it (%d slots)",
                        peer_name(worker.id, worker.info), len(worker.slots))
            self._tenants.count("workers_expired", worker.tenant)
            self.purge_worker(worker, "missed its heartbeats")
        for client in [c for c in self._clients.values() if c.last_seen < limit]:
            if client.slots:
                log.info("client %s went silent; closing its %d slots", peer_name(client.id, client.info),
                         len(client.slots))
            self._tenants.count("clients_expired", client.tenant)
            self.drop_client(client)

    def _count_misses(self, now: float) -> None:
        """Count in :attr:`heartbeat_misses`, by ``(peer kind, tenant)``, the heartbeat intervals
        each peer has stayed silent past the first: a peer heartbeating on time is never silent
        for two intervals. Each interval counts once per silence."""
        heartbeat = self._config.heartbeat
        misses = self.heartbeat_misses
        for kind, table in (("worker", self._workers), ("client", self._clients)):
            for peer in table.values():
                missed = int((now - peer.last_seen) / heartbeat) - 1
                if missed <= 0:
                    continue
                since, counted = peer.missed
                if since != peer.last_seen:  # heard from since the last count: a new silence
                    counted = 0
                if missed > counted:
                    misses[kind, peer.tenant] += missed - counted
                peer.missed = (peer.last_seen, max(missed, counted))

    def excuse(self, seconds: float) -> None:
        """Forgive every peer ``seconds`` of silence, and pong their heartbeat sockets
        (``BrokerCore.excuse``)."""
        for table, frame in ((self._workers, _W_HEARTBEAT), (self._clients, _C_HEARTBEAT)):
            for peer in table.values():
                peer.last_seen += seconds
                if peer.hb_from is not None:
                    self._out.append([peer.hb_from, frame, p.encode_header(
                        {"broker": self._instance, "known": True, "id": peer.id})])

    def shutdown(self) -> None:
        """Tell every worker the broker is leaving."""
        for worker in self._workers.values():
            self._out.append([worker.id, p.worker_frame(W.DISCONNECT)])

    # --- peers leaving ---------------------------------------------------------------------------

    def purge_worker(self, worker: RLWorker, reason: str) -> None:
        """Forget a worker: its slots, the OPENs and REGISTERs waiting for it, then tell the
        clients that held open slots there (WORKER_LOST)."""
        lost = self._placement.release_worker(worker, reason)
        self._registry.worker_gone(worker.id)
        self._peers.remove_worker(worker)
        for client_id, slot_ids in lost.items():
            self._out.append([client_id, p.client_frame(C.WORKER_LOST), p.encode_header({
                "worker": worker.id, "slots": slot_ids,
                "msg": f"worker {peer_name(worker.id, worker.info)} {reason}; the envs in slots {slot_ids} are lost",
            })])

    def drop_client(self, client: RLClient) -> None:
        """Forget a client: close its slots on their workers, and drop the registrations only it needed."""
        self._placement.release_client(client)
        del self._clients[client.id]
        self._registry.client_gone(client.id)


def _peer_info(fields: dict) -> dict:
    """The name, host and pid a HELLO or READY gives, checked (``remoterl status`` shows them)."""
    info: dict = {}
    for key in ("name", "host"):
        value = fields.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > p.MAX_NAME:
            raise ProtocolError(f"{key!r} must be a string of at most {p.MAX_NAME} characters")
        info[key] = value
    pid = fields.get("pid")
    if pid is not None:
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 1 << 63:
            raise ProtocolError("'pid' must be a non-negative integer")
        info["pid"] = pid
    return info


def _plain_stats(stats: dict) -> dict:
    """What ``remoterl status`` shows of a worker's heartbeat statistics: a few named numbers."""
    out = {}
    for key, value in stats.items():
        if isinstance(key, str) and len(key) <= 32 and type(value) in (int, float):
            out[key] = value
            if len(out) == 16:
                break
    return out
