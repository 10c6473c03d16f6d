"""Majordomo peers through the broker as a real process: RFC 18 / RFC 7 clients and an RFC 18
worker, many asynchronous requests, and a fresh client after a flood of vanished peers.

Each test starts its own broker on a free port with fast heartbeats
(``HEARTBEAT`` × ``LIVENESS`` seconds of silence declares a peer dead).
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import zmq

from conftest import T, start_broker, status, wait_for
from broker_loop_helpers import WINDOW, _raw_dealer


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
