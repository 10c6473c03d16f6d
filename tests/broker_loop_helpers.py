"""Shared by the tests/test_broker_loop_*.py files (the broker and workers as real processes on
127.0.0.1): slots grouped by worker, batched steps and resets, a raw DEALER socket, and the
``two_workers`` fixture (imported by the test modules that use it)."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from conftest import HEARTBEAT, LIVENESS, T, start_broker, start_worker


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


def _raw_dealer(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock
