"""Tests for remoterl.workers.runtime's reset and step: the host, driven step for step beside
``gymnasium.vector.SyncVectorEnv`` with the same seeds and actions, must give the same
observations, rewards, flags and (rebuilt with ``VectorEnv._add_info``) the same infos, in all
three autoreset modes ("gymnasium, exactly"). The host is driven by decoded calls (no sockets):
a call is a codec header plus frames, exactly as the worker loop hands it over; the reply is
decoded with the codec, exactly as the client would (helpers in workers_runtime_helpers.py)."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from conftest import assert_same

from workers_runtime_helpers import SLOTS, SEEDS, WIRE_MODE, assert_error, call, make_env, opened_host, rebuild_infos


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
