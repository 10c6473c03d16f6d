"""Tests for remoterl.broker.core: the broker state machine, fed plain ``bytes`` frames and a
fake clock (floats chosen by each test). No sockets, no sleeps."""

from __future__ import annotations

import json
import random

import pytest

from remoterl.wire import codec
from remoterl.wire import protocol as p
from remoterl.broker import services
from remoterl.broker.core import BrokerConfig, BrokerCore
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

ENV = "CartPole-v1"
W1, W2, W3 = b"w1", b"w2", b"w3"
C1, C2 = b"c1", b"c2"
ENV_DESC = {"observation_space": {"type": "Box"}, "action_space": {"type": "Discrete", "n": 2}}


# ----------------------------------------------------------------------------
# Frame builders and the harness (see websockets tests/test_protocol.py assertFrameSent)


def hdr(**fields) -> bytes:
    return p.encode_header(fields)


def ready(envs=(ENV,), capacity=4, **extra) -> list:
    return [p.worker_frame(W.READY), hdr(v=1, envs=list(envs), capacity=capacity, **extra)]


def hello(**extra) -> list:
    return [p.client_frame(C.HELLO), hdr(v=1, **extra)]


def open_msg(r, n, env=ENV, **extra) -> list:
    return [p.client_frame(C.OPEN), hdr(r=r, env=env, kwargs={}, n=n, **extra)]


def opened(client, r, slots, env=ENV_DESC, error=None) -> list:
    fields = {"r": r, "slots": slots}
    fields.update({"error": error} if error is not None else {"env": env})
    return [p.worker_frame(W.OPENED), client, p.encode_header(fields)]


def close_msg(r, slots) -> list:
    return [p.client_frame(C.CLOSE), hdr(r=r, slots=slots)]


def call_header(r) -> bytes:
    """A CALL header as the client codec writes it (the broker never decodes it)."""
    return codec.encode({"r": r, "op": "step", "slots": [1]})[0]


def call(worker, r=1, *payload) -> list:
    return [p.client_frame(C.CALL), worker, call_header(r), *payload]


def client_heartbeat(client_id) -> list:
    return [p.client_frame(C.HEARTBEAT), hdr(id=client_id)]


def worker_heartbeat(worker_id, **extra) -> list:
    return [p.worker_frame(W.HEARTBEAT), hdr(id=worker_id, **extra)]


def mdp_request(service, *body, version=2) -> list:
    if version == 1:
        return [b"", b"MDPC01", service, *body]
    return [b"MDPC02", b"\x01", service, *body]


def header(message, index=2) -> dict:
    return p.decode_header(message[index])


def to(messages, peer, frame0=None) -> list[list]:
    """The messages addressed to ``peer`` (with first frame ``frame0``, if given)."""
    return [m for m in messages if m[0] == peer and (frame0 is None or m[1] == frame0)]


def short(messages) -> list:
    """Messages with long frames cut, for readable assertion messages."""
    return [[bytes(f[:24]) + (b"..." if len(f) > 24 else b"") for f in m] for m in messages]


def one(messages, peer, frame0) -> list:
    """Assert exactly one message to ``peer`` starts with ``frame0``; return it."""
    found = to(messages, peer, frame0)
    assert len(found) == 1, f"expected one {frame0!r} to {peer!r}, got {short(messages)!r}"
    return found[0]


def assert_error(messages, peer, code, r=None) -> dict:
    """Assert ``peer`` got one ERROR with this code (and request id); return its header."""
    error = header(one(messages, peer, p.client_frame(C.ERROR)))
    assert error["code"] == code, error
    assert error["r"] == r, error
    assert isinstance(error["msg"], str) and error["msg"]
    return error


