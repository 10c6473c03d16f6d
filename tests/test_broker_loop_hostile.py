"""The broker as a real process against hostile peers: a flood of malformed messages, a frame
count bomb and a call flood leave it serving everyone else.

Each test starts its own broker on a free port with fast heartbeats
(``HEARTBEAT`` × ``LIVENESS`` seconds of silence declares a peer dead).
"""

from __future__ import annotations

import random

import numpy as np
import zmq

from conftest import T, start_broker, start_worker, status, wait_for
from remoterl import Client, LimitExceededError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from broker_loop_helpers import _raw_dealer, group, reset_all, step_all
from broker_loop_helpers import two_workers as two_workers  # the shared fixture: a broker and two workers


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
