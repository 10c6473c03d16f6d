"""What the cases share: options, figures, the measuring loops, brokers and clients.

Measuring rules, for every case:

* warm up first, then measure for ``duration`` seconds in all, and never more than a fixed
  count of calls;
* a remote figure and its baselines are measured in interleaved turns (remote, local,
  remote, local, ...) and each reports its median turn, so that a burst of load from
  another process on this machine hits both sides rather than one;
* no sleeps on a measured path: loops call the thing measured back to back;
* the same pre-drawn actions for the remote proxy and its local baseline;
* only 127.0.0.1; every process started here is stopped here (and dies with us anyway).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import gymnasium
import numpy as np

__all__ = ["CHILD", "ENVS_MODULE", "BridgedBroker", "Figure", "HERE", "IMAGE_ID", "Options", "SLOW_ID", "Session",
           "closing", "compare_latencies", "compare_rates", "env_step_timer", "local_vector", "median", "plural",
           "vector_stepper", "free_port"]

HERE = os.path.dirname(os.path.abspath(__file__))
ENVS_MODULE = "remoterl_bench_envs"  # registers the bench env ids; workers import it too
SLOW_ID = "RemoteRLBench/Slow-v0"
IMAGE_ID = "RemoteRLBench/Image-v0"

# No measured loop runs more than this many calls in one turn, whatever --duration says.
_MAX_CALLS = 5_000_000


@dataclass
class Options:
    """What ``bench/run.py`` was asked to do."""

    duration: float = 2.0
    warmup: float = 0.3
    rounds: int = 3
    quick: bool = False
    env_id: str = "CartPole-v1"
    num_envs: tuple[int, ...] = (1, 8, 64)
    workers: int = 2
    broker: str | None = None


@dataclass
class Figure:
    """One row of the table: ``value`` (remote) beside ``baseline`` (local), as ``ratio``."""

    case: str
    name: str
    value: float | None = None
    unit: str = ""
    baseline_name: str | None = None
    baseline: float | None = None
    target: str | None = None  # on the ratio: ">= 1.5" or "<= 2.0"
    na: str | None = None  # "n/a: why" instead of numbers
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        op, limit = self.target.split()
        return self.ratio >= float(limit) if op == ">=" else self.ratio <= float(limit)

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "passed": self.passed}


# --- measuring ------------------------------------------------------------------------------------

def _warm(call: Callable[[], Any], seconds: float) -> None:
    clock = time.perf_counter
    end = clock() + seconds
    n = 0
    while n < _MAX_CALLS and clock() < end:
        call()
        n += 1


def _rate(call: Callable[[], Any], seconds: float) -> float:
    """Calls of ``call`` per second, back to back, for ``seconds``."""
    clock = time.perf_counter
    n = 0
    t0 = clock()
    deadline = t0 + seconds
    while n < _MAX_CALLS:
        call()
        n += 1
        if clock() >= deadline:
            break
    return n / (clock() - t0)


def compare_rates(calls: dict[str, Callable[[], Any]], duration: float, warmup: float,
                  rounds: int) -> dict[str, list[float]]:
    """Calls per second of each of ``calls``, in ``rounds`` interleaved turns of
    ``duration / rounds`` seconds each (after a warm-up of each); one rate per turn."""
    for call in calls.values():
        _warm(call, warmup)
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            rates[name].append(_rate(call, duration / rounds))
    return rates


def compare_latencies(timers: dict[str, Callable[[], float]], duration: float, warmup: float,
                      rounds: int) -> dict[str, np.ndarray]:
    """Seconds per call of each of ``timers`` (a timer makes one call and returns how long
    it took), in ``rounds`` interleaved turns; all turns' samples together."""
    for timer in timers.values():
        _warm(timer, warmup)
    samples: dict[str, list[float]] = {name: [] for name in timers}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, timer in timers.items():
            out = samples[name]
            deadline = clock() + duration / rounds
            for _ in range(_MAX_CALLS):
                out.append(timer())
                if clock() >= deadline:
                    break
    return {name: np.asarray(s) for name, s in samples.items()}


def median(values: list[float]) -> float:
    return float(np.median(values))


def vector_stepper(envs: gymnasium.vector.VectorEnv, seed: int = 0) -> Callable[[], Any]:
    """One ``envs.step`` per call, with pre-drawn random actions (autoreset on); resets first."""
    envs.reset(seed=seed)
    envs.action_space.seed(seed)
    actions = itertools.cycle([envs.action_space.sample() for _ in range(64)])
    step = envs.step
    return lambda: step(next(actions))


