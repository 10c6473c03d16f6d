"""A trainer's own figures: round trips per worker, env-steps, errors (``remoterl.metrics()``).

Theory of operation
-------------------
The broker and the workers serve Prometheus metrics of their own (``--metrics``); what only
the trainer sees is how long its calls took, door to door: encode, the network both ways,
the broker, the queue at the worker, the envs, and decode. Each :class:`~remoterl.Client`
keeps a :class:`ClientMetrics`: the client stamps a call when it sends it and, when the reply
is taken, adds the round trip to that worker's :class:`Histogram` and counts the call by op
(``step``, ``reset``, ...), the env-steps (slots of a step call), error replies by error type,
and timeouts.
Recording is a few integer increments and one ``bisect`` per reply: nothing on the hot path
allocates.

:meth:`ClientMetrics.snapshot` returns plain numbers (``remoterl.metrics()`` merges the
process's clients); quantiles are estimated from the fixed buckets, linearly within a bucket,
as Prometheus's ``histogram_quantile`` does. :meth:`Histogram.since` gives the distribution
of an interval (what the SB3 callback and the RLlib runner report each iteration).
"""

from __future__ import annotations

import bisect
import collections
from typing import Any

__all__ = ["BUCKETS", "ClientMetrics", "Histogram", "Interval"]

# Upper bounds in seconds: 50 µs (a local link) to 10 s (a slow simulator), then +Inf.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts of observations per bucket (:data:`BUCKETS`, plus one for everything above)."""

    __slots__ = ("counts", "total", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Histogram:
        out = Histogram()
        out.counts, out.total, out.max = list(self.counts), self.total, self.max
        return out

    def since(self, earlier: Histogram | None) -> Histogram:
        """What was observed after ``earlier`` (a :meth:`copy` of this histogram); ``max`` is
        the maximum over the whole life, not the interval."""
        if earlier is None:
            return self.copy()
        out = Histogram()
        out.counts = [a - b for a, b in zip(self.counts, earlier.counts)]
        out.total, out.max = self.total - earlier.total, self.max
        return out

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile in seconds, estimated within its bucket; None when empty."""
        n = self.count
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                low = BUCKETS[i - 1] if i > 0 else 0.0
                high = BUCKETS[i] if i < len(BUCKETS) else max(self.max, low)
                # Never above the largest value seen (a bucket's bound may be far above it).
                return min(low + (high - low) * ((rank - seen) / c), self.max)
            seen += c
        return self.max

    def summary(self) -> dict[str, Any]:
        """``count``, ``mean_ms``, ``p50_ms``, ``p99_ms``, ``max_ms`` (None where empty)."""
        n = self.count

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 3)

        return {"count": n, "mean_ms": ms(self.total / n) if n else None, "p50_ms": ms(self.quantile(0.5)),
                "p99_ms": ms(self.quantile(0.99)), "max_ms": ms(self.max) if n else None}

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.max = max(self.max, other.max)


class ClientMetrics:
    """What one client recorded (see the module docstring)."""

    def __init__(self) -> None:
        self.round_trip: dict[bytes, Histogram] = {}
        self.calls: collections.Counter = collections.Counter()
        self.env_steps = 0
        self.errors: collections.Counter = collections.Counter()

    def answered(self, worker: bytes | None, op: str | None, slots: int, seconds: float,
                 error: BaseException | None) -> None:
        """A call to ``worker`` was answered after ``seconds``."""
        histogram = self.round_trip.get(worker)
        if histogram is None:
            histogram = self.round_trip[worker] = Histogram()
        histogram.observe(seconds)
        self.calls[op] += 1
        if op == "step":
            self.env_steps += slots
        if error is not None:
            self.errors[type(error).__name__] += 1

    def failed(self, kind: str) -> None:
        """A call that got no answer in time (``RemoteTimeoutError``)."""
        self.errors[kind] += 1

    def merge(self, other: ClientMetrics) -> None:
        """Add ``other``'s figures to these."""
        for worker, histogram in other.round_trip.items():
            self.round_trip.setdefault(worker, Histogram()).merge(histogram)
        self.calls.update(other.calls)
        self.env_steps += other.env_steps
        self.errors.update(other.errors)

    def overall(self) -> Histogram:
        out = Histogram()
        for histogram in self.round_trip.values():
            out.merge(histogram)
        return out

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers: ``calls`` by op, ``env_steps``, ``errors`` by type, ``round_trip``
        (all workers) and ``workers`` (by routing id, hex) with each one's round trips."""
        return {"calls": {str(op): n for op, n in self.calls.items()}, "env_steps": self.env_steps,
                "errors": dict(self.errors), "round_trip": self.overall().summary(),
                "workers": {(w.hex() if isinstance(w, bytes) else str(w)): h.summary()
                            for w, h in self.round_trip.items()}}


class Interval:
    """What a trainer's clients did since the last :meth:`take`: for the figures an SB3
    callback or an RLlib runner logs each iteration next to the rewards."""

    def __init__(self) -> None:
        self._last: tuple[Histogram, int, int, int] | None = None

    def take(self, now: ClientMetrics) -> dict[str, float]:
        """``round_trip_{mean,p50,p99}_ms`` (absent when no call), and ``calls``, ``env_steps``,
        ``errors`` of the interval."""
        overall = now.overall()
        calls, errors = sum(now.calls.values()), sum(now.errors.values())
        last = self._last
        self._last = (overall.copy(), now.env_steps, calls, errors)
        if last is not None:
            overall = overall.since(last[0])
        out: dict[str, float] = {
            "calls": float(calls - (last[2] if last else 0)),
            "env_steps": float(now.env_steps - (last[1] if last else 0)),
            "errors": float(errors - (last[3] if last else 0)),
        }
        summary = overall.summary()
        for key in ("mean_ms", "p50_ms", "p99_ms"):
            if summary[key] is not None:
                out[f"round_trip_{key}"] = summary[key]
        return out
