"""Tests for remoterl.workers.runtime's slots: OPEN makes the envs and describes them (spaces,
metadata, spec), refuses what it cannot host and leaves nothing behind; close frees only the
caller's slots. The host is driven by decoded calls (no sockets): a call is a codec header plus
frames, exactly as the worker loop hands it over; the reply is decoded with the codec, exactly
as the client would (helpers in workers_runtime_helpers.py)."""

from __future__ import annotations

import gymnasium
import pytest

import remoterl.env
from remoterl.wire import codec
from remoterl.wire.spaces import space_from_wire
from remoterl.errors import ProtocolError
from remoterl.wire.envdesc import EnvDescription
from remoterl.workers.runtime import SlotHost
from workers_runtime_helpers import CLIENT, OTHER, SLOTS, ClosingEnv, assert_error, call, opened_host


# ----------------------------------------------------------------------------
# OPEN: the env description


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_open_describes_the_env(env_id):
    host = SlotHost(None, 8)
    reply = host.open(CLIENT, {"r": 7, "env": env_id, "kwargs": {}, "slots": SLOTS})
    assert "error" not in reply, reply
    assert reply["r"] == 7 and reply["slots"] == SLOTS
    assert sorted(host.slots) == SLOTS
    assert all(host.slots[s].client == CLIENT for s in SLOTS)

    assert type(reply["env"]) is bytes
    desc = codec.decode(reply["env"], [])
    local = gymnasium.make(env_id)
    observation_space = space_from_wire(desc["observation_space"])
    action_space = space_from_wire(desc["action_space"])
    assert observation_space == local.observation_space
    assert action_space == local.action_space
    assert type(action_space) is type(local.action_space)
    assert remoterl.env.metadata_from_wire(desc["metadata"]) == local.metadata
    assert desc["render_mode"] is None

    spec = gymnasium.spec(env_id)
    assert desc["spec"]["id"] == env_id
    assert desc["spec"]["entry_point"] == spec.entry_point
    assert desc["spec"]["max_episode_steps"] == spec.max_episode_steps
    assert desc["spec"]["reward_threshold"] == spec.reward_threshold
    assert desc["spec"]["kwargs"] == {}

    # What the client makes of it (RemoteEnv, RemoteEnvVec).
    read = EnvDescription.from_wire(desc)
    assert read.observation_space == local.observation_space and read.action_space == local.action_space
    assert read.metadata == local.metadata and read.render_mode is None
    assert read.spec.id == env_id and read.spec.max_episode_steps == spec.max_episode_steps
    local.close()
    host.close_all()


@pytest.mark.parametrize("desc", [None, [], {}, {"observation_space": {"type": "Box"}},
                                  {"observation_space": {"type": "Discrete", "n": 2, "start": 0, "dtype": "<i8"}}])
def test_a_malformed_env_description_is_a_protocol_error(desc):
    with pytest.raises(ProtocolError):
        EnvDescription.from_wire(desc)


def test_open_passes_kwargs_and_reports_render_mode():
    host = SlotHost(None, 8)
    kwargs = {"render_mode": "rgb_array", "g": 5.0}
    reply = host.open(CLIENT, {"r": 1, "env": "Pendulum-v1", "kwargs": kwargs, "slots": [4]})
    desc = codec.decode(reply["env"], [])
    assert desc["render_mode"] == "rgb_array"
    assert desc["spec"]["kwargs"] == kwargs
    assert host.slots[4].env.unwrapped.g == 5.0
    host.close_all()


def test_open_serves_only_listed_env_ids():
    host = SlotHost(["CartPole-v1"], 8)
    assert host.served() == ["CartPole-v1"]
    assert SlotHost(None, 8).served() == ["*"]
    reply = host.open(CLIENT, {"r": 3, "env": "Pendulum-v1", "kwargs": {}, "slots": [1]})
    assert reply["error"]["code"] == "no_worker"
    assert reply["r"] == 3
    assert host.slots == {}


def test_open_of_an_unknown_env_id_fails_and_leaves_nothing():
    host = SlotHost(None, 8)
    reply = host.open(CLIENT, {"r": 1, "env": "NoSuchEnv-v0", "kwargs": {}, "slots": SLOTS})
    assert "error" in reply and "env" not in reply
    assert "NoSuchEnv" in reply["error"]["msg"]
    assert host.slots == {}


@pytest.mark.parametrize("env_id", [
    "NoSuchEnv-v0",  # NameNotFound
    "CartPole-v9",  # VersionNotFound
    "nosuchns/CartPole-v1",  # NamespaceNotFound: "Namespace nosuchns not found."
])
def test_open_of_an_unknown_env_id_is_no_worker(env_id):
    host = SlotHost(None, 8)
    reply = host.open(CLIENT, {"r": 1, "env": env_id, "kwargs": {}, "slots": SLOTS})
    assert reply["error"]["code"] == "no_worker", reply["error"]
    assert host.slots == {}


