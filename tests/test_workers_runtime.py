"""Tests for remoterl.workers.runtime: the slot host, driven by decoded calls (no sockets).

A call is a codec header plus frames, exactly as the worker loop hands it over; the
reply is decoded with the codec, exactly as the client would. The centrepiece is the
conformance test: the host, driven step for step beside ``gymnasium.vector.SyncVectorEnv``
with the same seeds and actions, must give the same observations, rewards, flags and
(rebuilt with ``VectorEnv._add_info``) the same infos, in all three autoreset modes
("gymnasium, exactly").
"""

from __future__ import annotations

import gc

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv

from conftest import assert_same

import remoterl.env
from remoterl.wire import codec
from remoterl_test_envs import CountingEnv, RaisingEnv  # the same envs the worker-process tests use
from remoterl.wire.spaces import space_from_wire
from remoterl.errors import ProtocolError
from remoterl.wire import calls
from remoterl.wire.calls import AUTORESET_MODES
from remoterl.wire.envdesc import EnvDescription
from remoterl.workers.runtime import SlotHost

CLIENT = b"client-A"
OTHER = b"client-B"
SLOTS = [1, 2, 3]
SEEDS = [0, 1, 2]

# AutoresetMode -> the "m" a step call carries, from the wire's own table.
WIRE_MODE = {AutoresetMode[name.upper()]: code for code, name in AUTORESET_MODES.items()}


# ----------------------------------------------------------------------------
# Test envs (built through SlotHost's ``make=`` hook; the global registry is left alone)


class SetInfoEnv(RaisingEnv):
    """An env whose step info holds a set, which cannot travel."""

    def step(self, action):
        return np.ones(2, np.float32), 1.0, False, False, {"ok": 1, "tags": {"a", "b"}}


class ClosingEnv(RaisingEnv):
    """Records whether close() was called."""

    def __init__(self) -> None:
        super().__init__()
        self.close_calls = 0

    def close(self) -> None:
        self.close_calls += 1


class InfoWrapper(gymnasium.Wrapper):
    """Rich infos, so the info comparison is not a comparison of empty dicts.

    Python ints, floats and bools, numpy scalars and arrays, strings, nested dicts,
    and a key that only some envs have on a given step (exercises the ``_key`` masks).
    """

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._t = 0
        return obs, {**info, "t": 0, "where": "reset", "obs_copy": np.array(obs),
                     "x": np.float32(obs[0]), "nested": {"even": True, "depth": {"k": 1.0}}}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        extra = {"t": self._t, "where": "step", "obs_copy": np.array(obs), "x": np.float32(obs[0]),
                 "nested": {"even": self._t % 2 == 0, "depth": {"k": float(self._t)}}}
        if self._t % 3 == 0:
            extra["sometimes"] = 1.5
        return obs, reward, terminated, truncated, {**info, **extra}


class KeyedActionEnv(gymnasium.Env):
    """A Dict action space whose keys are a constructor argument: two OPENs with other kwargs
    give action spaces of other structure, under the same env id."""

    def __init__(self, keys=("a",)) -> None:
        self.observation_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gymnasium.spaces.Dict({k: gymnasium.spaces.Discrete(2) for k in keys})

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        assert sorted(action) == sorted(self.action_space.spaces), f"got keys {sorted(action)}"
        return np.zeros(1, np.float32), 0.0, False, False, {}


class SameStepResetRaisesEnv(RaisingEnv):
    """Ends on every step; its reset raises after the first: SAME_STEP fails after the step."""

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    def reset(self, *, seed=None, options=None):
        self.resets += 1
        if self.resets > 1:
            raise RuntimeError("reset refused")
        return super().reset(seed=seed)

    def step(self, action):
        return np.ones(2, np.float32), 1.0, True, False, {}


class RaggedObsEnv(RaisingEnv):
    """Every other instance steps to an observation of the wrong shape: the batch cannot be stacked."""

    made = 0

    def __init__(self) -> None:
        super().__init__()
        RaggedObsEnv.made += 1
        self.size = 2 + RaggedObsEnv.made % 2

    def step(self, action):
        return np.ones(self.size, np.float32), 1.0, False, False, {}


