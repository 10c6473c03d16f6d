"""Services the broker answers itself: Majordomo ``mmi.*`` (RFC 8) and ``remoterl.status``.

Pure functions of the broker's state; no sockets. Replies are lists of frames for the
body of an MDP client reply.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remoterl.broker.core import BrokerCore

__all__ = ["answer", "status"]


def answer(core: BrokerCore, service: bytes, body: list) -> list[bytes]:
    """The reply body for an internal service request.

    ``mmi.service`` (RFC 8): ``200`` if the service named in the first body frame has
    workers (a Majordomo service, or an env id served by remoterl workers), ``404`` if
    not. ``remoterl.status``: one JSON frame, see :func:`status`. Any other ``mmi.``
    name: ``501``.
    """
    if service == b"remoterl.status":
        # In key mode the API key is the first body frame, and the answer covers its tenant only.
        tenant = "" if core.open_mode else core._tenant_of(bytes(body[0]).decode("utf-8", "replace") if body else None)
        if tenant is None:
            return [json.dumps({"error": "auth", "msg": "remoterl.status needs a valid API key "
                                                        "(the first body frame)"}).encode()]
        return [json.dumps(status(core, tenant)).encode()]
    if service == b"mmi.service":
        name = bytes(body[0]) if body else b""
        svc = core.mdp_services.get(name)
        env_id = name.decode("utf-8", "replace")
        known = (svc is not None and svc.workers > 0) or env_id in core.env_index or "*" in core.env_index
        return [b"200" if known else b"404"]
    return [b"501"]


def status(core: BrokerCore, tenant: str | None = None) -> dict:
    """A JSON-able snapshot of the broker: workers, services, slots, clients, counters.

    With ``tenant``, only that tenant's workers, services and clients are listed (and no
    Majordomo peers); a tenant never learns of another's workers. In key mode the counters
    are the tenant's own (its peers' events) and the broker-wide table sizes are left out.
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
        "started": core._wall_started,
        "time": time.time(),
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
