"""Envs for the benchmark, importable by worker processes (``--import remoterl_bench_envs``).

Registered with entry-point strings, so a worker that imports this module serves them:
the embedded workers started by ``bench/run.py`` get it in ``imports=``; workers you start
yourself for ``--broker URL`` need ``PYTHONPATH=bench remoterl-worker --import remoterl_bench_envs``.

* ``RemoteRLBench/Slow-v0``: CartPole-sized spaces, every step sleeps ``delay`` seconds
  (1 ms): a simulator whose cost is not Python.
* ``RemoteRLBench/Image-v0``: a fixed random ``uint8`` image of ``shape`` (default
  84×84×3) as the observation: payload size without env cost.
* ``RemoteRLBench/CartPolePixels-v0``: CartPole-v1 seen through its own ``rgb_array`` render
  (600×400, pygame) sampled down to 84×84×3 ``uint8`` (nearest pixel on an even grid): a real
  rendered image, mostly white, as compressible as real frames are.
"""

from __future__ import annotations

import os
import time

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["CartPolePixelsEnv", "IMAGE_ID", "ImageEnv", "PIXELS_ID", "SLOW_ID", "SlowEnv", "register"]

SLOW_ID = "RemoteRLBench/Slow-v0"  # also in cases.py, which does not import this module until it runs
IMAGE_ID = "RemoteRLBench/Image-v0"
PIXELS_ID = "RemoteRLBench/CartPolePixels-v0"


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


class CartPolePixelsEnv(gymnasium.Env):
    """CartPole-v1 whose observation is its ``rgb_array`` render sampled down to ``size``×``size``×3.

    Dynamics, rewards and termination are CartPole's; episodes are truncated after
    ``horizon`` steps (CartPole-v1's 500). The frame is drawn by CartPole's own ``render``
    (pygame, 600×400). Copying that frame out whole costs about 1 ms a step, three times the
    drawing, so the grid is read from the drawing surface instead and ``render`` copies out
    a 1×1 screen: about 0.4 ms a step, the same pixels (checked at construction; where
    gymnasium's CartPole keeps its surface elsewhere, the whole frame is copied).
    """

    metadata = {"render_modes": []}

    def __init__(self, size: int = 84, horizon: int = 500) -> None:
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # pygame.init() would look for a sound card
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        from gymnasium.envs.classic_control.cartpole import CartPoleEnv

        self._cartpole = CartPoleEnv(render_mode="rgb_array")
        self.horizon = int(horizon)
        height, width = self._cartpole.screen_height, self._cartpole.screen_width
        self._rows = np.linspace(0, height - 1, size).round().astype(np.intp)[:, None]
        self._cols = np.linspace(0, width - 1, size).round().astype(np.intp)[None, :]
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = self._cartpole.action_space
        self._t = 0
        self._from_surface = False
        self._cartpole.reset(seed=0)
        whole = self._pixels()
        import pygame

        screen, self._cartpole.screen = self._cartpole.screen, pygame.Surface((1, 1))  # what render() copies out
        self._from_surface = True
        try:
            self._from_surface = np.array_equal(self._pixels(), whole)
        except Exception:  # no .surf: another gymnasium's CartPole
            self._from_surface = False
        if not self._from_surface:
            self._cartpole.screen = screen  # copy the whole frame out, as render() does

    def _pixels(self) -> np.ndarray:
        if not self._from_surface:
            return self._cartpole.render()[self._rows, self._cols]  # (size, size, 3), a new array
        import pygame

        self._cartpole.render()  # draws the upright frame on .surf
        view = pygame.surfarray.pixels3d(self._cartpole.surf)  # (width, height, 3); locks the surface
        try:
            return np.ascontiguousarray(view[self._cols.T, self._rows.T].transpose(1, 0, 2))
        finally:
            del view  # unlocks it

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._cartpole.reset(seed=seed, options=options)
        self._t = 0
        return self._pixels(), {}

    def step(self, action):
        _, reward, terminated, _, _ = self._cartpole.step(action)
        self._t += 1
        return self._pixels(), reward, terminated, self._t >= self.horizon, {}

    def close(self):
        self._cartpole.close()


def register() -> None:
    """Register the bench env ids (idempotent)."""
    for env_id, entry in ((SLOW_ID, "remoterl_bench_envs:SlowEnv"), (IMAGE_ID, "remoterl_bench_envs:ImageEnv"),
                          (PIXELS_ID, "remoterl_bench_envs:CartPolePixelsEnv")):
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=entry, disable_env_checker=True)


register()
