"""Stable-Baselines3 on remote envs: RemoteVecEnv, the make_vec_env patch, PPO end to end."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
torch = pytest.importorskip("torch")

import gymnasium  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_checker import check_env  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # imported before init, as users do  # noqa: E402
from stable_baselines3.common.vec_env import (  # noqa: E402
    DummyVecEnv,
    SubprocVecEnv,
    VecFrameStack,
    VecMonitor,
    VecNormalize,
)

import remoterl  # noqa: E402
from remoterl import CodecError  # noqa: E402
from remoterl.sb3 import RemoteVecEnv  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def embedded():
    settings = remoterl.init(num_workers=2)
    yield settings
    remoterl.shutdown()


def test_sb3_check_env_passes_on_remote_env(embedded):
    env = remoterl.RemoteEnv("CartPole-v1")
    check_env(env, warn=True)
    env.close()


def test_make_vec_env_is_one_batched_vec_env(embedded):
    venv = make_vec_env("CartPole-v1", n_envs=8, seed=0)
    assert isinstance(venv, VecMonitor) and isinstance(venv.venv, RemoteVecEnv)
    assert venv.num_envs == 8
    obs = venv.reset()
    assert obs.shape == (8, 4)
    obs, rewards, dones, infos = venv.step(np.zeros(8, dtype=np.int64))
    assert rewards.dtype == np.float32 and dones.dtype == np.bool_ and len(infos) == 8
    assert venv.get_attr("render_mode") == [None] * 8
    with pytest.raises(CodecError, match="np_random"):  # a Generator cannot travel
        venv.get_attr("np_random")
    with pytest.raises(ValueError, match="close"):  # the workers keep the slots' bookkeeping
        venv.env_method("close")
    venv.close()


def test_terminal_observation_and_rewards_equal_dummy_vec_env(embedded):
    n = 4
    local = DummyVecEnv([lambda: remoterl_free_make("CartPole-v1")] * n)
    remote = RemoteVecEnv("CartPole-v1", n)
    local.seed(7)
    remote.seed(7)
    np.testing.assert_array_equal(local.reset(), remote.reset())
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(300):
        actions = rng.integers(0, 2, n)
        l_obs, l_rew, l_done, l_info = local.step(actions)
        r_obs, r_rew, r_done, r_info = remote.step(actions)
        np.testing.assert_array_equal(l_obs, r_obs)
        np.testing.assert_array_equal(l_rew, r_rew)
        assert l_rew.dtype == r_rew.dtype
        np.testing.assert_array_equal(l_done, r_done)
        for li, ri in zip(l_info, r_info):
            assert li.keys() == ri.keys()
            assert li["TimeLimit.truncated"] == ri["TimeLimit.truncated"]
            if "terminal_observation" in li:
                np.testing.assert_array_equal(li["terminal_observation"], ri["terminal_observation"])
                ended += 1
        assert local.reset_infos == remote.reset_infos
    assert ended >= 10
    local.close()
    remote.close()


def remoterl_free_make(env_id):
    """A local env even while gymnasium.make is patched (the baseline must not be remote)."""
    from remoterl.integrations import gymnasium as gym_patch

    return gym_patch._originals["make"](env_id)


def test_vec_wrappers_wrap_the_remote_vec_env(embedded):
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=4, seed=1), gamma=0.99)
    obs = venv.reset()
    for _ in range(20):
        obs, rewards, dones, infos = venv.step(np.ones(4, dtype=np.int64))
    assert obs.shape == (4, 4) and venv.obs_rms.count > 20
    venv.close()
    stacked = VecFrameStack(RemoteVecEnv("CartPole-v1", 2), n_stack=3)
    assert stacked.reset().shape == (2, 12)
    stacked.close()


def test_ppo_trains_through_the_broker(embedded):
    venv = make_vec_env("CartPole-v1", n_envs=8, seed=0)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                ent_coef=0.0, learning_rate=1e-3, clip_range=0.2, seed=0,
                policy_kwargs={"net_arch": [32, 32]}, verbose=0)
    model.learn(total_timesteps=40_000)
    from stable_baselines3.common.evaluation import evaluate_policy

    mean_reward, _ = evaluate_policy(model, venv, n_eval_episodes=10, deterministic=True)
    assert mean_reward >= 195
    venv.close()


def test_subproc_vec_env_children_reach_the_broker(embedded):
    venv = make_vec_env("CartPole-v1", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv)
    assert isinstance(venv, SubprocVecEnv)
    model = PPO("MlpPolicy", venv, n_steps=16, batch_size=32, n_epochs=1, seed=0,
                policy_kwargs={"net_arch": [16]}, verbose=0)
    model.learn(total_timesteps=96)  # a few updates, every step remote
    assert model.num_timesteps >= 96
    venv.close()


def test_dummy_vec_env_of_patched_make(embedded):
    venv = DummyVecEnv([lambda: gymnasium.make("CartPole-v1")] * 2)
    assert isinstance(venv.envs[0].unwrapped, remoterl.RemoteEnv)
    assert venv.reset().shape == (2, 4)
    venv.close()
