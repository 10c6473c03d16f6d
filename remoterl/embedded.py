"""The embedded default: a private broker and local worker processes on 127.0.0.1.

``remoterl.init()`` with no broker URL anywhere starts one of these, so remoterl
works on a laptop with zero infrastructure. The workers serve every env id
registered in gymnasium. Every child process dies with the trainer, even when the
trainer is killed with SIGKILL (``PR_SET_PDEATHSIG``), and :meth:`Embedded.stop`
stops them in order at shutdown.

The broker runs in a thread of the trainer by default, and takes the shortest path
it can: the trainer's client is an in-process peer that runs the broker's loop in its
own thread while it waits (``remoterl.io.inprocess.InProcessTransport``), and each worker
process talks to the broker over a local link, one end of a ``socket.socketpair()``
(``remoterl.io.link``), so a step wakes only the worker and then the trainer, where
zmq would also wake the I/O threads of both. Other processes (SB3's
``SubprocVecEnv`` children, ``remoterl status``) reach the same broker over tcp on
127.0.0.1, and the workers send their heartbeats that way.

Measured with CartPole-v1 on 2 cores (``bench/run.py --case embedded`` compares the
thread with ``REMOTERL_EMBEDDED_BROKER=process``, a broker process reached over tcp,
where the workers use tcp too): see ``bench/README.md``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

__all__ = ["Embedded"]

log = logging.getLogger(__name__)


class Embedded:
    """A private broker plus ``num_workers`` local worker processes.

    Args:
        num_workers: worker processes to start.
        slots_per_worker: slots each worker hosts.
        heartbeat, liveness: the broker's liveness settings.
        broker_mode: ``"thread"`` (default) or ``"process"``.
        imports: modules the workers import first (env ids they register are served).
    """

    def __init__(self, num_workers: int = 1, slots_per_worker: int = 256, *, heartbeat: float = 1.0,
                 liveness: int = 3, broker_mode: str | None = None, imports: list[str] | None = None) -> None:
        self.num_workers = num_workers
        self.slots_per_worker = slots_per_worker
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.broker_mode = broker_mode or os.environ.get("REMOTERL_EMBEDDED_BROKER", "thread")
        if self.broker_mode not in ("process", "thread"):
            raise ValueError(f"broker_mode must be 'process' or 'thread', got {self.broker_mode!r}")
        self.imports = list(imports or [])
        self.url: str | None = None
        self.local_url: str | None = None  # how this process reaches the broker (inproc in thread mode)
        self._broker_proc: subprocess.Popen | None = None
        self._broker_thread: Any = None
        self._workers: list[subprocess.Popen] = []

    def _child(self, *args: str, **popen: Any) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "remoterl.embedded_child", args[0], str(os.getpid()),
               repr(self.heartbeat), str(self.liveness), *args[1:]]
        # The trainer's import path, so the workers import what the trainer can (its own env modules).
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        env = {**os.environ, "PYTHONPATH": path}
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, **popen)

    def start(self) -> str:
        """Start the broker and the workers; return the broker's URL."""
        if self.broker_mode == "thread":
            from remoterl.broker.core import BrokerConfig
            from remoterl.broker.loop import Broker

            self.local_url = f"inproc://remoterl-embedded-{os.getpid()}-{id(self):x}"
            self._broker_thread = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=self.heartbeat,
                                                                           liveness=self.liveness),
                                         also=(self.local_url,))
            self.url = self._broker_thread.start()
        else:
            self._broker_proc = self._child("broker", stdout=subprocess.PIPE, text=True)
            assert self._broker_proc.stdout is not None
            line = self._broker_proc.stdout.readline().strip()  # bounded: the child exits on error
            self._broker_proc.stdout.close()
            if not line.startswith("tcp://"):
                self.stop()
                raise RuntimeError(f"the embedded broker did not start (exit code {self._broker_proc.poll()})")
            self.url = line
        for i in range(self.num_workers):
            args = [self.url, str(self.slots_per_worker), f"embedded-{i}"]
            if self._broker_thread is not None and os.name == "posix":
                # A local link carries the worker's messages (heartbeats still use tcp): the
                # kernel wakes the reader directly, where zmq goes through two I/O threads.
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self._broker_thread.add_link(ours)
                    self._workers.append(self._child("worker", *args, str(theirs.fileno()), *self.imports,
                                                     pass_fds=(theirs.fileno(),)))
                finally:
                    theirs.close()
            else:
                self._workers.append(self._child("worker", *args, "-1", *self.imports))
        self._wait_for_workers()
        log.info("embedded broker at %s with %d local worker(s)", self.url, self.num_workers)
        return self.url

    def _wait_for_workers(self, timeout: float = 60.0) -> None:
        """Return once every worker has registered with the broker (bounded)."""
        from remoterl.client.status import fetch_status

        deadline = time.monotonic() + timeout
        while True:
            assert self.url is not None
            if len(fetch_status(self.url, timeout=timeout)["workers"]) >= self.num_workers:
                return
            dead = [p.returncode for p in self._workers if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded workers did not start (exit codes {dead})" if dead else
                                   f"embedded workers did not register within {timeout:g} s")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        """Process ids of the broker (in process mode) and the workers."""
        procs = ([self._broker_proc] if self._broker_proc is not None else []) + self._workers
        return [p.pid for p in procs]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers, then the broker; SIGKILL whatever does not stop in ``timeout``."""
        procs = list(self._workers)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self._workers.clear()
        if self._broker_thread is not None:
            self._broker_thread.stop()
            self._broker_thread = None
        if self._broker_proc is not None:
            for proc in procs:
                _wait(proc, timeout)
            if self._broker_proc.poll() is None:
                self._broker_proc.send_signal(signal.SIGTERM)
            procs = [self._broker_proc]
            self._broker_proc = None
        for proc in procs:
            _wait(proc, timeout)


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
