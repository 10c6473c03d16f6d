"""A custom env for the registration-mirroring tests. Importing it registers nothing:
the trainer registers it after ``remoterl.init()``, and workers import it only when
their ``--import`` / ``--allow-import`` lists allow."""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces


class CountingEnv(gymnasium.Env):
    """Observation: the step count; ends after ``limit`` steps."""

    metadata = {"render_modes": []}

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.observation_space = spaces.Box(0, 1000, (1,), np.int64)
        self.action_space = spaces.Discrete(2)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return np.array([0]), {}

    def step(self, action):
        self._t += 1
        return np.array([self._t]), float(action), self._t >= self.limit, False, {"limit": self.limit}
