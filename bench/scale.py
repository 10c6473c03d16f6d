"""Case 7, broker scale: 1,000 slots on 4 worker processes, 50 trainer clients stepping at once.

The broker runs in its own process (so that its RSS can be read from /proc); the clients
are threads in a few ``scale_clients.py`` processes, driven over stdin/stdout so that all
start stepping together. Two open/step/close cycles: the broker's RSS after the second must
not exceed the first (no growth), and its tables must be back to their idle size once the
clients have left.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from measure import HERE, Figure, Session

__all__ = ["case_scale"]


@dataclass
class _Scale:
    workers: int = 4
    slots_per_worker: int = 250
    processes: int = 2  # client processes; each client is a thread in one of them
    clients: int = 50
    envs: int = 20
    cycles: int = 2  # open, step, close; RSS after the last close vs after the first


def case_scale(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl.client.status import fetch_status

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
        procs: list[subprocess.Popen] = []
        try:
            for k in counts:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "scale_clients.py"), str(os.getpid()), url, "CartPole-v1",
                     str(k), str(cfg.envs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            _command(procs, None, "connected")
            for cycle in range(cfg.cycles):
                note(f"cycle {cycle + 1}/{cfg.cycles}: {cfg.clients} clients × {cfg.envs} envs")
                cycles.append(_scale_cycle(procs, url, broker_pid, opts.duration, idle_status))
            _command(procs, "exit", None)
            for proc in procs:
                proc.wait(30)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        _wait_closed(url, idle_status, clients=True)
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


def _scale_cycle(procs: list[subprocess.Popen], url: str, broker_pid: int | None, duration: float,
                 idle_status: dict) -> dict:
    """Open every client's vector, step them all at once for ``duration`` s, close them."""
    from remoterl.client.status import fetch_status

    _command(procs, "open", "ready")
    rss_open = _rss_mb(broker_pid)
    before = fetch_status(url)
    results = [json.loads(line) for line in _command(procs, f"go {duration!r}", "{")]
    elapsed = max(r["seconds"] for r in results)  # the stepping itself, as the clients timed it
    after = fetch_status(url)
    rss_loaded = _rss_mb(broker_pid)
    _command(procs, "close", "closed")
    _wait_closed(url, idle_status)
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
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith(start):
        raise RuntimeError(f"scale client process: expected {start!r}, got {line.strip()[:500]!r} "
                           f"(exit code {proc.poll()})")
    return line


def _wait_closed(url: str, idle: dict, clients: bool = False, timeout: float = 30.0) -> None:
    """Wait (bounded; not a measured path) until the broker holds no more open slots (and,
    with ``clients``, no more clients) than it did when idle, before the case."""
    from remoterl.client.status import fetch_status

    deadline = time.monotonic() + timeout
    while True:
        status = fetch_status(url)
        if status["open_slots"] <= idle["open_slots"] and \
                (not clients or len(status["clients"]) <= len(idle["clients"])):
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
