"""``--procs``: start worker processes, restart the ones that crash, stop them all on request.

Each child is a full worker (its own socket, heartbeats and share of the slots), so the
broker sees P workers and places slots over them. Children die with the parent even if
it is killed with SIGKILL (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

from remoterl.errors import RemoteRLError

if TYPE_CHECKING:
    from remoterl.workers.loop import WorkerLoop

__all__ = ["REFUSED_EXIT_CODE", "WorkerPool", "WorkerSpec", "make_worker_loop", "run_worker", "split_capacity"]

log = logging.getLogger(__name__)

# A worker the broker refused (wrong API key...) exits with this code and is not restarted.
REFUSED_EXIT_CODE = 3
# A child that crashes more often than this is not restarted again.
_MAX_RESTARTS = 5
_RESTART_WINDOW = 60.0


@dataclass
class WorkerSpec:
    """Everything a worker process needs; picklable (it crosses a spawn boundary)."""

    url: str
    env_ids: list[str] | None
    capacity: int
    imports: list[str] = field(default_factory=list)
    allow_import: list[str] | None = field(default_factory=list)
    heartbeat: float = 1.0
    liveness: int = 3
    name: str | None = None
    log_level: int = logging.WARNING
    api_key: str | None = None  # never logged
    curve_serverkey: str | None = None
    link_fd: int | None = None  # one end of a local link to an embedded broker (remoterl.io.link)
    metrics: str | None = None  # [HOST:]PORT to serve Prometheus metrics on (remoterl.workers.metrics)
    log_format: str = "text"  # or "json" (remoterl.logs)


def split_capacity(n: int, procs: int) -> list[int]:
    """Share ``n`` slots over ``procs`` processes as evenly as possible."""
    base, extra = divmod(n, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


def make_worker_loop(spec: WorkerSpec) -> WorkerLoop:
    """The worker ``spec`` describes, built in this process: modules imported, a slot host
    and a :class:`~remoterl.workers.loop.WorkerLoop` not yet running (a process of
    :class:`WorkerPool` runs it in its main thread, a Ray actor in a thread of its own)."""
    from remoterl.workers.loop import WorkerLoop
    from remoterl.workers.runtime import SlotHost, import_modules

    import_modules(spec.imports)
    allow = None if spec.allow_import is None else [*spec.imports, *spec.allow_import]
    link = None
    if spec.link_fd is not None:
        import socket

        from remoterl.io.link import Link

        # Our own broker's messages: its core already checked their size against its limit.
        link = Link(socket.socket(fileno=spec.link_fd), max_message_size=1 << 62)
    return WorkerLoop(spec.url, SlotHost(spec.env_ids, spec.capacity, allow_import=allow),
                      heartbeat=spec.heartbeat, liveness=spec.liveness, name=spec.name, api_key=spec.api_key,
                      curve_serverkey=spec.curve_serverkey, link=link)


def run_worker(spec: WorkerSpec, parent_pid: int | None = None) -> None:
    """Run one worker in this process until SIGTERM/SIGINT (the child's entry point)."""
    from remoterl.io.process import die_with_parent

    if parent_pid is not None:
        from remoterl.logs import setup_logging

        die_with_parent(parent_pid)
        setup_logging(spec.log_level, spec.log_format)
    loop = make_worker_loop(spec)
    server = None
    if spec.metrics:
        from remoterl.workers.metrics import start_worker_metrics

        try:
            server = start_worker_metrics(spec.metrics, loop)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", spec.metrics, exc)
            raise SystemExit(1) from exc

    def _stop(signum: int, _frame: object) -> None:
        loop.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        loop.run()
    except RemoteRLError as exc:  # the broker refused us (key, limits): restarting will not help
        log.error("%s", exc)
        raise SystemExit(REFUSED_EXIT_CODE) from exc
    finally:
        if server is not None:
            server.close()


class WorkerPool:
    """Supervise ``len(specs)`` worker processes."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list = [None] * len(specs)
        self._restarts: list[list[float]] = [[] for _ in specs]
        self._stopping = False
        self._gave_up: list[int] = []  # exit codes of children not restarted

    def start(self) -> None:
        for i in range(len(self.specs)):
            self._start(i)

    def _start(self, i: int) -> None:
        proc = self._ctx.Process(target=run_worker, args=(self.specs[i], os.getpid()),
                                 name=f"remoterl-worker-{i}", daemon=False)
        proc.start()
        self.procs[i] = proc

    def stop(self) -> None:
        """Ask every child to stop (SIGTERM); safe from a signal handler."""
        self._stopping = True
        for proc in self.procs:
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def supervise(self) -> int:
        """Wait for the children, restarting crashed ones, until stopped; return an exit code."""
        while not self._stopping:
            alive = {proc.sentinel: i for i, proc in enumerate(self.procs) if proc is not None and proc.exitcode is None}
            if not alive:
                break
            for sentinel in wait(list(alive), timeout=1.0):
                i = alive[sentinel]
                proc = self.procs[i]
                proc.join()
                if self._stopping:
                    continue
                if proc.exitcode == REFUSED_EXIT_CODE:
                    log.error("worker process %d was refused by the broker; not restarting it", i)
                    self._gave_up.append(REFUSED_EXIT_CODE)
                    self.procs[i] = None
                    continue
                now = time.monotonic()
                recent = [t for t in self._restarts[i] if now - t < _RESTART_WINDOW]
                self._restarts[i] = recent
                if len(recent) >= _MAX_RESTARTS:
                    log.error("worker process %d exited with %s %d times in %.0f s; not restarting it",
                              i, proc.exitcode, len(recent), _RESTART_WINDOW)
                    self._gave_up.append(1)
                    self.procs[i] = None
                    continue
                log.warning("worker process %d exited with code %s; restarting it", i, proc.exitcode)
                recent.append(now)
                self._start(i)
        return self.join()

    def join(self, timeout: float = 10.0) -> int:
        """Wait for stopped children (SIGKILL after ``timeout``); return 0 if all exited
        cleanly, :data:`REFUSED_EXIT_CODE` if the broker refused any, else 1 if any failed or
        was given up on."""
        deadline = time.monotonic() + timeout
        code = max(self._gave_up, default=0)
        for proc in self.procs:
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.warning("worker process %s did not stop; killing it", proc.pid)
                proc.kill()
                proc.join()
            if proc.exitcode not in (0, -signal.SIGTERM):
                code = max(code, 1)
        return code
