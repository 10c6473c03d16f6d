"""Tests for remoterl.broker.core's registry: READY/HELLO and WELCOME, the status and mmi.*
services that list peers and what they serve, and REGISTER mirrored to workers. The broker
state machine is fed plain ``bytes`` frames and a fake clock; no sockets, no sleeps."""

from __future__ import annotations

import json

import pytest

from remoterl.wire import protocol as p
from remoterl.broker import services
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W
from broker_core_helpers import (
    ENV, W1, W2, W3, C1, C2, Harness,
    assert_error, hdr, header, mdp_request, open_msg, ready, to, worker_heartbeat,
)
from broker_core_helpers import h as h  # the shared fixture: two workers, one client


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
