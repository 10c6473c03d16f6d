"""The broker and workers as real processes, started by their CLIs, on 127.0.0.1.

Each test starts its own broker on a free port with fast heartbeats
(``HEARTBEAT`` × ``LIVENESS`` seconds of silence declares a peer dead).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from conftest import HEARTBEAT, LIVENESS, T, cli, start_broker, start_worker, status, wait_for
from remoterl import Client, LimitExceededError, RemoteEnvError, WorkerLostError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C

WINDOW = HEARTBEAT * LIVENESS


def group(opened):
    """Slots by worker, in order."""
    out: dict[bytes, list[int]] = {}
    for slot, worker in zip(opened.slots, opened.workers):
        out.setdefault(worker, []).append(slot)
    return out


def step_all(client, groups, timeout=T):
    pending = [client.send_call(w, s, {"op": "step", "a": np.zeros(len(s), np.int64), "m": 0})
               for w, s in groups.items()]
    return client.wait(pending, timeout)


def reset_all(client, groups):
    pending = [client.send_call(w, s, {"op": "reset", "seeds": list(range(len(s)))}) for w, s in groups.items()]
    return client.wait(pending, T)


@pytest.fixture
def two_workers(procs, broker_url):
    broker = start_broker(procs, broker_url)
    workers = [start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "4", "--procs", "1",
                            "--name", f"w{i}", expect=i + 1) for i in range(2)]
    return broker, workers


def test_slots_spread_and_one_message_per_worker(two_workers, broker_url):
    with Client(broker_url).connect() as client:
        opened = client.open("CartPole-v1", n=8)
        groups = group(opened)
        assert len(groups) == 2 and all(len(s) == 4 for s in groups.values())
        assert status(broker_url)["open_slots"] == 8
        reset_all(client, groups)
        before = {w["id"]: w["calls"] for w in status(broker_url)["workers"]}
        replies = step_all(client, groups)
        after = {w["id"]: w["calls"] for w in status(broker_url)["workers"]}
        # ONE batched message per worker for the 8-slot step.
        assert {k: after[k] - before[k] for k in after} == {w.hex(): 1 for w in groups}
        assert [r["obs"].shape for r in replies] == [(4, 4), (4, 4)]
        client.close_slots(opened.slots)
        wait_for(lambda: status(broker_url)["open_slots"] == 0, what="slots closed")


def test_kill_9_worker_loses_its_slots_only(two_workers, broker_url):
    _, workers = two_workers
    with Client(broker_url).connect() as client:
        groups = group(client.open("CartPole-v1", n=8))
        reset_all(client, groups)
        pids = {w["id"]: w["pid"] for w in status(broker_url)["workers"]}
        victim_id, survivor_id = list(groups)
        victim = next(w for w in workers if w.pid == pids[victim_id.hex()])
        # A call in flight when the worker dies must fail too, not hang.
        os.kill(victim.pid, signal.SIGSTOP)
        pending = client.send_call(victim_id, groups[victim_id], {"op": "step", "a": np.zeros(4, np.int64), "m": 0})
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            client.wait([pending], timeout=T)
        assert time.monotonic() - killed_at <= WINDOW + 1.0
        with pytest.raises(WorkerLostError):  # later calls on those slots fail before sending
            client.send_call(victim_id, groups[victim_id], {"op": "step", "a": np.zeros(4, np.int64), "m": 0})
        reply = client.call(survivor_id, groups[survivor_id], {"op": "step", "a": np.zeros(4, np.int64), "m": 0})
        assert reply["obs"].shape == (4, 4)


def test_env_exception_carries_remote_traceback(procs, broker_url):
    start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--import", "remoterl_test_envs", "--env", "RaisingEnv-v0", "-n", "2",
                 "--procs", "1", expect=1)
    with Client(broker_url).connect() as client:
        opened = client.open("RaisingEnv-v0", n=2)
        worker = opened.workers[0]
        client.call(worker, opened.slots, {"op": "reset"})
        with pytest.raises(RemoteEnvError) as info:
            client.call(worker, opened.slots, {"op": "step", "a": np.array([0, 1]), "m": 0})
        assert "boom from the simulator" in str(info.value)
        assert "explode_on_purpose" in info.value.remote_traceback
        assert info.value.remote_type == "ValueError"
        # The worker serves on, the other slot included.
        reply = client.call(worker, opened.slots[:1], {"op": "step", "a": np.array([0]), "m": 0})
        assert reply["rew"].tolist() == [1.0]


def test_idle_trainer_keeps_slots(two_workers, broker_url):
    with Client(broker_url).connect() as client:
        groups = group(client.open("CartPole-v1", n=4))
        reset_all(client, groups)
        time.sleep(3 * WINDOW)  # the trainer is busy elsewhere; only its heartbeat thread speaks
        assert status(broker_url)["open_slots"] == 4
        assert all(r["obs"].shape[1] == 4 for r in step_all(client, groups))


TRAINER = """
import sys, time
from remoterl import Client
client = Client(sys.argv[1]).connect()
opened = client.open("CartPole-v1", n=3)
print("opened", flush=True)
time.sleep(600)
"""


def test_killed_trainer_frees_its_slots(two_workers, broker_url):
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, broker_url], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "opened"
        assert status(broker_url)["open_slots"] == 3
        trainer.kill()
        trainer.wait(T)
        wait_for(lambda: status(broker_url)["open_slots"] == 0, timeout=WINDOW + T, what="slots freed")
        snap = status(broker_url)
        assert all(w["slots"] == 0 for w in snap["workers"])
        # The workers closed the envs: their hosts report no live slot at the next heartbeat.
        wait_for(lambda: all(w["stats"].get("slots") == 0 for w in status(broker_url)["workers"]),
                 what="workers closed the envs")
    finally:
        trainer.kill()
        trainer.wait(T)
        trainer.stdout.close()


def test_sigterm_stops_broker_and_worker_cleanly(procs, broker_url):
    broker = start_broker(procs, broker_url)
    worker = start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", expect=1)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    wait_for(lambda: not status(broker_url)["workers"], what="worker gone (DISCONNECT)")
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0


def test_worker_pool_sigterm_exits_zero(procs, broker_url):
    start_broker(procs, broker_url)
    pool = start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "4", "--procs", "2", expect=2)
    assert sum(w["capacity"] for w in status(broker_url)["workers"]) == 4
    pool.signal(signal.SIGTERM)
    assert pool.wait() == 0
    wait_for(lambda: not status(broker_url)["workers"], what="pool workers gone")


def test_workers_survive_broker_restart(procs, broker_url):
    broker = start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", expect=1)
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0
    start_broker(procs, broker_url)
    wait_for(lambda: len(status(broker_url)["workers"]) == 1, timeout=WINDOW + T, what="worker re-registered")
    with Client(broker_url).connect() as client:
        groups = group(client.open("CartPole-v1", n=2))
        reset_all(client, groups)
        assert step_all(client, groups)[0]["obs"].shape == (2, 4)


def test_broker_killed_and_restarted_is_survived(procs, broker_url):
    broker = start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", expect=1)
    os.killpg(broker.pid, signal.SIGKILL)  # no DISCONNECT: the workers must notice by heartbeat
    broker.wait()
    start_broker(procs, broker_url)
    wait_for(lambda: len(status(broker_url)["workers"]) == 1, timeout=2 * WINDOW + T, what="worker re-registered")


OVERSIZED_FRAME = 6


def _garbage(rng: random.Random) -> tuple[int, list[bytes]]:
    kind = rng.randrange(9)
    rand = lambda n: bytes(rng.getrandbits(8) for _ in range(n))  # noqa: E731
    if kind == 0:
        return kind, [rand(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 6))]
    if kind == 1:
        return kind, [p.client_frame(C.OPEN), p.encode_header({"r": 1, "env": "CartPole-v1", "n": 2})[:-3]]
    if kind == 2:
        return kind, [b"RLC9\x03", p.encode_header({"r": 1})]
    if kind == 3:
        return kind, [p.client_frame(C.OPEN), p.encode_header({"r": 1, "env": 5, "n": "x"})]
    if kind == 4:
        return kind, [p.client_frame(C.CALL), rand(16)]
    if kind == 5:
        return kind, [b"MDPW02", b"\x09", rand(5)]
    if kind == OVERSIZED_FRAME:
        # One frame over ZMQ_MAXMSGSIZE: libzmq drops the connection before the broker sees it.
        return kind, [p.client_frame(C.OPEN), b"x" * 70_000]
    if kind == 7:
        # Every frame under the limit, the whole message over it: refused with an error reply.
        return kind, [p.client_frame(C.OPEN), p.encode_header({"r": 9}), b"y" * 40_000, b"z" * 40_000]
    return kind, [b"MDPC02", b"\x07", b"svc"]


def test_malformed_flood_leaves_broker_serving(procs, broker_url):
    start_broker(procs, broker_url, "--max-message-size", "65536")
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "4", "--procs", "1", expect=1)
    with Client(broker_url).connect() as client:
        groups = group(client.open("CartPole-v1", n=2))
        reset_all(client, groups)
        tables = status(broker_url)["tables"]
        ctx = zmq.Context.instance()
        rng = random.Random(1234)
        sockets = [ctx.socket(zmq.DEALER) for _ in range(4)]  # the last one sends oversized frames
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(broker_url)
        seen = 0
        for i in range(1000):
            kind, frames = _garbage(rng)
            if kind == OVERSIZED_FRAME:
                sockets[3].send_multipart(frames)
            else:
                sockets[i % 3].send_multipart(frames)
                seen += 1
        # Normal traffic still flows, and every message that reached the broker was counted as bad.
        assert step_all(client, groups)[0]["obs"].shape == (2, 4)
        snap = wait_for(lambda: (s := status(broker_url))["counters"].get("malformed", 0)
                        + s["counters"].get("refused", 0) >= seen and s, what="garbage processed")
        assert snap["tables"] == tables
        errors = []
        for sock in sockets[:3]:
            while sock.poll(0):
                errors.append(sock.recv_multipart())
        for sock in sockets:
            sock.close()
        assert any(b"too_large" in e[-1] for e in errors)
        assert sum(e[0] == p.client_frame(C.ERROR) for e in errors) > 100
        assert step_all(client, groups)[0]["obs"].shape == (2, 4)


RFC18_WORKER = """
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send_multipart([b"MDPW02", b"\\x01", b"echo"])           # READY
print("ready", flush=True)
while True:
    frames = sock.recv_multipart()
    assert frames[0] == b"MDPW02", frames
    if frames[1] == b"\\x02":                                  # REQUEST: client, empty, body
        client, empty, body = frames[2], frames[3], frames[4:]
        assert empty == b""
        sock.send_multipart([b"MDPW02", b"\\x03", client, b"", b"partial"])  # PARTIAL
        sock.send_multipart([b"MDPW02", b"\\x04", client, b"", *body])       # FINAL
    elif frames[1] == b"\\x05":                                # HEARTBEAT
        sock.send_multipart([b"MDPW02", b"\\x05"])
    elif frames[1] == b"\\x06":                                # DISCONNECT
        break
