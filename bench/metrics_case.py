"""The metrics case: what serving and scraping Prometheus metrics costs the hot path.

Two deployments side by side on 127.0.0.1, each a ``remoterl-broker`` process and one
``remoterl-worker --env CartPole-v1 --procs 1`` process (subprocesses that die with this
one, ``PR_SET_PDEATHSIG``, each in a session of its own so that stopping it takes its whole
process group):

* **on**: ``--metrics 127.0.0.1:PORT`` on both the broker and the worker (the worker is
  instrumented only then), and a scraper thread in this process that GETs both ``/metrics``
  endpoints at once and then every second while the vectors step, counting the successful
  scrapes and the series of the last one;
* **off**: the same commands without ``--metrics``.

The trainer is this process: a ``Client(url, shared_memory=False)`` per deployment (sockets
only, as a trainer on another host) and ``RemoteEnvVec("CartPole-v1", n)`` on each, for
n = 8 and 64, stepped in interleaved turns (``measure.compare_rates``), twice as many as
``--rounds`` says, the order of the sides reversed every other round (off, on, on, off, ...).

That is one *pair*; the case measures :data:`_PAIRS` of them one after the other, each with
fresh processes (1 with ``--quick``), because two deployments started alike can differ by
several per cent for their whole life (where the scheduler happens to put them), a bias that
interleaving cannot cancel but fresh pairs average out. Reported: env-steps/s with metrics on
against the same with metrics off, each the median of all the pairs' turns, same run.
**Target: ≥ 0.95× at 8 envs** (issue 18: metrics must not cost the hot path). Each pair's own
ratio, the scrape counts, the series seen in the last scrape of each endpoint and each
pair's CPU per 1,000 env steps are in the figures' ``extra``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Callable, Iterator

from measure import CHILD, Figure, Session, closing, compare_rates, free_port, median, vector_stepper

__all__ = ["case_metrics"]

_ENV_ID = "CartPole-v1"
_SIZES = (8, 64)
_SLOTS = sum(_SIZES)  # both vectors open on each worker at once
_SCRAPE_EVERY = 1.0  # seconds, as a Prometheus scrape_interval
_START_TIMEOUT = 30.0  # seconds for a deployment to register its worker and serve its metrics
# Fresh pairs of deployments (on, off) measured one after the other (1 with --quick): two
# processes started alike can differ by several per cent for as long as they live (where the
# scheduler puts them), which interleaved turns within one pair cannot cancel.
_PAIRS = 3

def _get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8", "replace")


def _series(text: str) -> int:
    """Samples in a Prometheus text exposition: its lines that are neither comments nor blank."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


