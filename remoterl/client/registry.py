"""This process's settings and its clients: one connected client per broker URL.

``remoterl.init`` stores the :class:`Settings` here (:func:`configure`); ``RemoteEnv``,
``RemoteEnvVec`` and the integrations ask :func:`get_client` for the client of the
configured broker. The registry sits below everything that uses it (envs, vector envs,
integrations, ``remoterl.lifecycle``) and imports none of them.

A client is created on first use, again in a forked child (sockets do not survive a
fork), and again when the previous one lost its broker (it stopped, restarted or went
silent): the envs of the lost client keep raising ``BrokerUnavailableError``, new envs
get the new client, and the hooks given to :func:`on_client_replaced` run with it (the
gymnasium integration sends this process's registrations again, as a restarted broker
has none).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from remoterl.client.connection import Client, connect_client
from remoterl.client.metrics import ClientMetrics
from remoterl.errors import BrokerUnavailableError
from remoterl.wire.compress import check_algorithm

__all__ = ["Settings", "close_clients", "collect", "configure", "default_compression", "get_client", "metrics", "on_client_replaced",
           "settings"]

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """What ``remoterl.init`` configured for this process."""

    role: str
    broker: str
    api_key: str | None = None
    timeout: float = 60.0
    embedded: Any = None
    patched: bool = False
    # How other processes (SubprocVecEnv children, Ray actors) reach the broker: the
    # embedded broker's tcp address where this process itself uses inproc.
    children_broker: str = ""
    # What envs do when their worker or the broker is lost: "raise" or "truncate"
    # (remoterl.failover); the default of RemoteEnv, RemoteEnvVec and the integrations.
    on_worker_lost: str = "raise"
    # compression="lz4" / "zstd" for every env's replies (remoterl.wire.compress), or None.
    compression: str | None = None

    def __post_init__(self) -> None:
        self.children_broker = self.children_broker or self.broker


_settings: Settings | None = None
_clients: dict[tuple[int, str], Client] = {}
_lock = threading.RLock()
_replacement_hooks: list[Callable[[Client], None]] = []


def default_compression(value: Any) -> str | None:
    """A remote env's compression: ``value`` checked, None for ``remoterl.init``'s (else none),
    False for none.

    Raises:
        ValueError: not ``"lz4"``, ``"zstd"``, None or False.
    """
    if value is None:
        current = settings()
        return current.compression if current is not None else None
    return None if value is False else check_algorithm(value)


def settings() -> Settings | None:
    """The current settings, or None before ``remoterl.init`` (and after ``shutdown``)."""
    return _settings


def configure(new: Settings | None) -> Settings | None:
    """Make ``new`` the current settings; return the previous ones."""
    global _settings
    with _lock:
        previous, _settings = _settings, new
        return previous


def on_client_replaced(hook: Callable[[Client], None]) -> None:
    """Call ``hook(client)`` whenever :func:`get_client` replaces a client that lost its broker."""
    with _lock:
        if hook not in _replacement_hooks:
            _replacement_hooks.append(hook)


def get_client(broker: str | None = None) -> Client:
    """This process's connected client for ``broker`` (default: the configured broker).

    Raises:
        BrokerUnavailableError: no broker configured, or none answers.
    """
    current = _settings
    url = broker or (current.broker if current is not None else None) or os.environ.get("REMOTERL_BROKER")
    if not url:
        raise BrokerUnavailableError(
            "no broker configured: call remoterl.init() (it starts an embedded broker when no URL is set), "
            "pass broker='tcp://HOST:5555', or set REMOTERL_BROKER")
    key = (os.getpid(), url)
    with _lock:
        client = _clients.get(key)
        replacing = client is not None and client.lost is not None and not client.closed
        if replacing:
            log.info("replacing the client of %s: %s", url, client.lost)
            client.close()
        if client is None or client.closed:
            timeout = current.timeout if current is not None else 60.0
            api_key = current.api_key if current is not None else os.environ.get("REMOTERL_API_KEY")
            old = client
            client = connect_client(url, timeout=timeout, api_key=api_key or None)
            _clients[key] = client
            if replacing:
                client.metrics = old.metrics  # the figures go on across a reconnect
                for hook in _replacement_hooks:
                    hook(client)
        return client


def metrics(client: Client | None = None) -> dict[str, Any]:
    """The trainer's own figures: round trips per worker (count, mean, p50, p99, max in ms),
    calls by op, env-steps and errors, for ``client`` or else every client this process holds
    (``remoterl.client.metrics``). The broker's and workers' figures are their ``--metrics``.

    Example::

        remoterl.metrics()["round_trip"]["p99_ms"]     # all workers
        remoterl.metrics()["workers"]                  # by worker id (hex), as remoterl status
    """
    return collect(client).snapshot()


def collect(client: Client | None = None) -> ClientMetrics:
    """:func:`metrics` as a :class:`~remoterl.client.metrics.ClientMetrics` (merged, a copy)."""
    with _lock:
        pid = os.getpid()
        clients = [client] if client is not None else [c for (p, _), c in _clients.items() if p == pid]
    total = ClientMetrics()
    for one in clients:
        total.merge(one.metrics)
    return total


def close_clients() -> None:
    """Close this process's clients (a forked child's inherited entries are dropped unclosed)."""
    with _lock:
        pid = os.getpid()
        for key in [k for k in _clients if k[0] == pid]:
            client = _clients.pop(key)
            try:
                client.close()
            except Exception:  # shutting down: keep going
                log.exception("closing a client failed")
        _clients.clear()
