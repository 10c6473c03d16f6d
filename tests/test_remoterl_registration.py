"""Registration mirroring: gymnasium.register after init reaches the workers, by entry-point string."""

from __future__ import annotations

import gymnasium
import pytest

import remoterl
from conftest import start_broker, start_worker, status
from remoterl.integrations import gymnasium as gym_patch

ENTRY = "remoterl_custom_env:CountingEnv"


@pytest.fixture
def trainer(procs, broker_url):
    """A broker on ``broker_url`` and this process initialised as a trainer against it."""
    start_broker(procs, broker_url)
    remoterl.init(broker=broker_url)
    yield broker_url
    remoterl.shutdown()
    for env_id in ("Counting-v0", "Counting-v1", "Counting-v2"):
        gymnasium.registry.pop(env_id, None)


def test_registered_env_served_by_worker_that_imports_it(procs, broker_url, trainer):
    start_worker(procs, broker_url, "--env", "CartPole-v1", "--import", "remoterl_custom_env", "-n", "2",
                 "--procs", "1", "--name", "with-import", expect=1)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", "--name", "without",
                 expect=2)
    gymnasium.register(id="Counting-v0", entry_point=ENTRY, kwargs={"limit": 4})
    answer = gym_patch.mirror_registration("Counting-v0")
    assert len(answer["accepted"]) == 1 and answer["accepted"][0].startswith("with-import")
    [(refuser, reason)] = answer["refused"].items()
    assert refuser.startswith("without") and "--allow-import" in reason and "remoterl_custom_env" in reason
    env = gymnasium.make("Counting-v0")
    assert isinstance(env.unwrapped, remoterl.RemoteEnv)
    obs, _ = env.reset(seed=0)
    steps = 0
    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(1)
        steps += 1
    assert steps == 4 and info == {"limit": 4}  # the registered kwargs travelled
    env.close()
    served = {w["name"]: w["envs"] for w in status(broker_url)["workers"]}
    assert "Counting-v0" in served["with-import"] and "Counting-v0" not in served["without"]


def test_worker_without_the_module_refuses_with_a_clear_error(procs, broker_url, trainer):
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", expect=1)
    gymnasium.register(id="Counting-v1", entry_point=ENTRY)
    with pytest.raises(remoterl.NoWorkerError) as info:
        gymnasium.make("Counting-v1")
    message = str(info.value)
    assert "refused to register it" in message and "--allow-import" in message


def test_allow_import_and_late_joining_workers(procs, broker_url, trainer):
    gymnasium.register(id="Counting-v2", entry_point=ENTRY)  # no worker yet: kept by the broker
    start_worker(procs, broker_url, "--env", "CartPole-v1", "--allow-import", "remoterl_custom_env", "-n", "2",
                 "--procs", "1", expect=1)
    vec = gymnasium.make_vec("Counting-v2", num_envs=2)
    obs, _ = vec.reset(seed=0)
    assert obs.tolist() == [[0], [0]]
    vec.close()


def test_callable_entry_points_stay_local(trainer):
    gymnasium.register(id="Counting-v1", entry_point=lambda: None)  # nothing sent, nothing raised
    assert "Counting-v1" in gymnasium.registry
