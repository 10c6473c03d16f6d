"""Tests for remoterl.broker.core's Majordomo side: MDP/0.2 (RFC 18), MDP/0.1 (RFC 7) and
majortomo's dialect routed through the same core, request queues, and MDP worker liveness.
The broker state machine is fed plain ``bytes`` frames and a fake clock; no sockets, no sleeps."""

from __future__ import annotations

import json

import pytest

from remoterl.wire import protocol as p
from remoterl.broker import services
from broker_core_helpers import W1, C1, C2, Harness, mdp_request, one, to, worker_heartbeat


class TestMajordomo:
    """MDP/0.2 (RFC 18) and MDP/0.1 (RFC 7) request/reply routing through the same core."""

    @pytest.fixture
    def h(self) -> Harness:
        harness = Harness(heartbeat=1.0, liveness=3)
        assert harness.send(b"m1", [b"MDPW02", b"\x01", b"echo"]) == []
        return harness

    def test_rfc18_round_trip(self, h):
        out = h.send(C1, [b"MDPC02", b"\x01", b"echo", b"hello"])
        assert out == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"hello"]]
        out = h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"hello"])
        assert out == [[C1, b"MDPC02", b"\x03", b"echo", b"hello"]]
        assert h.core.mdp_workers[b"m1"].calls == 1 and h.core.mdp_workers[b"m1"].current is None

    def test_body_frames_pass_through(self, h):
        body = [bytearray(b"a" * 100), memoryview(b"b")]
        [request] = h.send(C1, [b"MDPC02", b"\x01", b"echo", *body])
        assert request[5] is body[0] and request[6] is body[1]
        reply_body = bytearray(b"r" * 100)
        [reply] = h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", reply_body])
        assert reply[4] is reply_body

    def test_partial_then_final(self, h):
        h.send(C1, mdp_request(b"echo", b"q"))
        assert h.send(b"m1", [b"MDPW02", b"\x03", C1, b"", b"part"]) == [[C1, b"MDPC02", b"\x02", b"echo", b"part"]]
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"done"]) == [[C1, b"MDPC02", b"\x03", b"echo", b"done"]]

    def test_rfc7_client(self, h):
        out = h.send(C1, [b"", b"MDPC01", b"echo", b"x"])
        assert out == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"x"]]
        # MDP/0.1 has no PARTIAL: it is not forwarded; FINAL is, with RFC 7 framing.
        assert h.send(b"m1", [b"MDPW02", b"\x03", C1, b"", b"part"]) == []
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"X"]) == [[C1, b"", b"MDPC01", b"echo", b"X"]]

    def test_lenient_empty_prefixed_rfc18_client(self, h):
        h.send(C1, [b"", b"MDPC02", b"\x01", b"echo", b"x"])
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"y"]) == [[C1, b"", b"MDPC02", b"\x03", b"echo", b"y"]]

    def test_rfc7_worker(self):
        h = Harness()
        assert h.send(b"m0", [b"", b"MDPW01", b"\x01", b"echo"]) == []
        assert h.send(C1, mdp_request(b"echo", b"x")) == [[b"m0", b"", b"MDPW01", b"\x02", C1, b"", b"x"]]
        # RFC 7 REPLY is 0x03.
        assert h.send(b"m0", [b"", b"MDPW01", b"\x03", C1, b"", b"y"]) == [[C1, b"MDPC02", b"\x03", b"echo", b"y"]]
        assert h.tick(2.5) == [[b"m0", b"", b"MDPW01", b"\x04"]]
        h.core.shutdown()
        assert h.out() == [[b"m0", b"", b"MDPW01", b"\x05"]]

    def test_request_waits_for_a_worker(self):
        h = Harness()
        assert h.send(C1, mdp_request(b"echo", b"early"), now=0.5) == []
        assert h.core.table_sizes()["mdp_requests"] == 1
        assert h.send(b"m1", [b"MDPW02", b"\x01", b"echo"], now=0.7) == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"early"]]
        assert h.core.table_sizes()["mdp_requests"] == 0

    def test_requests_queue_behind_a_busy_worker(self, h):
        h.send(C1, mdp_request(b"echo", b"1"))
        assert h.send(C2, mdp_request(b"echo", b"2")) == []
        out = h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"1"])
        assert out == [[C1, b"MDPC02", b"\x03", b"echo", b"1"], [b"m1", b"MDPW02", b"\x02", C2, b"", b"2"]]

    def test_queued_request_expires(self):
        h = Harness(request_ttl=5.0)
        h.send(C1, mdp_request(b"echo", b"x"), now=0.0)
        h.tick(4.0)
        assert h.core.table_sizes()["mdp_requests"] == 1
        h.tick(5.5)
        assert h.core.table_sizes() == dict.fromkeys(h.core.table_sizes(), 0)
        assert h.core.counters["mdp_requests_expired"] == 1

    def test_request_queue_is_capped(self):
        h = Harness(max_queued_requests=3)
        for i in range(5):
            h.send(C1, mdp_request(b"svc%d" % i, b"x"))
        assert h.core.table_sizes()["mdp_requests"] == 3 and len(h.core.mdp_queue.services()) == 3
        assert h.core.counters["mdp_requests_dropped"] == 2
        listed = {s["name"]: s["queued"] for s in services.status(h.core)["services"]}
        assert listed == {"svc0": 1, "svc1": 1, "svc2": 1}
        assert services.status(h.core)["counters"]["mdp_requests_dropped"] == 2

    def test_request_queue_has_a_byte_budget_per_client(self):
        h = Harness(max_queued_bytes=1000, max_queued_bytes_per_client=600)
        h.send(C1, mdp_request(b"svc", b"x" * 500))
        h.send(C1, mdp_request(b"svc", b"x" * 200))  # over C1's share: dropped, nothing kept
        h.send(C2, mdp_request(b"svc", b"x" * 400))
        h.send(b"C3", mdp_request(b"svc", b"x" * 200))  # over the whole budget
        assert len(h.core.mdp_queue) == 2 and h.core.mdp_queue.bytes == 900
        assert h.core.counters["mdp_requests_dropped"] == 2

    def test_clients_take_turns(self):
        h = Harness()
        for i in range(100):
            h.send(C1, mdp_request(b"echo", b"flood%d" % i))
        h.send(C2, mdp_request(b"echo", b"mine"))
        out = h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        assert out == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"flood0"]]
        # The second client's request is next, not behind the other 99.
        out = h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"r"])
        assert to(out, b"m1") == [[b"m1", b"MDPW02", b"\x02", C2, b"", b"mine"]]

    def test_request_to_an_unreachable_worker_goes_to_the_next(self):
        h = Harness()
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        h.send(b"m2", [b"MDPW02", b"\x01", b"echo"])
        out = h.send(C1, mdp_request(b"echo", b"x"))
        assert out == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"x"]]
        h.core.undeliverable(out[0], full=False)  # m1 vanished
        assert h.out() == [[b"m2", b"MDPW02", b"\x02", C1, b"", b"x"]]
        assert b"m1" not in h.core.mdp_workers and h.core.counters["undeliverable"] == 1

    def test_long_service_names_are_refused(self, h):
        h.send(C1, mdp_request(b"s" * (p.MAX_NAME + 1), b"x"))
        assert len(h.core.mdp_queue) == 0 and h.core.counters["malformed"] == 1

    def test_tick_heartbeats_mdp_workers_at_the_mdp_interval(self, h):
        # remoterl's heartbeat is 1 s here; MDP workers get the RFC 7/18 peers' 2.5 s.
        assert (h.core.config.heartbeat, h.core.config.mdp_heartbeat) == (1.0, 2.5)
        sent = []
        for i in range(1, 41):  # 10 s in sweep-sized steps
            now = i * 0.25
            sent += [now for m in h.tick(now) if m == [b"m1", b"MDPW02", b"\x05"]]
            if i % 10 == 0:
                h.send(b"m1", [b"MDPW02", b"\x05"])  # the worker's own heartbeat: not answered
        assert sent == [2.5, 5.0, 7.5, 10.0]

    def test_silent_mdp_worker_is_disconnected(self, h):
        # Idle: mdp_heartbeat × mdp_liveness = 7.5 s of silence.
        for now in (2.5, 5.0, 7.5):
            assert h.tick(now) == [[b"m1", b"MDPW02", b"\x05"]]
        assert b"m1" in h.core.mdp_workers
        assert h.tick(7.75) == [[b"m1", b"MDPW02", b"\x06"]]
        assert h.core.mdp_workers == {} and h.core.mdp_services == {}
        assert h.core.counters["mdp_workers_expired"] == 1

    def test_mdp_liveness_is_configurable_apart_from_remoterl_peers(self):
        h = Harness(heartbeat=1.0, liveness=3, mdp_heartbeat=0.5, mdp_liveness=4)
        h.add_worker(W1)
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        assert h.core.next_deadline() == 0.125  # sweeps follow the shorter heartbeat
        assert h.tick(0.5) == [[b"m1", b"MDPW02", b"\x05"]]
        h.send(W1, worker_heartbeat(W1), now=1.9)
        h.tick(2.0)
        assert b"m1" in h.core.mdp_workers  # 2.0 s silent: not yet 0.5 × 4
        out = h.tick(2.125)
        assert [b"m1", b"MDPW02", b"\x06"] in out and b"m1" not in h.core.mdp_workers
        assert W1 in h.core.workers  # remoterl peers keep their 1 s × 3

    def test_idle_mdp_worker_heartbeating_every_2_5_s_survives_150_s(self, h):
        """zguide's mdwrkapi and majortomo's Worker heartbeat every 2.5 s (their default)."""
        out = []
        for i in range(1, 601):  # 150 s in sweep-sized steps
            now = i * 0.25
            if i % 10 == 0:
                h.send(b"m1", [b"MDPW02", b"\x05"], now=now)
            out += h.tick(now)
        assert [b"m1", b"MDPW02", b"\x06"] not in out
        assert out.count([b"m1", b"MDPW02", b"\x05"]) == 60  # the broker's heartbeats, every 2.5 s
        assert b"m1" in h.core.mdp_workers and "mdp_workers_expired" not in h.core.counters
        # ...and it still serves.
        assert h.send(C1, mdp_request(b"echo", b"x")) == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"x"]]

    @pytest.mark.parametrize("frames, reply", [
        ([b"MDPW02", b"\x04", C1, b"", b"x"], [b"MDPW02", b"\x06"]),
        ([b"MDPW02", b"\x05"], [b"MDPW02", b"\x06"]),
        ([b"", b"MDPW01", b"\x04"], [b"", b"MDPW01", b"\x05"]),
        ([b"", b"MDPW02", b"\x05"], [b"", b"MDPW02", b"\x06"]),
    ])
    def test_unknown_mdp_worker_gets_disconnect(self, h, frames, reply):
        before = h.snapshot()
        assert h.send(b"stranger", frames) == [[b"stranger", *reply]]
        assert h.snapshot() == before

    def test_unknown_mdp_worker_disconnect_gets_nothing(self, h):
        assert h.send(b"stranger", [b"MDPW02", b"\x06"]) == []

    def test_mdp_worker_disconnect(self, h):
        assert h.send(b"m1", [b"MDPW02", b"\x06"]) == []
        assert h.core.table_sizes() == dict.fromkeys(h.core.table_sizes(), 0)

    def test_final_for_a_request_not_given(self, h):
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"x"]) == []
        assert h.core.counters["malformed"] == 1
        h.send(C1, mdp_request(b"echo", b"q"))
        assert h.send(b"m1", [b"MDPW02", b"\x04", C2, b"", b"x"]) == []
        assert h.core.counters["malformed"] == 2 and h.core.mdp_workers[b"m1"].current is not None

    def test_second_mdp_ready_is_consistent(self, h):
        out = h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        told_to_leave = [b"m1", b"MDPW02", b"\x06"] in out
        assert told_to_leave == (b"m1" not in h.core.mdp_workers), out

    def test_mdp_ready_from_a_remoterl_worker_is_refused(self, h):
        h.add_worker(W1)
        before = h.snapshot()
        assert h.send(W1, [b"MDPW02", b"\x01", b"echo"]) == []
        assert h.snapshot() == before and h.core.counters["malformed"] == 1

    # --- busy workers: silence, request timeout, and what happens to the request ---------------

    HB = (b"MDPW02", b"\x05")
    BYE = (b"MDPW02", b"\x06")

    @pytest.mark.parametrize("work", [4.0, 60.0])
    def test_busy_silent_worker_keeps_its_request(self, h, work):
        """zguide's mdwrkapi sends nothing while it works: 4 s used to be past the old 3 s
        expiry, and 60 s is past the idle MDP one (7.5 s) too. The reply still arrives."""
        assert h.send(C1, mdp_request(b"echo", b"slow"), now=1.0) == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"slow"]]
        out = []
        for i in range(5, int((1.0 + work) * 4)):  # ticks every 0.25 s while the worker works
            out += h.tick(i * 0.25)
        assert [b"m1", *self.BYE] not in out and b"m1" in h.core.mdp_workers
        assert [b"m1", *self.HB] in out  # busy workers are heartbeaten too
        reply = h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"done"], now=1.0 + work)
        assert reply == [[C1, b"MDPC02", b"\x03", b"echo", b"done"]]
        assert h.core.mdp_workers[b"m1"].current is None and "mdp_requests_lost" not in h.core.counters

    def test_busy_worker_that_heartbeats_is_kept_past_the_request_timeout(self):
        h = Harness(mdp_request_timeout=20.0)
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        h.send(C1, mdp_request(b"echo", b"long"))
        for i in range(1, 41):  # 100 s, a heartbeat from the (multi-threaded) worker every 2.5 s
            h.send(b"m1", [*self.HB], now=i * 2.5)
            assert [b"m1", *self.BYE] not in h.tick(i * 2.5)
        assert h.core.mdp_workers[b"m1"].current is not None
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"r"]) == [[C1, b"MDPC02", b"\x03", b"echo", b"r"]]

    def test_busy_worker_silent_past_the_request_timeout_is_purged_and_its_request_dropped(self, h):
        h.send(b"m2", [b"MDPW02", b"\x01", b"echo"])
        h.send(C1, mdp_request(b"echo", b"x"), now=1.0)  # to m1 (first to be ready)
        for now in range(10, 300, 10):  # m2 is idle and heartbeats; m1 works in silence
            h.send(b"m2", [*self.HB], now=float(now))
            h.tick(float(now))
        h.send(b"m2", [*self.HB], now=300.5)
        assert [b"m1", *self.BYE] not in h.tick(300.5) and b"m1" in h.core.mdp_workers
        out = h.tick(301.25)  # 300.25 s since m1 was handed the request (mdp_request_timeout 300 s)
        assert out == [[b"m1", *self.BYE]]  # nothing to m2: a hung worker's request is not run again
        assert b"m1" not in h.core.mdp_workers and h.core.mdp_workers[b"m2"].current is None
        assert h.core.counters["mdp_requests_lost"] == 1 and h.core.counters["mdp_workers_expired"] == 1
        assert len(h.core.mdp_queue) == 0
        # A late FINAL from the purged worker reaches nobody; the worker is told to re-register.
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"late"]) == [[b"m1", *self.BYE]]

    def test_worker_leaving_while_busy_has_its_request_run_again_once(self, h):
        h.send(b"m2", [b"MDPW02", b"\x01", b"echo"])
        h.send(b"m3", [b"", b"MDPW01", b"\x01", b"echo"])
        assert h.send(C1, mdp_request(b"echo", b"q"), now=1.0) == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"q"]]
        # DISCONNECT while busy: no DISCONNECT back (RFC 7/18), the request goes to the next worker.
        assert h.send(b"m1", [*self.BYE], now=2.0) == [[b"m2", b"MDPW02", b"\x02", C1, b"", b"q"]]
        assert h.core.counters["mdp_requests_requeued"] == 1
        # The next one leaves too: the request is not run a third time (m3 stays idle).
        assert h.send(b"m2", [*self.BYE], now=3.0) == []
        assert h.core.counters["mdp_requests_lost"] == 1 and len(h.core.mdp_queue) == 0
        assert h.core.mdp_workers[b"m3"].current is None

    def test_request_older_than_its_ttl_is_not_run_again(self):
        h = Harness(request_ttl=5.0)
        for worker in (b"m1", b"m2"):
            h.send(worker, [b"MDPW02", b"\x01", b"echo"])
        h.send(C1, mdp_request(b"echo", b"q"), now=1.0)
        h.send(b"m1", [*self.HB], now=5.5)
        assert h.send(b"m1", [*self.BYE], now=6.5) == []  # asked 5.5 s ago: the client gave up
        assert h.core.counters["mdp_requests_lost"] == 1 and h.core.mdp_workers[b"m2"].current is None

    def test_second_ready_while_busy_runs_the_request_again(self, h):
        h.send(C1, mdp_request(b"echo", b"q"))
        out = h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])  # m1 restarted and forgot it
        assert out == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"q"]]
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"a"]) == [[C1, b"MDPC02", b"\x03", b"echo", b"a"]]

    def test_busy_worker_whose_connection_is_gone_has_its_request_run_again(self, h):
        h.send(b"m2", [b"MDPW02", b"\x01", b"echo"])
        h.send(C1, mdp_request(b"echo", b"q"), now=1.0)  # to m1
        beats = h.tick(2.5)
        to_m1 = one(beats, b"m1", b"MDPW02")
        h.core.undeliverable(to_m1, full=False)  # m1's process died: the heartbeat finds no peer
        assert h.out() == [[b"m2", b"MDPW02", b"\x02", C1, b"", b"q"]]
        assert b"m1" not in h.core.mdp_workers and h.core.counters["mdp_requests_requeued"] == 1

    def test_busy_worker_with_a_full_queue_keeps_its_request(self, h):
        h.send(b"m2", [b"MDPW02", b"\x01", b"echo"])
        h.send(C1, mdp_request(b"echo", b"q"), now=1.0)  # to m1, which works and reads nothing
        beat = one(h.tick(2.5), b"m1", b"MDPW02")
        h.core.undeliverable(beat, full=True)  # its queue is full of heartbeats: alive, not gone
        assert h.out() == [] and h.core.mdp_workers[b"m1"].current is not None
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"r"]) == [[C1, b"MDPC02", b"\x03", b"echo", b"r"]]

    def test_undelivered_request_keeps_its_one_re_run(self, h):
        h.send(b"m2", [b"MDPW02", b"\x01", b"echo"])
        h.send(b"m3", [b"MDPW02", b"\x01", b"echo"])
        [request] = h.send(C1, mdp_request(b"echo", b"q"))
        h.core.undeliverable(request, full=False)  # m1 never got it
        assert h.out() == [[b"m2", b"MDPW02", b"\x02", C1, b"", b"q"]]
        assert "mdp_requests_requeued" not in h.core.counters
        # m2 got it and leaves: the request may still run once more, on m3.
        assert h.send(b"m2", [*self.BYE]) == [[b"m3", b"MDPW02", b"\x02", C1, b"", b"q"]]

    # --- majortomo 0.2.0's client dialect ----------------------------------------------------

    def test_majortomo_client_is_answered_in_its_framing(self, h):
        """majortomo's Client sends ["" "MDPC02" 0x02 service body...] and reads
        ["" "MDPC02" 0x03|0x04 body...]: PARTIAL 0x03, FINAL 0x04, no service frame."""
        out = h.send(C1, [b"", b"MDPC02", b"\x02", b"echo", b"a", b"b"])
        assert out == [[b"m1", b"MDPW02", b"\x02", C1, b"", b"a", b"b"]]
        assert h.send(b"m1", [b"MDPW02", b"\x03", C1, b"", b"p"]) == [[C1, b"", b"MDPC02", b"\x03", b"p"]]
        assert h.send(b"m1", [b"MDPW02", b"\x04", C1, b"", b"f", b"g"]) == [[C1, b"", b"MDPC02", b"\x04", b"f", b"g"]]

    def test_majortomo_client_and_worker(self):
        h = Harness()
        # majortomo's Worker frames like RFC 7 (leading empty frame) with MDP/0.2 commands.
        assert h.send(b"mw", [b"", b"MDPW02", b"\x01", b"echo"]) == []
        assert h.send(C1, [b"", b"MDPC02", b"\x02", b"echo", b"x"]) == [[b"mw", b"", b"MDPW02", b"\x02", C1, b"", b"x"]]
        assert h.send(b"mw", [b"", b"MDPW02", b"\x04", C1, b"", b"y"]) == [[C1, b"", b"MDPC02", b"\x04", b"y"]]
        assert h.tick(2.5) == [[b"mw", b"", b"MDPW02", b"\x05"]]

    @pytest.mark.parametrize("service, answer", [(b"mmi.service", b"200"), (b"mmi.nothing", b"501")])
    def test_majortomo_client_asks_the_broker(self, h, service, answer):
        assert h.send(C1, [b"", b"MDPC02", b"\x02", service, b"echo"]) == [[C1, b"", b"MDPC02", b"\x04", answer]]

    def test_majortomo_client_in_key_mode_gets_remoterl_status_only(self):
        h = Harness(api_keys={"ka": "a"})
        assert h.send(C1, [b"", b"MDPC02", b"\x02", b"echo", b"x"]) == []
        assert h.send(C1, [b"", b"MDPC02", b"\x02", b"mmi.service", b"echo"]) == []
        assert h.core.counters["malformed"] == 2 and len(h.core.mdp_queue) == 0
        [reply] = h.send(C1, [b"", b"MDPC02", b"\x02", b"remoterl.status", b"ka"])
        assert reply[:4] == [C1, b"", b"MDPC02", b"\x04"] and json.loads(reply[4])["workers"] == []

    def test_0x02_without_the_empty_frame_is_not_majortomo(self, h):
        """Only majortomo speaks this dialect, always with the empty frame; ["MDPC02" 0x02 ...]
        is the shape of an RFC 18 PARTIAL (broker → client): malformed, unanswered."""
        assert h.send(C1, [b"MDPC02", b"\x02", b"echo", b"x"]) == []
        assert h.core.counters["malformed"] == 1 and h.core.mdp_workers[b"m1"].current is None
        assert len(h.core.mdp_queue) == 0
