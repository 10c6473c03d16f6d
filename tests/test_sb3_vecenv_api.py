"""SB3's VecEnv API on ``RemoteVecEnv``, beside a local ``DummyVecEnv`` of the same envs and seeds.

``env_method``, ``get_attr`` and ``set_attr`` with indices (None, an int, a list), ``env_is_wrapped``
(answered by the workers from the wrapper class's name), lists of per-env actions for Dict and
Tuple action spaces, and an env whose ``reset`` takes no ``options``. The envs are defined here:
the two embedded workers import this module, so they serve the ids it registers.
"""

from __future__ import annotations

from typing import ClassVar

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

pytest.importorskip("stable_baselines3")

from conftest import T, assert_same, closed_after, embedded_broker
from remoterl.workers.runtime import MAX_WRAPPER_NAME, SlotHost
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from remoterl.wire import codec
from remoterl.env import RemoteEnv
from remoterl.errors import (
    InvalidActionError,
    ProtocolError,
    RemoteAttributeError,
    RemoteEnvError,
)
from remoterl.sb3 import RemoteVecEnv
from remoterl.vector import RemoteEnvVec

N = 3


class AttrEnv(gymnasium.Env):
    """Public state for the attribute calls: ``level`` (the observation), ``label``, ``total``;
    ``scale(x, factor=2)``; ``add(n)`` changes ``total``, so a call run twice shows;
    ``_secret`` is private (never reached remotely)."""

    metadata: ClassVar[dict] = {"render_modes": [], "render_fps": 7}

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-100.0, 100.0, (1,), np.float64)
        self.action_space = spaces.Discrete(2)
        self.level = 1.0
        self.label = "attr"
        self.total = 0
        self._secret = "private"

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([self.level + self.np_random.random()]), {}

    def step(self, action):
        return np.array([self.level * (action + 1)]), float(self.level), False, False, {}

    def scale(self, x, factor=2):
        return np.asarray(x) * factor

    def add(self, n):
        self.total += n
        return self.total


def monitored_attr_env() -> gymnasium.Env:
    """An entry point whose env comes Monitor-wrapped (as users register them)."""
    return Monitor(AttrEnv())


class DictActionEnv(gymnasium.Env):
    """A Dict action space; the observation follows the actions, episodes end after 4 steps."""

    def __init__(self) -> None:
        self.action_space = spaces.Dict({"move": spaces.Box(-1.0, 1.0, (2,), np.float32),
                                         "jump": spaces.Discrete(3)})
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float64)
        self._state = np.zeros(3)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._state = self.np_random.uniform(-1, 1, 3)
        self._t = 0
        return self._state.copy(), {}

    def step(self, action):
        self._t += 1
        self._state = self._state + np.append(action["move"], action["jump"])
        return self._state.copy(), float(action["jump"]) - float(np.sum(action["move"])), self._t >= 4, False, {}


class TupleActionEnv(gymnasium.Env):
    """A Tuple action space; the observation follows the actions, episodes end after 3 steps."""

    def __init__(self) -> None:
        self.action_space = spaces.Tuple((spaces.Discrete(4), spaces.Box(-1.0, 1.0, (1,), np.float32)))
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self._state = np.zeros(2)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._state = self.np_random.uniform(-1, 1, 2)
        self._t = 0
        return self._state.copy(), {}

    def step(self, action):
        self._t += 1
        self._state = self._state + np.array([action[0], action[1][0]])
        return self._state.copy(), float(action[0]) * float(action[1][0]), self._t >= 3, False, {}