class Harness:
    """A BrokerCore driven with explicit times; each call returns the messages it queued."""

    def __init__(self, now: float = 0.0, **config) -> None:
        self.core = BrokerCore(BrokerConfig(**config), now=now, instance="broker-test")
        self.now = now

    def send(self, sender: bytes, frames: list, now: float | None = None) -> list[list]:
        if now is not None:
            self.now = now
        self.core.receive(sender, frames, self.now)
        return self.out()

    def tick(self, now: float) -> list[list]:
        self.now = now
        self.core.tick(now)
        return self.out()

    def out(self) -> list[list]:
        return self.core.messages_to_send()

    # --- whole steps -------------------------------------------------------------------

    def add_worker(self, worker_id, envs=(ENV,), capacity=4, **extra) -> dict:
        out = self.send(worker_id, ready(envs, capacity, **extra))
        assert len(out) == 1
        return header(one(out, worker_id, p.worker_frame(W.WELCOME)), 2)

    def add_client(self, client_id, **extra) -> dict:
        out = self.send(client_id, hello(**extra))
        assert len(out) == 1
        return header(one(out, client_id, p.client_frame(C.WELCOME)), 2)

    def open_requests(self, out) -> dict[bytes, dict]:
        """The OPEN each worker was sent, by worker id: its header."""
        requests = {}
        for message in out:
            assert message[1] == p.worker_frame(W.OPEN), message
            assert message[0] not in requests, "one OPEN per worker"
            requests[message[0]] = header(message, 3)
        return requests

    def open_ok(self, client_id, n, r=1, env=ENV, **extra) -> list:
        """OPEN n slots and let every worker asked answer OPENED; return [[slot, worker], ...]."""
        requests = self.open_requests(self.send(client_id, open_msg(r, n, env, **extra)))
        out = []
        for worker_id, request in requests.items():
            out += self.send(worker_id, opened(client_id, request["r"], request["slots"]))
        reply = header(one(out, client_id, p.client_frame(C.OPENED)))
        assert reply["r"] == r and reply["env"] == ENV_DESC
        return reply["slots"]

    def snapshot(self) -> dict:
        """Every table size plus each peer's slot bookkeeping."""
        core = self.core
        return {
            **core.table_sizes(),
            "worker_slots": {w: sorted(x.slots) for w, x in core.workers.items()},
            "worker_clients": {w: dict(x.clients) for w, x in core.workers.items()},
            "client_slots": {c: sorted(x.slots) for c, x in core.clients.items()},
            "client_workers": {c: dict(x.workers) for c, x in core.clients.items()},
        }

    def assert_empty_slots(self) -> None:
        core = self.core
        assert core.slots == {} and core.pending_opens == {}
        for worker in core.workers.values():
            assert not worker.slots and not worker.clients and worker.free == worker.capacity
        for client in core.clients.values():
            assert not client.slots and not client.workers


@pytest.fixture
def h() -> Harness:
    """Two workers serving ENV with 4 slots each, and one client that said HELLO."""
    harness = Harness()
    harness.add_worker(W1)
    harness.add_worker(W2)
    harness.add_client(C1)
    return harness


# ----------------------------------------------------------------------------


