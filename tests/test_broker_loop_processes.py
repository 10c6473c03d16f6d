"""The broker and workers as real processes, started by their CLIs, on 127.0.0.1: slots spread
over workers, workers and trainers killed or stopped, brokers restarted, ``remoterl status``.

Each test starts its own broker on a free port with fast heartbeats
(``HEARTBEAT`` × ``LIVENESS`` seconds of silence declares a peer dead).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import T, cli, start_broker, start_worker, status, wait_for
from remoterl import Client, RemoteEnvError, WorkerLostError
from broker_loop_helpers import WINDOW, group, reset_all, step_all
from broker_loop_helpers import two_workers as two_workers  # the shared fixture: a broker and two workers


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


def test_status_cli(two_workers, broker_url):
    out = subprocess.run([*cli("remoterl"), "status", "--broker", broker_url], capture_output=True, text=True,
                         timeout=T)
    assert out.returncode == 0, out.stderr
    assert "w0" in out.stdout and "w1" in out.stdout and "CartPole-v1" in out.stdout
    assert "P50 MS" in out.stdout and "P99 MS" in out.stdout  # "-" until a worker answered a call
    bad = subprocess.run([*cli("remoterl"), "status", "--broker", "tcp://127.0.0.1:1", "--timeout", "0.5"],
                         capture_output=True, text=True, timeout=T)
    assert bad.returncode != 0 and "remoterl-broker --bind" in bad.stderr
