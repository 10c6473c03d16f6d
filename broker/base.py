"""What every part of the broker core shares: the settings, the outbox and refusals.

The core (:class:`~remoterl.broker.core.BrokerCore`) is composed of parts that each own
one concept's state: tenants (``tenants``), the remoterl peers (``peers``, ``sessions``),
their slots (``placement``) and registrations (``registry``), and Majordomo
(``majordomo``). They share what is defined here, handed to each part explicitly:

* :class:`BrokerConfig`, the settings;
* one :class:`Outbox`: the messages queued for the loop, the counters, and warnings
  about bad input, rate-limited on the latest time the core was given (the core reads
  no clock);
* :class:`Refusal`, raised by a handler that refuses a well-formed request. Bad input
  raises :class:`~remoterl.errors.ProtocolError` instead; the core answers the two
  differently (``BrokerCore.receive``).
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Any

from remoterl.errors import MessageTooLargeError, ProtocolError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C

__all__ = ["BrokerConfig", "Outbox", "Refusal", "header", "try_header"]

log = logging.getLogger(__name__)


@dataclass
class BrokerConfig:
    """Tunable broker settings (seconds and bytes)."""

    heartbeat: float = 1.0
    liveness: int = 3
    max_message_size: int = p.MAX_MESSAGE_SIZE
    open_timeout: float = 120.0
    # Calls one client may have in flight to one worker; more get a ``limit`` error at once.
    # A vector env has one in flight per worker; the bound is what keeps a flooding client
    # from queueing thousands of calls ahead of everyone else's at a shared worker.
    max_calls_in_flight: int = 64
    # The first slot id this broker hands out (then +1 each). None: 1 in the sans-I/O core, and a
    # random base per broker process (remoterl.broker.loop.Broker picks one), so a restarted
    # broker never hands out ids its previous instance gave: a client still holding those (it
    # has not noticed the restart yet) can never close or call a new slot by a stale id.
    first_slot: int | None = None
    # Majordomo requests waiting for a worker, across all services: a count, a byte budget, and
    # each client's share of the bytes (clients are served round robin within a service).
    max_queued_requests: int = 200_000
    max_queued_bytes: int = 256 * 1024 * 1024
    max_queued_bytes_per_client: int = 64 * 1024 * 1024
    request_ttl: float = 30.0
    # Majordomo workers' own liveness. RFC 7/18 ask broker and worker to heartbeat "at regular
    # and agreed-upon intervals" and list mismatched rates as a known weakness ("false
    # disconnections will occur"); zguide's mdwrkapi and majortomo's Worker heartbeat every
    # 2.5 s and give the broker 3 (zguide) or 4 (majortomo) intervals, so remoterl's 1 s × 3
    # would purge healthy idle ones. The broker heartbeats them every mdp_heartbeat seconds.
    mdp_heartbeat: float = 2.5
    mdp_liveness: int = 3
    # How long an MDP worker serving a request may stay silent. A single-threaded worker
    # (zguide's mdwrkapi, majortomo's Worker) sends nothing while it works, and zguide's
    # broker never expires a busy worker; majortomo's waits 900 s. A worker whose process
    # dies is noticed sooner anyway: its connection closes and the next HEARTBEAT to it is
    # undeliverable (ROUTER_MANDATORY). So this bounds only a worker that hangs with its
    # connection open: 5 minutes lets long single-threaded jobs finish, and is 10 times
    # request_ttl, far past any client's wait for the answer.
    mdp_request_timeout: float = 300.0
    # API keys: key -> tenant. None: open mode (no keys; one tenant, "").
    api_keys: dict[str, str] | None = None
    max_slots_per_tenant: int | None = None
    max_new_peers_per_second: float = 200.0

    @property
    def expiry(self) -> float:
        """Seconds of silence after which a remoterl peer is declared dead."""
        return self.heartbeat * self.liveness

    @property
    def mdp_expiry(self) -> float:
        """Seconds of silence after which an idle Majordomo worker is declared dead."""
        return self.mdp_heartbeat * self.mdp_liveness


class Refusal(Exception):
    """A well-formed client request refused with a typed error.

    The client gets an ERROR carrying ``code`` (``auth``, ``limit``, ``no_worker``,
    ``capacity``, ``protocol``), its request id ``r`` and ``msg``; the core counts it as
    ``refused``. Not a :class:`~remoterl.errors.ProtocolError`: a refusal answers a request
    the broker understood, and must not be counted or logged as bad input.
    """

    def __init__(self, r: Any, code: str, msg: str) -> None:
        super().__init__(msg)
        self.r, self.code, self.msg = r, code, msg


class Outbox:
    """What the core says: messages for the loop to send, counters, and warnings.

    ``messages`` is one list for the core's lifetime (the parts append to it directly, on
    the per-call path too); :meth:`take` empties it. ``now`` is the latest time the core
    was given; it paces :meth:`warn`, which may be called with no time at hand (from
    :meth:`bad`, or by the loop at a handshake).
    """

    def __init__(self, now: float) -> None:
        self.messages: list[list] = []  # each [routing id, frame, ...]
        self.counters: collections.Counter = collections.Counter()
        self.now = now
        self._warned_at = -math.inf  # the first warning opens a window
        self._warned = 0
        self._suppressed = 0

    def take(self) -> list[list]:
        """Remove and return the queued messages."""
        out = self.messages[:]
        self.messages.clear()
        return out

    def warn(self, fmt: str, *args: Any) -> None:
        """Log a warning, at most 10 a second: a flood of garbage must not become a flood of logs."""
        now = self.now
        if now - self._warned_at >= 1.0:
            if self._suppressed:
                log.warning("%d more bad-input warnings suppressed", self._suppressed)
            self._warned_at, self._warned, self._suppressed = now, 0, 0
        if self._warned < 10:
            self._warned += 1
            log.warning(fmt, *args)
        else:
            self._suppressed += 1

    def bad(self, sender: bytes, frames: list | None, reason: str, code: str = "protocol") -> None:
        """Count and log bad input; answer it when the sender's protocol has an error reply."""
        self.counters["malformed"] += 1
        self.warn("bad message from %s: %s", sender.hex() if isinstance(sender, bytes) else "?", reason)
        if not frames:
            return
        frame0 = p.as_bytes(frames[0])
        if frame0[:3] == b"RLC":
            # Echo the request id when a header can be found, so the client can match the error.
            r = None
            for frame in frames[1:3]:
                found = try_header(frame) if len(frame) < 4096 else None
                if found is not None:
                    r = found.get("r")
                    break
            self.messages.append([sender, p.client_frame(C.ERROR),
                                  p.encode_header({"r": r, "code": code, "msg": reason})])


def header(frames: list, index: int, limit: int | None = p.MAX_CONTROL_HEADER) -> dict:
    """Decode the control header at ``frames[index]``, refusing one over ``limit`` bytes
    before decoding it (``None``: bounded by the message size only)."""
    if len(frames) <= index:
        raise ProtocolError("message has no header frame")
    if limit is not None and len(frames[index]) > limit:
        raise MessageTooLargeError(f"a control header of {len(frames[index])} bytes exceeds the limit of "
                                   f"{limit} bytes (names, env ids, kwargs and specs together)")
    return p.decode_header(frames[index])


def try_header(frame: Any) -> dict | None:
    """The header in ``frame``, or None when it is not one."""
    try:
        return p.decode_header(frame)
    except ProtocolError:
        return None
