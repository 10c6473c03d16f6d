"""Tests for remoterl.broker.core's placement: OPEN puts slots on the least-loaded workers, all
or nothing, and explains refusals (no worker, capacity, timeouts, workers lost while opening).
The broker state machine is fed plain ``bytes`` frames and a fake clock; no sockets, no sleeps."""

from __future__ import annotations

import pytest

from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W
from broker_core_helpers import ENV, W1, W2, W3, C1, ENV_DESC, Harness, assert_error, header, one, open_msg, opened, to
from broker_core_helpers import h as h  # the shared fixture: two workers, one client


class TestOpen:
    """OPEN places slots on the least-loaded workers, all or nothing, and explains refusals."""

    def test_open_spreads_slots_over_both_workers(self, h):
        out = h.send(C1, open_msg(r=7, n=4))
        requests = h.open_requests(out)
        assert set(requests) == {W1, W2}
        for message in out:
            assert message[2] == C1  # the worker learns which client owns the slots
        assert [len(req["slots"]) for req in requests.values()] == [2, 2]
        for req in requests.values():
            assert (req["env"], req["kwargs"]) == (ENV, {})
        # Nothing reaches the client before every worker answered.
        assert h.send(W1, opened(C1, requests[W1]["r"], requests[W1]["slots"])) == []
        out = h.send(W2, opened(C1, requests[W2]["r"], requests[W2]["slots"]))
        reply = header(one(out, C1, p.client_frame(C.OPENED)))
        assert reply["r"] == 7 and reply["env"] == ENV_DESC
        owner = {s: w for w, req in requests.items() for s in req["slots"]}
        assert reply["slots"] == [[s, owner[s]] for s in sorted(owner)]
        assert h.core.table_sizes()["slots"] == 4 and h.core.pending_opens == {}
        assert all(slot.open for slot in h.core.slots.values())

    def test_open_prefers_the_least_loaded_worker(self, h):
        first = h.open_ok(C1, 3, max_workers=1)
        [busy] = {w for _, w in first}
        idle = W2 if busy == W1 else W1
        second = h.open_ok(C1, 2, r=2)
        assert [w for _, w in second] == [idle, idle]

    def test_max_workers_one_keeps_slots_on_one_worker(self, h):
        out = h.send(C1, open_msg(r=1, n=4, max_workers=1))
        requests = h.open_requests(out)
        assert len(requests) == 1 and len(next(iter(requests.values()))["slots"]) == 4

    def test_max_workers_one_over_one_workers_capacity(self, h):
        out = h.send(C1, open_msg(r=1, n=5, max_workers=1))
        assert_error(out, C1, "capacity", r=1)
        h.assert_empty_slots()

    def test_open_unserved_env_lists_what_is_served(self, h):
        h.add_worker(W3, envs=["Pendulum-v1"])
        out = h.send(C1, open_msg(r=3, n=1, env="Acrobot-v1"))
        error = assert_error(out, C1, "no_worker", r=3)
        assert "Acrobot-v1" in error["msg"]
        assert ENV in error["msg"] and "Pendulum-v1" in error["msg"]
        assert "remoterl-worker" in error["msg"]
        assert h.core.counters["refused"] == 1 and h.core.counters["malformed"] == 0
        h.assert_empty_slots()

    def test_open_with_no_worker_at_all(self):
        h = Harness()
        h.add_client(C1)
        error = assert_error(h.send(C1, open_msg(r=1, n=1)), C1, "no_worker", r=1)
        assert "remoterl-worker" in error["msg"]

    def test_open_more_than_free_capacity(self, h):
        error = assert_error(h.send(C1, open_msg(r=4, n=9)), C1, "capacity", r=4)
        assert "remoterl-worker" in error["msg"]
        h.open_ok(C1, 6, r=5)
        assert_error(h.send(C1, open_msg(r=6, n=3)), C1, "capacity", r=6)
        assert len(h.core.slots) == 6

    @pytest.mark.parametrize("error_first", [True, False], ids=["error-first", "error-last"])
    def test_open_is_all_or_nothing(self, h, error_first):
        requests = h.open_requests(h.send(C1, open_msg(r=8, n=4)))
        failure = {"code": "env", "msg": "could not make CartPole-v1: boom", "type": "RuntimeError"}
        replies = [(W1, opened(C1, requests[W1]["r"], requests[W1]["slots"], error=failure)),
                   (W2, opened(C1, requests[W2]["r"], requests[W2]["slots"]))]
        if not error_first:
            replies.reverse()
        assert h.send(*replies[0]) == []
        out = h.send(*replies[1])
        error = assert_error(out, C1, "env", r=8)
        assert error["msg"] == failure["msg"] and error["type"] == "RuntimeError"
        assert to(out, C1, p.client_frame(C.OPENED)) == []
        # The worker that succeeded closes what it created.
        close = one(out, W2, p.worker_frame(W.CLOSE))
        assert close[2] == C1 and sorted(header(close, 3)["slots"]) == sorted(requests[W2]["slots"])
        for message in to(out, W1, p.worker_frame(W.CLOSE)):  # harmless: only its own slots
            assert set(header(message, 3)["slots"]) <= set(requests[W1]["slots"])
        h.assert_empty_slots()
        assert h.core.table_sizes()["slots"] == 0

    def test_open_times_out(self):
        h = Harness(open_timeout=2.0)
        h.add_worker(W1)
        h.add_client(C1)
        requests = h.open_requests(h.send(C1, open_msg(r=1, n=2)))
        assert h.tick(1.9) == []
        out = h.tick(2.0 + 0.25)  # noticed at the first sweep after the deadline
        assert_error(out, C1, "timeout", r=1)
        assert header(one(out, W1, p.worker_frame(W.CLOSE)), 3)["slots"] == requests[W1]["slots"]
        h.assert_empty_slots()

    def test_worker_lost_while_opening(self, h):
        requests = h.open_requests(h.send(C1, open_msg(r=2, n=4)))
        h.send(W2, opened(C1, requests[W2]["r"], requests[W2]["slots"]))
        out = h.send(W1, [p.worker_frame(W.DISCONNECT)])
        assert_error(out, C1, "worker_lost", r=2)
        assert header(one(out, W2, p.worker_frame(W.CLOSE)), 3)["slots"] == requests[W2]["slots"]
        assert to(out, C1, p.client_frame(C.WORKER_LOST)) == []  # the slots never opened
        h.assert_empty_slots()

    def test_opened_from_unknown_worker_gets_disconnect(self, h):
        assert h.send(W3, opened(C1, 1, [1])) == [[W3, p.worker_frame(W.DISCONNECT)]]

    def test_opened_for_unknown_request(self, h):
        assert h.send(W1, opened(C1, 99, [1])) == []
        assert h.core.counters["malformed"] == 1

    def test_opened_from_a_worker_not_asked(self, h):
        requests = h.open_requests(h.send(C1, open_msg(r=1, n=1)))
        [(asked, request)] = requests.items()
        other = W2 if asked == W1 else W1
        assert h.send(other, opened(C1, request["r"], [99])) == []
        assert h.core.counters["malformed"] == 1 and len(h.core.pending_opens) == 1

    def test_client_leaving_during_open(self, h):
        requests = h.open_requests(h.send(C1, open_msg(r=1, n=2, max_workers=1)))
        [(worker_id, request)] = requests.items()
        out = h.send(C1, [p.client_frame(C.DISCONNECT)])
        assert header(one(out, worker_id, p.worker_frame(W.CLOSE)), 3)["slots"] == request["slots"]
        assert h.send(worker_id, opened(C1, request["r"], request["slots"])) == []  # nobody to tell
        h.assert_empty_slots()
        assert h.core.clients == {}