def env_step_timer(env: gymnasium.Env, seed: int = 0) -> Callable[[], float]:
    """Times one ``env.step`` per call; the reset after an episode ends is not timed."""
    env.reset(seed=seed)
    env.action_space.seed(seed)
    actions = itertools.cycle([env.action_space.sample() for _ in range(64)])
    clock = time.perf_counter

    def timed() -> float:
        t = clock()
        _, _, terminated, truncated, _ = env.step(next(actions))
        elapsed = clock() - t
        if terminated or truncated:
            env.reset()
        return elapsed

    return timed


def local_vector(kind: str, env_id: str, n: int, *, vector_kwargs: dict | None = None,
                 **kwargs: Any) -> gymnasium.vector.VectorEnv:
    """``SyncVectorEnv`` or ``AsyncVectorEnv`` (given ``vector_kwargs``) of ``n`` ``gymnasium.make(env_id)``."""
    if env_id.startswith("RemoteRLBench/"):
        env_id = f"{ENVS_MODULE}:{env_id}"  # importable by Async's child processes, whatever their start method
    fns = [functools.partial(gymnasium.make, env_id, **kwargs)] * n
    if kind == "sync":
        return gymnasium.vector.SyncVectorEnv(fns, **(vector_kwargs or {}))
    return gymnasium.vector.AsyncVectorEnv(fns, **(vector_kwargs or {}))


# --- what the cases share ---------------------------------------------------------------------------

