"""The benchmark cases. Each yields :class:`Figure` rows: a remote figure beside its local
baseline measured in the same run, their ratio, the target and whether it was met.

Measuring rules, for every case:

* warm up first, then run for ``duration`` seconds, and never more than a fixed count;
* no sleeps on a measured path: loops call the thing measured back to back;
* the same pre-drawn actions for the remote proxy and its local baseline;
* only 127.0.0.1; every process started here is stopped here (and dies with us anyway).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import gymnasium
import numpy as np

__all__ = ["CASES", "Figure", "Options", "Session", "run_case"]

HERE = os.path.dirname(os.path.abspath(__file__))
ENVS_MODULE = "remoterl_bench_envs"  # registers the bench env ids; workers import it too
SLOW_ID = "RemoteRLBench/Slow-v0"
IMAGE_ID = "RemoteRLBench/Image-v0"

# Case names, in the order they run.
CASES = ("latency", "throughput", "slow", "bigobs", "ws", "sb3", "scale", "embedded")

# No measured loop runs more than this many calls, whatever --duration says.
_MAX_CALLS = 5_000_000


@dataclass
class Options:
    """What ``bench/run.py`` was asked to do."""

    duration: float = 2.0
    warmup: float = 0.3
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
    target: str | None = None  # e.g. ">= 1.5", "<= 2.0" (on the ratio)
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

def measure_rate(step: Callable[[], Any], duration: float, warmup: float) -> float:
    """Calls of ``step`` per second, back to back, after ``warmup`` seconds of the same."""
    clock = time.perf_counter
    end = clock() + warmup
    n = 0
    while n < _MAX_CALLS and clock() < end:
        step()
        n += 1
    n = 0
    t0 = clock()
    deadline = t0 + duration
    while n < _MAX_CALLS:
        step()
        n += 1
        if clock() >= deadline:
            break
    return n / (clock() - t0)


def measure_latency(call: Callable[[], Any], duration: float, warmup: float) -> np.ndarray:
    """Seconds each call of ``call`` took, back to back, after a warm-up."""
    clock = time.perf_counter
    end = clock() + warmup
    n = 0
    while n < _MAX_CALLS and clock() < end:
        call()
        n += 1
    samples = []
    deadline = clock() + duration
    while len(samples) < _MAX_CALLS:
        t = clock()
        call()
        now = clock()
        samples.append(now - t)
        if now >= deadline:
            break
    return np.asarray(samples)


def vector_rate(envs: gymnasium.vector.VectorEnv, duration: float, warmup: float, seed: int = 0) -> float:
    """Env-steps per second of ``envs`` stepped with pre-drawn random actions (autoreset on)."""
    envs.reset(seed=seed)
    envs.action_space.seed(seed)
    actions = itertools.cycle([envs.action_space.sample() for _ in range(64)])
    step = envs.step
    return measure_rate(lambda: step(next(actions)), duration, warmup) * envs.num_envs


def local_vector(kind: str, env_id: str, n: int, **kwargs: Any) -> gymnasium.vector.VectorEnv:
    """``SyncVectorEnv`` or ``AsyncVectorEnv`` of ``n`` ``gymnasium.make(env_id)``."""
    if env_id.startswith("RemoteRLBench/"):
        env_id = f"{ENVS_MODULE}:{env_id}"  # importable by Async's child processes, whatever their start method
    fns = [functools.partial(gymnasium.make, env_id, **kwargs)] * n
    if kind == "sync":
        return gymnasium.vector.SyncVectorEnv(fns)
    return gymnasium.vector.AsyncVectorEnv(fns)


# --- what the cases share ---------------------------------------------------------------------------

class Session:
    """Brokers, workers and clients for the cases; everything started is stopped in :meth:`close`.

    With ``options.broker`` set, every case uses that broker (its workers must already be
    attached); otherwise each case gets an embedded broker and local workers on 127.0.0.1.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self._embedded: dict[tuple, Any] = {}
        self._clients: list = []
        self._stopping: list[threading.Thread] = []

    @property
    def external(self) -> bool:
        return self.options.broker is not None

    def broker(self, num_workers: int, slots_per_worker: int = 256, mode: str = "thread") -> str:
        """The URL a trainer in this process uses: ``--broker`` or an embedded one (kept for reuse)."""
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
        self._close_clients()
        if self.options.quick:
            thread = threading.Thread(target=embedded.stop, name="bench-release", daemon=True)
            thread.start()
            self._stopping.append(thread)
        else:
            embedded.stop()

    def client(self, url: str) -> Any:
        from remoterl import Client

        client = Client(url, name="bench").connect()
        self._clients.append(client)
        return client

    def _close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def close(self) -> None:
        self._close_clients()
        for key in list(self._embedded):
            self.release(*key)
        for thread in self._stopping:
            thread.join(30.0)
        self._stopping.clear()