"""


def test_rfc18_client_and_worker_echo_through_broker(procs, broker_url):
    start_broker(procs, broker_url)
    worker = procs([sys.executable, "-c", RFC18_WORKER, broker_url])
    assert worker.proc.stdout.readline().strip() == "ready"
    ctx = zmq.Context.instance()
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(broker_url)
    try:
        wait_for(lambda: any(s["name"] == "echo" and s["workers"] for s in status(broker_url)["services"]),
                 what="echo service")
        # RFC 8: mmi.service
        client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"echo"])
        assert client.poll(T * 1000)
        assert client.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.service", b"200"]
        client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"nothing-here"])
        assert client.poll(T * 1000)
        assert client.recv_multipart()[-1] == b"404"
        # RFC 18 request: PARTIAL then FINAL
        client.send_multipart([b"MDPC02", b"\x01", b"echo", b"hello", b"world"])
        assert client.poll(T * 1000)
        assert client.recv_multipart() == [b"MDPC02", b"\x02", b"echo", b"partial"]
        assert client.poll(T * 1000)
        assert client.recv_multipart() == [b"MDPC02", b"\x03", b"echo", b"hello", b"world"]
        # RFC 7 (MDP/0.1) client through the same broker and worker: FINAL only
        client.send_multipart([b"", b"MDPC01", b"echo", b"old"])
        assert client.poll(T * 1000)
        assert client.recv_multipart() == [b"", b"MDPC01", b"echo", b"old"]
        # The worker stays alive through several heartbeat periods.
        time.sleep(2 * WINDOW)
        assert any(s["name"] == "echo" and s["workers"] == 1 for s in status(broker_url)["services"])
    finally:
        client.close()


def test_status_cli(two_workers, broker_url):
    out = subprocess.run([*cli("remoterl"), "status", "--broker", broker_url], capture_output=True, text=True,
                         timeout=T)
    assert out.returncode == 0, out.stderr
    assert "w0" in out.stdout and "w1" in out.stdout and "CartPole-v1" in out.stdout
    bad = subprocess.run([*cli("remoterl"), "status", "--broker", "tcp://127.0.0.1:1", "--timeout", "0.5"],
                         capture_output=True, text=True, timeout=T)
    assert bad.returncode != 0 and "remoterl-broker --bind" in bad.stderr


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


# --- hostile peers ------------------------------------------------------------------------------


def _raw_dealer(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def test_frame_count_bomb_is_drained_and_answered(two_workers, broker_url):
    """A message of more than MAX_FRAMES frames is drained, not read into memory, and answered;
    the peers the broker could not hear meanwhile do not expire."""
    # Long enough to outlast the test peers' 0.6 s heartbeat window on a slow machine: the
    # broker pongs their heartbeat sockets while it drains.
    frames = p.MAX_FRAMES * 8
    with Client(broker_url).connect() as client:
        groups = group(client.open("CartPole-v1", n=8))
        reset_all(client, groups)
        bomb = _raw_dealer(broker_url)
        try:
            bomb.send(p.client_frame(C.CALL), zmq.SNDMORE)
            bomb.send(b"W" * 16, zmq.SNDMORE)
            bomb.send(p.encode_header({"r": 41}), zmq.SNDMORE)
            for _ in range(frames - 4):
                bomb.send(b"", zmq.SNDMORE)
            bomb.send(b"")
            assert bomb.poll(T * 1000), "no answer to the oversized message"
            reply = bomb.recv_multipart()
            error = p.decode_header(reply[1])
            assert reply[0] == p.client_frame(C.ERROR) and error["code"] == "too_large" and error["r"] == 41
            assert f"{frames} frames" in error["msg"]
        finally:
            bomb.close()
        for _ in range(20):
            step_all(client, groups)
        snap = status(broker_url)
        assert snap["counters"]["too_many_frames"] == 1
        assert "workers_expired" not in snap["counters"] and "clients_expired" not in snap["counters"]
        assert len(snap["workers"]) == 2 and snap["open_slots"] == 8


def test_call_flood_is_answered_and_does_not_starve_others(two_workers, broker_url):
    """A client sending thousands of calls without reading gets each answered (a reply or a
    ``limit`` error); another client's steps on the same workers carry on meanwhile."""
    sent = 3000
    with Client(broker_url).connect() as trainer, Client(broker_url).connect() as flooder:
        groups = group(trainer.open("CartPole-v1", n=4))
        reset_all(trainer, groups)
        mine = group(flooder.open("CartPole-v1", n=2, max_workers=1))
        (worker, slots), = mine.items()
        assert worker in groups, "both clients must share the flooded worker"
        reset_all(flooder, mine)
        flood = [flooder.send_call(worker, slots, {"op": "step", "a": np.zeros(2, np.int64), "m": 0})
                 for _ in range(sent)]
        for _ in range(20):
            step_all(trainer, groups, timeout=T)
        limited = 0
        for entry in flood:  # every call answered: a result or the broker's typed refusal
            try:
                flooder.wait([entry], T)
            except LimitExceededError:
                limited += 1
        assert 0 < limited < sent
        counters = status(broker_url)["counters"]
        assert counters["calls_limited"] == limited


