"""Image-observation envs for the compression and shared-memory tests (workers import this).

``RemoteRLTest/Pattern-v0``: a ``uint8`` image that looks like a rendered frame (flat
background, a block whose position follows the actions and the seed), different at every
step, so a stale or mixed-up observation cannot go unnoticed; episodes end after
``horizon`` steps (truncated) or when the block leaves the image (terminated).
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces

PATTERN_ID = "RemoteRLTest/Pattern-v0"


class PatternEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, shape=(84, 84, 3), horizon: int = 7, dtype: str = "uint8") -> None:
        self.shape = tuple(int(n) for n in shape)
        self.horizon = int(horizon)
        self.dtype = np.dtype(dtype)
        high = 255 if self.dtype.kind == "u" else 1.0
        self.observation_space = spaces.Box(0, high, self.shape, self.dtype)
        self.action_space = spaces.Discrete(3)
        self._x = self._t = 0

    def _obs(self) -> np.ndarray:
        image = np.full(self.shape, 40, np.uint8)
        image[self._t % self.shape[0], :, 0] = 250  # a line that moves every step
        x = self._x % (self.shape[1] - 8)
        image[10:30, x:x + 8, 1] = 200 + self._t
        return image if self.dtype == np.uint8 else (image / 255.0).astype(self.dtype)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._x, self._t = int(self.np_random.integers(0, 40)), 0
        return self._obs(), {"x": self._x}

    def step(self, action):
        self._t += 1
        self._x += int(action) - 1
        terminated = self._x < 0
        return self._obs(), float(self._x), terminated, self._t >= self.horizon, {"t": self._t}


if PATTERN_ID not in gymnasium.registry:
    gymnasium.register(id=PATTERN_ID, entry_point=f"{__name__}:PatternEnv", disable_env_checker=True)