def run_case(name: str, session: Session, note: Callable[[str], None] = lambda _: None) -> Iterator[Figure]:
    """Run one case; yield its figures as they are measured. ``note`` hears what runs now."""
    import remoterl_bench_envs  # noqa: F401  (registers SLOW_ID and IMAGE_ID here as well)

    yield from _CASES[name](session, note)


# --- 1. latency ----------------------------------------------------------------------------------------

def _step_message_size() -> int:
    """Bytes of a ``RemoteEnv`` CartPole step on the wire, the larger of request and reply."""
    from remoterl import codec
    from remoterl import protocol as p

    request, _ = codec.encode({"op": "step", "a": 1, "single": True, "r": 123456, "slots": [123]})
    reply, _ = codec.encode({"obs": np.zeros(4, np.float32), "rew": 1.0, "term": False, "trunc": False,
                             "info": {}, "r": 123456})
    signature = len(p.client_frame(p.ClientCommand.CALL))
    return signature + 16 + max(len(request), len(reply))  # + a routing id


def case_latency(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from floor import Floor

    from remoterl import RemoteEnv

    opts = session.options
    size = _step_message_size()
    payload = os.urandom(size)
    note("raw pyzmq floor")
    floor = Floor().start()
    try:
        floor_lat = measure_latency(lambda: floor.round_trip(payload), opts.duration, opts.warmup)
    finally:
        floor.stop()
    note(f"RemoteEnv({opts.env_id}).step")
    url = session.broker(opts.workers)
    env = RemoteEnv(opts.env_id, client=session.client(url))
    try:
        lat = _env_step_latency(env, opts.duration, opts.warmup)
    finally:
        env.close()
    floor_p = np.percentile(floor_lat, [50, 99]) * 1e6
    p = np.percentile(lat, [50, 99]) * 1e6
    where = "--broker" if session.external else "embedded broker thread"
    base = f"DEALER→ROUTER→DEALER echo, {size} B"
    extra = {"samples": len(lat), "floor_samples": len(floor_lat), "payload_bytes": size, "broker": where}
    yield Figure("latency", f"RemoteEnv step p50 ({where})", p[0], "µs", f"{base}, p50", floor_p[0], "<= 2.0", extra=extra)
    yield Figure("latency", f"RemoteEnv step p99 ({where})", p[1], "µs", f"{base}, p99", floor_p[1], extra=extra)


def _env_step_latency(env: gymnasium.Env, duration: float, warmup: float) -> np.ndarray:
    """Latency of single steps; resets (after an episode ends) are not timed."""
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = itertools.cycle([env.action_space.sample() for _ in range(64)])
    clock = time.perf_counter
    samples: list[float] = []
    deadline = clock() + warmup + duration
    warm_until = clock() + warmup
    while len(samples) < _MAX_CALLS:
        t = clock()
        _, _, terminated, truncated, _ = env.step(next(actions))
        now = clock()
        if now >= warm_until:
            samples.append(now - t)
        if terminated or truncated:
            env.reset()
        if now >= deadline:
            break
    return np.asarray(samples)


# --- 2. throughput -------------------------------------------------------------------------------------

def case_throughput(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import RemoteEnvVec

    opts = session.options
    env_id = opts.env_id
    url = session.broker(opts.workers)
    client = session.client(url)
    targets = {("async", 8): ">= 1.5", ("sync", 64): ">= 0.6"} if env_id == "CartPole-v1" else {}
    runs = [(n, 1) for n in opts.num_envs]
    if opts.workers > 1:
        runs.append((8, opts.workers))
    local: dict[tuple[str, int], float] = {}
    for n, workers in runs:
        for kind in ("sync", "async"):
            if (kind, n) not in local:
                note(f"{'Sync' if kind == 'sync' else 'Async'}VectorEnv({n})")
                envs = local_vector(kind, env_id, n)
                try:
                    local[kind, n] = vector_rate(envs, opts.duration, opts.warmup)
                finally:
                    envs.close()
        note(f"RemoteEnvVec({n}) on {workers} worker(s)")
        envs = RemoteEnvVec(env_id, n, client=client, max_workers=workers)
        try:
            rate = vector_rate(envs, opts.duration, opts.warmup)
            used = len(envs.workers)
        finally:
            envs.close()
        for kind in ("sync", "async"):
            target = targets.get((kind, n)) if workers == 1 else None
            base = f"{'Sync' if kind == 'sync' else 'Async'}VectorEnv({n})"
            yield Figure("throughput", f"RemoteEnvVec({n}), {used} worker(s)", rate, "env-steps/s",
                         base, local[kind, n], target, extra={"env": env_id, "num_envs": n, "workers": used})


# --- 3. slow simulator ------------------------------------------------------------------------------------

def case_slow(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import RemoteEnvVec

    opts = session.options
    n, delay = 8, 0.001
    ideal = n / delay
    note("AsyncVectorEnv(8) of SlowEnv")
    envs = local_vector("async", SLOW_ID, n, delay=delay)
    try:
        local_async = vector_rate(envs, opts.duration, opts.warmup)
    finally:
        envs.close()
    note("RemoteEnvVec(8) of SlowEnv on 8 workers")
    url = session.broker(n, 1)
    try:
        envs = RemoteEnvVec(SLOW_ID, n, client=session.client(url), delay=delay)
        try:
            rate = vector_rate(envs, opts.duration, opts.warmup)
            used = len(envs.workers)
        finally:
            envs.close()
    finally:
        session.release(n, 1)
    name = f"RemoteEnvVec(8) of 1 ms steps, {used} worker process(es)"
    extra = {"delay_s": delay, "workers": used}
    yield Figure("slow", name, rate, "env-steps/s", "ideal: 8 × 1,000 steps/s", ideal, ">= 0.8", extra=extra)
    yield Figure("slow", name, rate, "env-steps/s", "AsyncVectorEnv(8)", local_async, extra=extra)


# --- 4. big observations ------------------------------------------------------------------------------------

def case_bigobs(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from floor import Floor, sized_request

    from remoterl import RemoteEnvVec

    opts = session.options
    n = 8
    client = session.client(session.broker(opts.workers))
    floor = None
    try:
        for shape in ((84, 84, 3), (210, 160, 3)):
            label = "×".join(map(str, shape))
            obs_bytes = int(np.prod(shape))
            mb = n * obs_bytes / 1e6  # MB per vector step
            note(f"SyncVectorEnv(8) of {label} uint8")
            envs = local_vector("sync", IMAGE_ID, n, shape=shape)
            try:
                local = vector_rate(envs, opts.duration, opts.warmup)
            finally:
                envs.close()
            note(f"RemoteEnvVec(8) of {label} uint8")
            envs = RemoteEnvVec(IMAGE_ID, n, client=client, max_workers=1, shape=list(shape))
            try:
                rate = vector_rate(envs, opts.duration, opts.warmup)
            finally:
                envs.close()
            note(f"raw pyzmq floor, {n * obs_bytes // 1000} KB replies")
            if floor is None:
                floor = Floor(zero_copy=True).start()
            request = sized_request(n * obs_bytes)
            floor_rate = measure_rate(lambda: floor.round_trip_sized(request), opts.duration, opts.warmup) * n
            target = ">= 0.5" if shape == (84, 84, 3) else None
            name = f"RemoteEnvVec(8) {label} uint8, 1 worker"
            extra = {"shape": list(shape), "bytes_per_obs": obs_bytes, "num_envs": n}
            yield Figure("bigobs", name, rate, "env-steps/s", "SyncVectorEnv(8)", local, target, extra=extra)
            yield Figure("bigobs", name, rate * mb / n, "MB/s", "SyncVectorEnv(8)", local * mb / n, extra=extra)
            yield Figure("bigobs", name, rate, "env-steps/s", f"raw pyzmq floor, {n * obs_bytes // 1000} KB replies",
                         floor_rate, extra=extra)
    finally:
        if floor is not None:
            floor.stop()


# --- 5, 6. not built yet --------------------------------------------------------------------------------------

def case_ws(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    yield Figure("ws", "RemoteEnvVec(8) over ws:// vs tcp://", target=">= 0.6",
                 na="n/a: WebSocket bridge not built yet")


def case_sb3(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    yield Figure("sb3", "SB3 PPO CartPole-v1, 8 envs: wall time vs DummyVecEnv", target="<= 1.25",
                 na="n/a: SB3 integration not built yet")


# --- 7. broker scale ------------------------------------------------------------------------------------------

@dataclass
class _Scale:
    workers: int = 4
    slots_per_worker: int = 250
    processes: int = 2  # client processes; each client is a thread in one of them
    clients: int = 50
    envs: int = 20
    cycles: int = 2  # open, step, close; RSS after the last close vs after the first


def case_scale(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl.cli import fetch_status

    opts = session.options
    cfg = _Scale(slots_per_worker=25, processes=1, clients=5) if opts.quick else _Scale()
    note(f"broker process + {cfg.workers} workers × {cfg.slots_per_worker} slots")
    if session.external:
        url, broker_pid = opts.broker, None
    else:
        embedded = session.embedded(cfg.workers, cfg.slots_per_worker, "process")
        url, broker_pid = embedded.url, embedded.pids[0]  # process mode: the broker's pid comes first
    assert url is not None
    cycles = []
    try:
        idle_status = fetch_status(url)
        rss_idle = _rss_mb(broker_pid)
        counts = [len(range(i, cfg.clients, cfg.processes)) for i in range(cfg.processes)]
        procs = [subprocess.Popen(
            [sys.executable, os.path.join(HERE, "scale_clients.py"), str(os.getpid()), url, "CartPole-v1",
             str(k), str(cfg.envs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for k in counts if k]
        try:
            _command(procs, None, "connected")
            for cycle in range(cfg.cycles):
                note(f"cycle {cycle + 1}/{cfg.cycles}: {cfg.clients} clients × {cfg.envs} envs")
                cycles.append(_scale_cycle(procs, url, broker_pid, opts.duration))
            _command(procs, "exit", None)
            for proc in procs:
                proc.wait(30)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        _wait_closed(url, clients=True)
        final_status = fetch_status(url)
        rss_final = _rss_mb(broker_pid)
    finally:
        if not session.external:
            session.release(cfg.workers, cfg.slots_per_worker, "process")
    first, last = cycles[0], cycles[-1]
    slots = cfg.clients * cfg.envs
    what = f"{cfg.clients} clients × {cfg.envs} envs = {slots} slots on {cfg.workers} workers"
    extra = {"clients": cfg.clients, "envs_per_client": cfg.envs, "slots": slots, "workers": cfg.workers,
             "client_processes": cfg.processes, "cycles": cycles, "rss_idle_mb": rss_idle,
             "rss_final_mb": rss_final, "tables_idle": idle_status.get("tables"),
             "tables_final": final_status.get("tables")}
    yield Figure("scale", f"broker calls/s ({what})", first["broker_calls_per_s"], "calls/s", extra=extra)
    yield Figure("scale", "env-steps/s, all clients together", first["env_steps_per_s"], "env-steps/s")
    yield Figure("scale", "vector step latency p50, under load", first["p50_us"], "µs")
    yield Figure("scale", "vector step latency p99, under load", first["p99_us"], "µs")
    if broker_pid is None:
        yield Figure("scale", "broker RSS", na="n/a: --broker given; its process is not ours to read")
    else:
        yield Figure("scale", f"broker RSS, {slots} slots open, after stepping", first["rss_loaded_mb"], "MB",
                     "broker RSS idle", rss_idle)
        yield Figure("scale", f"broker RSS, all slots closed, cycle {len(cycles)}", last["rss_closed_mb"], "MB",
                     "cycle 1", first["rss_closed_mb"], "<= 1.05")
    idle_tables = idle_status.get("tables") or {}
    final_tables = final_status.get("tables") or {}
    yield Figure("scale", "broker table entries after all clients left", float(sum(final_tables.values())),
                 "entries", "idle, before the clients", float(sum(idle_tables.values())), "<= 1.0",
                 extra={"idle": idle_tables, "final": final_tables})


def _scale_cycle(procs: list[subprocess.Popen], url: str, broker_pid: int | None, duration: float) -> dict:
    """Open every client's vector, step them all at once for ``duration`` s, close them."""
    from remoterl.cli import fetch_status

    _command(procs, "open", "ready")
    rss_open = _rss_mb(broker_pid)
    before = fetch_status(url)
    t0 = time.perf_counter()
    results = [json.loads(line) for line in _command(procs, f"go {duration!r}", "{")]
    elapsed = time.perf_counter() - t0
    after = fetch_status(url)
    rss_loaded = _rss_mb(broker_pid)
    _command(procs, "close", "closed")
    _wait_closed(url, clients=False)
    rss_closed = _rss_mb(broker_pid)
    calls = sum(w["calls"] for w in after["workers"]) - sum(w["calls"] for w in before["workers"])
    lat = np.concatenate([np.asarray(r["lat_us"]) for r in results])
    return {"broker_calls_per_s": calls / elapsed, "env_steps_per_s": sum(r["env_steps"] for r in results) / elapsed,
            "p50_us": float(np.percentile(lat, 50)), "p99_us": float(np.percentile(lat, 99)),
            "vector_steps": int(sum(r["calls"] for r in results)), "seconds": elapsed,
            "rss_open_mb": rss_open, "rss_loaded_mb": rss_loaded, "rss_closed_mb": rss_closed}


def _command(procs: list[subprocess.Popen], command: str | None, answer: str | None) -> list[str]:
    """Send ``command`` to every client process, then read each one's answer line."""
    if command is not None:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
    return [_expect_line(proc, answer) for proc in procs] if answer is not None else []


def _expect_line(proc: subprocess.Popen, start: str, timeout: float = 120.0) -> str:
    """The child's next stdout line, which must start with ``start`` (bounded by ``timeout``)."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith(start):
        raise RuntimeError(f"scale client process: expected {start!r}, got {line.strip()[:500]!r} "
                           f"(exit code {proc.poll()})")
    return line


def _wait_closed(url: str, clients: bool, timeout: float = 30.0) -> None:
    """Wait (bounded; not a measured path) until the broker holds no slots (and no clients)."""
    from remoterl.cli import fetch_status

    deadline = time.monotonic() + timeout
    while True:
        status = fetch_status(url)
        if status["open_slots"] == 0 and not (clients and status["clients"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the broker still holds {status['open_slots']} slots and "
                               f"{len(status['clients'])} clients {timeout:g} s after they closed")
        time.sleep(0.05)


def _rss_mb(pid: int | None) -> float | None:
    """Resident set size of ``pid`` in MB (from /proc), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --- the embedded default: broker thread vs broker process -----------------------------------------------

def case_embedded(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import RemoteEnv, RemoteEnvVec

    opts = session.options
    if session.external:
        yield Figure("embedded", "embedded broker: thread vs process", na="n/a: --broker given")
        return
    figures: dict[str, tuple[float, float]] = {}
    for mode in ("thread", "process"):
        note(f"embedded broker in a {mode}")
        url = session.broker(1, 256, mode)
        client = session.client(url)
        envs = RemoteEnvVec(opts.env_id, 8, client=client)
        try:
            rate = vector_rate(envs, opts.duration, opts.warmup)
        finally:
            envs.close()
        env = RemoteEnv(opts.env_id, client=client)
        try:
            p50 = float(np.percentile(_env_step_latency(env, opts.duration / 2, opts.warmup), 50)) * 1e6
        finally:
            env.close()
        figures[mode] = (rate, p50)
        if mode == "thread" and (1, 256, "thread") != (opts.workers, 256, "thread"):
            session.release(1, 256, mode)
    session.release(1, 256, "process")
    yield Figure("embedded", "RemoteEnvVec(8), broker in a process", figures["process"][0], "env-steps/s",
                 "broker in a thread (default)", figures["thread"][0])
    yield Figure("embedded", "RemoteEnv step p50, broker in a process", figures["process"][1], "µs",
                 "broker in a thread (default)", figures["thread"][1])


_CASES: dict[str, Callable[[Session, Callable[[str], None]], Iterator[Figure]]] = {
    "latency": case_latency,
    "throughput": case_throughput,
    "slow": case_slow,
    "bigobs": case_bigobs,
    "ws": case_ws,
    "sb3": case_sb3,
    "scale": case_scale,
    "embedded": case_embedded,
}
