"""``remoterl.broker.bridge`` and ``remoterl.io.wsgateway``: WebSocket connections that end or
stall: a peer that stops reading, a trainer killed or dropped, a bridge stopped, and a
gateway closing the connections of closed sockets.

The broker runs in this process (a thread) with an extra ``inproc://`` endpoint; a
:class:`WsBridge` serves WebSocket peers on 127.0.0.1 through it. One broker, one bridge
and one tcp:// worker process serve the module (``setup``, from broker_bridge_helpers.py);
tests that need other settings start their own bridge on the same broker, and each test
leaves no slot open.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time

import msgpack
import numpy as np
from conftest import Proc, T, status, wait_for
from websockets.sync.client import connect as ws_connect

import remoterl
from remoterl import RemoteEnvVec
from remoterl.wire import wsframes as _wsframes
from remoterl.io.wsgateway import gateway_endpoint
from broker_bridge_helpers import NUM_ENVS, WINDOW, hello, recv_until_closed, ws_ids
from broker_bridge_helpers import clients as clients, setup as setup  # the shared fixtures: the module's broker


# --- (d) a peer that does not read -------------------------------------------------------------------------

def test_peer_that_stops_reading_does_not_stall_others(setup, clients):
    bridge = setup.add_bridge(send_timeout=1.0)
    trainer = clients(gateway_endpoint(bridge.url))
    vec = RemoteEnvVec("CartPole-v1", NUM_ENVS, client=trainer)
    vec.reset(seed=0)

    # The slow peer: heartbeats naming a 60 KB id (control headers are capped at 64 KiB), which
    # the broker echoes in each pong (docs/PROTOCOL.md §3.2), so ~24 MB come back, far more than
    # the socket buffers hold; it reads nothing (max_queue=1 stops its reader after one message).
    ping = _wsframes.pack([b"RLC1\x07", msgpack.packb({"id": b"\xff" * 60_000})])
    with ws_connect(bridge.url, max_queue=1, compression=None, max_size=None) as slow:
        flood = threading.Thread(target=lambda: [slow.send(ping) for _ in range(400)], daemon=True)
        flood.start()

        slowest, steps = 0.0, 0
        deadline = time.monotonic() + T
        while bridge.counters["closed_slow"] == 0:
            assert time.monotonic() < deadline, "the bridge never closed the peer that does not read"
            start = time.monotonic()
            vec.step(np.zeros(NUM_ENVS, np.int64))
            slowest = max(slowest, time.monotonic() - start)
            steps += 1
        assert steps >= 10, "the other trainer should keep stepping while the slow peer is stuck"
        assert slowest < T / 20, f"a step of the other trainer took {slowest:.2f} s while a peer did not read"

        close = recv_until_closed(slow)  # reading again drains the backlog and reaches the close frame
        assert close is not None and close.code == 1013, close
        assert close.reason == "remoterl: peer too slow (send queue full)"
        flood.join(T)
    # The bridge, the broker and the other trainer carry on.
    for _ in range(20):
        vec.step(np.ones(NUM_ENVS, np.int64))
    vec.close()


# --- (e) a WebSocket trainer killed ---------------------------------------------------------------------------

KILLED_TRAINER = """
import sys, time
import remoterl
from remoterl.io.wsgateway import gateway_endpoint
client = remoterl.Client(gateway_endpoint(sys.argv[1])).connect()
vec = remoterl.RemoteEnvVec("CartPole-v1", 3, client=client)
vec.reset(seed=0)
print("ready", flush=True)
time.sleep(60)
"""


def test_killed_ws_trainer_frees_its_slots_at_once(setup):
    trainer = Proc([sys.executable, "-c", KILLED_TRAINER, setup.ws_url])
    try:
        assert select.select([trainer.proc.stdout], [], [], T)[0], "the trainer did not start"
        line = trainer.proc.stdout.readline()
        assert line.strip() == "ready", line + trainer.output()
        assert status(setup.tcp_url)["open_slots"] == 3
        assert len(ws_ids(setup.tcp_url)[0]) == 1
        trainer.proc.kill()
        trainer.proc.wait(T)
        killed = time.monotonic()
        wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, timeout=WINDOW / 2,
                 what="the killed trainer's slots freed")
        freed = time.monotonic() - killed
        assert freed < WINDOW / 5, f"slots freed after {freed:.2f} s: that is expiry, not DISCONNECT"
        assert not ws_ids(setup.tcp_url)[0]
    finally:
        trainer.stop()


def test_raw_ws_client_dropped_mid_session_frees_its_slots(setup):
    with ws_connect(setup.ws_url, compression=None) as ws:
        ws.send(hello())
        assert _wsframes.unpack(ws.recv(timeout=T))[0] == b"RLC1\x02"  # WELCOME
        ws.send(_wsframes.pack([b"RLC1\x03", msgpack.packb({"r": 1, "env": "CartPole-v1", "n": 2})]))
        opened = _wsframes.unpack(ws.recv(timeout=T))
        assert bytes(opened[0]) == b"RLC1\x04" and len(msgpack.unpackb(opened[1])["slots"]) == 2
        assert status(setup.tcp_url)["open_slots"] == 2
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close handshake: the TCP connection just ends
    wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, timeout=WINDOW / 5,
             what="the dropped client's slots freed")


def test_stop_closes_connections_and_frees_slots(setup):
    bridge = setup.add_bridge()
    client = remoterl.Client(gateway_endpoint(bridge.url)).connect()
    vec = RemoteEnvVec("CartPole-v1", 2, client=client)
    vec.reset(seed=0)
    assert status(setup.tcp_url)["open_slots"] == 2
    start = time.monotonic()
    bridge.stop()
    assert time.monotonic() - start < 5.0
    wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, timeout=WINDOW / 5,
             what="slots freed when the bridge stopped")
    client.close()


def test_gateway_closes_connections_of_closed_sockets(setup, monkeypatch):
    import remoterl.io.wsgateway as wsgateway

    monkeypatch.setattr(wsgateway, "_HEARTBEAT_IDLE", 0.4)
    bridge = setup.add_bridge()
    client = remoterl.Client(gateway_endpoint(bridge.url)).connect()
    wait_for(lambda: bridge.open_connections == 2, what="the main and heartbeat connections")
    client.close()
    # The main connection closes after its DISCONNECT; the heartbeat one once idle.
    wait_for(lambda: bridge.open_connections == 0, timeout=T / 5, what="both connections closed")
