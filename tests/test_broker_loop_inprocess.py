"""The broker as a thread with an inproc endpoint (the embedded default's fast path): an
in-process client beside tcp clients, and link workers (real processes on a socketpair)
whose link, not their heartbeats, tells the broker when they die."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import HEARTBEAT, LIVENESS, T, status, wait_for
from remoterl import Client, WorkerLostError
from remoterl.wire import protocol as p
from broker_loop_helpers import WINDOW


# --- in-process peers and local links (the embedded default's fast path) ------------------------


class InProcessBroker:
    """A broker thread with an inproc endpoint, and link workers as real processes."""

    def __init__(self, heartbeat: float = HEARTBEAT, liveness: int = LIVENESS) -> None:
        from remoterl.broker.core import BrokerConfig
        from remoterl.broker.loop import Broker

        self.inproc = f"inproc://test-{os.urandom(4).hex()}"
        self.heartbeat, self.liveness = heartbeat, liveness
        self.broker = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=heartbeat, liveness=liveness),
                             also=(self.inproc,))
        self.url = self.broker.start()
        self.workers: list[subprocess.Popen] = []

    def link_worker(self, name: str, slots: int = 8) -> subprocess.Popen:
        import socket

        from conftest import TEST_ENV

        ours, theirs = socket.socketpair()
        self.broker.add_link(ours)
        proc = subprocess.Popen(
            [sys.executable, "-m", "remoterl.embedded_child", "worker", str(os.getpid()), repr(self.heartbeat),
             str(self.liveness), self.url, str(slots), name, str(theirs.fileno()), "remoterl_test_envs"],
            pass_fds=(theirs.fileno(),), env={**os.environ, **TEST_ENV})
        theirs.close()
        self.workers.append(proc)
        wait_for(lambda: name in [w["name"] for w in status(self.url)["workers"]], what=f"worker {name}")
        return proc

    def local_client(self):
        from remoterl.client.connection import connect_client

        return connect_client(self.inproc, timeout=T)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(T)
        self.broker.stop()


@pytest.fixture
def in_process():
    broker = InProcessBroker()
    yield broker
    broker.close()


def test_in_process_client_and_tcp_client_share_a_link_worker(in_process):
    from remoterl import RemoteEnvVec

    in_process.link_worker("linked")
    local = in_process.local_client()
    assert local.in_process
    remote = Client(in_process.url, timeout=T).connect()
    try:
        envs = [RemoteEnvVec("CartPole-v1", 4, client=c) for c in (local, remote)]
        results = [env.reset(seed=3)[0] for env in envs]
        np.testing.assert_array_equal(results[0], results[1])
        actions = np.array([0, 1, 1, 0])
        for _ in range(20):  # interleaved: the tcp client is served while the local one waits and idles
            steps = [env.step(actions) for env in envs]
            np.testing.assert_array_equal(steps[0][0], steps[1][0])
        time.sleep(0.02)  # past the broker thread's linger: it serves the tcp client alone
        envs[1].step(actions)
        envs[0].step(actions)  # the local client takes the loop back from the broker's thread
        assert status(in_process.url)["workers"][0]["name"] == "linked"
        for env in envs:
            env.close()
    finally:
        local.close()
        remote.close()


def test_tcp_client_is_served_while_the_local_client_waits(in_process):
    from remoterl import RemoteEnvVec

    in_process.link_worker("slow")
    in_process.link_worker("fast")
    local = in_process.local_client()
    remote = Client(in_process.url, timeout=T).connect()
    try:
        slow = RemoteEnvVec("SleepyEnv-v0", 1, client=local, delay=1.0)
        fast = RemoteEnvVec("CartPole-v1", 2, client=remote, max_workers=1)
        assert not set(slow.workers) & set(fast.workers)
        slow.reset()
        fast.reset(seed=0)
        slow.step_async(np.array([0]))
        waiter = threading.Thread(target=slow.step_wait)
        waiter.start()  # holds the loop for a second
        steps = 0
        while waiter.is_alive() and steps < 50:
            fast.step(np.array([0, 1]))  # routed by the waiting local client's thread
            steps += 1
        waiter.join(T)
        assert steps == 50, "the tcp client stalled while the local client waited"
        slow.close()
        fast.close()
    finally:
        local.close()
        remote.close()


def test_idle_local_client_keeps_its_slots(in_process):
    from remoterl import RemoteEnvVec

    in_process.link_worker("w")
    local = in_process.local_client()
    try:
        env = RemoteEnvVec("CartPole-v1", 2, client=local)
        env.reset(seed=0)
        time.sleep(WINDOW * 2.5)  # its heartbeat thread pings over inproc meanwhile
        env.step(np.array([0, 1]))
        env.close()
    finally:
        local.close()


def test_killed_link_worker_fails_its_slots_before_the_heartbeat_window():
    from remoterl import RemoteEnvVec

    # Heartbeats too slow to notice within the test's bound: only the closed link can tell.
    slow_heartbeats = InProcessBroker(heartbeat=5.0, liveness=3)
    try:
        proc = slow_heartbeats.link_worker("doomed")
        local = slow_heartbeats.local_client()
        env = RemoteEnvVec("CartPole-v1", 2, client=local)
        env.reset(seed=0)
        proc.kill()
        proc.wait(T)
        # The first step may still be sent (into the closed link) and fail with the purge, or be
        # refused at once if the broker already saw the link close: either way WorkerLostError,
        # long before the 15 s heartbeat window.
        with pytest.raises(WorkerLostError):
            env.step(np.array([0, 1]))
        assert status(slow_heartbeats.url)["workers"] == []
        local.close()
    finally:
        slow_heartbeats.close()


def test_broker_stop_fails_a_waiting_local_client(in_process):
    from remoterl import BrokerUnavailableError, RemoteEnvVec, RemoteRLError

    in_process.link_worker("w")
    local = in_process.local_client()
    env = RemoteEnvVec("SleepyEnv-v0", 1, client=local, delay=2.0)
    env.reset()
    env.step_async(np.array([0]))
    stopper = threading.Timer(0.2, in_process.broker.stop, kwargs={"join": False})
    stopper.start()
    with pytest.raises(BrokerUnavailableError, match="stopped"):
        env.step_wait()
    stopper.join(T)
    with pytest.raises(RemoteRLError, match="stopped"):  # its slots are lost with the broker
        env.step(np.array([0]))
    local.close()


@pytest.mark.parametrize("how", ["closed", "garbled"])
def test_linked_worker_stops_when_its_link_ends(how):
    import socket
    import struct

    from remoterl.io.link import Link
    from remoterl.wire.protocol import WorkerCommand as W
    from remoterl.workers.loop import WorkerLoop
    from remoterl.workers.runtime import SlotHost

    ours, theirs = socket.socketpair()
    # Heartbeats go to a port nobody serves: only the link matters here.
    loop = WorkerLoop("tcp://127.0.0.1:9", SlotHost(["CartPole-v1"], 2), heartbeat=HEARTBEAT, link=Link(theirs))
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    broker_end = Link(ours)
    (ready,) = broker_end.wait(T)
    assert ready[0] == p.worker_frame(W.READY)
    if how == "closed":
        broker_end.close()
    else:
        ours.sendall(struct.pack("<I", 3) + b"bad")  # a body too short to hold a frame count
    runner.join(T)
    assert not runner.is_alive(), f"the worker kept running after its link was {how}"
    assert loop.error is None
    if how == "garbled":
        broker_end.close()


def test_link_worker_killed_during_a_wait_fails_the_wait():
    from remoterl import RemoteEnvVec

    slow_heartbeats = InProcessBroker(heartbeat=5.0, liveness=3)  # the link must tell, not heartbeats
    try:
        proc = slow_heartbeats.link_worker("doomed")
        local = slow_heartbeats.local_client()
        env = RemoteEnvVec("SleepyEnv-v0", 1, client=local, delay=5.0)
        env.reset()
        env.step_async(np.array([0]))
        killer = threading.Timer(0.2, proc.kill)
        killer.start()
        with pytest.raises(WorkerLostError):
            env.step_wait()  # the local client holds the loop and sees the link close
        killer.join(T)
        local.close()
    finally:
        slow_heartbeats.close()


def test_each_broker_instance_numbers_slots_afresh():
    # A restarted broker must not hand out the ids its previous instance gave (a client that
    # has not noticed the restart still holds them); the sans-I/O core starts at 1.
    from remoterl.broker.core import BrokerConfig, BrokerCore
    from remoterl.broker.loop import Broker

    firsts = {Broker("tcp://127.0.0.1:*").config.first_slot for _ in range(3)}
    assert len(firsts) == 3 and 1 not in firsts and all(f < 2**53 for f in firsts)
    assert BrokerCore(BrokerConfig(), 0.0).placement._next_slot == 1
    assert Broker("tcp://127.0.0.1:*", BrokerConfig(first_slot=7)).config.first_slot == 7
