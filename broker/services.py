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
    if service == b"mmi.service":
        name = bytes(body[0]) if body else b""
        svc = core.mdp_services.get(name)
        env_id = name.decode("utf-8", "replace")
        known = (svc is not None and svc.workers > 0) or env_id in core.env_index or "*" in core.env_index
        return [b"200" if known else b"404"]
    if service == b"remoterl.status":
        return [json.dumps(status(core)).encode()]
    return [b"501"]


def status(core: BrokerCore) -> dict:
    """A JSON-able snapshot of the broker: workers, services, slots, clients, counters."""
    workers = []
    for worker in core.workers.values():
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
    for worker in core.mdp_workers.values():
        workers.append({
            "id": worker.id.hex(),
            "kind": f"mdp/0.{worker.version.value}",
            "service": worker.service.decode("utf-8", "replace"),
            "calls": worker.calls,
            "busy": worker.current is not None,
        })
    services = [{"name": env, "kind": "env", "workers": len(ids),
                 "free_slots": sum(core.workers[w].free for w in ids)}
                for env, ids in sorted(core.env_index.items())]
    services += [{"name": svc.name.decode("utf-8", "replace"), "kind": "mdp", "workers": svc.workers,
                  "queued": len(svc.requests)} for svc in core.mdp_services.values()]
    return {
        "broker": core.instance,
        "started": core._wall_started,
        "time": time.time(),
        "workers": workers,
        "services": services,
        "clients": [{"id": c.id.hex(), **{k: v for k, v in c.info.items() if isinstance(v, (str, int))},
                     "slots": len(c.slots)} for c in core.clients.values()],
        "open_slots": sum(1 for s in core.slots.values() if s.open),
        "counters": dict(core.counters),
        "tables": core.table_sizes(),
    }
