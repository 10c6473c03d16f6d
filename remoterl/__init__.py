"""remoterl: step reinforcement-learning environments on remote simulators.

``import remoterl`` is cheap: it loads no event loop, no socket and no framework
(torch, Stable-Baselines3, Ray). Public names are re-exported lazily (PEP 562) and
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

# Public name -> module that defines it.
_LAZY: dict[str, str] = {
    # errors
    "ActionNotBatchedError": "remoterl.errors",
    "AuthenticationError": "remoterl.errors",
    "BrokerUnavailableError": "remoterl.errors",
    "CapacityError": "remoterl.errors",
    "CodecError": "remoterl.errors",
    "EnvClosedError": "remoterl.errors",
    "InvalidActionError": "remoterl.errors",
    "LimitExceededError": "remoterl.errors",
    "MessageTooLargeError": "remoterl.errors",
    "NoWorkerError": "remoterl.errors",
    "ProtocolError": "remoterl.errors",
    "RemoteAttributeError": "remoterl.errors",
    "RemoteEnvError": "remoterl.errors",
    "RemoteRLError": "remoterl.errors",
    "RemoteTimeoutError": "remoterl.errors",
    "RenderUnavailableError": "remoterl.errors",
    "ResetNeededError": "remoterl.errors",
    "UnsupportedSpaceError": "remoterl.errors",
    "WorkerLostError": "remoterl.errors",
    # client and proxies
    "Client": "remoterl.client.connection",
    "RemoteEnv": "remoterl.env",
    "RemoteEnvVec": "remoterl.vector",
    # lifecycle
    "get_client": "remoterl.lifecycle",
    "init": "remoterl.lifecycle",
    "metrics": "remoterl.client.registry",
    "shutdown": "remoterl.lifecycle",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'remoterl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
