"""Registration mirroring: gymnasium.register after init reaches the workers, by entry-point string."""

from __future__ import annotations

import gymnasium
import pytest

import remoterl
from conftest import T, start_broker, start_worker, status, wait_for
from remoterl.integrations import gymnasium as gym_patch

ENTRY = "remoterl_custom_env:CountingEnv"


@pytest.fixture
def trainer(procs, broker_url):
    """A broker on ``broker_url`` and this process initialised as a trainer against it."""
    start_broker(procs, broker_url)
    remoterl.init(broker=broker_url)
    yield broker_url
    remoterl.shutdown()
    for env_id in ("Counting-v0", "Counting-v1", "Counting-v2", "Counting-v3"):
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
    # The broker hands a joining worker the registrations at READY; it serves the id once it answers.
    wait_for(lambda: "Counting-v2" in status(broker_url)["workers"][0]["envs"], what="the late worker registered it")
    vec = gymnasium.make_vec("Counting-v2", num_envs=2)
    obs, _ = vec.reset(seed=0)
    assert obs.tolist() == [[0], [0]]
    vec.close()


def test_callable_entry_points_stay_local(trainer):
    gymnasium.register(id="Counting-v1", entry_point=lambda: None)  # nothing sent, nothing raised
    assert "Counting-v1" in gymnasium.registry


def test_a_class_registered_by_object_travels_by_its_import_path(procs, broker_url, trainer):
    from remoterl_custom_env import CountingEnv

    start_worker(procs, broker_url, "--env", "CartPole-v1", "--import", "remoterl_custom_env", "-n", "2",
                 "--procs", "1", expect=1)
    gymnasium.register(id="Counting-v3", entry_point=CountingEnv, kwargs={"limit": 3})
    env = gymnasium.make("Counting-v3")
    try:
        assert isinstance(env.unwrapped, remoterl.RemoteEnv)
        env.reset(seed=0)
        assert [env.step(1)[2] for _ in range(3)] == [False, False, True]
    finally:
        env.close()


MAIN_CLASS = """
import gymnasium, remoterl

class MyEnv(gymnasium.Env):
    observation_space = gymnasium.spaces.Discrete(2)
    action_space = gymnasium.spaces.Discrete(2)

remoterl.init(broker={url!r})
gymnasium.register(id="MainEnv-v0", entry_point=MyEnv)
try:
    gymnasium.make("MainEnv-v0")
except remoterl.NoWorkerError as exc:
    print("NoWorkerError:", exc)
"""


def test_an_env_class_in_main_says_how_to_reach_the_workers(procs, broker_url, tmp_path):
    import subprocess
    import sys

    start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "1", "--procs", "1", expect=1)
    script = tmp_path / "train.py"
    script.write_text(MAIN_CLASS.format(url=broker_url))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=3 * T)
    assert out.returncode == 0, out.stderr
    assert "NoWorkerError:" in out.stdout
    assert "__main__ (train.py)" in out.stdout and "--import" in out.stdout


def test_a_typo_names_the_registered_ids(procs, broker_url, trainer):
    """Against a broker whose workers list their ids, the broker suggests; against a worker
    serving every registered id ("*"), gymnasium's own suggestion leads the error."""
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "1", "--procs", "1", expect=1)
    with pytest.raises(remoterl.NoWorkerError, match=r"did you mean 'CartPole-v1'\?"):
        gymnasium.make("CartPole-v9")
    start_worker(procs, broker_url, "-n", "1", "--procs", "1", expect=2)
    with pytest.raises(remoterl.NoWorkerError) as info:
        gymnasium.make("CartPol-v1")
    message = str(info.value)
    assert message.startswith("'CartPol-v1' is not a registered env id") and "Did you mean: `CartPole`?" in message
