"""Stable-Baselines3 on remote simulators: ``RemoteVecEnv`` and the ``make_vec_env`` patch.

``RemoteVecEnv`` is an SB3 ``VecEnv`` over a :class:`~remoterl.RemoteEnvVec` in
SAME_STEP autoreset mode, which is SB3's contract: a finished env is reset within
the step, its last observation goes to ``infos[i]["terminal_observation"]``,
``infos[i]["TimeLimit.truncated"]`` says whether time ran out, and ``reset()``
returns observations only. Each step is ONE message per worker, not one round trip
per env as in a ``DummyVecEnv`` of remote envs.

After ``remoterl.init()``, ``make_vec_env(env_id, n_envs)`` returns a ``RemoteVecEnv``
under ``VecMonitor`` (what the per-env ``Monitor`` would report). With a
``wrapper_class`` or another ``vec_env_cls`` (``SubprocVecEnv``...), the envs are
built one by one as SB3 builds them, from picklable env functions that carry the
broker's address: ``SubprocVecEnv`` starts its children with forkserver/spawn, where
patches made in the trainer do not exist. (Remote envs gain nothing from subprocesses:
the simulation already runs elsewhere and a ``RemoteVecEnv`` batches the calls.)

``make_vec_env`` is commonly imported (``from stable_baselines3.common.env_util
import make_vec_env``) before ``remoterl.init()`` runs, so the patch swaps the code
of SB3's function object itself instead of rebinding the module attribute; every
reference sees it. ``unpatch`` swaps it back.

This module imports Stable-Baselines3 (and so torch): it is loaded only when SB3 is.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any, Callable

import gymnasium
import numpy as np
from stable_baselines3.common import env_util
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

__all__ = ["RemoteEnvFn", "RemoteVecEnv", "patch", "remote_make_vec_env", "unpatch"]

log = logging.getLogger(__name__)

# Attributes every env of a RemoteVecEnv shares, answered from the cached description.
_LOCAL_ATTRS = ("observation_space", "action_space", "metadata", "render_mode", "spec")


class RemoteVecEnv(VecEnv):
    """An SB3 ``VecEnv`` of ``n_envs`` remote slots, stepped with one message per worker.

    Args:
        env_id: a gymnasium env id the workers serve.
        n_envs: number of envs.
        broker: the broker's URL (default: the one ``remoterl.init`` configured).
        client: an explicit :class:`remoterl.Client`.
        max_workers: spread the slots over at most this many workers.
        env_kwargs: for ``gymnasium.make`` on the workers.
        timeout: seconds to wait for each step.
    """

    def __init__(self, env_id: str, n_envs: int = 1, *, broker: str | None = None, client: Any = None,
                 max_workers: int | None = None, env_kwargs: dict | None = None,
                 timeout: float | None = None) -> None:
        from remoterl.vector import RemoteEnvVec

        self.venv = RemoteEnvVec(env_id, n_envs, autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP,
                                 broker=broker, client=client, max_workers=max_workers, timeout=timeout,
                                 **(env_kwargs or {}))
        super().__init__(n_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self.render_mode = self.venv.render_mode
        self.metadata = self.venv.metadata
        self.env_id = env_id
        self._actions: Any = None

    def reset(self) -> Any:
        """Reset every env with the seeds/options set by ``seed()``/``set_options()`` (used once)."""
        options = [o or None for o in self._options]
        if any(o != options[0] for o in options):
            raise NotImplementedError("RemoteVecEnv: different reset options per env are not supported; "
                                      "set the same options for all envs")
        obs, env_infos = self.venv.reset_envs(list(self._seeds), options[0])
        for i, info in env_infos:
            self.reset_infos[i] = info
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Send the actions: the formats SB3's algorithms give (``(n,)`` integers for Discrete,
        ``(n, *shape)`` arrays otherwise) pass ``RemoteEnvVec``'s checks, which refuse anything
        else with ``InvalidActionError`` before sending (and which the workers run again)."""
        self.venv.step_async(actions)

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict]]:
        obs, rewards, terminated, truncated, env_infos, finals = self.venv.wait_envs()
        dones = terminated | truncated
        infos: list[dict] = []
        for i, info in enumerate(env_infos):
            final = finals.get(i)
            if final is not None:
                # SB3: the info of the step that ended the episode; the reset's goes to reset_infos.
                self.reset_infos[i] = info
                info = dict(final[1])
                info["terminal_observation"] = final[0]
            else:
                info = dict(info)
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            infos.append(info)
        # DummyVecEnv's reward buffer is float32.
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Seeds for the next reset: ``seed + i`` for env ``i`` (as DummyVecEnv)."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._seeds = [seed + idx for idx in range(self.num_envs)]
        return self._seeds

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        """Spaces, metadata, render mode and spec are known here; other attributes live on the
        workers and are not fetched (nothing but data crosses the wire)."""
        if attr_name not in _LOCAL_ATTRS:
            raise AttributeError(
                f"RemoteVecEnv.get_attr({attr_name!r}): remote env attributes cannot be read; "
                f"available: {', '.join(_LOCAL_ATTRS)}")
        value = getattr(self.venv, "single_" + attr_name, None) if attr_name.endswith("_space") else \
            getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        raise AttributeError(f"RemoteVecEnv.set_attr({attr_name!r}): remote env attributes cannot be set")

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        raise AttributeError(
            f"RemoteVecEnv.env_method({method_name!r}): calling arbitrary methods on remote envs is not "
            f"supported (only reset and step cross the wire)")

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> list[Any]:
        raise NotImplementedError("RemoteVecEnv: frame streaming from remote workers is not available yet")

    def render(self, mode: str | None = None) -> Any:
        raise NotImplementedError("RemoteVecEnv.render(): frame streaming from remote workers is not available yet")

    @property
    def workers(self) -> list[bytes]:
        """Routing ids of the workers holding the slots."""
        return self.venv.workers


