"""An env creator for the RLlib tests, importable by worker processes and Ray actors.

Not a test module: pytest does not collect it. Registered with ``tune.register_env``
by the tests (a creator takes RLlib's env config); worker processes import it by name
(``--allow-import remoterl_rllib_envs``) through ``PYTHONPATH`` set to this folder.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces


class Corridor(gymnasium.Env):
    """Walk right (action 1) from cell 0 to cell ``length``; reward -0.1 a step, +1 at the end."""

    metadata = {"render_modes": []}

    def __init__(self, length: int = 5, max_steps: int = 40) -> None:
        self.length, self.max_steps = length, max_steps
        self.observation_space = spaces.Box(0.0, float(length), (1,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._pos, self._t = 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._pos, self._t = 0, 0
        return np.array([self._pos], np.float32), {}

    def step(self, action):
        self._t += 1
        self._pos = max(0, self._pos + (1 if int(action) == 1 else -1))
        terminated = self._pos >= self.length
        truncated = self._t >= self.max_steps and not terminated
        reward = 1.0 if terminated else -0.1
        return np.array([self._pos], np.float32), reward, terminated, truncated, {"pos": self._pos}


def make_corridor(config: dict) -> Corridor:
    """An RLlib env creator: ``config`` is the env config (``{"length": n}``)."""
    return Corridor(length=int(config.get("length", 5)))