class Session:
    """Brokers, workers and clients for the cases; everything started is stopped in :meth:`close`.

    With ``options.broker`` set, every case uses that broker (its workers must already be
    attached); otherwise cases get embedded brokers and local workers on 127.0.0.1, kept
    for the next case until released.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self._embedded: dict[tuple, Any] = {}
        self._clients: dict[str, list] = {}
        self._stopping: list[threading.Thread] = []

    @property
    def external(self) -> bool:
        return self.options.broker is not None

    def broker(self, num_workers: int, slots_per_worker: int = 256, mode: str = "thread") -> str:
        """The URL a trainer in this process uses: ``--broker``, or that of an embedded broker
        with these workers (started on first use)."""
        if self.options.broker is not None:
            return self.options.broker
        embedded = self.embedded(num_workers, slots_per_worker, mode)
        return embedded.local_url or embedded.url

    def embedded(self, num_workers: int, slots_per_worker: int = 256, mode: str = "thread") -> Any:
        from remoterl.embedded import Embedded

        key = (num_workers, slots_per_worker, mode)
        if key not in self._embedded:
            embedded = Embedded(num_workers, slots_per_worker, broker_mode=mode, imports=[ENVS_MODULE])
            embedded.start()
            self._embedded[key] = embedded
        return self._embedded[key]

    def release(self, num_workers: int, slots_per_worker: int = 256, mode: str = "thread") -> None:
        """Stop one embedded broker and its workers (the next case should not share the CPUs).

        With ``--quick`` the stop finishes in the background (a worker takes up to a heartbeat
        to notice SIGTERM); :meth:`close` waits for it.
        """
        embedded = self._embedded.pop((num_workers, slots_per_worker, mode), None)
        if embedded is None:
            return
        for url in (embedded.local_url, embedded.url):
            self._close_clients(url)
        self.stop_later(embedded.stop)

    def client(self, url: str) -> Any:
        """A new connected client (closed with its broker, or at the end of the case)."""
        from remoterl.client.connection import connect_client

        # As remoterl.init() does: a client reaching the embedded broker's thread in-process.
        client = connect_client(url, name="bench")
        self._clients.setdefault(url, []).append(client)
        return client

    def end_case(self) -> None:
        """Close the clients the case made (its brokers stay for the next case)."""
        for url in list(self._clients):
            self._close_clients(url)

    def _close_clients(self, url: str | None) -> None:
        for client in self._clients.pop(url, []) if url else []:
            client.close()

    def stop_later(self, stop: Callable[[], Any]) -> None:
        """Call ``stop`` now, or with ``--quick`` in the background; :meth:`close` waits for it."""
        if not self.options.quick:
            stop()
            return
        thread = threading.Thread(target=stop, name="bench-release", daemon=True)
        thread.start()
        self._stopping.append(thread)

    def close(self) -> None:
        self.end_case()
        for key in list(self._embedded):
            self.release(*key)
        for thread in self._stopping:
            thread.join(30.0)
        self._stopping.clear()


class BridgedBroker:
    """A broker process serving tcp:// and ws://, and one local worker process attached over tcp.

    The WebSocket bridge runs in the broker's process and reaches its ROUTER over an
    ``inproc://`` endpoint the broker also binds, as ``remoterl-broker --ws`` wires them
    (``broker/cli.py``); a trainer can then reach the same broker, and so the same worker,
    over either transport. Both children die with this process (``PR_SET_PDEATHSIG``).

        python bench/measure.py bridged-broker PARENT_PID   # prints "TCP_URL WS_URL" on stdout
    """

    def __init__(self, slots: int = 64, heartbeat: float = 1.0, liveness: int = 3) -> None:
        self.slots, self.heartbeat, self.liveness = slots, heartbeat, liveness
        self.tcp_url: str | None = None
        self.ws_url: str | None = None
        self._procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 30.0) -> BridgedBroker:
        from remoterl.client.status import fetch_status

        broker = self._spawn([sys.executable, os.path.abspath(__file__), _BRIDGED, str(os.getpid()),
                              repr(self.heartbeat), str(self.liveness)], stdout=subprocess.PIPE, text=True)
        assert broker.stdout is not None
        urls = broker.stdout.readline().split()  # bounded: the child exits on error
        broker.stdout.close()
        if len(urls) != 2:
            self.stop()
            raise RuntimeError(f"the bridged broker did not start (exit code {broker.poll()})")
        self.tcp_url, self.ws_url = urls
        worker = self._spawn([sys.executable, "-m", "remoterl.embedded_child", "worker", str(os.getpid()),
                              repr(self.heartbeat), str(self.liveness), self.tcp_url, str(self.slots),
                              "bench-bridged", "-1"])
        deadline = time.monotonic() + timeout
        while not fetch_status(self.tcp_url, timeout=timeout)["workers"]:
            if worker.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the bridged broker's worker did not register (exit code {worker.poll()})")
            time.sleep(0.02)
        return self

    def _spawn(self, cmd: list[str], **popen: Any) -> subprocess.Popen:
        # This process's import path, so the children import the remoterl this process does.
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": path}, **popen)
        self._procs.append(proc)
        return proc

    def stop(self, timeout: float = 5.0) -> None:
        """The worker first, then the broker (and its bridge); SIGKILL whatever does not stop."""
        procs, self._procs = self._procs[::-1], []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_BRIDGED = "bridged-broker"


def _serve_bridged(parent_pid: int, heartbeat: float, liveness: int) -> None:
    """The :class:`BridgedBroker` child: a broker plus a WsBridge to it, until SIGTERM."""
    import uuid

    import zmq

    from remoterl.io.process import die_with_parent
    from remoterl.broker.bridge import WsBridge
    from remoterl.broker.core import BrokerConfig
    from remoterl.broker.loop import Broker

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the bench; it stops us
    inproc = f"inproc://remoterl-bridge-{uuid.uuid4().hex}"
    broker = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=heartbeat, liveness=liveness), also=(inproc,))
    tcp_url = broker.bind()
    bridge = WsBridge("127.0.0.1", 0, inproc, context=zmq.Context.instance())
    print(tcp_url, bridge.start(), flush=True)
    sys.stdout.close()
    signal.signal(signal.SIGTERM, lambda *_: broker.stop(join=False))
    broker.run()
    bridge.stop()


# A child process: die with this one (PR_SET_PDEATHSIG), then run a module as __main__:
# [sys.executable, "-c", CHILD, str(os.getpid()), module, *args].
CHILD = ("import runpy, sys\n"
         "from remoterl.io.process import die_with_parent\n"
         "die_with_parent(int(sys.argv[1]))\n"
         "module = sys.argv[2]\n"
         "sys.argv = [module, *sys.argv[3:]]\n"
         "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def free_port() -> int:
    """A tcp port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plural(n: int, one: str, many: str | None = None) -> str:
    """``"1 worker"``, ``"2 workers"``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def closing(stack: contextlib.ExitStack, env: Any) -> Any:
    """``env``, closed when ``stack`` exits."""
    stack.callback(env.close)
    return env


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == _BRIDGED:
        _serve_bridged(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(f"usage: python {sys.argv[0]} {_BRIDGED} PARENT_PID HEARTBEAT LIVENESS")
