"""Tests for remoterl.broker.core against hostile peers: malformed messages never crash it or
leave state, and one peer's cost is bounded (calls in flight, strings, headers, stats,
undeliverable messages, tenants' counters). Plain ``bytes`` frames and a fake clock."""

from __future__ import annotations

import random

import pytest

from remoterl.wire import protocol as p
from remoterl.broker import services
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W
from broker_core_helpers import (
    ENV, W1, W2, C1, C2, Harness,
    assert_error, call, call_header, client_heartbeat, close_msg, hdr, header, hello,
    one, open_msg, ready, short, to, worker_heartbeat,
)
from broker_core_helpers import h as h  # the shared fixture: two workers, one client


class TestRobustness:
    """A peer can never crash the broker: 1000 malformed messages are counted and answered,
    leave every table as it was, and a normal OPEN/CALL works afterwards."""

    MAX = 4096  # max_message_size for these tests

    @pytest.fixture
    def h(self) -> Harness:
        harness = Harness(max_message_size=self.MAX)
        harness.add_worker(W1)
        harness.add_worker(W2)
        harness.add_client(C1)
        harness.slots = harness.open_ok(C1, 3)
        return harness

    BAD_OPEN = [
        {"r": 1, "env": ENV, "n": "x"},
        {"r": 1, "env": ENV, "n": 0},
        {"r": 1, "env": ENV, "n": -3},
        {"r": 1, "env": ENV, "n": True},
        {"r": 1, "env": ENV, "n": 1.5},
        {"r": 1, "env": 5, "n": 1},
        {"r": 1, "env": "", "n": 1},
        {"r": 1, "n": 1},
        {"r": 1, "env": ENV, "n": 1, "kwargs": [1, 2]},
        {"r": 1, "env": ENV, "n": 1, "kwargs": "x"},
        {"r": 1, "env": ENV, "n": 1, "max_workers": 0},
        {"r": 1, "env": ENV, "n": 1, "max_workers": "2"},
    ]
    # Commands whose header the broker reads (DISCONNECT reads none, CALL/REPLY are forwarded).
    CLIENT_HEADER_COMMANDS = [C.HELLO, C.OPEN, C.CLOSE, C.HEARTBEAT]
    WORKER_HEADER_COMMANDS = [W.READY, W.HEARTBEAT]
    # Commands a peer never sends to the broker.
    NOT_TO_BROKER = ([p.client_frame(c) for c in (C.WELCOME, C.OPENED, C.CLOSED, C.ERROR, C.WORKER_LOST, C.REPLY)]
                     + [p.worker_frame(c) for c in (W.WELCOME, W.OPEN, W.CLOSE, W.CALL)]
                     + [b"RLC1\x00", b"RLC1\x0b", b"RLC1\xff", b"RLW1\x06", b"RLW1\x12", b"RLW1\x00"])

    def malformed(self, rng: random.Random, known_client: bytes, known_worker: bytes) -> tuple[bytes, list]:
        """One (sender, frames) that the broker must refuse, chosen at random."""
        stranger = b"x-" + rng.randbytes(4)
        sender = rng.choice([stranger, known_client, known_worker])
        good_header = hdr(r=rng.randrange(100), env=ENV, n=1, slots=[1], envs=[ENV], capacity=1, id=known_client)
        kind = rng.randrange(11)
        if kind == 0:  # random frames and bytes
            frames = [rng.randbytes(rng.randrange(0, 30)) for _ in range(rng.randrange(0, 6))]
            if frames and frames[0][:3] in (b"RLC", b"RLW", b"MDP"):
                frames[0] = b"?" + frames[0]
            return stranger, frames
        if kind == 1:  # truncated headers
            command = rng.choice([*(p.client_frame(c) for c in self.CLIENT_HEADER_COMMANDS),
                                  *(p.worker_frame(c) for c in self.WORKER_HEADER_COMMANDS)])
            return sender, [command, good_header[: rng.randrange(len(good_header))]]
        if kind == 2:  # wrong protocol versions, valid headers
            frame0 = rng.choice([b"RLC9\x03", b"RLC2\x01", b"RLW2\x01", b"RLC0\x10", b"RLW9\x11", b"RLC1",
                                 b"RLW1", b"RLC1\x03\x00", b"RLC", b"RLCX\x01"])
            return sender, [frame0, good_header, *[rng.randbytes(8) for _ in range(rng.randrange(3))]]
        if kind == 3:  # valid signatures, garbage headers (0xc1 is never valid msgpack)
            command = rng.choice([*(p.client_frame(c) for c in self.CLIENT_HEADER_COMMANDS),
                                  *(p.worker_frame(c) for c in self.WORKER_HEADER_COMMANDS)])
            garbage = rng.choice([b"\xc1" + rng.randbytes(rng.randrange(10)), b"",
                                  p.encode_header({}) + b"\x00", b"\x93\x01\x02\x03", b"\xa3abc", b"\x05"])
            frames = [command, garbage] if rng.random() < 0.8 else [command]
            return sender, frames
        if kind == 4:  # OPEN with wrong types
            fields = dict(rng.choice(self.BAD_OPEN), r=rng.randrange(100))
            return rng.choice([stranger, known_client]), [p.client_frame(C.OPEN), p.encode_header(fields)]
        if kind == 5:  # CALL / REPLY with too few frames
            if rng.random() < 0.5:
                return rng.choice([stranger, known_client]), [p.client_frame(C.CALL), known_worker][: rng.randrange(1, 3)]
            return known_worker, [p.worker_frame(W.REPLY), known_client][: rng.randrange(1, 3)]
        if kind == 6:  # oversized control messages
            command = rng.choice([p.client_frame(C.HELLO), p.client_frame(C.OPEN), p.worker_frame(W.READY),
                                  p.worker_frame(W.HEARTBEAT), b"MDPC02", b"junk"])
            big = [rng.randbytes(self.MAX // 2) for _ in range(3)]
            return sender, [command, good_header, *big]
        if kind == 7:  # commands that only the broker sends
            return sender, [rng.choice(self.NOT_TO_BROKER), good_header]
        if kind == 8:  # well-formed types, wrong values (CLOSE without a list, HEARTBEAT id not bytes)
            return sender if sender != known_worker else stranger, rng.choice([
                [p.client_frame(C.CLOSE), hdr(r=2, slots="all")],
                [p.client_frame(C.CLOSE), hdr(r=2)],
                [p.client_frame(C.HEARTBEAT), hdr(id=5)],
                [p.worker_frame(W.HEARTBEAT), hdr(id="w1")],
                [p.worker_frame(W.OPENED), known_client, hdr(r=12345, slots=[1])],
            ])
        if kind == 9:  # CALL from a stranger, or to a worker the client has no slot on
            if rng.random() < 0.5:
                return stranger, call(known_worker, rng.randrange(100), rng.randbytes(rng.randrange(self.MAX * 2)))
            return known_client, call(b"not-a-worker", rng.randrange(100))
        # kind 10: broken Majordomo messages
        return stranger, rng.choice([
            [b"MDPC02"], [b"MDPC02", b"\x01"], [b"MDPC02", b"\x02", b"echo"], [b"", b"MDPC01"],
            [b"MDPW02"], [b"MDPW02", b"\x09"], [b"MDPW02", b"\x01"], [b"MDPW02", b"\x02", C1, b"", b"x"],
            [b"", b"MDPW01", b"\x06"], [b"MDPW02", b"\x04", C1], [b"", b"junk"], [b""], [],
        ])

    def test_malformed_messages_never_crash_or_leave_state(self, h):
        rng = random.Random(1234)
        before = h.snapshot()
        counters = h.core.counters
        bad_counters = ("malformed", "refused", "calls_refused", "unknown_worker_messages")
        seen_kinds = set()
        for i in range(1000):
            sender, frames = self.malformed(rng, C1, W1)
            total = sum(counters[k] for k in bad_counters)
            out = h.send(sender, frames, now=1.0 + i * 1e-4)  # must not raise
            assert sum(counters[k] for k in bad_counters) == total + 1, (i, sender, short([frames]))
            for message in out:  # answers go to the sender only: no worker hears of it
                assert message[0] == sender, (i, short([frames]), short([message]))
            if frames and p.as_bytes(frames[0])[:3] == b"RLC":
                error = header(one(out, sender, p.client_frame(C.ERROR)))
                assert isinstance(error["code"], str) and error["msg"], error
                seen_kinds.add(error["code"])
            assert h.snapshot() == before, (i, sender, short([frames]))
        assert {"protocol", "too_large", "worker_lost"} <= seen_kinds
        assert counters["malformed"] > 500 and counters["refused"] > 10

        # Business as usual afterwards.
        worker_id = h.slots[0][1]
        payload = bytearray(b"step")
        out = h.send(C1, call(worker_id, 77, payload))
        assert out == [[worker_id, b"RLW1\x10", C1, call_header(77), payload]] and out[0][4] is payload
        h.open_ok(C1, 2, r=78)
        assert len(h.core.slots) == 5

    def test_oversized_message_gets_too_large(self, h):
        big = b"\x00" * (self.MAX + 1)
        error = assert_error(h.send(C2, [p.client_frame(C.HELLO), hdr(r=3), big]), C2, "too_large", r=3)
        assert str(self.MAX) in error["msg"]
        assert C2 not in h.core.clients

    def test_oversized_call_gets_too_large(self, h):
        worker_id = h.slots[0][1]
        out = h.send(C1, call(worker_id, 3, b"\x00" * (self.MAX + 1)))
        assert_error(out, C1, "too_large", r=3)

    def test_internal_error_is_contained(self, h, monkeypatch):
        def boom(*args):
            raise RuntimeError("bug")

        monkeypatch.setitem(h.core._dispatch_client, C.HELLO, boom)
        error = assert_error(h.send(C2, hello()), C2, "protocol")
        assert "internal broker error" in error["msg"]
        assert h.core.counters["malformed"] == 1


class TestHostilePeers:
    """What one peer may cost the broker: bounded strings, calls in flight, undeliverable messages."""

    @pytest.fixture
    def slots(self, h) -> list:
        return h.open_ok(C1, 2, max_workers=1)

    def test_calls_in_flight_are_limited_per_client_and_worker(self):
        h = Harness(max_calls_in_flight=3)
        h.add_worker(W1)
        h.add_client(C1)
        h.add_client(C2)
        h.open_ok(C1, 1)
        h.open_ok(C2, 1, r=2)
        for r in range(3):
            assert to(h.send(C1, call(W1, r)), W1)
        error = assert_error(h.send(C1, call(W1, 3)), C1, "limit", r=3)
        assert "in flight" in error["msg"]
        # Another client's calls to the same worker still go through: the limit is per client.
        assert to(h.send(C2, call(W1, 7)), W1)
        # A reply frees one place.
        h.send(W1, [p.worker_frame(W.REPLY), C1, call_header(0)])
        assert to(h.send(C1, call(W1, 4)), W1)
        assert h.core.counters["calls_limited"] == 1

    def test_closing_the_last_slot_on_a_worker_forgets_its_calls(self, h, slots):
        worker_id = slots[0][1]
        h.send(C1, call(worker_id, 1))
        assert h.core.clients[C1].inflight == {worker_id: 1}
        h.send(C1, close_msg(2, [s for s, _ in slots]))
        assert h.core.clients[C1].inflight == {}

    def test_call_a_worker_cannot_take_gets_a_limit_error(self, h, slots):
        worker_id = slots[0][1]
        out = h.send(C1, call(worker_id, 9))
        h.core.undeliverable(out[0], full=True)
        assert_error(h.out(), C1, "limit", r=9)
        assert h.core.clients[C1].inflight == {} and worker_id in h.core.workers

    def test_call_to_an_unreachable_worker_purges_it(self, h, slots):
        worker_id = slots[0][1]
        out = h.send(C1, call(worker_id, 9))
        h.core.undeliverable(out[0], full=False)
        out = h.out()
        assert_error(out, C1, "worker_lost", r=9)
        one(out, C1, p.client_frame(C.WORKER_LOST))
        assert worker_id not in h.core.workers

    def test_message_for_a_gone_client_is_counted(self, h):
        h.core.undeliverable([C1, p.client_frame(C.HEARTBEAT), hdr()], full=False)
        assert h.out() == [] and h.core.counters["undeliverable"] == 1 and C1 in h.core.clients

    @pytest.mark.parametrize("field, value", [
        ("name", "n" * (p.MAX_NAME + 1)), ("host", "h" * (p.MAX_NAME + 1)), ("name", 5), ("pid", "12"),
        ("pid", -1),
    ])
    def test_hello_and_ready_strings_are_bounded(self, field, value):
        h = Harness()
        assert_error(h.send(C1, [p.client_frame(C.HELLO), hdr(v=1, r=4, **{field: value})]), C1, "protocol", r=4)
        out = h.send(W1, ready(**{field: value}))
        one(out, W1, p.worker_frame(W.ERROR))
        assert h.core.table_sizes() == dict.fromkeys(h.core.table_sizes(), 0)

    def test_control_headers_are_bounded(self, h):
        big = {"pad": "x" * p.MAX_CONTROL_HEADER}
        error = assert_error(h.send(C2, [p.client_frame(C.HELLO), hdr(v=1, **big)]), C2, "too_large")
        assert str(p.MAX_CONTROL_HEADER) in error["msg"] and C2 not in h.core.clients
        assert_error(h.send(C1, open_msg(5, 1, opts=big)), C1, "too_large")
        assert_error(h.send(C1, open_msg(6, 1, env="E" * (p.MAX_NAME + 1))), C1, "protocol", r=6)
        assert h.core.slots == {}

    def test_worker_stats_keep_known_numbers_only(self, h):
        stats = {"steps": 5, "junk": "x" * 1000, "errors": "many", "k" * 33: 1, **{f"n{i}": i for i in range(40)}}
        h.send(W1, worker_heartbeat(W1, stats=stats))
        kept = h.core.workers[W1].stats
        assert kept["steps"] == 5 and len(kept) == 16 and all(type(v) is int for v in kept.values())

    def test_refused_frames_are_answered_and_counted(self, h):
        h.core.refuse_frames(C1, [p.client_frame(C.CALL), W1, call_header(12)], 3_000_000, 1.5)
        error = assert_error(h.out(), C1, "too_large", r=12)
        assert "3000000 frames" in error["msg"] and h.core.counters["too_many_frames"] == 1

    def test_excused_silence_does_not_expire_peers(self, h):
        h.send(b"side", client_heartbeat(C1))
        out = h.core.excuse(10.0) or h.out()  # the loop was deaf for 10 s
        # The client's heartbeat socket hears from the broker meanwhile; workers that never
        # sent a heartbeat have no such socket yet.
        pong = one(out, b"side", p.client_frame(C.HEARTBEAT))
        assert header(pong) == {"broker": "broker-test", "known": True, "id": C1} and len(out) == 1
        h.tick(5.0)
        assert set(h.core.workers) == {W1, W2} and C1 in h.core.clients
        h.tick(14.0)
        assert h.core.workers == {}

    def test_status_in_key_mode_shows_only_the_tenants_own_counters(self):
        h = Harness(api_keys={"ka": "a", "kb": "b"})
        h.add_worker(W1, key="ka")
        h.add_worker(W2, key="kb")
        h.tick(0.3)
        h.tick(10.0)  # both expire
        mine = services.status(h.core, "a")
        assert mine["counters"] == {"workers_expired": 1} and "tables" not in mine
        assert services.status(h.core)["counters"]["workers_expired"] == 2