def test_open_that_fails_midway_closes_what_it_made():
    made: list[ClosingEnv] = []

    def make(env_id, **kwargs):
        if len(made) == 2:
            raise RuntimeError("third env will not build")
        made.append(ClosingEnv())
        return made[-1]

    host = SlotHost(None, 8, make=make)
    reply = host.open(CLIENT, {"r": 1, "env": "ClosingEnv-v0", "kwargs": {}, "slots": SLOTS})
    error = reply["error"]
    assert error["code"] == "env"
    assert "third env will not build" in error["msg"]
    assert "RuntimeError" in error["tb"]
    assert host.slots == {}
    assert [env.close_calls for env in made] == [1, 1]


def test_open_over_capacity():
    calls = []

    def make(env_id, **kwargs):
        calls.append(env_id)
        return gymnasium.make(env_id, **kwargs)

    host = SlotHost(None, 3, make=make)
    reply = host.open(CLIENT, {"r": 1, "env": "CartPole-v1", "kwargs": {}, "slots": [1, 2, 3, 4]})
    assert reply["error"]["code"] == "capacity"
    assert host.slots == {} and calls == []  # refused before making anything

    assert "error" not in host.open(CLIENT, {"r": 2, "env": "CartPole-v1", "kwargs": {}, "slots": SLOTS})
    reply = host.open(OTHER, {"r": 3, "env": "CartPole-v1", "kwargs": {}, "slots": [4]})
    assert reply["error"]["code"] == "capacity"
    assert reply["r"] == 3
    assert sorted(host.slots) == SLOTS
    assert len(calls) == 3
    host.close_all()


@pytest.mark.parametrize("header", [
    {"r": 1, "kwargs": {}, "slots": SLOTS},                          # no env
    {"r": 1, "env": 5, "kwargs": {}, "slots": SLOTS},                # env not a str
    {"r": 1, "env": "CartPole-v1", "kwargs": {}, "slots": 3},        # slots not a list
    {"r": 1, "env": "CartPole-v1", "kwargs": [1], "slots": SLOTS},   # kwargs not a map
])
def test_malformed_open_is_a_protocol_error(header):
    host = SlotHost(None, 8)
    reply = host.open(CLIENT, header)
    assert reply["error"]["code"] == "protocol"
    assert host.slots == {}


def test_open_of_a_slot_id_already_hosted_is_refused():
    host = opened_host("ClosingEnv-v0", slots=[1, 2])
    old = host.slots[2].env
    reply = host.open(OTHER, {"r": 2, "env": "ClosingEnv-v0", "kwargs": {}, "slots": [2, 3]})
    try:
        assert "error" in reply
        assert host.slots[2].env is old and host.slots[2].client == CLIENT
        assert 3 not in host.slots
    finally:
        host.close_all()


# ----------------------------------------------------------------------------
# close


def test_close_ignores_foreign_and_unknown_slots():
    host = opened_host("ClosingEnv-v0", slots=[1, 2])
    assert "error" not in host.open(OTHER, {"r": 1, "env": "ClosingEnv-v0", "kwargs": {}, "slots": [3]})
    envs = {slot_id: slot.env for slot_id, slot in host.slots.items()}

    host.close(OTHER, [1, 2, 99])  # not OTHER's: ignored
    assert sorted(host.slots) == [1, 2, 3]
    assert [envs[i].close_calls for i in (1, 2, 3)] == [0, 0, 0]

    host.close(CLIENT, [2, 3])  # 3 is OTHER's: only 2 closes
    assert sorted(host.slots) == [1, 3]
    assert [envs[i].close_calls for i in (1, 2, 3)] == [0, 1, 0]
    assert_error(call(host, {"r": 2, "op": "reset", "slots": [2]}), "closed")

    host.close(CLIENT, [2])  # twice: ignored
    assert envs[2].close_calls == 1


def test_close_all_closes_every_env():
    host = opened_host("ClosingEnv-v0", slots=[1, 2])
    assert "error" not in host.open(OTHER, {"r": 1, "env": "ClosingEnv-v0", "kwargs": {}, "slots": [3]})
    envs = [slot.env for slot in host.slots.values()]
    host.close_all()
    assert host.slots == {}
    assert [env.close_calls for env in envs] == [1, 1, 1]
    assert_error(call(host, {"r": 2, "op": "reset", "slots": [1]}), "closed")
    # Freed capacity can be used again.
    assert "error" not in host.open(CLIENT, {"r": 3, "env": "ClosingEnv-v0", "kwargs": {}, "slots": [1, 2, 3]})
    host.close_all()


def test_close_survives_an_env_whose_close_raises():
    class BadClose(ClosingEnv):
        def close(self):
            raise RuntimeError("close failed")

    host = SlotHost(None, 8, make=lambda env_id, **kw: BadClose())
    host.open(CLIENT, {"r": 1, "env": "x", "kwargs": {}, "slots": [1, 2]})
    host.close(CLIENT, [1])
    assert sorted(host.slots) == [2]
    host.close_all()
    assert host.slots == {}
