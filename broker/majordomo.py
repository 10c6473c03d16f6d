"""Majordomo (MDP/0.1, RFC 7; MDP/0.2, RFC 18): services, their workers, and request routing.

Theory of operation
-------------------
A Majordomo worker says READY for one service; a client's REQUEST names a service and
waits in the queue (``remoterl.broker.mdpqueue``: bounded, fair between clients,
expiring after ``request_ttl``) until a worker of that service is waiting, which then
gets it, and its FINAL (and, in MDP/0.2, PARTIAL) replies go back to that client.
``mmi.*`` (RFC 8) and ``remoterl.status`` are answered by the broker itself (the
``answer`` it is given: ``remoterl.broker.services``). Majordomo peers have no keys:
in key mode only ``remoterl.status`` (which takes a key in its body) is served.

Rules
-----
* *Liveness, RFC-sized.* Majordomo workers keep their own clock (``mdp_heartbeat ×
  mdp_liveness``, 2.5 s × 3): they are sent HEARTBEATs every ``mdp_heartbeat`` seconds,
  busy ones too, and one serving a request may stay silent for up to
  ``mdp_request_timeout`` (:meth:`Majordomo._expired`).
* *A request outlives its worker at most once* (:meth:`Majordomo._orphan`): when a
  worker that holds a request is certainly gone, the request runs again on another
  worker, once, if its client asked recently enough.
* *Nothing sent is lost unsaid* (:meth:`Majordomo.undeliverable`): a REQUEST the loop
  cannot deliver goes back to the head of its queue; a worker whose connection is gone
  is dropped.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from remoterl.broker.base import BrokerConfig, Outbox
from remoterl.broker.mdpqueue import MdpQueue, MdpRequest
from remoterl.broker.tenants import Tenants
from remoterl.errors import ProtocolError
from remoterl.wire import protocol as p

__all__ = ["Majordomo", "MdpService", "MdpWorker"]

log = logging.getLogger(__name__)

_MDP_WORKER_SIGNATURES = frozenset(p.MDP_WORKER)


@dataclass(eq=False)
class MdpWorker:
    id: bytes
    service: bytes
    version: p.MdpVersion
    empty_prefix: bool
    last_seen: float
    current: MdpRequest | None = None  # the request it is serving
    busy_since: float = 0.0  # when it was handed ``current``
    calls: int = 0


@dataclass(eq=False)
class MdpService:
    """A Majordomo service with workers (its queued requests live in ``Majordomo.queue``)."""

    name: bytes
    waiting: collections.deque = field(default_factory=collections.deque)
    workers: int = 0


class Majordomo:
    """Majordomo workers, services and queued requests.

    Args:
        config: the MDP heartbeat, liveness, request timeout and queue bounds.
        outbox: where messages, counters and warnings go.
        tenants: whether the broker is in open mode (Majordomo peers are allowed there only).
        now: the core's start time.
        is_remoterl_peer: whether a routing id is a remoterl worker's or client's (roles
            are exclusive).
        answer: the reply body for a request to ``mmi.*`` or ``remoterl.status``.
    """

    def __init__(self, config: BrokerConfig, outbox: Outbox, tenants: Tenants, now: float,
                 is_remoterl_peer: Callable[[bytes], bool], answer: Callable[[bytes, list], list[bytes]]) -> None:
        self.workers: dict[bytes, MdpWorker] = {}
        self.services: dict[bytes, MdpService] = {}
        self.queue = MdpQueue(config.max_queued_requests, config.max_queued_bytes,
                              config.max_queued_bytes_per_client, config.request_ttl)
        self._config = config
        self._outbox = outbox
        self._out = outbox.messages
        self._tenants = tenants
        self._is_remoterl_peer = is_remoterl_peer
        self._answer = answer
        self.next_heartbeat = now + config.mdp_heartbeat
        self._now = now  # the latest time given here (undeliverable() gets none)

    # --- messages ------------------------------------------------------------------------------

    def on_client(self, sender: bytes, frames: list, now: float) -> None:
        self._now = now
        request = p.parse_mdp_client(frames)
        service = request.service
        if not self._tenants.open_mode and service != p.STATUS_SERVICE:
            # Key-less Majordomo peers are allowed in open mode only.
            raise ProtocolError("Majordomo clients are not allowed: this broker requires API keys")
        if service.startswith(b"mmi.") or service == p.STATUS_SERVICE:
            body = self._answer(service, request.body)
            self._out.append([sender, *p.mdp_client_reply(
                request.version, service, body, empty_prefix=request.empty_prefix, majortomo=request.majortomo)])
            return
        if len(service) > p.MAX_NAME:
            raise ProtocolError(f"MDP service names are at most {p.MAX_NAME} bytes")
        queued = MdpRequest(sender, service, request.version, request.empty_prefix, request.body, now,
                            sum(map(len, request.body)), majortomo=request.majortomo)
        why = self.queue.push(queued)
        if why is not None:
            # Majordomo has no error reply: the client's own timeout tells it; the count shows here.
            self._outbox.counters["mdp_requests_dropped"] += 1
            self._outbox.warn("dropping an MDP request for %r from %s: %s", service[:64], sender.hex(), why)
            return
        svc = self.services.get(service)
        if svc is not None:
            self._dispatch(svc, now)

    def on_worker(self, sender: bytes, frames: list, now: float) -> None:
        self._now = now
        msg = p.parse_mdp_worker(frames)
        worker = self.workers.get(sender)
        if msg.command == "READY" and not self._tenants.open_mode:
            self._out.append([sender, *p.mdp_worker_disconnect(msg.version, empty_prefix=msg.empty_prefix)])
            raise ProtocolError("Majordomo workers are not allowed: this broker requires API keys")
        if msg.command == "READY":
            if len(msg.service) > p.MAX_NAME:
                raise ProtocolError(f"MDP service names are at most {p.MAX_NAME} bytes")
            if worker is not None or self._is_remoterl_peer(sender):
                if worker is not None:
                    # RFC 7/18: "The worker MUST NOT send a further READY". One that does has
                    # restarted and forgotten what it held: it is registered afresh, as remoterl
                    # workers are, and a request it held is treated as if it had left (_orphan).
                    self._drop(worker, now, notify=False)
                else:
                    raise ProtocolError("this peer is already registered in another role")
            worker = self.workers[sender] = MdpWorker(sender, msg.service, msg.version, msg.empty_prefix, now)
            svc = self.services.get(msg.service)
            if svc is None:
                svc = self.services[msg.service] = MdpService(msg.service)
            svc.workers += 1
            svc.waiting.append(sender)
            self._dispatch(svc, now)
            return
        if worker is None:
            if msg.command != "DISCONNECT":
                self._out.append([sender, *p.mdp_worker_disconnect(msg.version, empty_prefix=msg.empty_prefix)])
            return
        worker.last_seen = now  # RFC 7/18: "Any received command except DISCONNECT acts as a heartbeat"
        if msg.command in ("PARTIAL", "FINAL"):
            current = worker.current
            if current is None or current.client != msg.client:
                raise ProtocolError(f"MDP {msg.command} for a request this worker was not given")
            final = msg.command == "FINAL"
            if final or current.version is p.MdpVersion.V02:  # MDP/0.1 has no PARTIAL
                self._out.append([current.client, *p.mdp_client_reply(
                    current.version, current.service, msg.body, final=final, empty_prefix=current.empty_prefix,
                    majortomo=current.majortomo)])
            if final:
                worker.current = None
                svc = self.services[worker.service]
                svc.waiting.append(sender)
                self._dispatch(svc, now)
        elif msg.command == "DISCONNECT":
            # RFC 7/18: "When the broker receives DISCONNECT from a worker it MUST send no
            # further commands to that worker": no DISCONNECT back.
            self._drop(worker, now, notify=False)

    def _dispatch(self, svc: MdpService, now: float) -> None:
        queue = self.queue
        while svc.waiting:
            request = queue.pop(svc.name)
            if request is None:
                return
            worker = self.workers[svc.waiting.popleft()]
            worker.current = request
            worker.busy_since = now
            worker.calls += 1
            self._out.append([worker.id, *p.mdp_worker_request(
                worker.version, request.client, request.body, empty_prefix=worker.empty_prefix)])

    # --- timers and the loop -------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """Send every worker a HEARTBEAT when ``mdp_heartbeat`` seconds have passed since the last."""
        self._now = now
        if now >= self.next_heartbeat:
            # Every MDP worker, busy ones too (RFC 7/18: "Both broker and worker MUST send
            # heartbeats"): a busy worker that reads none meanwhile finds them queued when it
            # is done, and a HEARTBEAT that cannot be delivered tells the broker (through
            # undeliverable()) that a busy worker's connection is gone.
            self.next_heartbeat = now + self._config.mdp_heartbeat
            for worker in self.workers.values():
                self._out.append([worker.id, *p.mdp_worker_heartbeat(worker.version, empty_prefix=worker.empty_prefix)])

    def expire_workers(self, now: float) -> None:
        """Drop the workers silent for too long (:meth:`_expired`)."""
        for worker in [w for w in self.workers.values() if self._expired(w, now)]:
            if worker.current is None:
                log.warning("MDP worker %s missed its heartbeats; purging it", worker.id.hex())
            else:
                log.warning("MDP worker %s said nothing for %g s while serving a request "
                            "(mdp_request_timeout); purging it and dropping the request",
                            worker.id.hex(), now - max(worker.last_seen, worker.busy_since))
            self._outbox.counters["mdp_workers_expired"] += 1
            # A silent busy worker may be hung rather than dead: its request is not run again.
            self._drop(worker, now, requeue=False)

    def expire_requests(self, now: float) -> None:
        """Drop the requests queued for longer than ``request_ttl``."""
        expired = self.queue.expire(now)
        if expired:
            self._outbox.counters["mdp_requests_expired"] += expired

    def undeliverable(self, msg: list, full: bool) -> None:
        """The loop could not send ``msg`` (see ``BrokerCore.undeliverable``). A REQUEST goes
        back to the head of its queue and its worker is dropped; a HEARTBEAT that failed
        drops the worker unless only its queue was full. Nothing for other peers."""
        peer = msg[0]
        mdp = self.workers.get(peer)
        if mdp is None:
            return
        now = self._now
        request = mdp.current
        is_request = request is not None and _is_mdp_request_for(msg, request)
        if full and not is_request:
            # A HEARTBEAT that does not fit: the worker is not reading (busy with a long
            # request, or stuck), not gone. Its queue holds heartbeats enough; silence
            # decides its fate (_expired), so a request it is running is not run twice.
            return
        log.info("MDP worker %s cannot be reached (%s); dropping it", peer.hex(), "full" if full else "gone")
        if request is not None and is_request:
            # This message is the REQUEST itself: the worker never saw it, so the next
            # worker runs it once, and it keeps its one re-run (_orphan).
            mdp.current = None
            self._drop(mdp, now, notify=False)
            self.queue.push(request, front=True)
            svc = self.services.get(request.service)
            if svc is not None:
                self._dispatch(svc, now)
        else:  # a HEARTBEAT to it failed: a request it held was delivered
            self._drop(mdp, now, notify=False)

    def excuse(self, seconds: float) -> None:
        """Forgive every worker ``seconds`` of silence (``BrokerCore.excuse``); heartbeats go
        out as usual."""
        for mdp in self.workers.values():
            mdp.last_seen += seconds
            mdp.busy_since += seconds  # a busy worker's silence is counted from the later of the two

    def shutdown(self) -> None:
        """Tell every worker the broker is leaving."""
        for worker in self.workers.values():
            self._out.append([worker.id, *p.mdp_worker_disconnect(worker.version, empty_prefix=worker.empty_prefix)])

    # --- workers leaving -----------------------------------------------------------------------

    def _expired(self, worker: MdpWorker, now: float) -> bool:
        """Whether ``worker`` has been silent too long.

        Idle: ``mdp_heartbeat × mdp_liveness`` seconds (RFC 7/18: "A peer MUST consider the
        other peer 'disconnected' if no heartbeat arrives within some multiple of that
        interval"). Busy (holding a request): ``mdp_request_timeout`` seconds since its last
        message or since it was handed the request, whichever is later (never less than the
        idle bound). Single-threaded workers (zguide's mdwrkapi, majortomo's Worker) send
        nothing while they work, and zguide's broker, the RFCs' reference, expires waiting
        workers only; the bound keeps a hung worker from holding a request for ever.
        """
        cfg = self._config
        if worker.current is None:
            return now - worker.last_seen > cfg.mdp_expiry
        return now - max(worker.last_seen, worker.busy_since) > max(cfg.mdp_request_timeout, cfg.mdp_expiry)

    def _drop(self, worker: MdpWorker, now: float, notify: bool = True, requeue: bool = True) -> None:
        """Forget ``worker`` (telling it DISCONNECT with ``notify``). A request it held goes
        to :meth:`_orphan` (``requeue=False``: dropped)."""
        request, worker.current = worker.current, None
        del self.workers[worker.id]
        svc = self.services.get(worker.service)
        if svc is not None:
            svc.workers -= 1
            if worker.id in svc.waiting:
                svc.waiting.remove(worker.id)
            if not svc.workers:
                del self.services[svc.name]
        if notify:
            self._out.append([worker.id, *p.mdp_worker_disconnect(worker.version, empty_prefix=worker.empty_prefix)])
        if request is not None:
            self._orphan(request, worker, now, requeue)

    def _orphan(self, request: MdpRequest, worker: MdpWorker, now: float, requeue: bool) -> None:
        """A request was handed to ``worker``, which left before its FINAL: run it once more,
        at the head of its client's queue, or drop it.

        RFC 7/18 leave this open; zguide's broker drops it. Either choice costs something:
        the worker may have done some or all of the work before it went, so running the
        request again may run it twice; dropping it leaves the client waiting for a reply
        that will never come (Majordomo has no error reply). The broker runs it again only
        when all of these hold:

        * ``requeue``: the worker is certainly gone and cannot answer any more (it sent
          DISCONNECT or a second READY, or its connection closed). Not when it was purged
          for silence past ``mdp_request_timeout``: a hung worker may still be running the
          request, and a second run would overlap the first.
        * The request was not run again before: a request that kills every worker that
          takes it is tried on two workers, not on all of them in turn.
        * Its client asked less than ``request_ttl`` ago: the broker starts no request later
          than that after it was asked (a queued one expires then), so a client that gave
          up long ago does not have its request run again.

        Otherwise it is dropped, logged and counted (``mdp_requests_lost``). A client that
        follows RFC 7/18's recommended recovery resends a request that got no reply within
        its timeout, so a Majordomo request may run more than once already; the re-run only
        spares such a client its timeout. A request that reached the worker may have run
        (in part) whether or not it runs again: Majordomo promises no exactly-once.
        """
        if requeue and not request.requeued and now - request.queued < self._config.request_ttl:
            request.requeued = True
            self._outbox.counters["mdp_requests_requeued"] += 1
            log.info("MDP worker %s left while serving a request from %s; running it again",
                     worker.id.hex(), request.client.hex())
            self.queue.push(request, front=True)
            svc = self.services.get(request.service)
            if svc is not None:
                self._dispatch(svc, now)
            return
        self._outbox.counters["mdp_requests_lost"] += 1
        why = ("it went silent past mdp_request_timeout" if not requeue
               else "the request was run again once already" if request.requeued
               else f"the request is older than request_ttl ({self._config.request_ttl:g} s)")
        self._outbox.warn("MDP worker %s left without answering a request for %r from %s; dropping it: %s",
                          worker.id.hex(), request.service[:64], request.client.hex(), why)


def _is_mdp_request_for(msg: list, request: MdpRequest) -> bool:
    """Whether ``msg`` (``[worker id, frames...]``, as it was queued) is the MDP REQUEST that
    hands ``request`` to its worker."""
    frames = msg[1:]
    if frames and not len(frames[0]):
        frames = frames[1:]
    return (len(frames) > 2 and p.as_bytes(frames[0]) in _MDP_WORKER_SIGNATURES
            and p.as_bytes(frames[1]) == p.MDPW_REQUEST and p.as_bytes(frames[2]) == request.client)
