"""Envs for the tests, importable by worker processes (``--import remoterl_test_envs``).

Not a test module: pytest does not collect it. Worker processes find it through
``PYTHONPATH`` set to this folder.
"""

from __future__ import annotations

import time

import gymnasium
import numpy as np
from gymnasium import spaces


class RaisingEnv(gymnasium.Env):
    """Steps fine with action 0; action 1 raises inside ``explode_on_purpose``."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        if int(action) == 1:
            explode_on_purpose()
        return np.ones(2, np.float32), 1.0, False, False, {"ok": True}


def explode_on_purpose() -> None:
    raise ValueError("boom from the simulator")


class DictObsEnv(gymnasium.Env):
    """A Dict observation space with nested arrays and a terminal after ``horizon`` steps."""

    metadata = {"render_modes": []}

    def __init__(self, horizon: int = 7) -> None:
        self.horizon = horizon
        self.observation_space = spaces.Dict({
            "pos": spaces.Box(-10.0, 10.0, (3,), np.float64),
            "count": spaces.Discrete(100),
            "flags": spaces.MultiBinary(4),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
        self._t = 0
        self._pos = np.zeros(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._pos = self.np_random.uniform(-1, 1, 3)
        return self._obs(), {"start": self._pos.copy()}

    def step(self, action):
        self._t += 1
        self._pos = np.clip(self._pos + np.asarray(action, np.float64), -10, 10)
        terminated = self._t >= self.horizon
        reward = float(-np.linalg.norm(self._pos))
        return self._obs(), reward, terminated, False, {"t": self._t, "pos": self._pos.copy()}

    def _obs(self):
        return {"pos": self._pos.copy(), "count": self._t,
                "flags": (self.np_random.random(4) > 0.5).astype(np.int8)}


class SleepyEnv(gymnasium.Env):
    """Each step sleeps ``delay`` seconds: a slow simulator, for waits that last."""

    metadata = {"render_modes": []}

    def __init__(self, delay: float = 0.5) -> None:
        self.delay = delay
        self.observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        time.sleep(self.delay)
        return np.zeros(1, np.float32), 0.0, False, False, {}


class CountingEnv(gymnasium.Env):
    """The observation is the number of steps since the last reset, so a step the trainer
    never saw shows in the next observation. Each step sleeps ``delay`` seconds.

    Public attributes and methods for ``get_attr``/``set_attr``/``call``: ``steps``, ``delay``,
    ``label``, ``scale(x, factor=2)``, ``fail()`` (raises), ``handle`` (an object that cannot
    travel) and ``_secret`` (private: never reached remotely).
    """

    metadata = {"render_modes": []}

    def __init__(self, delay: float = 0.0, label: str = "counting") -> None:
        self.delay = delay
        self.label = label
        self.steps = 0
        self.handle = object()
        self._secret = "private"
        self.observation_space = spaces.Box(0.0, np.inf, (1,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.steps = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        if self.delay:
            time.sleep(self.delay)
        self.steps += 1
        return np.array([self.steps], np.float32), 1.0, False, False, {}

    def scale(self, x, factor=2):
        return np.asarray(x) * factor

    def fail(self):
        raise RuntimeError("fail() on purpose")


gymnasium.register(id="RaisingEnv-v0", entry_point=f"{__name__}:RaisingEnv")
gymnasium.register(id="CountingEnv-v0", entry_point=f"{__name__}:CountingEnv")
gymnasium.register(id="SleepyEnv-v0", entry_point=f"{__name__}:SleepyEnv")
gymnasium.register(id="DictObsEnv-v0", entry_point=f"{__name__}:DictObsEnv")