class RemoteEnvFn:
    """A picklable env function for SB3 vec envs: builds one remote env as ``make_vec_env`` would.

    It carries the broker's address (and API key), so it works in ``SubprocVecEnv``
    children, where remoterl was never initialised.
    """

    def __init__(self, env_id: str, rank: int, *, broker: str, api_key: str | None = None,
                 seed: int | None = None, monitor_dir: str | None = None, wrapper_class: Any = None,
                 env_kwargs: dict | None = None, monitor_kwargs: dict | None = None,
                 wrapper_kwargs: dict | None = None) -> None:
        self.env_id, self.rank, self.broker, self.api_key, self.seed = env_id, rank, broker, api_key, seed
        self.monitor_dir, self.wrapper_class = monitor_dir, wrapper_class
        self.env_kwargs, self.monitor_kwargs, self.wrapper_kwargs = env_kwargs or {}, monitor_kwargs or {}, wrapper_kwargs or {}

    def __call__(self) -> gymnasium.Env:
        from remoterl.env import RemoteEnv
        from remoterl.lifecycle import settings

        if self.api_key and settings() is None:
            os.environ.setdefault("REMOTERL_API_KEY", self.api_key)
        env: gymnasium.Env = RemoteEnv(self.env_id, broker=self.broker, **self.env_kwargs)
        if self.seed is not None:
            env.action_space.seed(self.seed + self.rank)
        monitor_path = os.path.join(self.monitor_dir, str(self.rank)) if self.monitor_dir is not None else None
        if monitor_path is not None:
            os.makedirs(self.monitor_dir, exist_ok=True)  # type: ignore[arg-type]
        env = Monitor(env, filename=monitor_path, **self.monitor_kwargs)
        if self.wrapper_class is not None:
            env = self.wrapper_class(env, **self.wrapper_kwargs)
        return env


def remote_make_vec_env(env_id: str | Callable[..., gymnasium.Env], n_envs: int = 1, seed: int | None = None,
                        start_index: int = 0, monitor_dir: str | None = None, wrapper_class: Any = None,
                        env_kwargs: dict | None = None, vec_env_cls: type | None = None,
                        vec_env_kwargs: dict | None = None, monitor_kwargs: dict | None = None,
                        wrapper_kwargs: dict | None = None) -> VecEnv:
    """SB3's ``make_vec_env`` with remote envs (see the module docstring)."""
    from remoterl.lifecycle import settings

    current = settings()
    if not isinstance(env_id, str) or current is None:
        return _original(env_id, n_envs, seed, start_index, monitor_dir, wrapper_class, env_kwargs, vec_env_cls,
                         vec_env_kwargs, monitor_kwargs, wrapper_kwargs)
    if wrapper_class is None and vec_env_cls in (None, DummyVecEnv) and not vec_env_kwargs:
        venv: VecEnv = RemoteVecEnv(env_id, n_envs, env_kwargs=env_kwargs)
        filename = os.path.join(monitor_dir, "vec") if monitor_dir is not None else None
        if monitor_dir is not None:
            os.makedirs(monitor_dir, exist_ok=True)
        venv = VecMonitor(venv, filename=filename, **{k: v for k, v in (monitor_kwargs or {}).items()
                                                      if k == "info_keywords"})
        if seed is not None:
            venv.action_space.seed(seed)
        venv.seed(seed)
        return venv
    fns = [RemoteEnvFn(env_id, start_index + i, broker=current.children_broker, api_key=current.api_key, seed=seed,
                       monitor_dir=monitor_dir, wrapper_class=wrapper_class, env_kwargs=env_kwargs,
                       monitor_kwargs=monitor_kwargs, wrapper_kwargs=wrapper_kwargs) for i in range(n_envs)]
    venv = (vec_env_cls or DummyVecEnv)(fns, **(vec_env_kwargs or {}))
    venv.seed(seed)
    return venv


# --- patching ------------------------------------------------------------------------------

_saved: dict[str, Any] = {}


def _original(*args: Any) -> VecEnv:
    return _saved["function"](*args)


def patch() -> None:
    """Route SB3's ``make_vec_env`` (the function object itself) to ``remote_make_vec_env``."""
    if _saved:
        return
    target = env_util.make_vec_env
    # A copy of the original function, to call when remoterl does not apply.
    _saved["function"] = types.FunctionType(target.__code__, target.__globals__, target.__name__,
                                            target.__defaults__, target.__closure__)
    _saved["code"] = target.__code__
    env_util.__dict__["_remoterl_make_vec_env"] = remote_make_vec_env
    target.__code__ = _trampoline.__code__


def unpatch() -> None:
    """Give SB3's ``make_vec_env`` its own code back."""
    if not _saved:
        return
    env_util.make_vec_env.__code__ = _saved["code"]
    env_util.__dict__.pop("_remoterl_make_vec_env", None)
    _saved.clear()


def _trampoline(env_id, n_envs=1, seed=None, start_index=0, monitor_dir=None, wrapper_class=None,  # noqa: ANN001
                env_kwargs=None, vec_env_cls=None, vec_env_kwargs=None, monitor_kwargs=None,
                wrapper_kwargs=None):  # noqa: ANN202
    # Runs as SB3's make_vec_env (its globals are env_util's): forwards to remoterl.
    return _remoterl_make_vec_env(env_id, n_envs, seed, start_index, monitor_dir, wrapper_class,  # noqa: F821
                                  env_kwargs, vec_env_cls, vec_env_kwargs, monitor_kwargs, wrapper_kwargs)