def _mdp_echo_worker(url: str, service: bytes, stop: threading.Event, ready: threading.Event) -> None:
    """An MDP/0.2 worker (RFC 18) that echoes every request until ``stop`` is set."""
    sock = _raw_dealer(url)
    try:
        sock.send_multipart([b"MDPW02", b"\x01", service])
        ready.set()
        while not stop.is_set():
            if not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            if frames[1] == b"\x02":  # REQUEST: [sig, cmd, client, empty, body...]
                sock.send_multipart([b"MDPW02", b"\x04", frames[2], b"", *frames[4:]])
            elif frames[1] == b"\x05":  # HEARTBEAT: answer in kind, so the broker keeps us
                sock.send_multipart([b"MDPW02", b"\x05"])
    finally:
        sock.close()


@pytest.fixture
def echo_service(procs, broker_url):
    start_broker(procs, broker_url)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=_mdp_echo_worker, args=(broker_url, b"echo", stop, ready), daemon=True)
    thread.start()
    assert ready.wait(T)
    yield
    stop.set()
    thread.join(T)


def test_many_asynchronous_mdp_requests_are_all_answered(echo_service, broker_url):
    """More requests than the old 10,000 cap, sent before reading any reply (as zguide's
    mdclient2 does): every one is answered."""
    count = 20_000
    client = _raw_dealer(broker_url)
    try:
        for i in range(count):
            client.send_multipart([b"MDPC02", b"\x01", b"echo", b"%d" % i])
        got = set()
        deadline = time.monotonic() + 6 * T
        while len(got) < count and time.monotonic() < deadline:
            if client.poll(1000):
                got.add(int(client.recv_multipart()[-1]))
        assert got == set(range(count))
    finally:
        client.close()
    assert "mdp_requests_dropped" not in status(broker_url)["counters"]


def test_fresh_mdp_client_is_served_after_a_flood_of_vanished_peers(echo_service, broker_url):
    """Fake workers that said READY and left, and clients that asked and left, do not keep a
    fresh client from its answer: unreachable workers are skipped, clients take turns."""
    for i in range(300):
        ghost = _raw_dealer(broker_url)
        ghost.send_multipart([b"MDPW02", b"\x01", b"echo"])
        ghost.close()
        asker = _raw_dealer(broker_url)
        asker.send_multipart([b"MDPC02", b"\x01", b"echo", b"ghost"])
        asker.close()
    client = _raw_dealer(broker_url)
    try:
        start = time.monotonic()
        client.send_multipart([b"MDPC02", b"\x01", b"echo", b"fresh"])
        assert client.poll(T * 1000), "the fresh client got no answer"
        assert client.recv_multipart()[-1] == b"fresh"
        assert time.monotonic() - start < T / 2
    finally:
        client.close()
