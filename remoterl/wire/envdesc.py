"""The env description: what a worker tells a client about an env when its slots open (docs/PROTOCOL.md §5.4).

Theory of operation
-------------------
When an OPEN succeeds, the worker describes the env once (OPENED's ``env``, a codec map
with every array inline) and the client caches it: ``RemoteEnv`` and ``RemoteEnvVec``
expose real gymnasium spaces, metadata, render mode and spec without a round trip::

    {"observation_space": space description, "action_space": space description,
     "metadata": map, "render_mode": str or nil,
     "spec": nil or {id, entry_point, reward_threshold, nondeterministic,
                     max_episode_steps, order_enforce, disable_env_checker, kwargs}}

:func:`describe` builds it on the worker; :meth:`EnvDescription.from_wire` reads it on
the client. Spaces are described by :mod:`remoterl.wire.spaces`. Metadata and spec kwargs
may hold arbitrary objects: only what can travel is kept (keys that are not ``str`` and
values that are not plain data are dropped), and enums travel as their value, so
gymnasium's ``AutoresetMode`` in metadata is restored on the client. No entry point that
is not a string crosses the wire (a callable one is nil), and nothing in a spec is ever
imported or called on the client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
from gymnasium.envs.registration import EnvSpec

from remoterl.errors import ProtocolError
from remoterl.wire.spaces import space_from_wire, space_to_wire

__all__ = ["EnvDescription", "describe", "metadata_from_wire", "spec_from_wire"]


@dataclass
class EnvDescription:
    """An env as its worker described it (a fresh ``metadata`` dict each time it is read)."""

    observation_space: gymnasium.spaces.Space
    action_space: gymnasium.spaces.Space
    metadata: dict
    render_mode: str | None
    spec: EnvSpec | None

    @classmethod
    def from_wire(cls, desc: Any) -> EnvDescription:
        """Read OPENED's decoded ``env``.

        Raises:
            ProtocolError: not a map, or a space description that is missing or malformed.
        """
        if not isinstance(desc, dict):
            raise ProtocolError(f"an env description must be a map, got {type(desc).__name__}")
        return cls(observation_space=space_from_wire(desc.get("observation_space")),
                   action_space=space_from_wire(desc.get("action_space")),
                   metadata=metadata_from_wire(desc.get("metadata")),
                   render_mode=desc.get("render_mode"),
                   spec=spec_from_wire(desc.get("spec")))


def describe(env: Any) -> dict:
    """What a client caches about an env: spaces, metadata, render mode, spec.

    Raises:
        UnsupportedSpaceError: a space has no wire description (it names the space's path).
    """
    spec = getattr(env, "spec", None)
    return {
        "observation_space": space_to_wire(env.observation_space, name="observation_space"),
        "action_space": space_to_wire(env.action_space, name="action_space"),
        "metadata": _plain(dict(getattr(env, "metadata", {}) or {})),
        "render_mode": getattr(env, "render_mode", None),
        "spec": _spec_dict(spec),
    }


def metadata_from_wire(desc: Any) -> dict:
    """The env's metadata as the worker sent it, with gymnasium's enums restored."""
    metadata = dict(desc or {})
    mode = metadata.get("autoreset_mode")
    if isinstance(mode, str):
        try:
            metadata["autoreset_mode"] = gymnasium.vector.AutoresetMode(mode)
        except ValueError:
            pass
    return metadata


def spec_from_wire(desc: Any) -> EnvSpec | None:
    """Rebuild an ``EnvSpec`` from a worker's description (no entry point crosses the wire)."""
    if not isinstance(desc, dict) or not isinstance(desc.get("id"), str):
        return None
    return EnvSpec(
        id=desc["id"],
        entry_point=desc.get("entry_point"),
        reward_threshold=desc.get("reward_threshold"),
        nondeterministic=bool(desc.get("nondeterministic", False)),
        max_episode_steps=desc.get("max_episode_steps"),
        order_enforce=bool(desc.get("order_enforce", True)),
        disable_env_checker=bool(desc.get("disable_env_checker", False)),
        kwargs=dict(desc.get("kwargs") or {}),
    )


def _spec_dict(spec: Any) -> dict | None:
    if spec is None:
        return None
    entry = spec.entry_point if isinstance(spec.entry_point, str) else None
    return _plain({
        "id": spec.id, "entry_point": entry, "reward_threshold": spec.reward_threshold,
        "nondeterministic": spec.nondeterministic, "max_episode_steps": spec.max_episode_steps,
        "order_enforce": spec.order_enforce, "disable_env_checker": spec.disable_env_checker,
        "kwargs": dict(spec.kwargs or {}),
    })


def _plain(value: Any) -> Any:
    """Keep only what can travel: metadata and spec kwargs may hold arbitrary objects.
    Enums (gymnasium's ``AutoresetMode`` in metadata) travel as their value."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if isinstance(k, str) and _travels(v)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value if _travels(v))
    return value


def _travels(value: Any) -> bool:
    if isinstance(value, enum.Enum):
        return _travels(value.value)
    if value is None or isinstance(value, (bool, int, float, str, bytes, np.ndarray, np.generic)):
        return True
    if isinstance(value, (list, tuple, dict)):
        return True
    return False
