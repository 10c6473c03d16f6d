"""Majordomo requests waiting for a worker: bounded, fair, O(1) per request. ◇

Theory of operation
-------------------
A Majordomo client's REQUEST names a service; when no worker of that service is
waiting, the broker keeps the request here until one is (RFC 7/18 leave the queue to
the broker). What a hostile or careless client can do to a queue, and what stops it:

* **Flood it.** The queue holds at most ``max_requests`` requests and ``max_bytes``
  bytes of request bodies across all services, and one client at most
  ``max_bytes_per_client`` of them. A request over a bound is refused (:meth:`push`
  says why; the broker counts it) and nothing of it is kept.
* **Starve others.** Within a service, clients take turns: each client has its own
  FIFO, and :meth:`pop` serves the clients round robin, one request each. A client
  that queued 100,000 requests delays another's next request by one of them, not by
  100,000.
* **Leave.** A request waits at most ``ttl`` seconds (:meth:`expire`); a client that
  vanished leaves nothing behind for longer.

Every operation costs O(1), amortised: the totals are kept, never summed; expiry walks
one arrival-ordered list from its old end (requests already served are skipped there
and compacted away when they outnumber the waiting ones).

No sockets, no clock: times are arguments.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MdpQueue", "MdpRequest"]


@dataclass(eq=False, slots=True)
class MdpRequest:
    """One queued request. The broker keeps it (body included) while a worker holds it,
    so that it can be given back to the queue if that worker goes (see
    ``Majordomo._orphan`` in ``remoterl.broker.majordomo``); it is released with the reply."""

    client: bytes
    service: bytes
    version: Any          # remoterl.wire.protocol.MdpVersion
    empty_prefix: bool
    body: list
    queued: float         # monotonic time it arrived
    size: int             # bytes of its body
    waiting: bool = True  # in a queue now (False once popped or expired)
    majortomo: bool = False  # the client speaks majortomo's dialect (remoterl.wire.protocol)
    requeued: bool = False   # already given back once after a worker holding it left


@dataclass(eq=False)
class _Service:
    by_client: dict = field(default_factory=dict)              # client id -> deque of requests
    turns: collections.deque = field(default_factory=collections.deque)  # clients with requests
    count: int = 0


class MdpQueue:
    """Queued Majordomo requests of every service.

    Args:
        max_requests: requests queued at once, across services.
        max_bytes: body bytes queued at once, across services.
        max_bytes_per_client: body bytes one client may have queued.
        ttl: seconds a request may wait.
    """

    def __init__(self, max_requests: int, max_bytes: int, max_bytes_per_client: int, ttl: float) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_bytes_per_client = max_bytes_per_client
        self.ttl = ttl
        self.count = 0
        self.bytes = 0
        self._services: dict[bytes, _Service] = {}
        self._client_bytes: dict[bytes, int] = {}
        self._arrivals: collections.deque[MdpRequest] = collections.deque()

    def __len__(self) -> int:
        return self.count

    def queued(self, service: bytes) -> int:
        """Requests waiting for ``service``."""
        svc = self._services.get(service)
        return svc.count if svc is not None else 0

    def services(self) -> dict[bytes, int]:
        """Requests waiting, by service (services with none are not listed)."""
        return {name: svc.count for name, svc in self._services.items()}

    def refusal(self, client: bytes, size: int) -> str | None:
        """Why a request of ``size`` body bytes from ``client`` would be refused now, or None."""
        if self.count >= self.max_requests:
            return f"{self.count} requests are queued (at most {self.max_requests})"
        if self.bytes + size > self.max_bytes:
            return f"{self.bytes} bytes are queued; {size} more exceed the limit of {self.max_bytes}"
        mine = self._client_bytes.get(client, 0)
        if mine + size > self.max_bytes_per_client:
            return (f"this client has {mine} bytes queued; {size} more exceed its limit of "
                    f"{self.max_bytes_per_client}")
        return None

    def push(self, request: MdpRequest, front: bool = False) -> str | None:
        """Queue ``request`` (at the head of its client's FIFO with ``front``: a request a
        worker could not take, or one given back after its worker left; it keeps its arrival
        time, so its TTL still counts from then). Returns None, or why it was refused
        (nothing kept then)."""
        why = self.refusal(request.client, request.size)
        if why is not None and not front:  # a request given back was admitted once already
            return why
        svc = self._services.get(request.service)
        if svc is None:
            svc = self._services[request.service] = _Service()
        mine = svc.by_client.get(request.client)
        if mine is None:
            mine = svc.by_client[request.client] = collections.deque()
            if front:
                svc.turns.appendleft(request.client)
            else:
                svc.turns.append(request.client)
        if front:
            mine.appendleft(request)
        else:
            mine.append(request)
        request.waiting = True
        svc.count += 1
        self.count += 1
        self.bytes += request.size
        self._client_bytes[request.client] = self._client_bytes.get(request.client, 0) + request.size
        self._arrivals.append(request)
        return None

    def pop(self, service: bytes) -> MdpRequest | None:
        """The next request for ``service``, clients taking turns; None when none waits."""
        svc = self._services.get(service)
        if svc is None or not svc.turns:
            return None
        client = svc.turns.popleft()
        mine = svc.by_client[client]
        request = mine.popleft()
        if mine:
            svc.turns.append(client)
        else:
            del svc.by_client[client]
        self._forget(svc, request)
        if not svc.count:
            del self._services[service]
        return request

    def expire(self, now: float) -> int:
        """Drop requests older than ``ttl``; return how many were dropped."""
        limit = now - self.ttl
        arrivals, dropped = self._arrivals, 0
        while arrivals and (not arrivals[0].waiting or arrivals[0].queued < limit):
            request = arrivals.popleft()
            if request.waiting:
                self._remove(request)
                dropped += 1
        return dropped

    # --- internals ---------------------------------------------------------------------------

    def _remove(self, request: MdpRequest) -> None:
        svc = self._services[request.service]
        mine = svc.by_client[request.client]
        if mine[0] is request:
            mine.popleft()
        else:  # given back to the front after a later request arrived: rare
            mine.remove(request)
        if not mine:
            del svc.by_client[request.client]
            svc.turns.remove(request.client)
        self._forget(svc, request)
        if not svc.count:
            del self._services[request.service]

    def _forget(self, svc: _Service, request: MdpRequest) -> None:
        request.waiting = False
        svc.count -= 1
        self.count -= 1
        self.bytes -= request.size
        left = self._client_bytes[request.client] - request.size
        if left > 0:
            self._client_bytes[request.client] = left
        else:
            del self._client_bytes[request.client]
        # Requests served out of arrival order stay in _arrivals until they reach its old
        # end; compact when they outnumber the waiting ones, so it stays O(queued).
        if len(self._arrivals) > 2 * self.count + 64:
            self._arrivals = collections.deque(r for r in self._arrivals if r.waiting)
