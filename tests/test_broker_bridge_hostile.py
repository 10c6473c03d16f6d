"""``remoterl.broker.bridge``: malformed and hostile WebSocket peers. A bad message closes that
connection only, and the broker's limits (message size, frames, names, calls in flight) hold
on this path too.

The broker runs in this process (a thread) with an extra ``inproc://`` endpoint; a
:class:`WsBridge` serves WebSocket peers on 127.0.0.1 through it. One broker, one bridge
and one tcp:// worker process serve the module (``setup``, from broker_bridge_helpers.py);
tests that need other settings start their own bridge on the same broker, and each test
leaves no slot open.
"""

from __future__ import annotations

import msgpack
import numpy as np
from conftest import T, status
from websockets.sync.client import connect as ws_connect

import remoterl
from remoterl.wire import wsframes as _wsframes
from remoterl.io.wsgateway import gateway_endpoint
from broker_bridge_helpers import hello, recv_until_closed, run_cartpole
from broker_bridge_helpers import clients as clients, setup as setup  # the shared fixtures: the module's broker


# --- (f) malformed messages ---------------------------------------------------------------------------------

MALFORMED = [
    ("a text message", 1003),
    (b"\x05\x00\x00", 1007),  # a truncated length prefix
    (b"\x10\x00\x00\x00RLC1\x01", 1007),  # a frame running past the end
    (b"", 1007),  # no frame at all
]


def test_malformed_messages_close_that_connection_only(setup, clients):
    with ws_connect(setup.ws_url, compression=None) as bystander:
        bystander.send(hello())
        assert _wsframes.unpack(bystander.recv(timeout=T))[0] == b"RLC1\x02"
        for message, code in MALFORMED:
            with ws_connect(setup.ws_url, compression=None) as bad:
                bad.send(hello())
                bad.recv(timeout=T)
                bad.send(message)
                close = recv_until_closed(bad)
                assert close is not None and close.code == code, (message, close)
                assert close.reason.startswith("remoterl: ")
            # The other connection and the bridge keep serving.
            bystander.send(_wsframes.pack([b"RLC1\x07", msgpack.packb({})]))
            assert _wsframes.unpack(bystander.recv(timeout=T))[0] == b"RLC1\x07"
    assert setup.bridge.counters["closed_malformed"] >= len(MALFORMED)
    run_cartpole(clients(gateway_endpoint(setup.ws_url)), steps=5)


def test_oversized_message_is_refused_with_1009(setup):
    bridge = setup.add_bridge(max_message_size=1024)
    with ws_connect(bridge.url, compression=None, max_size=None) as ws:
        ws.send(_wsframes.pack([b"RLC1\x01", b"\x00" * (2 * 1024 * 1024)]))
        close = recv_until_closed(ws)
    assert close is not None and close.code == 1009


# --- (g) hostile peers over WebSocket: the broker's limits hold on this path too ---------------------------


def test_too_many_frames_close_that_connection(setup, clients):
    frames = [b"RLC1\x10"] + [b""] * remoterl.wire.protocol.MAX_FRAMES
    with ws_connect(setup.ws_url, compression=None) as bad:
        bad.send(hello())
        bad.recv(timeout=T)
        bad.send(_wsframes.pack(frames))
        close = recv_until_closed(bad)
    assert close is not None and close.code == 1007 and "frames" in close.reason
    run_cartpole(clients(gateway_endpoint(setup.ws_url)), steps=5)


def test_long_names_and_headers_are_refused(setup):
    with ws_connect(setup.ws_url, compression=None, max_size=None) as ws:
        for fields, code in [({"name": "n" * 40_000_000}, "too_large"),
                             ({"name": "n" * (remoterl.wire.protocol.MAX_NAME + 1)}, "protocol")]:
            ws.send(_wsframes.pack([b"RLC1\x01", msgpack.packb({"v": 1, "r": 3, **fields})]))
            reply = _wsframes.unpack(ws.recv(timeout=T))
            assert bytes(reply[0]) == b"RLC1\x09", reply[0]
            assert msgpack.unpackb(reply[1])["code"] == code
    assert not any(c.get("name", "").startswith("nnn") for c in status(setup.tcp_url)["clients"])


def test_call_flood_over_websocket_is_answered(setup, clients):
    """Calls beyond the in-flight limit get a typed error each; a tcp trainer carries on."""
    flooder = clients(gateway_endpoint(setup.ws_url))
    opened = flooder.open("CartPole-v1", n=1)
    worker, slots = opened.workers[0], opened.slots
    flooder.wait([flooder.send_call(worker, slots, {"op": "reset", "seeds": [0]})], T)
    flood = [flooder.send_call(worker, slots, {"op": "step", "a": np.zeros(1, np.int64), "m": 0})
             for _ in range(1000)]
    run_cartpole(clients(setup.tcp_url), steps=20)
    limited = 0
    for entry in flood:
        try:
            flooder.wait([entry], T)
        except remoterl.LimitExceededError:
            limited += 1
    assert 0 < limited < len(flood)
    flooder.close_slots(slots)
