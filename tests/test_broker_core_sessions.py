"""Tests for remoterl.broker.core's sessions: CALL and REPLY passing through, heartbeats and
liveness, CLOSE and DISCONNECT freeing slots, and shutdown. The broker state machine is fed
plain ``bytes`` frames and a fake clock (floats chosen by each test); no sockets, no sleeps."""

from __future__ import annotations

import pytest

from remoterl.wire import protocol as p
from remoterl.broker import services
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W
from broker_core_helpers import (
    ENV, W1, W2, W3, C1, C2, Harness,
    assert_error, call, call_header, client_heartbeat, close_msg, hdr, header, one, ready, to, worker_heartbeat,
)
from broker_core_helpers import h as h  # the shared fixture: two workers, one client


class TestCall:
    """CALL and REPLY pass through: frame 0 and the routing frame change, payloads stay the same objects."""

    @pytest.fixture
    def slots(self, h) -> list:
        return h.open_ok(C1, 4)

    def test_call_is_forwarded_untouched(self, h, slots):
        head = call_header(5)
        payload = [bytearray(b"actions" * 100), memoryview(b"more")]
        out = h.send(C1, [p.client_frame(C.CALL), W1, head, *payload])
        assert out == [[W1, b"RLW1\x10", C1, head, *payload]]
        assert out[0][3] is head
        assert out[0][4] is payload[0] and out[0][5] is payload[1]

    def test_call_counts_one_per_message(self, h, slots):
        for i in range(3):
            h.send(C1, call(W1, i, b"x", b"y"))
        h.send(C1, call(W2, 9))
        assert (h.core.workers[W1].calls, h.core.workers[W2].calls) == (3, 1)
        assert {w["id"]: w["calls"] for w in services.status(h.core)["workers"]} == {W1.hex(): 3, W2.hex(): 1}

    def test_reply_is_forwarded_untouched(self, h, slots):
        head = call_header(5)
        payload = [bytearray(b"obs" * 1000), b"rewards"]
        out = h.send(W1, [p.worker_frame(W.REPLY), C1, head, *payload])
        assert out == [[C1, b"RLC1\x11", head, *payload]]
        assert out[0][2] is head and out[0][3] is payload[0]

    def test_reply_to_a_client_without_slots_there_is_dropped(self, h, slots):
        h.add_client(C2)
        assert h.send(W1, [p.worker_frame(W.REPLY), C2, call_header(1)]) == []
        assert h.send(W1, [p.worker_frame(W.REPLY), b"nobody", call_header(1)]) == []
        assert h.core.counters["replies_dropped"] == 2

    def test_reply_without_header_is_malformed(self, h, slots):
        assert h.send(W1, [p.worker_frame(W.REPLY), C1]) == []
        assert h.core.counters["malformed"] == 1

    def test_reply_from_unknown_worker_gets_disconnect(self, h):
        assert h.send(W3, [p.worker_frame(W.REPLY), C1, call_header(1)]) == [[W3, p.worker_frame(W.DISCONNECT)]]

    def test_call_to_worker_without_my_slots(self, h, slots):
        h.add_worker(W3)
        assert_error(h.send(C1, call(W3, 5)), C1, "protocol", r=5)
        assert h.core.workers[W3].calls == 0

    def test_call_to_unknown_worker(self, h, slots):
        error = assert_error(h.send(C1, call(b"gone", 6)), C1, "worker_lost", r=6)
        assert b"gone".hex() in error["msg"]

    def test_call_from_unknown_client(self, h, slots):
        out = h.send(C2, call(W1, 5, b"payload"))
        error = assert_error(out, C2, "worker_lost", r=5)
        assert "unknown" in error["msg"]
        assert h.core.workers[W1].calls == 0 and h.core.counters["calls_refused"] == 1

    def test_call_from_other_client_holding_no_slot_there(self, h, slots):
        h.add_client(C2)
        assert_error(h.send(C2, call(W1, 3)), C2, "protocol", r=3)
        assert to(h.out(), W1) == []

    def test_refused_call_with_undecodable_header(self, h):
        assert_error(h.send(C2, [p.client_frame(C.CALL), W1, b"\xc1junk"]), C2, "worker_lost", r=None)

    @pytest.mark.parametrize("frames", [[p.client_frame(C.CALL)], [p.client_frame(C.CALL), W1]])
    def test_call_with_too_few_frames(self, h, slots, frames):
        assert_error(h.send(C1, frames), C1, "protocol", r=None)
        assert h.core.workers[W1].calls == 0 and h.core.counters["malformed"] == 1