CUSTOM = {
    "RaisingEnv-v0": RaisingEnv,
    "SetInfoEnv-v0": SetInfoEnv,
    "ClosingEnv-v0": ClosingEnv,
    "KeyedActionEnv-v0": KeyedActionEnv,
    "CountingEnv-v0": CountingEnv,
    "SameStepResetRaisesEnv-v0": SameStepResetRaisesEnv,
    "RaggedObsEnv-v0": RaggedObsEnv,
}


def make_env(env_id: str, **kwargs):
    """The factory for SlotHost and SyncVectorEnv alike."""
    if env_id in CUSTOM:
        return CUSTOM[env_id](**kwargs)
    if env_id.endswith("+info"):
        return InfoWrapper(gymnasium.make(env_id.removesuffix("+info"), **kwargs))
    return gymnasium.make(env_id, **kwargs)


# ----------------------------------------------------------------------------
# Helpers


def call(host: SlotHost, request, client: bytes = CLIENT, **encode_kwargs) -> dict:
    """Encode ``request`` as the client would, run it, decode the reply as the client would."""
    header, frames = codec.encode(request, **encode_kwargs)
    reply_header, reply_frames = host.call(client, header, frames, 0)
    assert type(reply_header) is bytes
    return codec.decode(reply_header, reply_frames)


def raw_call(host: SlotHost, header, frames=(), client: bytes = CLIENT) -> dict:
    reply_header, reply_frames = host.call(client, header, list(frames), 0)
    return codec.decode(reply_header, reply_frames)


def opened_host(env_id: str = "CartPole-v1", slots=SLOTS, client: bytes = CLIENT,
                capacity: int = 8, **kwargs) -> SlotHost:
    host = SlotHost(None, capacity, make=make_env)
    reply = host.open(client, {"r": 1, "env": env_id, "kwargs": kwargs, "slots": list(slots)})
    assert "error" not in reply, reply
    return host


def assert_error(reply: dict, code: str) -> dict:
    assert "error" in reply, reply
    error = reply["error"]
    assert error["code"] == code, error
    assert isinstance(error["msg"], str) and error["msg"]
    assert set(reply) == {"r", "error"}, reply  # nothing else travels with an error
    return error


