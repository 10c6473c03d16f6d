"""A small custom env, importable by workers (``--import grid_env``)."""

import gymnasium
import numpy as np
from gymnasium import spaces


class GridWalk(gymnasium.Env):
    """Walk right on a line of ``size`` cells; reward 1 at the end."""

    metadata = {"render_modes": []}

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.observation_space = spaces.Discrete(size)
        self.action_space = spaces.Discrete(2)  # 0: left, 1: right
        self._pos = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._pos = 0
        return self._pos, {}

    def step(self, action):
        self._pos = int(np.clip(self._pos + (1 if action == 1 else -1), 0, self.size - 1))
        done = self._pos == self.size - 1
        return self._pos, float(done), done, False, {}
