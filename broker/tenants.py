"""API keys and tenants: who may become a peer, as which tenant, and what a tenant may hold.

Theory of operation
-------------------
Open mode (no keys, the default): every peer is in tenant ``""``. Key mode
(:meth:`Tenants.set_api_keys`, ``BrokerConfig.api_keys``): HELLO and READY must
present a key, and the peer gets the key's tenant for the life of its session (keys
re-read on SIGHUP apply to new peers; admitted ones keep their tenant). The other parts
of the core read the tenant recorded on each peer: placement, registrations, the status
service and error messages only ever involve the caller's own tenant.

* *Keys are kept as digests and never logged.* A presented key is hashed and its digest
  compared with every known one in constant time (:meth:`Tenants.tenant_of`), so the
  time taken says nothing about how much of a key was right. The loop checks the same
  way at the ZeroMQ handshake.
* *Admission is paced.* At most ``max_new_peers_per_second`` new peers are admitted in
  a one-second window, across tenants; more are refused with ``limit``.
* *Per tenant:* ``max_slots_per_tenant`` bounds the slots a tenant holds (open and
  opening), and :meth:`Tenants.count` counts an event broker-wide and for the peer's
  tenant: in key mode ``remoterl.status`` shows a tenant its own counters only.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from remoterl.broker.base import BrokerConfig, Outbox, Refusal

__all__ = ["Tenants"]


@dataclass
class _AdmissionWindow:
    """The current one-second window of admissions: when it began and how many it let in."""

    start: float
    count: int = 0


class Tenants:
    """Keys, admission and per-tenant figures.

    Args:
        config: ``api_keys``, ``max_new_peers_per_second``, ``max_slots_per_tenant``.
        outbox: its counters are the broker-wide ones :meth:`count` adds to.
        now: the core's start time (the first admission window opens then).
    """

    def __init__(self, config: BrokerConfig, outbox: Outbox, now: float) -> None:
        self.config = config
        self._broker_counters = outbox.counters
        self.counters: dict[str, collections.Counter] = {}  # tenant -> its peers' events; see count()
        self.slots: collections.Counter = collections.Counter()  # tenant -> slots held (open or opening)
        self._key_hashes: dict[bytes, str] | None = None
        self._window = _AdmissionWindow(now)
        self.set_api_keys(config.api_keys)

    def set_api_keys(self, api_keys: dict[str, str] | None) -> None:
        """Switch to key mode with ``{key: tenant}`` (``None``: open mode). Sessions already
        admitted keep their tenant; new HELLO/READY messages are checked against the new keys."""
        if api_keys is None:
            self._key_hashes = None
            return
        self._key_hashes = {hashlib.sha256(key.encode()).digest(): tenant for key, tenant in api_keys.items()}

    @property
    def open_mode(self) -> bool:
        """True when no API keys are configured: every peer is in tenant ``""``."""
        return self._key_hashes is None

    def tenant_of(self, key: Any) -> str | None:
        """The tenant an API key belongs to, or None. Keys are never logged.

        The presented key is hashed and the digest compared in constant time, so the
        time taken says nothing about how much of a key was right.
        """
        if self._key_hashes is None:
            return ""
        if not isinstance(key, str) or not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, tenant in self._key_hashes.items():
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def admit(self, header: dict, now: float, r: Any = None) -> str:
        """Check the key and the new-peer rate for a HELLO or READY; return the tenant.

        Raises:
            Refusal: ``auth`` (wrong or missing key) or ``limit`` (too many new peers).
        """
        tenant = self.tenant_of(header.get("key"))
        if tenant is None:
            self._broker_counters["auth_refused"] += 1
            raise Refusal(r, "auth", "wrong or missing API key: the broker refused this peer")
        window = self._window
        start, count = (now, 0) if now - window.start >= 1.0 else (window.start, window.count)
        if count >= self.config.max_new_peers_per_second:
            self._broker_counters["rate_limited"] += 1
            raise Refusal(r, "limit", f"more than {self.config.max_new_peers_per_second:g} new connections a "
                                      f"second; try again shortly")
        window.start, window.count = start, count + 1
        return tenant

    def check_slots(self, tenant: str, n: int, r: Any) -> None:
        """Refuse (``limit``) an OPEN of ``n`` more slots past ``max_slots_per_tenant``."""
        limit = self.config.max_slots_per_tenant
        if limit is not None and self.slots[tenant] + n > limit:
            raise Refusal(r, "limit", f"this tenant may hold at most {limit} open slots "
                                      f"({self.slots[tenant]} open, {n} asked for)")

    def count(self, name: str, tenant: str | None) -> None:
        """Count an event broker-wide and, when it belongs to a tenant, for that tenant
        (``remoterl.status`` shows a tenant only its own counters in key mode)."""
        self._broker_counters[name] += 1
        if tenant is not None:
            counters = self.counters.get(tenant)
            if counters is None:
                counters = self.counters[tenant] = collections.Counter()
            counters[name] += 1
