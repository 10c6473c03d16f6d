"""Training that survives a simulator's death or a broker restart: ``on_worker_lost="truncate"``.

Real broker and worker processes on 127.0.0.1 (their CLIs). A worker is SIGKILLed while a
``RemoteEnvVec`` steps; with ``"truncate"`` the envs it held end their episode with
``truncated=True`` and ``info["remoterl_worker_lost"]``, are re-opened on the surviving worker,
and every other env's trajectory is exactly that of an undisturbed run with the same seeds
and actions.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode

from conftest import T, start_broker, start_worker, status, wait_for
from remoterl import BrokerUnavailableError, Client, RemoteEnvVec, WorkerLostError

FLAG = "remoterl_worker_lost"
# Slower heartbeats than conftest's: a loaded 2-core machine stalls for 0.6 s at times.
BEATS = ("--heartbeat", "0.3", "--liveness", "4")
STEPS, KILL_AT, N = 40, 12, 8


def _actions(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(STEPS, N))


def _drive(envs: RemoteEnvVec, mode: AutoresetMode, before_step=None) -> list:
    """Reset with seed 0, step through :func:`_actions`; the records of each step.
    Under DISABLED, envs that ended are reset (a partial reset, as a trainer does)."""
    envs.reset(seed=0)
    records = []
    for t, action in enumerate(_actions()):
        if before_step is not None:
            before_step(t)
        obs, rew, term, trunc, info = envs.step(action)
        records.append((np.array(obs, copy=True), rew.copy(), term.copy(), trunc.copy(), info))
        if mode is AutoresetMode.DISABLED and (term | trunc).any():
            envs.reset(options={"reset_mask": term | trunc})
    return records


def _lost_flags(info: dict) -> np.ndarray:
    flags = np.zeros(N, dtype=bool)
    if FLAG in info:
        flags[info[f"_{FLAG}"]] = True
        assert all(info[FLAG][info[f"_{FLAG}"]])
    return flags


@pytest.fixture
def broker_and_two_workers(procs, broker_url):
    start_broker(procs, broker_url, *BEATS)
    workers = [start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", str(N), "--procs", "1",
                            "--name", f"w{i}", expect=i + 1) for i in range(2)]
    return workers


@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.name)
def test_killed_worker_truncates_its_envs_only(broker_and_two_workers, broker_url, mode):
    workers = broker_and_two_workers
    with Client(broker_url).connect() as client:
        envs = RemoteEnvVec("CartPole-v1", N, client=client, autoreset_mode=mode, on_worker_lost="truncate")
        reference = _drive(envs, mode)
        envs.close()

        envs = RemoteEnvVec("CartPole-v1", N, client=client, autoreset_mode=mode, on_worker_lost="truncate")
        held = envs.env_workers
        assert len(set(held)) == 2, "the 8 envs should be spread over both workers"
        pids = {bytes.fromhex(w["id"]): w["pid"] for w in status(broker_url)["workers"]}
        victim_id = held[-1]
        victim = next(w for w in workers if w.pid == pids[victim_id])
        lost = np.array([w == victim_id for w in held])

        def kill(t: int) -> None:
            if t == KILL_AT:
                victim.signal(signal.SIGKILL)
                wait_for(lambda: victim_id.hex() not in {w["id"] for w in status(broker_url)["workers"]},
                         what="the broker to notice the dead worker")

        records = _drive(envs, mode, kill)
        assert set(envs.env_workers) == {held[0]}, "every env now runs on the surviving worker"
        assert status(broker_url)["open_slots"] == N
        envs.close()

    flagged = np.array([_lost_flags(info) for *_, info in records])
    assert flagged.sum(axis=0).tolist() == lost.astype(int).tolist(), "each lost env is flagged exactly once"
    t = int(np.flatnonzero(flagged.any(axis=1))[0])
    assert t == KILL_AT, "the first step after the worker's death reports it"
    obs, rew, term, trunc, info = records[t]
    prev_obs = records[t - 1][0]
    assert trunc[lost].all() and not term[lost].any() and (rew[lost] == 0).all()
    if mode is AutoresetMode.SAME_STEP:
        for i in np.flatnonzero(lost):
            assert data_equivalence(info["final_obs"][i], prev_obs[i], exact=True)
            assert info["final_info"][FLAG][i] and info["final_info"][f"_{FLAG}"][i]
            assert envs.single_observation_space.contains(obs[i])
    else:  # the episode ends on its last observation; NEXT_STEP resets it on the next step
        assert data_equivalence(obs[lost], prev_obs[lost], exact=True)
    if mode is AutoresetMode.NEXT_STEP:
        _, rew_next, term_next, trunc_next, _ = records[t + 1][:5]
        assert (rew_next[lost] == 0).all() and not (term_next[lost] | trunc_next[lost]).any()
    # Every other env: exactly the undisturbed run, every step.
    kept = ~lost
    for step, (ours, theirs) in enumerate(zip(records, reference)):
        for k, what in enumerate(("obs", "rewards", "terminated", "truncated")):
            assert data_equivalence(ours[k][kept], theirs[k][kept], exact=True), f"step {step}: {what} differ"


def test_killed_worker_raises_by_default(broker_and_two_workers, broker_url):
    workers = broker_and_two_workers
    with Client(broker_url).connect() as client:
        envs = RemoteEnvVec("CartPole-v1", N, client=client)
        envs.reset(seed=0)
        victim_id = envs.env_workers[-1]
        pids = {bytes.fromhex(w["id"]): w["pid"] for w in status(broker_url)["workers"]}
        next(w for w in workers if w.pid == pids[victim_id]).signal(signal.SIGKILL)
        wait_for(lambda: len(status(broker_url)["workers"]) == 1, what="the broker to notice the dead worker")
        with pytest.raises(WorkerLostError):
            envs.step(np.zeros(N, dtype=np.int64))


@pytest.mark.parametrize("policy", ["truncate", "raise"])
def test_broker_restart(procs, broker_url, policy):
    broker = start_broker(procs, broker_url, *BEATS)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", str(2 * N), "--procs", "1", expect=1)
    envs = RemoteEnvVec("CartPole-v1", N, broker=broker_url, on_worker_lost=policy, timeout=3 * T)
    try:
        envs.reset(seed=0)
        for _ in range(5):
            envs.step(np.zeros(N, dtype=np.int64))
        broker.signal(signal.SIGKILL)
        broker.wait()
        start_broker(procs, broker_url, *BEATS)
        wait_for(lambda: len(status(broker_url)["workers"]) == 1, what="the worker to register again")
        if policy == "raise":
            with pytest.raises((WorkerLostError, BrokerUnavailableError)):
                envs.step(np.zeros(N, dtype=np.int64))
            # The next env just works: the process's client for this broker is replaced.
            fresh = RemoteEnvVec("CartPole-v1", N, broker=broker_url)
            fresh.reset(seed=1)
            fresh.step(np.zeros(N, dtype=np.int64))
            fresh.close()
            return
        flagged = np.zeros(N, dtype=int)
        for _ in range(5):
            _, _, _, trunc, info = envs.step(np.zeros(N, dtype=np.int64))
            flags = _lost_flags(info)
            assert trunc[flags].all()
            flagged += flags
        assert flagged.tolist() == [1] * N, "every env's episode was cut once, and training went on"
        assert status(broker_url)["open_slots"] == N
    finally:
        envs.close()


def test_remote_env_truncates_and_resets_on_a_new_worker(broker_and_two_workers, broker_url):
    from remoterl import RemoteEnv

    workers = broker_and_two_workers
    with Client(broker_url).connect() as client:
        env = RemoteEnv("CartPole-v1", client=client, on_worker_lost="truncate")
        obs, _ = env.reset(seed=3)
        obs, *_ = env.step(0)
        pids = {bytes.fromhex(w["id"]): w["pid"] for w in status(broker_url)["workers"]}
        held = env._worker
        next(w for w in workers if w.pid == pids[held]).signal(signal.SIGKILL)
        wait_for(lambda: len(status(broker_url)["workers"]) == 1, what="the broker to notice the dead worker")
        last, reward, terminated, truncated, info = env.step(1)
        assert (truncated, terminated, reward, info) == (True, False, 0.0, {FLAG: True})
        assert data_equivalence(last, obs, exact=True)
        obs, _ = env.reset(seed=4)
        assert env._worker != held and env.observation_space.contains(obs)
        assert env.step(0)[3] is False
        env.close()


def test_sb3_ppo_learn_finishes_across_a_worker_death(broker_and_two_workers, broker_url):
    pytest.importorskip("stable_baselines3")
    import threading

    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    from remoterl.sb3 import RemoteVecEnv

    workers = broker_and_two_workers

    class Watch(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.flagged = 0
            self.steps = 0
            self.lost = -1

        def _on_step(self) -> bool:
            self.steps += 1
            for info in self.locals["infos"]:
                if info.get(FLAG):
                    self.flagged += 1
                    assert info["TimeLimit.truncated"] and "terminal_observation" in info
            if self.steps == 20:  # mid-training: kill the worker holding the last env
                pids = {bytes.fromhex(w["id"]): w["pid"] for w in status(broker_url)["workers"]}
                victim_id = venv.venv.env_workers[-1]
                self.lost = venv.venv.env_workers.count(victim_id)
                victim = next(w for w in workers if w.pid == pids[victim_id])
                threading.Thread(target=victim.signal, args=(signal.SIGKILL,), daemon=True).start()
            return True

    with Client(broker_url).connect() as client:
        venv = RemoteVecEnv("CartPole-v1", N, client=client, on_worker_lost="truncate")
        watch = Watch()
        model = PPO("MlpPolicy", venv, n_steps=64, batch_size=128, n_epochs=1, seed=0,
                    policy_kwargs={"net_arch": [16]})
        model.learn(total_timesteps=3 * 64 * N, callback=watch)  # finishes: no exception
        venv.close()
    assert watch.steps >= 3 * 64
    assert watch.flagged == watch.lost > 0, "the lost worker's envs were truncated, once each"


def test_broker_restart_noticed_by_a_call_first_reuses_no_slot_id(procs, broker_url):
    # The client has not noticed the restart (its heartbeat thread is stopped): the first step
    # after it is refused (worker_lost: an unknown session), and the replacements open on the
    # same client. (A restarted broker numbered slots from 1 again, as the lost ones were, and
    # the replacements were closed with them; now its ids are new, and lost slots are
    # forgotten before re-opening anyway.)
    broker = start_broker(procs, broker_url, *BEATS)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", str(2 * N), "--procs", "1", expect=1)
    with Client(broker_url).connect() as client:
        client._hb_stop.set()
        client._hb_thread.join(T)
        envs = RemoteEnvVec("CartPole-v1", N, client=client, on_worker_lost="truncate", timeout=3 * T)
        old_slots = list(envs._env_slots)
        envs.reset(seed=0)
        envs.step(np.zeros(N, dtype=np.int64))
        broker.signal(signal.SIGKILL)
        broker.wait()
        start_broker(procs, broker_url, *BEATS)
        wait_for(lambda: len(status(broker_url)["workers"]) == 1, what="the worker to register again")
        flagged = np.zeros(N, dtype=int)
        for _ in range(4):
            _, _, _, trunc, info = envs.step(np.zeros(N, dtype=np.int64))
            flagged += _lost_flags(info)
        assert flagged.tolist() == [1] * N
        assert not set(envs._env_slots) & set(old_slots), "a restarted broker gives out new ids"
        assert status(broker_url)["open_slots"] == N
        envs.close()


def test_remote_env_after_a_broker_restart_noticed_by_a_step_first(procs, broker_url):
    from remoterl import RemoteEnv

    broker = start_broker(procs, broker_url, *BEATS)
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "4", "--procs", "1", expect=1)
    with Client(broker_url).connect() as client:
        client._hb_stop.set()  # as in the vector's test above: the client has not noticed yet
        client._hb_thread.join(T)
        env = RemoteEnv("CartPole-v1", client=client, on_worker_lost="truncate", timeout=3 * T)
        env.reset(seed=0)
        env.step(0)
        broker.signal(signal.SIGKILL)
        broker.wait()
        start_broker(procs, broker_url, *BEATS)
        wait_for(lambda: len(status(broker_url)["workers"]) == 1, what="the worker to register again")
        _, _, _, truncated, info = env.step(0)
        assert truncated and info[FLAG]
        env.reset(seed=1)
        env.step(1)  # the replacement is still open
        assert status(broker_url)["open_slots"] == 1
        env.close()
