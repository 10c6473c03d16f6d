"""Shared by the tests/test_remoterl_vector_*.py files (``remoterl.vector.RemoteEnvVec`` against a
real broker and two real workers): the module-scoped ``url`` fixture (a broker serving
SERVED, as processes on tcp and as the embedded default), ``make_vec``, and the local
``SyncVectorEnv`` to compare with. Test modules import the fixtures by name."""

from __future__ import annotations

import pytest

import gymnasium
import remoterl_test_envs  # noqa: F401  (registers DictObsEnv-v0, RaisingEnv-v0, CountingEnv-v0 here too)
from conftest import assert_same, closed_after, embedded_broker, tcp_broker
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from remoterl import RemoteEnvVec


SERVED = ["CartPole-v1", "Pendulum-v1", "DictObsEnv-v0", "RaisingEnv-v0", "CountingEnv-v0"]
NUM_ENVS = 4
STEPS = 200
# Pendulum only truncates (at 200 steps by default): make its episodes end during the run.
ENV_KWARGS = {"Pendulum-v1": {"max_episode_steps": 50}}


@pytest.fixture(scope="module", params=["tcp", "embedded"])
def url(request):
    """A broker and two workers (16 slots each) serving SERVED, for the whole module: once as
    processes on tcp, once as the embedded default (broker thread, workers on local links)."""
    if request.param == "embedded":
        with embedded_broker(2, 16, ("remoterl_test_envs",)) as local_url:
            yield local_url
        return
    env_args = [arg for env_id in SERVED for arg in ("--env", env_id)]
    with tcp_broker(2, "--import", "remoterl_test_envs", *env_args, "-n", "16") as broker_url:
        yield broker_url


@pytest.fixture
def make_vec(url):
    """Build RemoteEnvVecs on the module's broker; all are closed at teardown."""
    with closed_after(url) as track:
        yield lambda env_id, num_envs=NUM_ENVS, **kwargs: track(RemoteEnvVec(env_id, num_envs, broker=url, **kwargs))


def assert_same_step(remote, local, step: int) -> None:
    for name, r, l in zip(("obs", "rewards", "terminations", "truncations", "infos"), remote, local):
        assert_same(r, l, f"step {step}: {name}")


def sync_vec(env_id: str, mode: AutoresetMode = AutoresetMode.NEXT_STEP, num_envs: int = NUM_ENVS,
             **kwargs) -> SyncVectorEnv:
    return SyncVectorEnv([lambda: gymnasium.make(env_id, **kwargs)] * num_envs, autoreset_mode=mode)
