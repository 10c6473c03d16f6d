"""Services the broker answers itself: Majordomo ``mmi.*`` (RFC 8) and ``remoterl.status``.

Pure functions of a read-only view of the broker (:class:`BrokerView`, which
:class:`~remoterl.broker.core.BrokerCore` provides); no sockets, no clock, and no import
of the core, which calls :func:`answer` for Majordomo requests to these names. Replies
are lists of frames for the body of an MDP client reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from remoterl.broker.majordomo import MdpService, MdpWorker
from remoterl.broker.mdpqueue import MdpQueue
from remoterl.broker.peers import RLClient, RLWorker
from remoterl.broker.placement import Slot
from remoterl.wire import protocol as p

__all__ = ["BrokerView", "answer", "served", "status"]


class BrokerView(Protocol):
    """What the answers read of the broker: its tables, counters and a few facts
    (nothing here changes them)."""

    @property
    def instance(self) -> str: ...
    @property
    def open_mode(self) -> bool: ...
    @property
    def wall_started(self) -> float | None: ...
    @property
    def workers(self) -> Mapping[bytes, RLWorker]: ...
    @property
    def clients(self) -> Mapping[bytes, RLClient]: ...
    @property
    def slots(self) -> Mapping[int, Slot]: ...
    @property
    def env_index(self) -> Mapping[str, set[bytes]]: ...
    @property
    def mdp_workers(self) -> Mapping[bytes, MdpWorker]: ...
    @property
    def mdp_services(self) -> Mapping[bytes, MdpService]: ...
    @property
    def mdp_queue(self) -> MdpQueue: ...
    @property
    def counters(self) -> Mapping[str, int]: ...
    @property
    def tenant_counters(self) -> Mapping[str, Mapping[str, int]]: ...

    def tenant_of(self, key: Any) -> str | None: ...
    def wall_clock(self) -> float | None: ...
    def table_sizes(self) -> dict[str, int]: ...


def answer(core: BrokerView, service: bytes, body: list) -> list[bytes]:
    """The reply body for an internal service request.

    ``mmi.service`` (RFC 8): ``200`` if the service named in the first body frame has
    workers, ``404`` if not; see :func:`served`. ``remoterl.status``: one JSON frame, see
    :func:`status`. Any other ``mmi.`` name: ``501``.
    """
    if service == p.STATUS_SERVICE:
        # In key mode the API key is the first body frame, and the answer covers its tenant only.
        tenant = "" if core.open_mode else core.tenant_of(bytes(body[0]).decode("utf-8", "replace") if body else None)
        if tenant is None:
            return [json.dumps({"error": "auth", "msg": "remoterl.status needs a valid API key "
                                                        "(the first body frame)"}).encode()]
        return [json.dumps(status(core, tenant)).encode()]
    if service == b"mmi.service":
        # Majordomo clients are served in open mode only (Majordomo.on_client refuses mmi.*
        # in key mode), where every peer is in tenant "".
        name = bytes(body[0]) if body else b""
        return [b"200" if served(core, name, "") else b"404"]
    return [b"501"]


def served(core: BrokerView, name: bytes, tenant: str) -> bool:
    """Whether ``name`` has a worker now, as ``mmi.service`` answers it (RFC 8: "200" when
    the service is available, "404" when not).

    True for a Majordomo service with at least one worker, or an env id that a connected
    remoterl worker of ``tenant`` announced (in READY, or by accepting a REGISTER). A
    ``"*"`` worker makes no other name available: it serves whatever gymnasium can make on
    its host, which the broker cannot know, and an RFC 8 answer of 200 promises that a
    request to the name can be served. (Nor is ``"*"`` itself a name anything serves.)
    """
    svc = core.mdp_services.get(name)
    if svc is not None and svc.workers > 0:
        return True
    try:
        env_id = name.decode("utf-8")
    except UnicodeDecodeError:
        return False  # env ids are strings: no worker announced this one
    if env_id == "*":
        return False
    return any(core.workers[w].tenant == tenant for w in core.env_index.get(env_id, ()))


def _latency(worker: RLWorker) -> dict:
    """The worker's CALL -> REPLY time as the broker saw it, in ms: ``p50_ms`` and ``p99_ms``
    estimated from its histogram (None before its first reply)."""
    p50, p99 = worker.call_time.quantile(0.5), worker.call_time.quantile(0.99)
    return {"p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3)}


def status(core: BrokerView, tenant: str | None = None) -> dict:
    """A JSON-able snapshot of the broker: workers, services, slots, clients, counters.

    Each remoterl worker's row has ``calls`` (CALLs forwarded to it) and ``p50_ms``/``p99_ms``,
    its CALL -> REPLY latency as the broker saw it, estimated from the histogram the metrics
    also serve (``remoterl.broker.metrics``; within a bucket, so a rough figure; None before
    the first reply).

    With ``tenant``, only that tenant's workers, services and clients are listed (and no
    Majordomo peers); a tenant never learns of another's workers. In key mode the counters
    are the tenant's own (its peers' events) and the broker-wide table sizes are left out.
    ``started`` and ``time`` are wall-clock times as the core knows them (None when it was
    not told when it started).
    """
    workers = []
    mine = [w for w in core.workers.values() if tenant is None or w.tenant == tenant]
    for worker in mine:
        workers.append({
            "id": worker.id.hex(),
            "kind": "remoterl",
            **{k: v for k, v in worker.info.items() if isinstance(v, (str, int))},
            "envs": sorted(worker.envs),
            "capacity": worker.capacity,
            "slots": len(worker.slots),
            "calls": worker.calls,
            **_latency(worker),
            "stats": {k: v for k, v in worker.stats.items() if isinstance(k, str) and isinstance(v, (int, float))},
        })
    for worker in (core.mdp_workers.values() if core.open_mode else ()):
        workers.append({
            "id": worker.id.hex(),
            "kind": f"mdp/0.{worker.version.value}",
            "service": worker.service.decode("utf-8", "replace"),
            "calls": worker.calls,
            "busy": worker.current is not None,
        })
    ids_mine = {w.id for w in mine}
    services = [{"name": env, "kind": "env", "workers": len(ids & ids_mine),
                 "free_slots": sum(core.workers[w].free for w in ids & ids_mine)}
                for env, ids in sorted(core.env_index.items()) if ids & ids_mine]
    if core.open_mode:
        queued = core.mdp_queue.services()
        names = sorted(set(core.mdp_services) | set(queued))
        services += [{"name": name.decode("utf-8", "replace"), "kind": "mdp",
                      "workers": svc.workers if (svc := core.mdp_services.get(name)) else 0,
                      "queued": queued.get(name, 0)} for name in names]
    clients = [c for c in core.clients.values() if tenant is None or c.tenant == tenant]
    snapshot = {
        "broker": core.instance,
        "started": core.wall_started,
        "time": core.wall_clock(),
        "workers": workers,
        "services": services,
        "clients": [{"id": c.id.hex(), **{k: v for k, v in c.info.items() if isinstance(v, (str, int))},
                     "slots": len(c.slots)} for c in clients],
        "open_slots": sum(1 for s in core.slots.values() if s.open and s.worker in ids_mine),
    }
    if core.open_mode or tenant is None:
        snapshot["counters"] = dict(core.counters)
        snapshot["tables"] = core.table_sizes()
    else:  # broker-wide figures would tell a tenant about the others' traffic
        snapshot["counters"] = dict(core.tenant_counters.get(tenant, {}))
    return snapshot
