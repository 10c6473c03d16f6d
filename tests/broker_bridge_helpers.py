"""Shared by the tests/test_broker_bridge_*.py files (``remoterl.broker.bridge``, the WebSocket
bridge, and ``remoterl.io.wsgateway``, its client side): :class:`Setup` and the module-scoped
``setup`` fixture (a broker with tcp and inproc endpoints, a bridge and a tcp worker), the
``clients`` fixture, and helpers for trainers and raw ``websockets`` peers. Test modules
import the fixtures by name."""

from __future__ import annotations

import time
import uuid

import msgpack
import numpy as np
import pytest
import zmq
from conftest import HEARTBEAT, Proc, T, cli, status, wait_for
from websockets.exceptions import ConnectionClosed

import remoterl
from remoterl import RemoteEnvVec
from remoterl.wire import wsframes as _wsframes
from remoterl.broker.bridge import WsBridge
from remoterl.broker.core import BrokerConfig
from remoterl.broker.loop import Broker
from remoterl.io.wsgateway import close_gateways


# The broker's heartbeat window is long (5 s) so that "freed at once" is told apart from "expired".
BROKER_HEARTBEAT, BROKER_LIVENESS = 1.0, 5
WINDOW = BROKER_HEARTBEAT * BROKER_LIVENESS
NUM_ENVS = 4
STEPS = 150


class Setup:
    """The module's broker (tcp + inproc), bridge and tcp worker."""

    def __init__(self, heartbeat: float = BROKER_HEARTBEAT, liveness: int = BROKER_LIVENESS) -> None:
        self.inproc = f"inproc://remoterl-bridge-{uuid.uuid4().hex}"
        self.broker = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=heartbeat, liveness=liveness),
                             also=(self.inproc,))
        self.tcp_url = self.broker.start()
        self.bridges: list[WsBridge] = []
        self.bridge = self.add_bridge()
        self.ws_url = self.bridge.url

    def add_bridge(self, **kwargs) -> WsBridge:
        bridge = WsBridge("127.0.0.1", 0, self.inproc, context=zmq.Context.instance(), **kwargs)
        bridge.start()
        self.bridges.append(bridge)
        return bridge

    def stop(self) -> None:
        close_gateways()
        for bridge in self.bridges:
            bridge.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def setup():
    s = Setup()
    worker = Proc([*cli("remoterl-worker"), "--broker", s.tcp_url, "--env", "CartPole-v1", "-n", "16",
                   "--procs", "1", "--heartbeat", str(HEARTBEAT), "--name", "tcp-worker"])
    try:
        wait_for(lambda: len(status(s.tcp_url)["workers"]) == 1 or worker.proc.poll() is not None,
                 what="the tcp worker registered")
        assert worker.proc.poll() is None, worker.output()
        yield s
    finally:
        worker.stop()
        s.stop()


@pytest.fixture
def clients(setup):
    """Make remoterl Clients; all are closed at teardown and no slot may stay open."""
    made: list[remoterl.Client] = []

    def make(url: str, **kwargs) -> remoterl.Client:
        client = remoterl.Client(url, **kwargs).connect()
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, what="every slot closed after the test")


def run_cartpole(client, steps: int = STEPS, num_envs: int = NUM_ENVS) -> list:
    """Reset and step a RemoteEnvVec with fixed seeds and actions; return every result (copied)."""
    vec = RemoteEnvVec("CartPole-v1", num_envs, client=client)
    try:
        record = [vec.reset(seed=list(range(num_envs)))]
        rng = np.random.default_rng(7)
        for _ in range(steps):
            obs, rew, term, trunc, infos = vec.step(rng.integers(0, 2, num_envs))
            record.append((np.array(obs), np.array(rew), np.array(term), np.array(trunc), infos))
        return record
    finally:
        vec.close()


def ws_ids(url: str) -> tuple[list[str], list[str]]:
    """Client and worker ids that the bridge assigned (they start with 0x01)."""
    st = status(url)
    return ([c["id"] for c in st["clients"] if c["id"].startswith("01")],
            [w["id"] for w in st["workers"] if w["id"].startswith("01")])


def hello() -> bytes:
    return _wsframes.pack([b"RLC1\x01", msgpack.packb({"v": 1, "name": "raw"})])


def recv_until_closed(ws, timeout: float = T):
    """Read (and drop) messages until the server closes; return the close frame it sent."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd
    except TimeoutError:
        pass
    pytest.fail(f"the bridge did not close the connection within {timeout:g} s")