class _Deployment:
    """A broker process and one worker process (``--procs 1``) on free ports; with ``metrics``,
    both serve Prometheus metrics (``self.endpoints``: name -> URL). :meth:`stop` ends both."""

    def __init__(self, name: str, metrics: bool) -> None:
        self.name = name
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.endpoints = ({"broker": f"http://127.0.0.1:{free_port()}/metrics",
                           "worker": f"http://127.0.0.1:{free_port()}/metrics"} if metrics else {})
        self._dir = tempfile.mkdtemp(prefix=f"remoterl-bench-metrics-{name}-")
        self._procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, role: str, module: str, *args: str) -> None:
        if role in self.endpoints:
            args = (*args, "--metrics", self.endpoints[role].removeprefix("http://").removesuffix("/metrics"))
        # This process's import path, so the children import the remoterl this process does.
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        with open(os.path.join(self._dir, f"{role}.log"), "wb") as log:
            self._procs[role] = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(os.getpid()), module, *args], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path},
                start_new_session=True)

    def _log_tail(self, role: str, chars: int = 2000) -> str:
        try:
            with open(os.path.join(self._dir, f"{role}.log"), "rb") as f:
                return f.read()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self, timeout: float = _START_TIMEOUT) -> _Deployment:
        """Start both; return once the worker is registered and every endpoint answers.

        Raises:
            RuntimeError: a process exited, or the deployment was not up within ``timeout``.
        """
        from remoterl.client.status import fetch_status

        self._spawn("broker", "remoterl.broker.cli", "--bind", self.url)
        self._spawn("worker", "remoterl.workers.cli", "--env", _ENV_ID, "-n", str(_SLOTS), "--procs", "1",
                    "--broker", self.url, "--name", f"bench-metrics-{self.name}")
        deadline = time.monotonic() + timeout
        waiting = "the worker to register"
        while True:
            for role, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"metrics {self.name}: the {role} exited with code {proc.returncode}:\n"
                                       f"{self._log_tail(role)}")
            with contextlib.suppress(Exception):  # not up yet
                if fetch_status(self.url, timeout=0.5)["workers"]:
                    waiting = "the metrics endpoints"
                    for url in self.endpoints.values():
                        _get(url, timeout=0.5)
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"metrics {self.name}: timed out after {timeout:g} s waiting for {waiting}:\n"
                                   f"{self._log_tail('worker')}")
            time.sleep(0.05)

    def cpu_seconds(self) -> dict[str, float | None]:
        """CPU time (user + system) each process has used so far; None where it cannot be read
        (not Linux, or the process is gone)."""
        out: dict[str, float | None] = {}
        for role, proc in self._procs.items():
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()  # after "pid (comm)"
                out[role] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                out[role] = None
        return out

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to each process group (the worker first), SIGKILL to any still there after
        ``grace`` s; every child reaped, the logs removed."""
        procs, self._procs = list(self._procs.values())[::-1], {}
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class _Scraper:
    """A thread GETting each endpoint at once, then every :data:`_SCRAPE_EVERY` s until stopped."""

    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints = endpoints
        self.scrapes = {name: 0 for name in endpoints}
        self.failures = {name: 0 for name in endpoints}
        self.series = {name: 0 for name in endpoints}  # in the last successful scrape
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-metrics-scraper", daemon=True)

    def __enter__(self) -> _Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)  # a GET times out within 5 s

    def _run(self) -> None:
        while True:
            for name, url in self.endpoints.items():
                try:
                    self.series[name] = _series(_get(url, timeout=5.0))
                    self.scrapes[name] += 1
                except Exception as exc:  # counted and shown, not fatal to the thread
                    self.failures[name] += 1
                    self.last_error = f"{name}: {exc!r}"
            if self._stop.wait(_SCRAPE_EVERY):
                return


def _client(url: str) -> Any:
    from remoterl import Client

    # Sockets only, as a trainer on another host: no shared memory with the local worker.
    return Client(url, name="bench-metrics", shared_memory=False).connect()


def _alternating(calls: dict[tuple[int, str], Callable[[], object]], duration: float, warmup: float,
                 rounds: int) -> dict[tuple[int, str], list[float]]:
    """``compare_rates`` in ``rounds`` turns each, the sides' order reversed every other round
    (off, on, then on, off, ...), so that neither side always runs right after the other."""
    rates: dict[tuple[int, str], list[float]] = {key: [] for key in calls}
    for i in range(rounds):
        order = sorted(calls, key=lambda key: (key[0], (key[1] == "on") == (i % 2 == 0)))
        turn = compare_rates({key: calls[key] for key in order}, duration / rounds, warmup if i == 0 else 0.0, 1)
        for key, rate in turn.items():
            rates[key] += rate
    return rates


def _counted(step: Callable[[], object], steps: dict[str, int], side: str, n: int) -> Callable[[], object]:
    """``step``, adding ``n`` env steps to ``steps[side]`` per call."""
    def counted() -> object:
        steps[side] += n
        return step()

    return counted


def _cpu_per_kstep(before: dict[str, float | None], after: dict[str, float | None],
                   env_steps: int) -> dict[str, float | None]:
    """Milliseconds of CPU each process spent per 1,000 env steps (warm-up, both vector sizes,
    the idle heartbeats and, with metrics, the scrapes included)."""
    return {role: None if before[role] is None or after.get(role) is None or not env_steps
            else round((after[role] - before[role]) * 1e6 / env_steps, 2) for role in before}


def _pair(index: int, opts: Any, note: Callable[[str], None], session: Session
          ) -> tuple[dict[tuple[int, str], list[float]], dict[str, dict[str, float | None]], _Scraper]:
    """One pair of fresh deployments, on and off, measured in interleaved turns: the turns'
    rates (per size and side), each process's CPU per 1,000 env steps, and the scraper."""
    from remoterl import RemoteEnvVec

    sides = ("on", "off") if index % 2 == 0 else ("off", "on")  # which starts first alternates too
    deployments = {side: _Deployment(side, metrics=side == "on") for side in sides}
    try:
        for side, deployment in deployments.items():
            note(f"pair {index + 1}: start a broker and a worker process, metrics {side}")
            deployment.start()
        with contextlib.ExitStack() as stack:
            calls, steps = {}, {side: 0 for side in deployments}
            for side, deployment in deployments.items():
                client = _client(deployment.url)
                stack.callback(client.close)  # after its vectors close (an ExitStack unwinds)
                for n in _SIZES:
                    envs = closing(stack, RemoteEnvVec(_ENV_ID, n, client=client))
                    calls[(n, side)] = _counted(vector_stepper(envs), steps, side, n)
            note(f"pair {index + 1}: RemoteEnvVec({', '.join(map(str, _SIZES))}), metrics on and off, "
                 "interleaved, scraping")
            cpu0 = {side: deployment.cpu_seconds() for side, deployment in deployments.items()}
            with _Scraper(deployments["on"].endpoints) as scraper:
                rates = _alternating(calls, opts.duration, opts.warmup, 2 * opts.rounds)
            cpu = {side: _cpu_per_kstep(cpu0[side], deployment.cpu_seconds(), steps[side])
                   for side, deployment in deployments.items()}
    finally:
        for deployment in deployments.values():
            session.stop_later(deployment.stop)
    if not all(scraper.scrapes.values()):
        raise RuntimeError(f"metrics: an endpoint never answered a scrape ({scraper.scrapes}): {scraper.last_error}")
    return rates, cpu, scraper


def case_metrics(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    opts = session.options
    name = "RemoteEnvVec({n}) CartPole-v1, metrics on (broker and worker, scraped every 1 s)"
    if session.external:
        yield Figure("metrics", name.format(n=_SIZES[0]), target=">= 0.95",
                     na="n/a: --broker given (this case starts two brokers of its own, with and without --metrics)")
        return
    pairs = 1 if opts.quick else _PAIRS
    rates: dict[tuple[int, str], list[float]] = {(n, side): [] for n in _SIZES for side in ("on", "off")}
    per_pair: dict[int, list[float]] = {n: [] for n in _SIZES}
    cpu: list[dict[str, dict[str, float | None]]] = []
    scrapes: collections.Counter = collections.Counter()
    failures: collections.Counter = collections.Counter()
    for index in range(pairs):
        turns, pair_cpu, scraper = _pair(index, opts, note, session)
        for key, values in turns.items():
            rates[key] += values
        scrapes.update(scraper.scrapes)
        failures.update(scraper.failures)
        for n in _SIZES:
            per_pair[n].append(round(median(turns[(n, "on")]) / median(turns[(n, "off")]), 3))
        cpu.append(pair_cpu)
    extra = {"env": _ENV_ID, "scrape_interval_s": _SCRAPE_EVERY, "pairs": pairs, "scrapes": dict(scrapes),
             "scrape_failures": dict(failures), "series_last_scrape": scraper.series,
             "cpu_ms_per_1000_env_steps": cpu}
    for n in _SIZES:
        on, off = rates[(n, "on")], rates[(n, "off")]
        yield Figure("metrics", name.format(n=n), median(on) * n, "env-steps/s", "the same, metrics off",
                     median(off) * n, ">= 0.95" if n == _SIZES[0] else None,
                     extra={**extra, "num_envs": n, "ratio_per_pair": per_pair[n],
                            "turns": {"remote": on, "local": off}})
