"""Shared fixtures: brokers and workers as real processes or threads on 127.0.0.1.

Every wait is bounded by a multiple of ``T`` (seconds), scaled by
``REMOTERL_TEST_TIMEOUT_FACTOR`` on slow machines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

T = float(os.environ.get("REMOTERL_TEST_TIMEOUT_FACTOR", "1")) * 10.0

# Fast heartbeats so liveness tests finish quickly.
HEARTBEAT = 0.2
LIVENESS = 3


def wait_for(predicate, timeout: float = T, what: str = "condition", interval: float = 0.02):
    """Poll ``predicate`` until it is truthy or ``timeout`` passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def assert_same(remote, local, what: str) -> None:
    """Exactly equal, types included (gymnasium's data_equivalence), or fail showing both."""
    from gymnasium.utils.env_checker import data_equivalence

    assert data_equivalence(remote, local, exact=True), f"{what} differs:\nremote: {remote!r}\nlocal:  {local!r}"


def free_url() -> str:
    """A tcp:// URL on 127.0.0.1 with a port that was free a moment ago."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    return f"tcp://127.0.0.1:{port}"


class Proc:
    """A CLI process whose stderr is kept for assertions and failure messages."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = T) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.args!r} did not exit within {timeout:g} s:\n{self.output()}")

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stdout.read() if self.proc.stdout else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(T)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(T)
        if self.proc.stdout:
            self.proc.stdout.close()


def cli(name: str) -> list[str]:
    """The command line that runs one of our console scripts with this interpreter."""
    module = {
        "remoterl-broker": "remoterl.broker.cli",
        "remoterl-worker": "remoterl.workers.cli",
        "remoterl": "remoterl.cli",
    }[name]
    return [sys.executable, "-m", module]


@contextlib.contextmanager
def process_group():
    """Yield ``start(args, env=None) -> Proc``; every process started is stopped on exit
    (SIGTERM, then SIGKILL). For module-scoped fixtures; tests use ``procs``."""
    started: list[Proc] = []

    def start(args: list[str], env: dict | None = None) -> Proc:
        proc = Proc(args, env)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@contextlib.contextmanager
def tcp_broker(workers: int, *worker_args: str):
    """A broker process and ``workers`` worker processes (``remoterl-worker *worker_args``,
    named w0, w1, ...) on a free tcp port; yields its URL. ``remoterl.shutdown()`` runs on
    exit, so this process's cached clients for it are closed first."""
    import remoterl

    url = free_url()
    with process_group() as start:
        try:
            start_broker(start, url)
            for i in range(workers):
                start_worker(start, url, *worker_args, "--procs", "1", "--name", f"w{i}", expect=i + 1)
            yield url
        finally:
            remoterl.shutdown()


@contextlib.contextmanager
def closed_after(url: str):
    """Yield ``track(obj) -> obj``: every tracked env is closed on exit, then the broker at
    ``url`` must report no open slot (for fixtures that open envs on a shared broker)."""
    made: list = []

    def track(obj):
        made.append(obj)
        return obj

    yield track
    for obj in made:
        obj.close()
    wait_for(lambda: status(url)["open_slots"] == 0, what="every slot closed after the test")


@contextlib.contextmanager
def embedded_broker(num_workers: int, slots_per_worker: int, imports: tuple[str, ...] = ()):
    """The embedded default (broker thread, workers on local links) with fast heartbeats;
    yields the URL this process reaches it at. ``remoterl.shutdown()`` runs on exit, so this
    process's cached clients for it are closed first."""
    import remoterl
    from remoterl.embedded import Embedded

    embedded = Embedded(num_workers, slots_per_worker, heartbeat=HEARTBEAT, liveness=LIVENESS, imports=list(imports))
    try:
        embedded.start()
        yield embedded.local_url
    finally:
        remoterl.shutdown()
        embedded.stop()


@pytest.fixture
def procs():
    """Start CLI processes; all are stopped (SIGTERM, then SIGKILL) at teardown."""
    with process_group() as start:
        yield start


@pytest.fixture
def broker_url():
    return free_url()


def status(url: str) -> dict:
    from remoterl.client.status import fetch_status

    return fetch_status(url, timeout=T)


def worker_calls(url: str) -> dict[str, int]:
    """Batched calls each worker has served, by worker id (the broker's own counters)."""
    return {w["id"]: w["calls"] for w in status(url)["workers"]}


def start_broker(start, url: str, *extra: str) -> Proc:
    """Start ``remoterl-broker`` on ``url`` with fast heartbeats; return once it answers."""
    from remoterl.errors import AuthenticationError

    proc = start([*cli("remoterl-broker"), "--bind", url, "--heartbeat", str(HEARTBEAT),
                  "--liveness", str(LIVENESS), *extra])
    try:
        status(url)  # bounded: raises if the broker does not answer within T
    except AuthenticationError:
        pass  # a broker with API keys: it answered, asking for a key
    return proc


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Worker processes import the test envs (remoterl_test_envs) from this folder.
TEST_ENV = {"PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_worker(start, url: str, *extra: str, expect: int | None = None) -> Proc:
    """Start ``remoterl-worker``; with ``expect``, wait until the broker lists that many workers."""
    proc = start([*cli("remoterl-worker"), "--broker", url, "--heartbeat", str(HEARTBEAT),
                  "--liveness", str(LIVENESS), *extra], TEST_ENV)
    if expect is not None:
        wait_for(lambda: len(status(url)["workers"]) >= expect or proc.proc.poll() is not None,
                 what=f"{expect} workers registered")
        assert proc.proc.poll() is None, proc.output()
    return proc