class TestLiveness:
    """heartbeat=1, liveness=3: a peer silent for 3 s is purged at the next sweep (every 0.25 s)."""

    @pytest.fixture
    def h(self) -> Harness:
        harness = Harness(heartbeat=1.0, liveness=3)
        harness.add_worker(W1)
        harness.add_worker(W2)
        harness.add_client(C1)
        return harness

    def test_next_deadline(self, h):
        assert h.core.next_deadline() == 0.25
        h.tick(0.25)
        assert h.core.next_deadline() == 0.5

    def test_silent_worker_is_purged_and_clients_told(self, h):
        slots = h.open_ok(C1, 4)
        lost = sorted(s for s, w in slots if w == W1)
        t = 0.0
        while t < 3.0:  # W1 stays silent; W2 and the client's side socket keep heartbeating
            t += 0.25
            if t % 1.0 == 0:
                h.send(b"hb-w2", worker_heartbeat(W2), now=t)
                h.send(b"hb-c1", client_heartbeat(C1), now=t)
            assert to(h.tick(t), C1) == [], t
        assert W1 in h.core.workers
        out = h.tick(3.0 + 0.25 + 0.001)
        assert W1 not in h.core.workers and W2 in h.core.workers
        notice = header(one(out, C1, p.client_frame(C.WORKER_LOST)))
        assert notice["worker"] == W1 and sorted(notice["slots"]) == lost
        assert W1.hex() in notice["msg"] and "missed its heartbeats" in notice["msg"]
        assert to(out, W1) == []
        assert sorted(h.core.clients[C1].slots) == sorted(s for s, w in slots if w == W2)
        assert ENV in h.core.env_index and h.core.counters["workers_expired"] == 1

    def test_side_heartbeat_refreshes_worker(self, h):
        out = h.send(b"w1-side", worker_heartbeat(W1, stats={"steps": 10}), now=2.0)
        assert len(out) == 1
        reply = header(one(out, b"w1-side", p.worker_frame(W.HEARTBEAT)))
        assert reply == {"broker": "broker-test", "known": True, "id": W1}
        h.send(b"w2-side", worker_heartbeat(W2), now=2.0)
        h.tick(3.5)
        assert set(h.core.workers) == {W1, W2}
        assert h.core.workers[W1].stats == {"steps": 10}
        h.tick(5.3)  # 2.0 + 3 + one sweep
        assert h.core.workers == {}

    def test_heartbeat_for_unknown_id(self, h):
        before = h.snapshot()
        out = h.send(b"side", worker_heartbeat(b"nobody"))
        assert header(one(out, b"side", p.worker_frame(W.HEARTBEAT))) == {
            "broker": "broker-test", "known": False, "id": b"nobody"}
        out = h.send(b"side2", client_heartbeat(b"nobody"))
        assert header(one(out, b"side2", p.client_frame(C.HEARTBEAT)))["known"] is False
        assert h.snapshot() == before

    def test_heartbeat_without_id_names_the_sender(self, h):
        out = h.send(C1, [p.client_frame(C.HEARTBEAT), hdr()])
        assert header(one(out, C1, p.client_frame(C.HEARTBEAT))) == {"broker": "broker-test", "known": True, "id": C1}

    def test_silent_client_slots_are_closed(self, h):
        slots = h.open_ok(C1, 4)
        for t in (1.0, 2.0, 3.0):
            for worker_id in (W1, W2):
                h.send(worker_id, worker_heartbeat(worker_id), now=t)
            h.tick(t)
        out = h.tick(3.3)
        assert C1 not in h.core.clients
        for worker_id in (W1, W2):
            close = one(out, worker_id, p.worker_frame(W.CLOSE))
            assert close[2] == C1
            assert sorted(header(close, 3)["slots"]) == sorted(s for s, w in slots if w == worker_id)
        h.assert_empty_slots()
        assert h.core.counters["clients_expired"] == 1
        h.add_client(C2)
        h.open_ok(C2, 8)  # capacity is back

    def test_heartbeating_client_keeps_slots_for_ten_windows(self, h):
        slots = h.open_ok(C1, 4)
        before = h.snapshot()
        t, end = 0.0, 10 * 3.0
        while t < end:
            t += 0.25
            if t % 1.0 == 0:
                h.send(b"hb-c1", client_heartbeat(C1), now=t)
                h.send(b"hb-w1", worker_heartbeat(W1), now=t)
                h.send(b"hb-w2", worker_heartbeat(W2), now=t)
            for message in h.tick(t):
                assert message[1] not in (p.worker_frame(W.CLOSE), p.client_frame(C.WORKER_LOST)), (t, message)
        assert h.snapshot() == before
        assert h.send(C1, call(slots[0][1], 1)) and h.core.workers[slots[0][1]].calls == 1

    def test_calls_keep_a_client_alive(self, h):
        slots = h.open_ok(C1, 2, max_workers=1)
        worker_id = slots[0][1]
        for t in (1.0, 2.0, 3.0, 4.0):
            h.send(C1, call(worker_id, 1), now=t)
            h.send(worker_id, worker_heartbeat(worker_id), now=t)
            h.tick(t)
        assert C1 in h.core.clients and len(h.core.clients[C1].slots) == 2


