"""``RemoteEnv``: one env slot on a remote worker, as a ``gymnasium.Env``.

The spaces, metadata, render mode and spec are fetched once, when the slot opens,
and cached. ``reset``, ``step`` and ``close`` are forwarded; each is one round trip
through the broker. Everything else is the local ``gymnasium.Env`` machinery, so
gymnasium's wrappers and env checker work on it unchanged.
"""

from __future__ import annotations

from typing import Any

import gymnasium
from gymnasium.envs.registration import EnvSpec

from remoterl.actions import check_action
from remoterl.errors import EnvClosedError
from remoterl.spaces import space_from_wire

__all__ = ["RemoteEnv", "check_action", "metadata_from_wire", "spec_from_wire"]


class RemoteEnv(gymnasium.Env):
    """An environment that lives on a remote worker.

    Args:
        env_id: a gymnasium env id the workers serve.
        broker: the broker's URL; default: the one ``remoterl.init`` configured, else
            ``$REMOTERL_BROKER``.
        client: an explicit :class:`remoterl.Client` (overrides ``broker``).
        timeout: seconds to wait for each reply (default: the client's).
        **kwargs: passed to ``gymnasium.make`` on the worker (``max_episode_steps``,
            env constructor arguments, ...).

    Raises:
        NoWorkerError: no worker serves ``env_id`` (the message lists what is served).
        BrokerUnavailableError: no broker answers.
        RemoteEnvError: the env could not be created on the worker.
    """

    def __init__(self, env_id: str, *, broker: str | None = None, client: Any = None,
                 timeout: float | None = None, _bare: bool = False, **kwargs: Any) -> None:
        from remoterl.lifecycle import get_client

        self._client = client if client is not None else get_client(broker)
        self._timeout = timeout
        opts = {"bare": True} if _bare else None
        opened = self._client.open(env_id, 1, kwargs, opts=opts, timeout=timeout)
        self._slot = opened.slots[0]
        self._worker = opened.workers[0]
        self._slots = [self._slot]
        self._closed = False
        desc = opened.env
        self.env_id = env_id
        self.observation_space = space_from_wire(desc["observation_space"])
        self.action_space = space_from_wire(desc["action_space"])
        self.metadata = metadata_from_wire(desc.get("metadata"))
        self.render_mode = desc.get("render_mode")
        self.spec = spec_from_wire(desc.get("spec"))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the remote env; ``seed`` and ``options`` as in ``gymnasium.Env.reset``."""
        super().reset(seed=seed)
        self._ensure_open()
        reply = self._client.call(self._worker, self._slots,
                                  {"op": "reset", "seeds": [seed], "options": options, "single": True},
                                  self._timeout)
        return reply["obs"], reply["info"]

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        """Step the remote env; returns what it returned, types included.

        Raises:
            InvalidActionError: the action cannot fit the action space (nothing sent; the
                worker runs the same check on arrival).
        """
        self._ensure_open()
        check_action(self.action_space, action)
        reply = self._client.call(self._worker, self._slots, {"op": "step", "a": action, "single": True},
                                  self._timeout)
        return reply["obs"], reply["rew"], reply["term"], reply["trunc"], reply["info"]

    def render(self) -> Any:
        """Not available yet: frames are not streamed from workers."""
        raise NotImplementedError(
            "RemoteEnv.render(): frame streaming from remote workers is not available yet "
            f"(env {self.env_id!r} renders on its worker, not here)")

    def close(self) -> None:
        """Release the slot; the env is closed on its worker. Closing twice is harmless."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._client.close_slots(self._slots)

    def _ensure_open(self) -> None:
        if self._closed:
            raise EnvClosedError(f"RemoteEnv({self.env_id!r}) is closed")

    def __repr__(self) -> str:
        return f"<RemoteEnv {self.env_id} slot={self._slot} worker={self._worker.hex()[:8]}>"


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
