"""Prometheus metrics for one worker process: env steps, calls, latencies, slots, errors.

Theory of operation
-------------------
:func:`start_worker_metrics` instruments a running worker's slot host and serves
:class:`WorkerCollector` on an HTTP port. Nothing is instrumented without ``--metrics``,
so a worker without it pays nothing at all.

*Instrumenting.* :class:`WorkerMetrics` wraps the host's ``call`` (on the instance) and
each of its ops (``SlotHost.wrap_ops``); the loop is unchanged. The ``call`` wrapper times the whole call (decode, op, encode) under
the op's name (``other`` when it reached none of the op table's: refused before its op
ran, or an op served without env work such as ``shm``); the op wrapper records
which op ran, how many slots it stepped and reset (the host's own ``stats``, read
before and after) and how long it took, and classifies what it raised. All of it is
integer increments and one :class:`~remoterl.broker.metrics.Histogram` ``bisect`` per
observation, on the worker's one serving thread.

*Env step time* (``remoterl_worker_env_step_duration_seconds``) is per slot, derived
per call: a step call's time divided by the slots it stepped, observed once per slot
stepped. So ``_count`` is the slots stepped and ``_sum`` the time the step calls took
(autoresets inside them included); a slow env among fast ones shows as a higher mean of
its calls, not as one slow slot.

*Errors* (``kind``): ``env`` (an env raised: step, reset, an attribute), ``action``
(actions that do not fit the action space), ``request`` (a call the worker could not
serve: malformed, an unknown op, a slot not open here, an unknown attribute), ``internal``
(a bug in the worker).

*Reading.* The HTTP server's thread reads the counters while the serving thread writes
them; each table is copied in one C-level step (atomic under the GIL) and no lock is
taken. With ``--procs N`` each worker process serves its own endpoint (the CLI gives
process ``i`` port ``PORT + i``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from remoterl.broker.metrics import Histogram, MetricsServer, add_histogram, metrics_app
from remoterl.errors import InvalidActionError, RemoteRLError
from remoterl.wire.calls import Op
from remoterl.workers.slots import EnvFailure

__all__ = ["WorkerCollector", "WorkerMetrics", "start_worker_metrics"]

_STEPPING = (Op.STEP, Op.RESET)


class WorkerMetrics:
    """The figures of one slot host, kept by wrapping its ``call`` and ops (module docstring).

    Args:
        host: the :class:`~remoterl.workers.runtime.SlotHost` to instrument (from now on).
    """

    def __init__(self, host: Any) -> None:
        self.host = host
        self.env_steps: collections.Counter = collections.Counter()   # env id -> slots stepped
        self.env_resets: collections.Counter = collections.Counter()  # env id -> slots reset
        self.env_step_time: dict[str, Histogram] = {}
        self.calls: collections.Counter = collections.Counter()       # op -> calls
        self.call_time: dict[str, Histogram] = {}
        self.errors: collections.Counter = collections.Counter()      # kind -> errors
        self._op: str | None = None
        self._classified = False
        stats = host.stats
        host.wrap_ops(lambda name, handler: self._wrap_op(name, handler, stats))
        host.call = self._wrap_call(host.call, stats)  # this instance's call, timed whole

    def _wrap_call(self, call: Callable, stats: dict) -> Callable:
        perf_counter, calls, call_time = time.perf_counter, self.calls, self.call_time

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            self._op, self._classified = None, False
            errors = stats["errors"]
            started = perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                elapsed = perf_counter() - started
                op = self._op or "other"
                calls[op] += 1
                hist = call_time.get(op)
                if hist is None:
                    hist = call_time[op] = Histogram()
                hist.observe(elapsed)
                if stats["errors"] != errors and not self._classified:
                    self.errors["request"] += 1  # refused before its op ran (decode, slots)

        return timed_call

    def _wrap_op(self, name: str, handler: Callable, stats: dict) -> Callable:
        perf_counter = time.perf_counter
        stepping = name in _STEPPING

        def timed_op(slots: list, request: dict) -> Any:
            self._op = name
            steps, resets = stats["steps"], stats["resets"]
            started = perf_counter()
            try:
                return handler(slots, request)
            except BaseException as exc:
                self._classify(exc)
                raise
            finally:
                if stepping:
                    self._count_steps(slots[0].env_id, stats["steps"] - steps, stats["resets"] - resets,
                                      perf_counter() - started)

        return timed_op

    def _count_steps(self, env: str, steps: int, resets: int, elapsed: float) -> None:
        if resets:
            self.env_resets[env] += resets
        if steps:
            self.env_steps[env] += steps
            hist = self.env_step_time.get(env)
            if hist is None:
                hist = self.env_step_time[env] = Histogram()
            hist.observe_many(elapsed / steps, steps)

    def _classify(self, exc: BaseException) -> None:
        self._classified = True
        if isinstance(exc, EnvFailure):
            kind = "request" if exc.desc.get("code") == "closed" else "env"
        elif isinstance(exc, InvalidActionError):
            kind = "action"
        elif isinstance(exc, RemoteRLError):
            kind = "request"
        else:
            kind = "internal"
        self.errors[kind] += 1


class WorkerCollector:
    """The worker's metrics, read from ``metrics`` and ``loop`` at each scrape.

    Args:
        metrics: the :class:`WorkerMetrics` of the loop's host.
        loop: the :class:`~remoterl.workers.loop.WorkerLoop` (name, connection state).
    """

    def __init__(self, metrics: WorkerMetrics, loop: Any) -> None:
        self.metrics = metrics
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        m, host = self.metrics, self.metrics.host
        steps = CounterMetricFamily("remoterl_worker_env_steps", "Env steps (slots stepped).", labels=["env_id"])
        resets = CounterMetricFamily("remoterl_worker_resets", "Env resets, autoresets included.", labels=["env_id"])
        for family, table in ((steps, m.env_steps), (resets, m.env_resets)):
            for env, n in sorted(dict(table).items()):
                family.add_metric([env], n)
        yield steps
        yield resets
        step_time = HistogramMetricFamily("remoterl_worker_env_step_duration_seconds",
                                          "Env step time per slot: each step call's time divided by the "
                                          "slots it stepped.", labels=["env_id"])
        for env, hist in sorted(dict(m.env_step_time).items()):
            add_histogram(step_time, [env], hist)
        yield step_time
        calls = CounterMetricFamily("remoterl_worker_calls", "Calls served, by op.", labels=["op"])
        for op, n in sorted(dict(m.calls).items()):
            calls.add_metric([op], n)
        yield calls
        call_time = HistogramMetricFamily("remoterl_worker_call_duration_seconds",
                                          "Time to serve one call (decode, env work, encode).", labels=["op"])
        for op, hist in sorted(dict(m.call_time).items()):
            add_histogram(call_time, [op], hist)
        yield call_time
        errors = CounterMetricFamily("remoterl_worker_errors", "Calls answered with an error, by kind.",
                                     labels=["kind"])
        for kind, n in sorted(dict(m.errors).items()):
            errors.add_metric([kind], n)
        yield errors
        slots = GaugeMetricFamily("remoterl_worker_slots", "Open env slots.", labels=["env_id"])
        for env, n in sorted(collections.Counter(s.env_id for s in list(host.slots.values())).items()):
            slots.add_metric([env], n)
        yield slots
        yield GaugeMetricFamily("remoterl_worker_capacity", "Env slots this worker may host.", value=host.capacity)
        yield GaugeMetricFamily("remoterl_worker_connected", "1 while registered with the broker, else 0.",
                                value=1 if self.loop.registered.is_set() else 0)
        info = GaugeMetricFamily("remoterl_worker_info", "Always 1; the worker's name as `remoterl status` "
                                 "shows it.", labels=["worker"])
        info.add_metric([self.loop.name], 1)
        yield info


def start_worker_metrics(address: str, loop: Any) -> MetricsServer:
    """Instrument ``loop``'s slot host and serve its metrics on ``address`` (``[HOST:]PORT``).

    Raises:
        OSError: the address cannot be bound.
        ValueError: ``address`` is malformed.
    """
    registry = CollectorRegistry(auto_describe=False)
    server = MetricsServer(address, metrics_app(registry))  # bind first: a port in use instruments nothing
    registry.register(WorkerCollector(WorkerMetrics(loop.host), loop))
    return server