class TestCloseAndDisconnect:
    """CLOSE frees slots; DISCONNECT or a second READY purges a worker (WORKER_LOST)."""

    def test_close_frees_slots(self, h):
        slots = h.open_ok(C1, 4)
        mine = [s for s, w in slots if w == W1]
        out = h.send(C1, close_msg(9, [mine[0], 999, "x"]))
        assert header(one(out, C1, p.client_frame(C.CLOSED))) == {"r": 9, "closed": [mine[0]]}
        close = one(out, W1, p.worker_frame(W.CLOSE))
        assert close[2] == C1 and header(close, 3) == {"slots": [mine[0]]}
        assert to(out, W2) == []
        assert h.core.workers[W1].free == 3
        out = h.send(C1, close_msg(10, [s for s, _ in slots]))
        assert sorted(header(one(out, C1, p.client_frame(C.CLOSED)))["closed"]) == sorted(
            s for s, _ in slots if s != mine[0])
        h.assert_empty_slots()

    def test_close_of_another_clients_slots_is_ignored(self, h):
        slots = h.open_ok(C1, 2)
        h.add_client(C2)
        out = h.send(C2, close_msg(1, [s for s, _ in slots]))
        assert out == [[C2, p.client_frame(C.CLOSED), hdr(r=1, closed=[])]]
        assert len(h.core.clients[C1].slots) == 2

    def test_close_naming_a_slot_twice(self, h):
        """Regression: a duplicated slot id must be freed once, not decrement the per-worker counts twice."""
        slots = h.open_ok(C1, 2, max_workers=1)
        worker_id = slots[0][1]
        keep, drop = slots[1][0], slots[0][0]
        h.send(C1, close_msg(1, [drop, drop]))
        assert h.core.clients[C1].slots == {keep}
        assert dict(h.core.clients[C1].workers) == {worker_id: 1}
        assert dict(h.core.workers[worker_id].clients) == {C1: 1}
        # The client still holds `keep` on that worker, so its CALLs must still go through.
        assert h.send(C1, call(worker_id, 2)) == [[worker_id, b"RLW1\x10", C1, call_header(2)]]

    def test_client_disconnect_closes_its_slots(self, h):
        h.open_ok(C1, 4)
        out = h.send(C1, [p.client_frame(C.DISCONNECT)])
        assert {m[0] for m in to(out, W1) + to(out, W2)} == {W1, W2}
        assert C1 not in h.core.clients
        h.assert_empty_slots()

    def test_worker_disconnect_purges_it(self, h):
        slots = h.open_ok(C1, 4)
        out = h.send(W1, [p.worker_frame(W.DISCONNECT)])
        notice = header(one(out, C1, p.client_frame(C.WORKER_LOST)))
        assert notice["worker"] == W1 and sorted(notice["slots"]) == sorted(s for s, w in slots if w == W1)
        assert to(out, W1) == []
        assert W1 not in h.core.workers and h.core.env_index == {ENV: {W2}}
        assert_error(h.send(C1, call(W1, 4)), C1, "worker_lost", r=4)

    def test_last_worker_leaving_empties_the_env_index(self):
        h = Harness()
        h.add_worker(W1)
        h.send(W1, [p.worker_frame(W.DISCONNECT)])
        assert h.core.table_sizes() == dict.fromkeys(h.core.table_sizes(), 0)

    def test_second_ready_re_registers(self, h):
        slots = h.open_ok(C1, 4)
        out = h.send(W1, ready(envs=["Pendulum-v1"], capacity=2))
        assert header(one(out, W1, p.worker_frame(W.WELCOME)))["broker"] == "broker-test"
        worker = h.core.workers[W1]
        assert (worker.envs, worker.capacity, worker.slots) == (frozenset({"Pendulum-v1"}), 2, set())
        assert h.core.env_index == {ENV: {W2}, "Pendulum-v1": {W1}}
        assert sorted(h.core.clients[C1].slots) == sorted(s for s, w in slots if w == W2)

    def test_second_ready_tells_clients_their_slots_are_lost(self, h):
        slots = h.open_ok(C1, 4)
        out = h.send(W1, ready())
        one(out, W1, p.worker_frame(W.WELCOME))
        notice = header(one(out, C1, p.client_frame(C.WORKER_LOST)))
        assert notice["worker"] == W1 and sorted(notice["slots"]) == sorted(s for s, w in slots if w == W1)
        assert "re-registered" in notice["msg"]


class TestShutdown:
    """shutdown() tells every worker to leave and nobody else."""

    def test_shutdown_disconnects_every_worker(self, h):
        h.open_ok(C1, 2)
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        h.core.shutdown()
        out = h.out()
        assert sorted(out) == sorted([[W1, p.worker_frame(W.DISCONNECT)], [W2, p.worker_frame(W.DISCONNECT)],
                                      [b"m1", b"MDPW02", b"\x06"]])
