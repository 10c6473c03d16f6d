"""Ray RLlib (new API stack) on remote envs: RemoteEnvRunner, the AlgorithmConfig patch, PPO end to end."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("ray.rllib")
torch = pytest.importorskip("torch")

import ray  # noqa: E402
from conftest import HEARTBEAT, TESTS_DIR, T, start_broker, start_worker, status, wait_for  # noqa: E402
from ray import tune  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner  # noqa: E402

import remoterl  # noqa: E402
import remoterl_rllib_envs  # noqa: E402
from remoterl.integrations import rllib as rllib_integration  # noqa: E402
from remoterl.rllib import RemoteEnvRunner, remote_env_runners  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_cluster():
    # The env runners import the test envs' module (a tune.register_env creator) from tests/.
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def embedded():
    settings = remoterl.init(num_workers=2, heartbeat=HEARTBEAT)
    assert rllib_integration.is_patched()  # init() saw RLlib and patched AlgorithmConfig
    yield settings
    remoterl.shutdown()
    assert not rllib_integration.is_patched()


def small_ppo(config: PPOConfig, runners: int, envs: int, fragment: int = 64) -> PPOConfig:
    """A tiny PPO: one pass over one batch per iteration, a 32-unit network."""
    batch = runners * envs * fragment
    return (config.env_runners(num_env_runners=runners, num_envs_per_env_runner=envs,
                               rollout_fragment_length=fragment)
            .training(train_batch_size_per_learner=batch, minibatch_size=batch, num_epochs=1)
            .rl_module(model_config={"fcnet_hiddens": [32]}))


def worker_counters(url: str) -> dict[str, tuple[int, int, int]]:
    """{worker id: (calls forwarded by the broker, env steps, env resets)}."""
    return {w["id"]: (w["calls"], w.get("stats", {}).get("steps", 0), w.get("stats", {}).get("resets", 0))
            for w in status(url)["workers"]}


def test_ppo_steps_through_the_broker_one_message_per_worker_per_step(ray_cluster, embedded):
    runners, n = 2, 4
    before = worker_counters(embedded.children_broker)
    config = small_ppo(PPOConfig().environment("CartPole-v1"), runners, n)
    assert config.env_runner_cls is RemoteEnvRunner  # the patched environment() did it
    assert config.enable_rl_module_and_learner and config.enable_env_runner_and_connector_v2
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        vec_envs = algo.env_runner_group.foreach_env_runner(
            lambda runner: (type(runner.env.unwrapped).__name__, runner.env.unwrapped.num_envs,
                            len(runner.env.unwrapped.workers)), local_env_runner=False)
    finally:
        algo.stop()
    # Each runner's 4 envs are ONE RemoteEnvVec; the broker spread its slots over w workers.
    w = vec_envs[0][2]
    assert vec_envs == [("RemoteEnvVec", n, w)] * runners
    sampled = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
    episodes = int(result["env_runners"]["num_episodes_lifetime"])
    # remoterl's own figures of the iteration, summed (counts) or averaged (ms) over the runners:
    # every vector step is one call per worker, of n/w env-steps each.
    figures = result["env_runners"]["remoterl"]
    assert figures["env_steps"] >= runners * n * 64 and figures["errors"] == 0
    assert figures["env_steps"] * w <= figures["calls"] * n
    assert 0 < figures["round_trip_p50_ms"] <= figures["round_trip_p99_ms"]
    assert sampled >= 2 * runners * n * 64

    def delta() -> tuple[int, int, int]:
        after = worker_counters(embedded.children_broker)
        return tuple(sum(after[k][i] - before.get(k, (0, 0, 0))[i] for k in after) for i in range(3))

    # Every env step RLlib sampled was taken on a worker (heartbeats bring the workers' stats).
    wait_for(lambda: delta()[1] == sampled, what=f"workers' steps to reach RLlib's {sampled}")
    calls, steps, resets = delta()
    # Exact: a message carries n/w slots (one per worker per vector step or reset), so the
    # slot operations the workers ran (steps + resets, autoresets included) are calls * n/w.
    assert (steps + resets) * w == calls * n
    # From RLlib's counters: the runners made V = (sampled + A) / n vector steps, A the
    # NEXT_STEP autoresets: one per finished episode, except the episodes that ended in a
    # runner's last step (at most n per runner, not reset yet). Plus one reset per runner.
    # Unbatched (n single envs) this would be n, not w, messages per vector step.
    lowest = w * ((sampled + episodes - n * runners) / n + runners)
    highest = w * ((sampled + episodes) / n + runners)
    assert lowest <= calls <= highest, (calls, lowest, highest)
    assert calls < n * (sampled / n)


def test_tune_register_env_creator_trains_on_the_workers(ray_cluster, embedded):
    tune.register_env("remoterl-corridor", remoterl_rllib_envs.make_corridor)
    config = small_ppo(PPOConfig().environment("remoterl-corridor", env_config={"length": 3}), 1, 2, 32)
    algo = config.build_algo()
    try:
        result = algo.train()
        opened = algo.env_runner_group.foreach_env_runner(
            lambda runner: (runner.env.unwrapped.env_id, float(runner.env.unwrapped.single_observation_space.high[0])),
            local_env_runner=False)
    finally:
        algo.stop()
    assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 64
    # Registered on the workers by its import path; env_config reached the creator there.
    assert opened == [("rllib/remoterl-corridor", 3.0)]
    served = {env for worker in status(embedded.children_broker)["workers"] for env in worker.get("envs", [])}
    assert "rllib/remoterl-corridor" in served


def test_creator_the_workers_may_not_import_is_refused(ray_cluster, procs, broker_url):
    start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", expect=1)
    tune.register_env("remoterl-corridor", remoterl_rllib_envs.make_corridor)
    with pytest.raises(remoterl.NoWorkerError, match="--allow-import remoterl_rllib_envs"):
        remote_env_runners(PPOConfig().environment("remoterl-corridor"), broker=broker_url)


def test_creators_that_cannot_travel_are_a_clear_error(ray_cluster):
    tune.register_env("remoterl-lambda", lambda env_config: remoterl_rllib_envs.Corridor())
    with pytest.raises(ValueError, match="cannot be served by remote simulators.* is a lambda"):
        remote_env_runners(PPOConfig().environment("remoterl-lambda"), broker="tcp://127.0.0.1:9")

    def local_creator(env_config):
        return remoterl_rllib_envs.Corridor()

    with pytest.raises(ValueError, match="inside a function"):
        rllib_integration.creator_entry_point("local", local_creator)
    main_creator = type(local_creator)(local_creator.__code__, {}, "main_creator")
    main_creator.__module__, main_creator.__qualname__ = "__main__", "main_creator"
    with pytest.raises(ValueError, match="defined in __main__"):
        rllib_integration.creator_entry_point("main", main_creator)
    assert rllib_integration.creator_entry_point("ok", remoterl_rllib_envs.make_corridor) == \
        "remoterl_rllib_envs:make_corridor"


def test_old_api_stack_is_refused(ray_cluster, embedded):
    old = dict(enable_rl_module_and_learner=False, enable_env_runner_and_connector_v2=False)
    with pytest.raises(ValueError, match="new API stack only"):
        remote_env_runners(PPOConfig().api_stack(**old), broker="tcp://127.0.0.1:9")
    with pytest.raises(ValueError, match="new API stack only"):  # patched environment()
        PPOConfig().api_stack(**old).environment("CartPole-v1")
    with pytest.raises(ValueError, match="new API stack only"):  # patched build_algo(), before any actor
        PPOConfig().environment("CartPole-v1").api_stack(**old).build_algo()


def test_another_env_runner_cls_is_refused():
    with pytest.raises(ValueError, match="RemoteEnvRunner or a subclass"):
        remote_env_runners(PPOConfig().env_runners(env_runner_cls=SingleAgentEnvRunner), broker="tcp://127.0.0.1:9")


def _ppo_on_two_workers(procs, broker_url: str, **runners) -> tuple:
    """A broker and two CartPole workers as processes; a small PPO whose 2 runners step there.
    Heartbeats slower than conftest's: runner processes under load stall for 0.6 s at times."""
    start_broker(procs, broker_url, "--heartbeat", "0.3", "--liveness", "4")
    workers = [start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "8", "--procs", "1", expect=i + 1)
               for i in range(2)]
    config = small_ppo(PPOConfig().environment("CartPole-v1"), 2, 2, 32)
    # RLlib would restart a failed runner (its new RemoteEnvVec opening on the survivor): not here.
    config = remote_env_runners(config.fault_tolerance(restart_failed_env_runners=False), broker=broker_url,
                                **runners)
    return config.build_algo(), workers