class NoOptionsEnv(gymnasium.Env):
    """An older-style env: ``reset`` takes a seed but no ``options``. Episodes end after 2 steps."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0.0, 1.0, (2,), np.float64)
        self.action_space = spaces.Discrete(2)
        self._t = 0

    def reset(self, seed=None):
        super().reset(seed=seed)
        self._t = 0
        return self.np_random.random(2), {}

    def step(self, action):
        self._t += 1
        return self.np_random.random(2), float(action), self._t >= 2, False, {}


for _id, _entry in {"SB3ApiAttr-v0": "AttrEnv", "SB3ApiMonitored-v0": "monitored_attr_env",
                    "SB3ApiDictAction-v0": "DictActionEnv", "SB3ApiTupleAction-v0": "TupleActionEnv",
                    "SB3ApiNoOptions-v0": "NoOptionsEnv"}.items():
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point=f"{__name__}:{_entry}")
if "SB3ApiBareAttr-v0" not in gymnasium.registry:  # gymnasium.make adds no wrapper
    gymnasium.register(id="SB3ApiBareAttr-v0", entry_point=f"{__name__}:AttrEnv", order_enforce=False,
                       disable_env_checker=True)


@pytest.fixture(scope="module")
def url():
    """Two embedded workers (8 slots each) that import this module: N envs spread over both."""
    with embedded_broker(2, 8, (__name__,)) as local_url:
        yield local_url


@pytest.fixture
def pair(url):
    """``pair(env_id, make_local=None) -> (RemoteVecEnv, DummyVecEnv)`` of N envs, seeded alike;
    every vec env is closed at teardown (and the broker must then hold no slot)."""
    with closed_after(url) as track:
        def make(env_id: str, make_local=None) -> tuple:
            remote = track(RemoteVecEnv(env_id, N, broker=url, timeout=T))
            local = track(DummyVecEnv([make_local or (lambda: gymnasium.make(env_id))] * N))
            remote.seed(11)
            local.seed(11)
            assert_same(remote.reset(), local.reset(), "reset obs")
            return remote, local

        yield make


INDICES = [None, 1, -1, [2, 0], [1], [], [0, 0, 2]]


@pytest.mark.parametrize("indices", INDICES, ids=repr)
def test_get_attr_env_method_set_attr_match_dummy_vec_env(pair, indices):
    remote, local = pair("SB3ApiAttr-v0")
    assert len(set(remote.workers)) == 2, "the envs should be spread over both workers"
    for name in ("level", "label", "total", "observation_space", "action_space", "metadata", "render_mode",
                 "spec", "np_random_seed"):
        assert_same(remote.get_attr(name, indices), local.get_attr(name, indices), f"get_attr({name!r})")
    assert_same(remote.env_method("scale", np.arange(3.0), indices=indices, factor=4),
                local.env_method("scale", np.arange(3.0), indices=indices, factor=4), "env_method('scale')")
    # Once per mention, in order: [0, 0, 2] adds twice to env 0.
    assert remote.env_method("add", 5, indices=indices) == local.env_method("add", 5, indices=indices)
    assert remote.get_attr("total") == local.get_attr("total")
    # A method read with get_attr is a callable that runs it (DummyVecEnv: a bound method).
    assert [m(2) for m in remote.get_attr("add", indices)] == [m(2) for m in local.get_attr("add", indices)]

    # setattr on the env object the worker hosts (its outermost wrapper), as DummyVecEnv: reads
    # see the new value, the env underneath keeps its own (the observations do not change).
    remote.set_attr("level", 3.0, indices)
    local.set_attr("level", 3.0, indices)
    remote.set_attr("brand_new", [1, 2], indices)
    local.set_attr("brand_new", [1, 2], indices)
    for name in ("level", "total"):
        assert_same(remote.get_attr(name), local.get_attr(name), f"get_attr({name!r}) after set_attr")
    assert_same(remote.get_attr("brand_new", indices), local.get_attr("brand_new", indices), "created attribute")
    actions = np.array([0, 1, 1])
    for r, l, what in zip(remote.step(actions), local.step(actions), ("obs", "rewards", "dones", "infos")):
        assert_same(r, l, f"step after set_attr: {what}")


def test_render_mode_is_set_where_dummy_vec_env_sets_it(pair):
    remote, local = pair("SB3ApiAttr-v0")
    for venv in (remote, local):  # a wrapper's render_mode is a read-only property
        with pytest.raises(AttributeError, match="render_mode"):
            venv.set_attr("render_mode", "human", indices=1)
    bare, local_bare = pair("SB3ApiBareAttr-v0")  # an env without wrappers takes it
    bare.set_attr("render_mode", "human", indices=[1])
    local_bare.set_attr("render_mode", "human", indices=[1])
    assert bare.get_attr("render_mode") == local_bare.get_attr("render_mode") == [None, "human", None]


def test_missing_attributes_and_indices_fail_as_in_dummy_vec_env(pair):
    remote, local = pair("SB3ApiAttr-v0")
    for venv in (remote, local):
        with pytest.raises(AttributeError, match="nope"):
            venv.get_attr("nope", [1])
        with pytest.raises(AttributeError, match="nope"):
            venv.env_method("nope", indices=0)
        with pytest.raises(IndexError):
            venv.get_attr("level", [N])
    assert remote.get_attr("level", [np.int64(1)]) == local.get_attr("level", [np.int64(1)])
    # Not callable: DummyVecEnv's TypeError, raised on the worker.
    with pytest.raises(TypeError):
        local.env_method("label")
    with pytest.raises(RemoteEnvError) as caught:
        remote.env_method("label")
    assert caught.value.remote_type == "TypeError"


def test_private_names_and_slot_bookkeeping_are_refused(pair):
    remote, _ = pair("SB3ApiAttr-v0")
    with pytest.raises(RemoteAttributeError, match="private"):
        remote.get_attr("_secret")
    with pytest.raises(RemoteAttributeError, match="private"):
        remote.set_attr("_secret", 1, indices=[0])
    with pytest.raises(RemoteAttributeError, match="private"):
        remote.env_method("__init__")
    with pytest.raises(ValueError, match="close"):
        remote.env_method("close", indices=1)
    assert remote.env_method("scale", 1) == [2] * N  # the vec env still works


@pytest.mark.parametrize("indices", [None, 2, [1, 0]], ids=repr)
def test_env_is_wrapped_is_answered_by_the_workers(pair, indices):
    monitored, local_monitored = pair("SB3ApiMonitored-v0")
    plain, local_plain = pair("SB3ApiAttr-v0")
    for remote, local in ((monitored, local_monitored), (plain, local_plain)):
        for wrapper in (Monitor, gymnasium.wrappers.OrderEnforcing, gymnasium.Wrapper,
                        gymnasium.wrappers.TimeLimit):
            assert remote.env_is_wrapped(wrapper, indices) == local.env_is_wrapped(wrapper, indices), wrapper
    assert monitored.env_is_wrapped(Monitor) == [True] * N
    assert plain.env_is_wrapped(Monitor) == [False] * N


def test_a_wrapper_class_whose_name_cannot_travel_is_refused(pair):
    remote, _ = pair("SB3ApiAttr-v0")
    odd = type("Odd", (gymnasium.Wrapper,), {})
    odd.__qualname__ = "not a name"
    with pytest.raises(ProtocolError, match="module:QualName"):
        remote.env_is_wrapped(odd)
    with pytest.raises(TypeError):
        remote.env_is_wrapped("stable_baselines3.common.monitor:Monitor")
    assert remote.env_is_wrapped(Monitor) == [False] * N  # still in step


@pytest.mark.parametrize("wrapper", [None, 7, "Monitor", "stable_baselines3.common.monitor:", ":Monitor",
                                     "a b:C", "mod:C.1x", "mod:C:D", "m:" + "A" * MAX_WRAPPER_NAME])
def test_the_worker_refuses_a_bad_wrapper_name(wrapper):
    host = SlotHost(None, 4, make=lambda env_id, **kwargs: Monitor(AttrEnv()))
    assert "error" not in host.open(b"client", {"r": 1, "env": "x", "kwargs": {}, "slots": [1]})
    request = {"r": 2, "op": "is_wrapped", "slots": [1], "wrapper": wrapper}
    reply = codec.decode(*host.call(b"client", *codec.encode(request), 0))
    assert reply["error"]["code"] == "protocol", reply
    request["wrapper"] = "stable_baselines3.common.monitor:Monitor"
    assert codec.decode(*host.call(b"client", *codec.encode(request), 0)) == {"r": 2, "values": [True]}
    host.close_all()


@pytest.mark.parametrize("env_id", ["SB3ApiDictAction-v0", "SB3ApiTupleAction-v0"])
def test_lists_of_per_env_actions_step_as_in_dummy_vec_env(pair, env_id):
    remote, local = pair(env_id)
    space = remote.action_space
    space.seed(3)
    ended = 0
    for step in range(9):
        actions = [space.sample() for _ in range(N)]
        if env_id == "SB3ApiTupleAction-v0" and step % 2:
            actions = [list(a) for a in actions]  # lists stand for tuples, as Tuple.contains takes them
        r_obs, r_rew, r_done, r_info = remote.step(actions)
        l_obs, l_rew, l_done, l_info = local.step(actions)
        assert_same(r_obs, l_obs, f"step {step}: obs")
        assert_same(r_rew, l_rew, f"step {step}: rewards")
        assert_same(r_done, l_done, f"step {step}: dones")
        for ri, li in zip(r_info, l_info):
            assert_same(ri, li, f"step {step}: info")
        ended += int(r_done.sum())
    assert ended >= N


def test_bad_per_env_action_lists_are_refused_before_sending(pair):
    remote, _ = pair("SB3ApiDictAction-v0")
    good = remote.action_space.sample()
    with pytest.raises(InvalidActionError, match="3 actions"):
        remote.step([good] * (N - 1))
    with pytest.raises(InvalidActionError, match=r"actions\[1\]\['jump'\]"):
        remote.step([good, {**good, "jump": 0.5}, good])
    remote.step([good] * N)  # nothing was sent: still in step


def test_an_env_whose_reset_takes_no_options(pair):
    remote, local = pair("SB3ApiNoOptions-v0", make_local=NoOptionsEnv)  # locally: DummyVecEnv of the env itself
    for step in range(5):  # episodes end every 2 steps: autoreset on the workers, no options either
        for r, l, what in zip(remote.step(np.ones(N, np.int64)), local.step(np.ones(N, np.int64)),
                              ("obs", "rewards", "dones", "infos")):
            assert_same(r, l, f"step {step}: {what}")
    # Options given still reach the env, which refuses them, as locally.
    remote.set_options({"level": 2})
    local.set_options({"level": 2})
    with pytest.raises(TypeError, match="options"):
        local.reset()
    with pytest.raises(RemoteEnvError, match="options"):
        remote.reset()
    for venv in (remote, local):  # a reset that failed used up neither the options nor the seeds
        venv.set_options()
        venv.seed(5)
    assert_same(remote.reset(), local.reset(), "reset after a refused one")


def test_remote_env_and_env_vec_reset_an_env_without_options(url):
    with closed_after(url) as track:
        single = track(RemoteEnv("SB3ApiNoOptions-v0", broker=url, timeout=T))
        assert_same(single.reset(seed=4), NoOptionsEnv().reset(seed=4), "RemoteEnv.reset")
        vec = track(RemoteEnvVec("SB3ApiNoOptions-v0", 2, broker=url, timeout=T))
        expected = np.stack([NoOptionsEnv().reset(seed=seed)[0] for seed in (4, 5)])
        assert_same(vec.reset(seed=4)[0], expected, "RemoteEnvVec.reset")
