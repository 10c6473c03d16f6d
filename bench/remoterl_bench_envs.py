"""Envs for the benchmark, importable by worker processes (``--import remoterl_bench_envs``).

Registered with entry-point strings, so a worker that imports this module serves them:
the embedded workers started by ``bench/run.py`` get it in ``imports=``; workers you start
yourself for ``--broker URL`` need ``PYTHONPATH=bench remoterl-worker --import remoterl_bench_envs``.

* ``RemoteRLBench/Slow-v0``: CartPole-sized spaces, every step sleeps ``delay`` seconds
  (1 ms): a simulator whose cost is not Python.
* ``RemoteRLBench/Image-v0``: a fixed random ``uint8`` image of ``shape`` (default
  84×84×3) as the observation: payload size without env cost.
"""

from __future__ import annotations

import time

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["IMAGE_ID", "ImageEnv", "SLOW_ID", "SlowEnv", "register"]

SLOW_ID = "RemoteRLBench/Slow-v0"  # also in cases.py, which does not import this module until it runs
IMAGE_ID = "RemoteRLBench/Image-v0"


class SlowEnv(gymnasium.Env):
    """Discrete(2) actions, a 4-float observation; each step sleeps ``delay`` seconds."""

    metadata = {"render_modes": []}

    def __init__(self, delay: float = 0.001, horizon: int = 500) -> None:
        self.delay = float(delay)
        self.horizon = int(horizon)
        self.observation_space = spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._obs = np.zeros(4, np.float32)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs.copy(), {}

    def step(self, action):
        time.sleep(self.delay)  # the simulator's work: not Python, releases the GIL
        self._t += 1
        return self._obs.copy(), 1.0, False, self._t >= self.horizon, {}


class ImageEnv(gymnasium.Env):
    """A fixed random ``uint8`` image of ``shape`` as every observation; Discrete(4) actions."""

    metadata = {"render_modes": []}

    def __init__(self, shape: tuple[int, ...] | list[int] = (84, 84, 3), horizon: int = 1000) -> None:
        shape = tuple(int(x) for x in shape)
        self.horizon = int(horizon)
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)
        self.action_space = spaces.Discrete(4)
        self._image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._image, {}

    def step(self, action):
        self._t += 1
        return self._image, 0.0, False, self._t >= self.horizon, {}


def register() -> None:
    """Register the bench env ids (idempotent)."""
    for env_id, entry in ((SLOW_ID, "remoterl_bench_envs:SlowEnv"), (IMAGE_ID, "remoterl_bench_envs:ImageEnv")):
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=entry, disable_env_checker=True)


register()