def _kill_while_sampling(broker_url: str, workers: list) -> tuple[threading.Thread, list[float], int]:
    """Start a thread that SIGKILLs a worker once it serves the next iteration's steps (no
    DISCONNECT, no goodbye); return it, the list it appends the kill time to, and the pid."""
    pids = {w["pid"]: w["id"] for w in status(broker_url)["workers"]}
    victim = next(p for p in workers if p.pid in pids)
    calls = worker_counters(broker_url)[pids[victim.pid]][0]
    killed_at: list[float] = []

    def kill() -> None:
        wait_for(lambda: worker_counters(broker_url)[pids[victim.pid]][0] > calls + 3, what="sampling")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer, killed_at, victim.pid


def test_worker_killed_mid_training_raises_worker_lost_in_the_driver(ray_cluster, procs, broker_url):
    algo, workers = _ppo_on_two_workers(procs, broker_url)
    try:
        algo.train()
        killer, killed_at, _ = _kill_while_sampling(broker_url, workers)
        deadline = time.monotonic() + 3 * T
        with pytest.raises(remoterl.WorkerLostError, match="lost") as caught:
            while time.monotonic() < deadline:
                algo.train()
        killer.join(T)
        assert killed_at, "the worker was never killed"
        # Within the broker's liveness window (plus an iteration), not a hang.
        assert time.monotonic() - killed_at[0] < 0.3 * 4 + T / 2  # the broker's liveness window
        assert isinstance(caught.value, ray.exceptions.RayTaskError)  # raised by a runner, re-raised here
    finally:
        algo.stop()


def test_worker_killed_mid_training_is_survived_with_truncate(ray_cluster, procs, broker_url):
    # Runners are not restarted: the RemoteEnvVec inside each replaces its lost envs itself.
    algo, workers = _ppo_on_two_workers(procs, broker_url, on_worker_lost="truncate")
    try:
        algo.train()
        killer, killed_at, victim = _kill_while_sampling(broker_url, workers)
        deadline = time.monotonic() + 3 * T
        trained_after = 0
        while trained_after < 2:
            assert time.monotonic() < deadline, "training did not go on after the worker's death"
            was_killed = bool(killed_at)
            result = algo.train()  # never raises: the lost envs are replaced
            trained_after += was_killed
        killer.join(T)
        # Every runner's envs now live on the surviving worker.
        assert [w["pid"] for w in status(broker_url)["workers"]] != [victim]
        assert status(broker_url)["open_slots"] == 4
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] > 0
    finally:
        algo.stop()
