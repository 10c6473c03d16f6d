"""``remoterl.sb3.MetricsCallback``: remoterl's trainer-side figures in SB3's logger.

Add it to ``model.learn(callback=...)`` and, at the end of every rollout, SB3's logger
(TensorBoard, W&B, CSV, stdout) records ``remoterl/round_trip_p50_ms``,
``remoterl/round_trip_p99_ms``, ``remoterl/round_trip_mean_ms``, ``remoterl/calls``,
``remoterl/env_steps`` and ``remoterl/errors`` for that rollout, next to the rewards
(:mod:`remoterl.client.metrics` says what is measured).
"""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from remoterl.client.metrics import Interval

__all__ = ["MetricsCallback"]


class MetricsCallback(BaseCallback):
    """Records remoterl's figures of each rollout with ``self.logger.record("remoterl/...")``.

    Args:
        client: the :class:`remoterl.Client` to report (default: every client of this process,
            which is what ``remoterl.init()`` and ``RemoteVecEnv`` use).
        verbose: SB3's verbosity.
    """

    def __init__(self, client: Any = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self._client = client
        self._interval = Interval()

    def _on_training_start(self) -> None:
        self._take()  # what happened before training (opening the envs) is not the first rollout's

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        for key, value in self._take().items():
            self.logger.record(f"remoterl/{key}", value)

    def _take(self) -> dict[str, float]:
        from remoterl.client.registry import collect

        return self._interval.take(collect(self._client))