class TestRegistration:
    """READY/HELLO get WELCOME; status and the mmi.* / remoterl.status services see peers."""

    def test_ready_gets_welcome(self):
        h = Harness(heartbeat=2.0, liveness=5)
        welcome = h.add_worker(W1, name="sim-1")
        assert welcome["v"] == p.PROTOCOL_VERSION
        assert welcome["broker"] == "broker-test"
        assert (welcome["heartbeat"], welcome["liveness"]) == (2.0, 5)

    def test_hello_gets_welcome_with_limits(self):
        h = Harness(max_message_size=12345)
        welcome = h.add_client(C1, name="trainer")
        assert welcome["max_message_size"] == 12345 and welcome["broker"] == "broker-test"
        assert h.core.clients[C1].info == {"name": "trainer"}

    def test_status_lists_worker(self):
        h = Harness()
        h.add_worker(W1, envs=[ENV, "Pendulum-v1"], capacity=3, name="sim-1", pid=42)
        status = services.status(h.core)
        [worker] = status["workers"]
        assert worker["id"] == W1.hex() and worker["kind"] == "remoterl"
        assert worker["name"] == "sim-1" and worker["pid"] == 42
        assert worker["envs"] == [ENV, "Pendulum-v1"]
        assert (worker["capacity"], worker["slots"], worker["calls"]) == (3, 0, 0)
        assert {s["name"]: s["free_slots"] for s in status["services"]} == {ENV: 3, "Pendulum-v1": 3}
        json.dumps(status)

    @pytest.mark.parametrize("version", [1, 2])
    def test_mmi_service_for_env_ids(self, h, version):
        for name, code in [(ENV.encode(), b"200"), (b"Nope-v0", b"404"), (b"", b"404")]:
            out = h.send(C2, mdp_request(b"mmi.service", name, version=version))
            expected = ([b"", b"MDPC01", b"mmi.service", code] if version == 1
                        else [b"MDPC02", b"\x03", b"mmi.service", code])
            assert out == [[C2, *expected]]

    def test_mmi_service_for_mdp_services(self, h):
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        assert h.send(C2, mdp_request(b"mmi.service", b"echo")) == [[C2, b"MDPC02", b"\x03", b"mmi.service", b"200"]]
        # A service that only has queued requests has no worker: 404.
        h.send(C2, mdp_request(b"nobody", b"x"))
        assert h.send(C2, mdp_request(b"mmi.service", b"nobody")) == [[C2, b"MDPC02", b"\x03", b"mmi.service", b"404"]]

    def test_mmi_service_is_not_fooled_by_a_star_worker(self, h):
        """A "*" worker serves whatever gymnasium can make on its host, which the broker
        cannot know: it makes no name available, not even "*"."""
        h.add_worker(W3, envs=["*"])
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        for name, code in [(b"Unknown-v0", b"404"), (b"*", b"404"), (b"\xff\xfe", b"404"),
                           (ENV.encode(), b"200"), (b"echo", b"200")]:
            assert h.send(C2, mdp_request(b"mmi.service", name)) == [[C2, b"MDPC02", b"\x03", b"mmi.service", code]], name
        # Once the "*" worker accepts a REGISTER of an id, it serves that id: 200.
        assert not services.served(h.core, b"Custom-v0", "")
        h.core.workers[W3].envs.add("Custom-v0")
        h.core.env_index.setdefault("Custom-v0", set()).add(W3)
        assert h.send(C2, mdp_request(b"mmi.service", b"Custom-v0"))[0][-1] == b"200"

    def test_mmi_service_counts_only_the_open_tenants_workers(self):
        """Workers admitted with keys keep their tenant when keys are switched off; an MDP
        client (tenant "") is not told about them."""
        h = Harness(api_keys={"ka": "a"})
        h.add_worker(W1, envs=["Secret-v0"], key="ka")
        # In key mode, Majordomo clients get no mmi.* answer at all.
        assert h.send(C2, mdp_request(b"mmi.service", b"Secret-v0")) == []
        assert h.core.counters["malformed"] == 1
        h.core.set_api_keys(None)
        assert h.send(C2, mdp_request(b"mmi.service", b"Secret-v0")) == [[C2, b"MDPC02", b"\x03", b"mmi.service", b"404"]]
        assert services.served(h.core, b"Secret-v0", "a")

    def test_mmi_unknown_is_501(self, h):
        assert h.send(C2, mdp_request(b"mmi.nothing", b"x")) == [[C2, b"MDPC02", b"\x03", b"mmi.nothing", b"501"]]

    def test_remoterl_status_service_answers_json(self, h):
        [reply] = h.send(C2, mdp_request(b"remoterl.status"))
        assert reply[:4] == [C2, b"MDPC02", b"\x03", b"remoterl.status"]
        status = json.loads(reply[4])
        assert status["broker"] == "broker-test"
        assert sorted(w["id"] for w in status["workers"]) == [W1.hex(), W2.hex()]
        assert [c["id"] for c in status["clients"]] == [C1.hex()]
        assert status["services"][0] == {"name": ENV, "kind": "env", "workers": 2, "free_slots": 8}

    def test_status_service_survives_odd_worker_stats(self, h):
        h.send(b"w1-side", worker_heartbeat(W1, stats={b"raw": 1, "steps": 3}))
        out = h.send(C2, mdp_request(b"remoterl.status"))
        assert len(out) == 1, h.core.counters
        [worker] = [w for w in json.loads(out[0][4])["workers"] if w["id"] == W1.hex()]
        assert worker["stats"]["steps"] == 3

    def test_internal_services_leave_no_state(self, h):
        before = h.snapshot()
        h.send(C2, mdp_request(b"mmi.service", b"x"))
        h.send(C2, mdp_request(b"remoterl.status", version=1))
        assert h.snapshot() == before

    @pytest.mark.parametrize("fields", [
        {"envs": ENV, "capacity": 4},
        {"envs": [ENV, 5], "capacity": 4},
        {"envs": [""], "capacity": 4},
        {"envs": [ENV], "capacity": -1},
        {"envs": [ENV], "capacity": "4"},
        {"envs": [ENV], "capacity": True},
        {"capacity": 4},
    ])
    def test_bad_ready_registers_nothing(self, fields):
        h = Harness()
        # The worker is told why (W.ERROR ends it) rather than left to send READY forever.
        [refusal] = h.send(W1, [p.worker_frame(W.READY), p.encode_header(fields)])
        assert refusal[:2] == [W1, p.worker_frame(W.ERROR)] and header(refusal, 2)["code"] == "protocol"
        assert h.core.workers == {} and h.core.counters["malformed"] == 1

    def test_ready_from_a_client_is_refused(self, h):
        before = h.snapshot()
        [refusal] = h.send(C1, ready())
        assert refusal[:2] == [C1, p.worker_frame(W.ERROR)] and "another role" in header(refusal, 2)["msg"]
        assert h.snapshot() == before and h.core.counters["malformed"] == 1

    def test_worker_of_another_protocol_version_is_told(self):
        h = Harness()
        [refusal] = h.send(W1, [b"RLW9\x01", p.encode_header({"envs": [], "capacity": 1})])
        assert refusal[1] == p.worker_frame(W.ERROR) and "version" in header(refusal, 2)["msg"]


