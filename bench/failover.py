"""The failover case: training speed while simulators die, and how soon a lost env is back.

A broker process (heartbeat 0.25 s × liveness 4: a dead worker is noticed within 1 s) and two
worker processes of 8 slots each. A ``RemoteEnvVec(8, on_worker_lost="truncate")`` steps
CartPole-v1 undisturbed, then again while a thread SIGKILLs the worker holding its last env
every few seconds and starts a new one at once. Reported: env-steps/s of the disturbed run
against the undisturbed one (same run), and the time from each kill to the first step that
the replacement of a lost env takes (the step after the one that reported the truncation).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import numpy as np

from measure import Figure, Session

__all__ = ["case_failover"]

_BEATS = ("--heartbeat", "0.25", "--liveness", "4")
_FLAG = "remoterl_worker_lost"


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


class _Cluster:
    """A broker and named workers as processes, on a free loopback port."""

    def __init__(self) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.ROUTER)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.close(0)
        self.url = f"tcp://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start(self, workers: int) -> None:
        from remoterl.client.status import fetch_status

        self._spawn([*_module("remoterl.broker.cli"), "--bind", self.url, *_BEATS])
        fetch_status(self.url, timeout=30)
        for i in range(workers):
            self.start_worker(f"w{i}")
        self.wait_workers(workers)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn([*_module("remoterl.workers.cli"), "--broker", self.url, "--env",
                                          "CartPole-v1", "-n", "8", "--procs", "1", "--name", name, *_BEATS])

    def wait_workers(self, n: int, timeout: float = 30.0) -> None:
        from remoterl.client.status import fetch_status

        deadline = time.monotonic() + timeout
        while len(fetch_status(self.url)["workers"]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers did not register within {timeout:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def case_failover(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import Client, RemoteEnvVec
    from remoterl.client.status import fetch_status

    opts = session.options
    seconds, period = (4.0, 1.5) if opts.quick else (max(12.0, 6 * opts.duration), 3.0)
    note("broker process + 2 workers")
    cluster = _Cluster()
    try:
        cluster.start(2)
        with Client(cluster.url).connect() as client:
            envs = RemoteEnvVec("CartPole-v1", 8, client=client, on_worker_lost="truncate")
            actions = [envs.action_space.sample() for _ in range(64)]
            envs.reset(seed=0)
            note("undisturbed")
            plain = _step_for(envs, actions, seconds / 2)[0]
            note(f"a worker killed every {period:g} s")
            kills: list[float] = []
            stop = threading.Event()

            def killer() -> None:
                while not stop.wait(period):
                    held = {w["id"]: w["name"] for w in fetch_status(cluster.url)["workers"]}
                    name = held.get(envs.env_workers[-1].hex())
                    proc = cluster.workers.get(name or "")
                    if proc is None or proc.poll() is not None:
                        continue
                    os.kill(proc.pid, signal.SIGKILL)
                    kills.append(time.monotonic())
                    proc.wait()
                    cluster.start_worker(name)  # a fresh process under the same name

            thread = threading.Thread(target=killer, name="failover-killer", daemon=True)
            thread.start()
            try:
                disturbed, flagged_at = _step_for(envs, actions, seconds)
            finally:
                stop.set()
                thread.join(30)
            envs.close()
    finally:
        cluster.stop()
    back = []
    for killed in kills:
        later = [t for t in flagged_at if t > killed]
        if later:
            back.append((later[0] - killed) * 1000.0)
    extra = {"kills": len(kills), "recovered": len(back), "recovery_ms": back, "period_s": period,
             "heartbeat": "0.25 s × 4"}
    yield Figure("failover", f"RemoteEnvVec(8), 2 workers, one SIGKILLed and restarted every {period:g} s",
                 disturbed, "env-steps/s", "the same, undisturbed", plain, extra=extra)
    if back:
        yield Figure("failover", f"kill → replacement's first step, median of {len(back)} (dead worker noticed "
                                 f"within 1 s)", float(np.median(back)), "ms")
        yield Figure("failover", "kill → replacement's first step, worst", float(max(back)), "ms")
    else:
        yield Figure("failover", "kill → replacement's first step", na="n/a: no kill landed during the run")


def _step_for(envs, actions: list, seconds: float) -> tuple[float, list[float]]:
    """Step for ``seconds``; env-steps/s, and when each replacement took its first step."""
    steps, flagged_at, replacing = 0, [], False
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        _, _, _, _, info = envs.step(actions[steps % 64])
        if replacing:  # the step after the truncation: the replacements' first
            flagged_at.append(time.monotonic())
        replacing = bool(info.get(f"_{_FLAG}", np.zeros(1, bool)).any())
        steps += 1
    return steps * envs.num_envs / (now - start), flagged_at
