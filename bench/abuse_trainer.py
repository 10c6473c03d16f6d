"""The well-behaved side of a trial of bench/abuse.py: a trainer stepping, and the broker's RSS sampled.

:class:`Trainer` steps ``RemoteEnvVec("CartPole-v1", 8)`` back to back in a thread and keeps
the worst step latency since a mark; :class:`RssSampler` reads the broker's RSS in a thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable

from abuse_session import ENV_ID

__all__ = ["RssSampler", "Trainer"]


class Trainer:
    """A well-behaved trainer in a thread: ``RemoteEnvVec(env_id, num_envs)`` on its own
    client, stepping back to back with pre-drawn actions until :meth:`stop` (or an error,
    or ``max_steps``). Counts every step it starts and every step that returns, and times
    each; a step that raises ends the loop (``error``)."""

    def __init__(self, url: str, key: str, *, env_id: str = ENV_ID, num_envs: int = 8, step_timeout: float = 30.0,
                 max_steps: int = 5_000_000) -> None:
        self.url, self.key, self.env_id, self.num_envs = url, key, env_id, num_envs
        self.step_timeout, self.max_steps = step_timeout, max_steps
        self.attempted = 0
        self.returned = 0
        self.error: str | None = None
        self.identity: str | None = None
        self._worst_since: tuple[float, float] = (float("inf"), 0.0)  # (mark, worst step since it)
        self._step_started: float | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abuse-trainer", daemon=True)

    def start(self, timeout: float) -> Trainer:
        """Start stepping; return once the first step returned. Raises RuntimeError otherwise."""
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            self.stop(1.0)
            raise RuntimeError(f"the trainer did not start stepping: {self.error or 'timed out'}")
        return self

    def mark(self) -> None:
        """Worst latency is counted from now on (warm-up excluded)."""
        self._worst_since = (time.monotonic(), 0.0)

    @property
    def worst(self) -> float:
        """Worst step latency since :meth:`mark`, the step in flight included (seconds)."""
        mark, worst = self._worst_since
        started = self._step_started
        if started is not None:
            worst = max(worst, time.monotonic() - max(started, mark))
        return worst

    def stop(self, timeout: float) -> bool:
        """Stop after the step in flight; False if it did not return within ``timeout``."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        from remoterl import Client, RemoteEnvVec

        client = None
        try:
            client = Client(self.url, api_key=self.key, name="abuse-trainer", timeout=self.step_timeout).connect()
            self.identity = client.identity.hex()
            envs = RemoteEnvVec(self.env_id, self.num_envs, client=client, max_workers=1, timeout=self.step_timeout)
            envs.reset(seed=0)
            envs.action_space.seed(0)
            actions = [envs.action_space.sample() for _ in range(64)]
            for i in range(self.max_steps):
                if self._stop.is_set():
                    break
                self._step(envs, actions[i & 63])
                self._ready.set()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
            # Keep the session until told to stop, so that the broker's status still lists
            # it (a client that left after an error is not a client the broker expired).
            self._stop.wait(600.0)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

    def _step(self, envs: Any, action: Any) -> None:
        clock = time.monotonic
        self.attempted += 1
        self._step_started = t = clock()
        try:
            obs = envs.step(action)[0]
        finally:
            end = clock()
            self._step_started = None
            mark, worst = self._worst_since
            if end - max(t, mark) > worst:  # a step begun before the mark counts from the mark
                self._worst_since = (mark, end - max(t, mark))
        if getattr(obs, "shape", None) != (self.num_envs, 4):
            raise RuntimeError(f"a step returned observations of shape {getattr(obs, 'shape', None)}")
        self.returned += 1


class RssSampler:
    """The broker's RSS every ``interval`` seconds in a thread (bounded count), until stopped."""

    def __init__(self, read: Callable[[], int | None], interval: float = 0.02, limit: int = 200_000) -> None:
        self.samples: list[tuple[float, int]] = []
        self._read, self._interval, self._limit = read, interval, limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abuse-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self._limit:
            rss = self._read()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._stop.wait(self._interval)

    def between(self, start: float, end: float = float("inf")) -> list[int]:
        """The samples read from ``start`` to ``end`` (monotonic), in bytes."""
        return [rss for t, rss in list(self.samples) if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