def register_msg(r, env_id, entry_point="mods.envs:MyEnv") -> list:
    return [p.client_frame(C.REGISTER), hdr(r=r, spec={"id": env_id, "entry_point": entry_point})]


def registered(env_id, r, ok=True, msg=None) -> list:
    return [p.worker_frame(W.REGISTERED), hdr(id=env_id, r=r, ok=ok, msg=msg)]


class TestRegistrationMirroring:
    """REGISTER reaches the workers, and new workers while a trainer that made it is connected."""

    def test_a_typo_gets_did_you_mean(self, h):
        h.add_worker(W3, envs=["Pendulum-v1"])
        error = assert_error(h.send(C1, open_msg(5, 1, env="CartPole-v9")), C1, "no_worker", r=5)
        assert "did you mean 'CartPole-v1'?" in error["msg"], error
        error = assert_error(h.send(C1, open_msg(6, 1, env="Humanoid-v5")), C1, "no_worker", r=6)
        assert "did you mean" not in error["msg"] and "remoterl-worker --env Humanoid-v5" in error["msg"]

    def test_a_registration_is_forgotten_when_its_last_trainer_leaves(self, h):
        h.add_client(C2)
        [sent] = [m for m in h.send(C1, register_msg(1, "Mine-v0")) if m[0] == W1]
        h.send(W1, registered("Mine-v0", header(sent, 2)["r"], ok=False, msg="no module named mods"))
        h.send(C2, register_msg(1, "Mine-v0"))
        # A worker arriving now gets the registration (r=0: nobody waits for its answer) ...
        out = h.send(W3, ready())
        assert [header(m, 2)["spec"]["id"] for m in to(out, W3, p.worker_frame(W.REGISTER))] == ["Mine-v0"]
        h.send(C1, [p.client_frame(C.DISCONNECT), hdr()])
        assert ("", "Mine-v0") in h.core.registrations  # C2 still needs it
        h.send(C2, [p.client_frame(C.DISCONNECT), hdr()])
        assert h.core.registrations == {} and h.core.registrants == {}
        assert "Mine-v0" not in h.core.workers[W1].refused  # no stale refusal in NoWorkerError
        # ... one arriving after both trainers left does not, and late answers are harmless.
        assert to(h.send(b"w4", ready()), b"w4", p.worker_frame(W.REGISTER)) == []
        assert h.send(W3, registered("Mine-v0", 0, ok=False, msg="late")) == []
        assert h.core.counters["malformed"] == 0

    def test_an_answer_for_an_id_nobody_registered_is_malformed(self, h):
        assert h.send(W1, registered("Never-v0", 7)) == []
        assert h.core.counters["malformed"] == 1 and "Never-v0" not in h.core.env_index


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


class TestShutdown:
    """shutdown() tells every worker to leave and nobody else."""

    def test_shutdown_disconnects_every_worker(self, h):
        h.open_ok(C1, 2)
        h.send(b"m1", [b"MDPW02", b"\x01", b"echo"])
        h.core.shutdown()
        out = h.out()
        assert sorted(out) == sorted([[W1, p.worker_frame(W.DISCONNECT)], [W2, p.worker_frame(W.DISCONNECT)],
                                      [b"m1", b"MDPW02", b"\x06"]])


# ----------------------------------------------------------------------------


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
