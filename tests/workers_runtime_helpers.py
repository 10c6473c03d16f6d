"""Shared by the tests/test_workers_runtime_*.py files (remoterl.workers.runtime, the slot host):
the test envs that ``SlotHost``'s ``make=`` hook builds (the global registry is left alone),
``call``/``raw_call`` that encode a request and decode the reply as the client would, an
opened host, and ``rebuild_infos`` (the vector infos dict, as ``SyncVectorEnv`` builds it)."""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from remoterl.wire import codec
from remoterl_test_envs import CountingEnv, RaisingEnv  # the same envs the worker-process tests use
from remoterl.wire.calls import AUTORESET_MODES
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
