"""``on_worker_lost``: what a remote env does when its worker (or the broker) is lost.

``"raise"`` (the default) raises :class:`~remoterl.errors.WorkerLostError` or
:class:`~remoterl.errors.BrokerUnavailableError`, as it always has. ``"truncate"`` keeps
training going: the envs lost with a worker are re-opened on the workers still serving
the env id, and each lost env's episode ends with ``truncated=True`` and
``info["remoterl_worker_lost"] = True``; the replacement starts from a fresh reset. When the
broker itself was lost (it restarted), the client is replaced by a new one and every env is
re-opened: a broker restart looks like the loss of every worker.

This module holds what ``RemoteEnv`` and ``RemoteEnvVec`` share: the policy's check and
default, and :func:`reopen`, which waits, bounded, for capacity to come back. The vector's
per-env bookkeeping is in :mod:`remoterl.vector_failover`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from remoterl.errors import (BrokerUnavailableError, CapacityError, LimitExceededError, NoWorkerError,
                             RemoteTimeoutError, WorkerLostError)
from remoterl.wire.calls import BARE, COMPRESSION

__all__ = ["LOST_FLAG", "POLICIES", "LostClient", "check_policy", "is_lost", "reopen"]

log = logging.getLogger(__name__)

POLICIES = ("raise", "truncate")
# The info key set on the step that ends an episode because its env was lost.
LOST_FLAG = "remoterl_worker_lost"
# Errors that mean "the env is gone with its worker or the broker session", as opposed to an
# env that raised or a call that timed out (raised as always).
_LOST = (WorkerLostError, BrokerUnavailableError)
# What may clear up while we wait for a replacement: a broker coming back, workers re-registering.
_TRANSIENT = (*_LOST, NoWorkerError, CapacityError, LimitExceededError, RemoteTimeoutError)
_RETRY_EVERY = 0.2


def check_policy(value: str | None) -> str:
    """``value``, or the process's default (``remoterl.init(on_worker_lost=...)``, else
    ``"raise"``), checked."""
    if value is None:
        from remoterl.client.registry import settings

        current = settings()
        value = current.on_worker_lost if current is not None else "raise"
    if value not in POLICIES:
        raise ValueError(f"on_worker_lost must be one of {POLICIES}, got {value!r}")
    return value


def hosting_opts(compression: str | None, *, bare: bool = False) -> dict | None:
    """The OPEN hosting options of a remote env (kept for its re-opens): no wrappers on the
    worker (``bare``), the compression of its replies; None when there are none."""
    opts: dict = {}
    if bare:
        opts[BARE] = True
    if compression is not None:
        opts[COMPRESSION] = compression
    return opts or None


def is_lost(error: BaseException | None) -> bool:
    """Whether ``error`` says the env is gone with its worker or its broker session."""
    return isinstance(error, _LOST)


class LostClient:
    """A remote env's client and how to get a fresh one when it is lost.

    Args:
        client: the client the env was opened on.
        broker: ``None`` when ``client`` came from the process's registry (a replacement is
            asked of the registry again); otherwise the caller's own client, replaced by a
            new connection with the same settings, which this object then owns.
    """

    def __init__(self, client: Any, from_registry: bool, broker: str | None) -> None:
        self.client = client
        self._from_registry = from_registry
        self._broker = broker
        self.owned: Any = None  # a client made here, closed with the env

    def live(self) -> Any:
        """The client, replaced first if it lost its broker.

        Raises:
            BrokerUnavailableError: no broker answers (yet).
        """
        client = self.client
        if client.lost is None and not client.closed:
            return client
        if self._from_registry:
            from remoterl.client.registry import get_client

            fresh = get_client(self._broker)
        else:
            fresh = client.reconnected()
            if self.owned is not None:
                self.owned.close()
            self.owned = fresh
        log.warning("replaced the client of %s: %s", client.url, client.lost)
        self.client = fresh
        return fresh


def reopen(clients: LostClient, env_id: str, n: int, kwargs: dict, opts: dict | None, bound: float,
           why: BaseException, on_new_client: Callable[[Any], None] | None = None) -> Any:
    """Open ``n`` slots of ``env_id`` on the workers serving it, waiting up to ``bound``
    seconds for a broker, workers or capacity to come back; return the ``Opened`` answer.

    ``on_new_client(client)`` is called whenever the client had to be replaced (the caller's
    other envs are gone with the old session).

    Raises:
        WorkerLostError or BrokerUnavailableError (as ``why``): nothing came back in time;
        the message says what was tried. RemoteEnvError: the env failed to construct.
    """
    deadline = time.monotonic() + bound
    last: BaseException = why
    while True:
        try:
            before = clients.client
            client = clients.live()
            if client is not before and on_new_client is not None:
                on_new_client(client)
            remaining = max(deadline - time.monotonic(), 0.1)
            return client.open(env_id, n, kwargs, opts=opts, timeout=remaining)
        except _TRANSIENT as exc:
            last = exc
        if time.monotonic() >= deadline:
            cls = BrokerUnavailableError if isinstance(why, BrokerUnavailableError) else WorkerLostError
            raise cls(f"{why} — and {n} replacement env(s) of {env_id!r} could not be opened within "
                      f"{bound:g} s (on_worker_lost='truncate'): {type(last).__name__}: {last}") from last
        time.sleep(min(_RETRY_EVERY, max(deadline - time.monotonic(), 0.0)))