class _InfoBuilder(VectorEnv):
    """Just enough of a VectorEnv to run gymnasium's own ``_add_info``."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs


def rebuild_infos(num_envs: int, per_env: list, indices=None, final=()) -> dict:
    """The vector infos dict from a reply's per-slot infos, as SyncVectorEnv builds it.

    ``final`` entries ``[i, final_obs, final_info]`` (SAME_STEP) go in first for env i,
    then env i's info, as ``SyncVectorEnv.step`` does.
    """
    builder = _InfoBuilder(num_envs)
    finals = {i: (final_obs, final_info) for i, final_obs, final_info in final}
    infos: dict = {}
    for j, info in enumerate(per_env):
        i = j if indices is None else int(indices[j])
        if i in finals:
            final_obs, final_info = finals[i]
            infos = builder._add_info(infos, {"final_obs": final_obs, "final_info": final_info}, i)
        infos = builder._add_info(infos, info, i)
    return infos


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
# reset


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_reset_with_seeds_matches_local_envs(env_id):
    host = opened_host(env_id)
    reply = call(host, {"r": 5, "op": "reset", "slots": SLOTS, "seeds": SEEDS})
    assert reply["r"] == 5
    local = [gymnasium.make(env_id) for _ in SEEDS]
    expected = [env.reset(seed=seed) for env, seed in zip(local, SEEDS)]
    assert_same(reply["obs"], np.stack([obs for obs, _ in expected]), "obs")
    assert_same(reply["infos"], [info for _, info in expected], "infos")
    # Different seeds, different starts: the seeds reached their own slots.
    assert not np.array_equal(reply["obs"][0], reply["obs"][1])

    # A subset of slots, in the order the call names them.
    reply = call(host, {"r": 6, "op": "reset", "slots": [3, 1], "seeds": [2, 0]})
    assert_same(reply["obs"], np.stack([expected[2][0], expected[0][0]]), "subset obs")

    # A single env (RemoteEnv): unbatched obs and info.
    reply = call(host, {"r": 7, "op": "reset", "slots": [2], "seeds": [1], "single": True})
    assert_same(reply["obs"], expected[1][0], "single obs")
    assert reply["info"] == expected[1][1]
    host.close_all()


# ----------------------------------------------------------------------------
# Conformance with SyncVectorEnv


N_STEPS = 300


@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.name)
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "CartPole-v1+info"])
def test_same_as_sync_vector_env(env_id, mode):
    n = len(SLOTS)
    m = WIRE_MODE[mode]
    envs = SyncVectorEnv([lambda: make_env(env_id) for _ in range(n)], autoreset_mode=mode)
    host = opened_host(env_id)
    envs.action_space.seed(123)
    r = iter(range(100, 10**6))

    obs, infos = envs.reset(seed=SEEDS)
    reply = call(host, {"r": next(r), "op": "reset", "slots": SLOTS, "seeds": list(SEEDS)})
    assert_same(reply["obs"], obs, "reset obs")
    assert_same(rebuild_infos(n, reply["infos"]), infos, "reset infos")

    ended = np.zeros(n, dtype=np.bool_)
    episodes_ended = 0
    truncations = 0
    for t in range(N_STEPS):
        if mode == AutoresetMode.DISABLED and ended.any():
            # What a user of DISABLED must do: reset the ended envs, and only those.
            obs, infos = envs.reset(options={"reset_mask": ended.copy()})
            indices = np.flatnonzero(ended)
            reply = call(host, {"r": next(r), "op": "reset", "slots": [SLOTS[i] for i in indices]})
            assert "error" not in reply, reply
            assert_same(reply["obs"], obs[ended], f"step {t}: masked reset obs")
            assert_same(rebuild_infos(n, reply["infos"], indices), infos, f"step {t}: masked reset infos")

        actions = envs.action_space.sample()
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        reply = call(host, {"r": next(r), "op": "step", "slots": SLOTS, "a": actions, "m": m})
        assert "error" not in reply, reply
        assert_same(reply["obs"], obs, f"step {t}: obs")
        assert_same(reply["rew"], rewards, f"step {t}: rewards")
        assert_same(reply["term"], terminated, f"step {t}: terminated")
        assert_same(reply["trunc"], truncated, f"step {t}: truncated")
        final = reply.get("final", [])
        if mode != AutoresetMode.SAME_STEP:
            assert final == []
        else:
            assert [i for i, _, _ in final] == list(np.flatnonzero(terminated | truncated))
        assert_same(rebuild_infos(n, reply["infos"], final=final), infos, f"step {t}: infos")

        ended = terminated | truncated
        episodes_ended += int(ended.sum())
        truncations += int(truncated.sum())

    # The run crossed episode boundaries in every env, so every autoreset branch ran.
    assert episodes_ended >= n
    if env_id.startswith("Pendulum"):
        assert truncations >= n
    assert host.stats["steps"] > 0 and host.stats["errors"] == 0
    envs.close()
    host.close_all()


def test_disabled_step_of_an_ended_slot_is_an_error():
    host = opened_host("CartPole-v1", slots=[1])
    call(host, {"r": 1, "op": "reset", "slots": [1], "seeds": [0]})
    for _ in range(500):
        reply = call(host, {"r": 2, "op": "step", "slots": [1], "a": np.array([1]), "m": 2})
        if reply["term"][0] or reply["trunc"][0]:
            break
    else:
        pytest.fail("CartPole pushed right never ended")
    reply = call(host, {"r": 3, "op": "step", "slots": [1], "a": np.array([1]), "m": 2})
    error = assert_error(reply, "env")
    assert "DISABLED" in error["msg"] and error["slot"] == 1
    # After the reset the user owes, it steps again.
    call(host, {"r": 4, "op": "reset", "slots": [1]})
    assert "error" not in call(host, {"r": 5, "op": "step", "slots": [1], "a": np.array([1]), "m": 2})
    host.close_all()


def test_single_step_returns_unbatched_values():
    host = opened_host("RaisingEnv-v0", slots=[1])
    call(host, {"r": 1, "op": "reset", "slots": [1], "single": True})
    reply = call(host, {"r": 2, "op": "step", "slots": [1], "a": 0, "single": True})
    assert reply == {"r": 2, "obs": reply["obs"], "rew": 1.0, "term": False, "trunc": False,
                     "info": {"ok": True}}
    assert_same(reply["obs"], np.ones(2, np.float32), "obs")
    assert_error(call(host, {"r": 3, "op": "step", "slots": [1, 1], "a": 0, "single": True}), "protocol")
    host.close_all()


# ----------------------------------------------------------------------------
# Failures: an env that raises, foreign slots, malformed calls, infos that cannot travel


def test_env_error_carries_the_traceback_and_the_host_keeps_serving():
    host = opened_host("RaisingEnv-v0")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0]), "m": 0})
    error = assert_error(reply, "env")
    assert reply["r"] == 2
    assert "boom from the simulator" in error["msg"]
    assert error["type"] == "ValueError"
    assert error["slot"] == 2
    assert "explode_on_purpose" in error["tb"]
    assert "Traceback" in error["tb"]
    assert host.stats["errors"] == 1
    assert sorted(host.slots) == SLOTS

    # Every slot, the one that raised included, keeps working.
    reply = call(host, {"r": 3, "op": "step", "slots": SLOTS, "a": np.array([0, 0, 0]), "m": 0})
    assert "error" not in reply, reply
    assert_same(reply["obs"], np.ones((3, 2), np.float32), "obs")
    assert_same(reply["rew"], np.ones(3), "rewards")
    assert reply["infos"] == [{"ok": True}] * 3
    reply = call(host, {"r": 4, "op": "step", "slots": [1, 3], "a": np.array([0, 0]), "m": 0})
    assert "error" not in reply and reply["obs"].shape == (2, 2)
    host.close_all()


def test_call_naming_another_clients_slot_is_closed():
    host = opened_host("RaisingEnv-v0", slots=[1, 2])
    assert "error" not in host.open(OTHER, {"r": 1, "env": "RaisingEnv-v0", "kwargs": {}, "slots": [3]})
    # OTHER names its own slot 3 and CLIENT's slot 1: refused before anything runs.
    reply = call(host, {"r": 9, "op": "step", "slots": [3, 1], "a": np.array([1, 1]), "m": 0}, client=OTHER)
    error = assert_error(reply, "closed")
    assert reply["r"] == 9 and "1" in error["msg"]
    assert_error(call(host, {"r": 10, "op": "reset", "slots": [1]}, client=OTHER), "closed")
    # A slot nobody opened.
    assert_error(call(host, {"r": 11, "op": "reset", "slots": [42]}), "closed")
    # The owners are unaffected.
    assert "error" not in call(host, {"r": 12, "op": "step", "slots": [1, 2], "a": np.array([0, 0]), "m": 0})
    assert "error" not in call(host, {"r": 13, "op": "step", "slots": [3], "a": np.array([0]), "m": 0},
                               client=OTHER)
    host.close_all()


def _encoded(request) -> bytes:
    header, frames = codec.encode(request)
    assert frames == []
    return header


MALFORMED = {
    "junk bytes": b"\xc1\xc1\xc1",
    "empty header": b"",
    "truncated map": _encoded({"r": 1, "op": "step"})[:-2],
    "not a map": _encoded([1, "step", SLOTS]),
    "unknown ext type": b"\xd4\x63\x00",
    "unknown op": _encoded({"r": 5, "op": "jump", "slots": SLOTS}),
    "no op": _encoded({"r": 5, "slots": SLOTS}),
    "slots not a list": _encoded({"r": 5, "op": "step", "slots": 1, "a": np.array([0]), "m": 0}),
    "slots a string": _encoded({"r": 5, "op": "reset", "slots": "123"}),
    "slots empty": _encoded({"r": 5, "op": "step", "slots": [], "a": np.array([], np.int64), "m": 0}),
    "slot unhashable": _encoded({"r": 5, "op": "reset", "slots": [[1]]}),
    "slot repeated": _encoded({"r": 5, "op": "step", "slots": [1, 2, 3, 1], "a": np.array([0, 1, 0, 1]), "m": 0}),
    "slot repeated in a reset": _encoded({"r": 5, "op": "reset", "slots": [2, 2]}),
    "too few actions": _encoded({"r": 5, "op": "step", "slots": SLOTS, "a": np.array([0, 1]), "m": 0}),
    "too many actions": _encoded({"r": 5, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0, 1]), "m": 0}),
    "no actions": _encoded({"r": 5, "op": "step", "slots": SLOTS, "m": 0}),
    "actions a string": _encoded({"r": 5, "op": "step", "slots": SLOTS, "a": "left", "m": 0}),
    "seeds too short": _encoded({"r": 5, "op": "reset", "slots": SLOTS, "seeds": [1]}),
    "seeds not a list": _encoded({"r": 5, "op": "reset", "slots": SLOTS, "seeds": 7}),
    "seeds too long": _encoded({"r": 5, "op": "reset", "slots": SLOTS, "seeds": list(range(100_000))}),
}


@pytest.mark.parametrize("header", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_call_gets_an_error_reply(header):
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS, "seeds": SEEDS})
    reply = raw_call(host, header)  # never raises
    assert set(reply) == {"r", "error"}, reply
    assert isinstance(reply["error"]["code"], str) and isinstance(reply["error"]["msg"], str)
    assert reply["r"] in (None, 5)
    # The host is intact and serves the next call.
    assert sorted(host.slots) == SLOTS
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0]), "m": 0})
    assert "error" not in reply and reply["obs"].shape == (3, 4)
    host.close_all()


@pytest.mark.parametrize("name", ["junk bytes", "empty header", "not a map", "unknown op",
                                  "slots not a list", "slot unhashable", "slot repeated",
                                  "slot repeated in a reset", "seeds too short", "seeds too long"])
def test_malformed_call_is_a_protocol_error(name):
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    assert_error(raw_call(host, MALFORMED[name]), "protocol")
    assert host.stats["steps"] == 0  # refused before any env ran
    host.close_all()


@pytest.mark.parametrize("name", ["too few actions", "too many actions", "no actions", "actions a string"])
def test_actions_that_do_not_fit_are_an_action_error(name):
    # "action" is the wire code of InvalidActionError: the client raises what its own check
    # would have raised. (tests/test_workers_hostile.py has the hostile shapes.)
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    error = assert_error(raw_call(host, MALFORMED[name]), "action")
    assert "Discrete(2)" in error["msg"]
    assert host.stats["steps"] == 0
    host.close_all()


def test_call_referring_to_a_missing_frame_is_a_protocol_error():
    host = opened_host("Pendulum-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    header, frames = codec.encode({"r": 2, "op": "step", "slots": SLOTS,
                                   "a": np.zeros((3, 1), np.float32), "m": 0}, frame_threshold=0)
    assert len(frames) == 1
    assert_error(raw_call(host, header, []), "protocol")
    reply = raw_call(host, header, frames)
    assert "error" not in reply and reply["r"] == 2
    host.close_all()


@pytest.mark.parametrize("extra", [{"m": 7}, {"m": "same_step"}, {}], ids=["m=7", "m=str", "no m"])
def test_unknown_autoreset_mode_is_a_protocol_error(extra):
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0]), **extra})
    assert_error(reply, "protocol")
    host.close_all()


def test_info_that_cannot_travel_is_a_codec_error_naming_the_key():
    host = opened_host("SetInfoEnv-v0")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 0, 0]), "m": 0})
    error = assert_error(reply, "codec")
    assert reply["r"] == 2
    assert "'tags'" in error["msg"] and "set" in error["msg"]
    assert sorted(host.slots) == SLOTS
    host.close_all()


def test_a_failed_step_says_which_slots_stepped():
    host = opened_host("RaisingEnv-v0", slots=[4, 7, 9, 2])
    call(host, {"r": 1, "op": "reset", "slots": [4, 7, 9, 2]})
    reply = call(host, {"r": 2, "op": "step", "slots": [4, 7, 9, 2], "a": np.array([0, 0, 1, 0]), "m": 0})
    error = assert_error(reply, "env")
    assert error["slot"] == 9 and error["stepped"] == [4, 7]  # slot ids, in the call's order
    reply = call(host, {"r": 3, "op": "step", "slots": [4, 7, 9, 2], "a": np.array([1, 0, 0, 0]), "m": 0})
    assert assert_error(reply, "env")["stepped"] == []
    host.close_all()


def test_a_step_that_fails_after_the_env_stepped_counts_it():
    # SAME_STEP: the env stepped and ended, then its reset raised: it did step.
    host = opened_host("SameStepResetRaisesEnv-v0", slots=[1, 2])
    call(host, {"r": 1, "op": "reset", "slots": [1, 2]})
    error = assert_error(call(host, {"r": 2, "op": "step", "slots": [1, 2], "a": np.array([0, 0]), "m": 1}), "env")
    assert error["slot"] == 1 and error["stepped"] == [1] and "reset refused" in error["msg"]
    host.close_all()


@pytest.mark.parametrize("env_id, code", [("SetInfoEnv-v0", "codec"), ("RaggedObsEnv-v0", "env")])
def test_a_step_whose_results_cannot_travel_stepped_every_slot(env_id, code):
    host = opened_host(env_id)
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    error = assert_error(call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 0, 0]), "m": 0}), code)
    assert error["stepped"] == SLOTS
    host.close_all()


def test_refused_steps_say_nothing_about_stepping():
    # Refused before any env ran: no "stepped" (the client knows nothing moved there).
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    for name in ("too few actions", "unknown op"):
        assert "stepped" not in raw_call(host, MALFORMED[name])["error"]
    host.close_all()


def test_batched_action_space_is_never_taken_from_a_freed_env():
    # The batched action space was cached by id(action_space): once an env was closed and its space
    # freed, a new space could get the same id, and a step of an env opened with other kwargs was
    # checked against the old structure. 200 open/step/close rounds made that happen about 60 times.
    host = SlotHost(None, 8, make=make_env)
    for i in range(200):
        keys = ["a", "b"] if i % 2 == 0 else ["x", "y", "z"]
        opened = host.open(CLIENT, {"r": 1, "env": "KeyedActionEnv-v0", "kwargs": {"keys": keys}, "slots": [i]})
        assert "error" not in opened, opened
        call(host, {"r": 2, "op": "reset", "slots": [i]})
        reply = call(host, {"r": 3, "op": "step", "slots": [i], "a": {k: np.zeros(1, np.int64) for k in keys}, "m": 0})
        assert "error" not in reply, (i, reply)
        host.close(CLIENT, [i])
        del opened, reply
        gc.collect()


def test_batched_action_space_follows_a_space_the_env_replaced():
    host = opened_host("KeyedActionEnv-v0", slots=[1, 2], keys=["a"])
    call(host, {"r": 1, "op": "reset", "slots": [1, 2]})
    assert "error" not in call(host, {"r": 2, "op": "step", "slots": [1, 2], "a": {"a": np.zeros(2, np.int64)}, "m": 0})
    for slot in host.slots.values():
        slot.env.action_space = gymnasium.spaces.Dict({"b": gymnasium.spaces.Discrete(2)})
    assert "error" not in call(host, {"r": 3, "op": "step", "slots": [1, 2], "a": {"b": np.zeros(2, np.int64)}, "m": 0})
    host.close_all()


# ----------------------------------------------------------------------------
# Attributes: get_attr, set_attr, call


def counting_host(slots=SLOTS, **kwargs) -> SlotHost:
    host = opened_host("CountingEnv-v0", slots=slots, **kwargs)
    call(host, {"r": 1, "op": "reset", "slots": list(slots), "seeds": list(range(len(slots)))})
    return host


def test_get_attr_reads_each_slot_and_marks_methods():
    host = counting_host(label="L")
    for slot, steps in zip(host.slots.values(), (3, 4, 5)):
        slot.env.steps = steps
    assert call(host, {"r": 2, "op": "get_attr", "slots": SLOTS, "name": "steps"}) == {"r": 2, "values": [3, 4, 5]}
    assert call(host, {"r": 3, "op": "get_attr", "slots": SLOTS, "name": "label"})["values"] == ["L"] * 3
    reply = call(host, {"r": 4, "op": "get_attr", "slots": SLOTS, "name": "scale"})
    assert reply == {"r": 4, "values": [None] * 3, "callable": [0, 1, 2]}  # not called
    reply = call(host, {"r": 5, "op": "get_attr", "slots": SLOTS, "name": "np_random_seed"})
    assert reply["values"] == [0, 1, 2] and "big" not in reply
    probe = {"r": 6, "op": "get_attr", "slots": SLOTS, "probe": True}
    assert call(host, {**probe, "name": "steps"})["values"] == [True] * 3
    assert call(host, {**probe, "name": "nope"})["values"] == [False] * 3
    host.close_all()


def test_ints_beyond_64_bits_travel_as_decimal_strings():
    host = opened_host("CountingEnv-v0")  # never seeded: gymnasium draws 128-bit seeds
    local = [slot.env.np_random_seed for slot in host.slots.values()]
    assert max(local) >= 2**64, "gymnasium's own seeds should need more than 64 bits"
    reply = call(host, {"r": 2, "op": "get_attr", "slots": SLOTS, "name": "np_random_seed"})
    assert reply["values"] == [str(v) if v >= 2**64 else v for v in local]
    assert reply["big"] == [i for i, v in enumerate(local) if v >= 2**64]
    assert remoterl.env.values_from_wire(reply, 3) == local
    host.close_all()


def test_call_calls_methods_and_returns_plain_attributes():
    host = counting_host()
    reply = call(host, {"r": 2, "op": "call", "slots": SLOTS, "name": "scale",
                        "args": [np.arange(3, dtype=np.float32)], "kwargs": {"factor": 4}})
    assert_same(reply["values"], [np.arange(3, dtype=np.float32) * 4] * 3, "scale results")
    assert call(host, {"r": 3, "op": "call", "slots": SLOTS, "name": "steps"})["values"] == [0, 0, 0]
    error = assert_error(call(host, {"r": 4, "op": "call", "slots": SLOTS, "name": "fail"}), "env")
    assert error["slot"] == SLOTS[0] and "fail() on purpose" in error["msg"] and "RuntimeError" in error["tb"]
    host.close_all()


def test_set_attr_sets_one_value_per_slot():
    host = counting_host()
    reply = call(host, {"r": 2, "op": "set_attr", "slots": SLOTS, "name": "steps", "values": [7, 8, 9], "force": True})
    assert reply == {"r": 2, "set": [True] * 3}
    assert [slot.env.unwrapped.steps for slot in host.slots.values()] == [7, 8, 9]
    reply = call(host, {"r": 3, "op": "set_attr", "slots": SLOTS, "name": "fresh", "values": [1, 2, 3], "force": False})
    assert reply["set"] == [False] * 3  # force=False sets only what exists
    host.close_all()


@pytest.mark.parametrize("request_, code", [
    ({"op": "get_attr", "name": "_secret"}, "attr"),
    ({"op": "get_attr", "name": "__class__"}, "attr"),
    ({"op": "get_attr", "name": "no_such_attribute"}, "attr"),
    ({"op": "get_attr", "name": "a.b"}, "attr"),
    ({"op": "get_attr", "name": "x" * 257}, "attr"),
    ({"op": "call", "name": "get_wrapper_attr", "args": ["_secret"]}, "attr"),
    ({"op": "call", "name": "has_wrapper_attr", "args": ["_secret"]}, "attr"),
    ({"op": "call", "name": "close"}, "attr"),
    ({"op": "call", "name": "reset"}, "attr"),
    ({"op": "call", "name": "step", "args": [0]}, "attr"),
    ({"op": "set_attr", "name": "_secret", "values": [1, 1, 1]}, "attr"),
    ({"op": "set_attr", "name": "set_wrapper_attr", "values": [1, 1, 1]}, "attr"),
    ({"op": "get_attr"}, "protocol"),
    ({"op": "get_attr", "name": 5}, "protocol"),
    ({"op": "call", "name": "scale", "args": 5}, "protocol"),
    ({"op": "call", "name": "scale", "args": [1], "kwargs": {1: 2}}, "protocol"),
    ({"op": "set_attr", "name": "steps", "values": [1, 2]}, "protocol"),
    ({"op": "set_attr", "name": "steps", "values": 1}, "protocol"),
    ({"op": "set_attr", "name": "steps", "values": [1, 2, 3], "force": "yes"}, "protocol"),
], ids=["private", "dunder", "missing", "dotted", "too-long", "helper-get", "helper-has", "close", "reset", "step",
        "set-private", "set-helper", "no-name", "name-not-str", "args-not-list", "kwargs-int-keys",
        "values-short", "values-not-list", "force-not-bool"])
def test_attribute_calls_the_worker_refuses(request_, code):
    host = counting_host()
    before = [(slot.env.unwrapped.steps, slot.env.unwrapped._secret) for slot in host.slots.values()]
    error = assert_error(call(host, {"r": 2, "slots": SLOTS, **request_}), code)
    if request_.get("name") == "no_such_attribute":
        assert "no_such_attribute" in error["msg"]
    assert [(slot.env.unwrapped.steps, slot.env.unwrapped._secret) for slot in host.slots.values()] == before
    assert host.stats["steps"] == 0 and host.stats["resets"] == 3  # nothing ran
    host.close_all()


def test_a_value_that_cannot_travel_is_a_codec_error_naming_the_attribute():
    host = counting_host()
    error = assert_error(call(host, {"r": 2, "op": "get_attr", "slots": SLOTS, "name": "handle"}), "codec")
    assert "'handle'" in error["msg"] and f"slot {SLOTS[0]}" in error["msg"] and "object" in error["msg"]
    error = assert_error(call(host, {"r": 3, "op": "call", "slots": SLOTS, "name": "np_random"}), "codec")
    assert "'np_random'" in error["msg"] and "Generator" in error["msg"]
    assert "error" not in call(host, {"r": 4, "op": "step", "slots": SLOTS, "a": np.zeros(3, np.int64), "m": 0})
    host.close_all()


def test_attribute_calls_reach_only_the_callers_slots():
    host = counting_host(slots=[1, 2])
    assert "error" not in host.open(OTHER, {"r": 1, "env": "CountingEnv-v0", "kwargs": {}, "slots": [3]})
    reply = call(host, {"r": 2, "op": "set_attr", "slots": [3, 1], "name": "steps", "values": [5, 5]}, client=OTHER)
    assert_error(reply, "closed")
    assert host.slots[1].env.unwrapped.steps == 0
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


# ----------------------------------------------------------------------------
# The call builders the trainer side uses: exactly the maps docs/PROTOCOL.md §5.2 describes


def test_call_builders_build_the_documented_maps():
    action = np.array([0, 1, 0])
    built_and_written = [
        (calls.step(action, 1), {"op": "step", "a": action, "m": 1}),
        (calls.step_single(0), {"op": "step", "a": 0, "single": True}),
        (calls.reset([0, None], None), {"op": "reset", "seeds": [0, None], "options": None}),
        (calls.reset_single(3, {"x": 1}), {"op": "reset", "seeds": [3], "options": {"x": 1}, "single": True}),
        (calls.get_attr("gravity"), {"op": "get_attr", "name": "gravity"}),
        (calls.get_attr("gravity", probe=True), {"op": "get_attr", "name": "gravity", "probe": True}),
        (calls.set_attr("g", [1.0], force=False), {"op": "set_attr", "name": "g", "values": [1.0], "force": False}),
        (calls.set_attr("g", force=True), {"op": "set_attr", "name": "g", "force": True}),
        (calls.set_attr("g", outer=True), {"op": "set_attr", "name": "g", "outer": True}),
        (calls.call("f", (1,), {"k": 2}), {"op": "call", "name": "f", "args": [1], "kwargs": {"k": 2}}),
        (calls.call("f", strict=True), {"op": "call", "name": "f", "args": [], "kwargs": {}, "strict": True}),
        (calls.is_wrapped(InfoWrapper),
         {"op": "is_wrapped", "wrapper": f"{__name__}:InfoWrapper"}),
    ]
    for built, written in built_and_written:
        # Byte for byte, key order included.
        assert codec.encode(built) == codec.encode(written), written
    assert {calls.mode_code(mode) for mode in AutoresetMode} == set(AUTORESET_MODES)
    assert all(calls.mode_code(mode) == WIRE_MODE[mode] for mode in AutoresetMode)


def test_the_host_answers_what_the_builders_build():
    host = opened_host()
    reply = call(host, {"r": 1, "slots": SLOTS, **calls.reset(list(SEEDS))})
    assert reply[calls.OBS].shape == (3, 4) and len(reply[calls.INFOS]) == 3
    reply = call(host, {"r": 2, "slots": SLOTS, **calls.step(np.array([0, 1, 0]), calls.SAME_STEP)})
    assert set(reply) >= {"r", calls.OBS, calls.REWARDS, calls.TERMINATED, calls.TRUNCATED, calls.INFOS}
    reply = call(host, {"r": 3, "slots": SLOTS, **calls.call("np_random_seed")})
    assert calls.values_from_wire(reply, 3) == SEEDS
    reply = call(host, {"r": 4, "slots": SLOTS, **calls.get_attr("render_mode", probe=True)})
    assert calls.values_from_wire(reply, 3) == [True] * 3
    reply = call(host, {"r": 5, "slots": SLOTS, **calls.is_wrapped(gymnasium.Wrapper)})
    assert "error" not in reply and len(reply[calls.VALUES]) == 3
