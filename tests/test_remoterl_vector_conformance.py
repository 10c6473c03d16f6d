"""``remoterl.vector.RemoteEnvVec`` against a real broker and two real workers: conformance.

The conformance scenario runs ``SyncVectorEnv`` and ``RemoteEnvVec`` in lock-step
with the same seeds and actions and asserts, with gymnasium's own
``data_equivalence`` (exact), that every reset and step returns the same data,
for each autoreset mode ("gymnasium, exactly"); seeded, unseeded and masked resets too.

One broker and two workers serve each module (starting processes costs about a second),
once as processes on tcp and once embedded; every test closes the vectors it opens, so
each starts with no slot open. Fixtures and helpers: remoterl_vector_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_same
from gymnasium.vector import AutoresetMode

from remoterl import RemoteEnvVec
from remoterl_vector_helpers import ENV_KWARGS, NUM_ENVS, STEPS, assert_same_step, sync_vec
from remoterl_vector_helpers import make_vec as make_vec, url as url  # the shared fixtures: the module's broker


# --- conformance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "DictObsEnv-v0"])
def test_conforms_to_sync_vector_env(make_vec, env_id, mode):
    kwargs = ENV_KWARGS.get(env_id, {})
    local = sync_vec(env_id, mode, **kwargs)
    remote = make_vec(env_id, autoreset_mode=mode, **kwargs)
    try:
        assert len(set(remote.workers)) == 2, "the slots should be spread over both workers"
        assert remote.num_envs == local.num_envs
        assert remote.single_observation_space == local.single_observation_space
        assert remote.single_action_space == local.single_action_space
        assert remote.observation_space == local.observation_space
        assert remote.action_space == local.action_space
        assert remote.metadata["autoreset_mode"] is local.metadata["autoreset_mode"] is mode
        assert remote.metadata == local.metadata
        assert remote.render_mode == local.render_mode
        assert remote.metadata is not type(remote).metadata  # an instance dict, not the class-level one

        assert_same(remote.reset(seed=42), local.reset(seed=42), "reset(seed=42)")
        actions = local.action_space
        actions.seed(7)
        ends = 0
        for step in range(STEPS):
            action = actions.sample()
            local_out = local.step(action)
            assert_same_step(remote.step(action), local_out, step)
            ended = local_out[2] | local_out[3]
            ends += int(ended.sum())
            if mode is AutoresetMode.DISABLED and ended.any():
                opts = {"reset_mask": ended}
                assert_same(remote.reset(options=opts), local.reset(options=opts), f"step {step}: masked reset")
        assert ends >= NUM_ENVS, f"only {ends} episodes ended in {STEPS} steps: the autoreset path went untested"
    finally:
        local.close()


def test_reset_with_seed_list_matches_sync(make_vec):
    local, remote = sync_vec("DictObsEnv-v0"), make_vec("DictObsEnv-v0")
    seeds = [3, 8, 11, 0]
    remote_obs, remote_info = remote.reset(seed=seeds)
    assert_same((remote_obs, remote_info), local.reset(seed=seeds), "reset(seed=list)")
    # A None entry leaves that env unseeded; the others repeat their seeded start.
    again = remote.reset(seed=[3, None, 11, 0])[0]["pos"]
    assert_same(again[[0, 2, 3]], remote_obs["pos"][[0, 2, 3]], "re-seeded envs")
    with pytest.raises(ValueError, match="num_envs=4"):
        remote.reset(seed=[1, 2])


def test_reset_without_seed(make_vec):
    vec = make_vec("CartPole-v1")
    obs, infos = vec.reset()
    assert obs in vec.observation_space and infos == {}
    obs2, _ = vec.reset(seed=None)
    assert obs2.shape == (NUM_ENVS, 4) and not np.array_equal(obs, obs2)


def test_masked_reset_keeps_other_envs(make_vec):
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    assert_same(remote.reset(seed=1), local.reset(seed=1), "reset")
    action = np.array([0, 1, 1, 0])
    for step in range(3):
        before = remote.step(action)[0]
        local.step(action)
    mask = np.array([True, False, False, True])
    returned = before.copy()
    obs, infos = remote.reset(seed=[100, None, None, 103], options={"reset_mask": mask})
    assert_same((obs, infos), local.reset(seed=[100, None, None, 103], options={"reset_mask": mask}), "masked reset")
    np.testing.assert_array_equal(obs[~mask], before[~mask])
    assert not np.array_equal(obs[mask], before[mask])
    np.testing.assert_array_equal(before, returned)  # what step() returned earlier is never altered
    assert_same(remote.step(action), local.step(action), "step after the masked reset")


@pytest.mark.parametrize("mask", [
    np.array([1, 0, 0, 1]),                                    # not booleans
    np.array([1.0, 0.0, 0.0, 1.0]),                            # floats
    np.array([True, False]),                                   # too short
    np.array([True, False, False, True, True]),                # too long
    np.array([[True, False, False, True]]),                    # 2-d
    np.zeros(NUM_ENVS, np.bool_),                              # nothing to reset
    [True, False, False, True],                                # not an array
], ids=["ints", "floats", "short", "long", "2d", "all-false", "list"])
def test_bad_reset_mask_raises_like_the_installed_sync(make_vec, mask):
    # The installed gymnasium's exact type and words (1.2: AssertionError; later: TypeError/ValueError).
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    local.reset(seed=0)
    remote.reset(seed=0)
    with pytest.raises(Exception) as local_error:
        local.reset(options={"reset_mask": mask})
    with pytest.raises(Exception) as remote_error:
        remote.reset(options={"reset_mask": mask})
    assert type(remote_error.value) is type(local_error.value)
    assert str(remote_error.value) == str(local_error.value)
    assert_same(remote.step(np.zeros(NUM_ENVS, np.int64)), local.step(np.zeros(NUM_ENVS, np.int64)),
                "the step after a refused mask")


def test_first_reset_may_be_a_masked_reset_of_every_env(make_vec):
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    every = np.ones(NUM_ENVS, np.bool_)
    assert_same(remote.reset(seed=3, options={"reset_mask": every}),
                local.reset(seed=3, options={"reset_mask": every}), "first reset, all envs masked in")
    action = np.array([1, 0, 1, 0])
    assert_same(remote.step(action), local.step(action), "the step after it")


def test_first_reset_masking_envs_out_is_a_value_error_like_sync(make_vec):
    # SyncVectorEnv fails on it too (the envs left out have no observation to keep): ValueError.
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    mask = np.array([True, True, False, True])
    with pytest.raises(ValueError):
        local.reset(seed=3, options={"reset_mask": mask})
    with pytest.raises(ValueError, match=r"first reset.*\[2\]"):
        remote.reset(seed=3, options={"reset_mask": mask})
    assert_same(remote.reset(seed=3), local.reset(seed=3), "the full reset after it")


def test_num_envs_must_be_positive(url):
    with pytest.raises(ValueError, match="num_envs"):
        RemoteEnvVec("CartPole-v1", 0, broker=url)


def test_np_random_seed_matches_sync(make_vec):
    local, vec = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    # Never seeded: every env's own draw (gymnasium's are 128-bit ints, which travel too).
    seeds = vec.np_random_seed
    assert type(seeds) is tuple and len(set(seeds)) == NUM_ENVS and all(type(s) is int for s in seeds)
    assert vec.np_random_seed == seeds  # read, not redrawn
    for seed in (42, [3, None, 11, 0]):
        local.reset(seed=seed)
        vec.reset(seed=seed)
        assert vec.np_random_seed == local.np_random_seed, seed
        local.reset(seed=None)  # unseeded resets keep the seeds
        vec.reset(seed=None)
        assert vec.np_random_seed == local.np_random_seed, seed
    assert vec.np_random_seed == (3, 43, 11, 0)
