"""``remoterl.metrics()``: the trainer's own round trips, calls, env-steps and errors, and the
SB3 callback that logs them next to the rewards (the RLlib runner's are checked in
tests/test_remoterl_rllib.py)."""

from __future__ import annotations

import numpy as np
import pytest

import remoterl
from conftest import start_broker, start_worker
from remoterl import Client, RemoteEnvError, RemoteEnvVec, RemoteTimeoutError
from remoterl.client.metrics import BUCKETS, ClientMetrics, Histogram, Interval


def test_histogram_quantiles_come_from_the_buckets():
    h = Histogram()
    assert h.summary() == {"count": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None, "max_ms": None}
    for _ in range(98):
        h.observe(0.0007)  # in the (0.5 ms, 1 ms] bucket
    h.observe(0.02)
    h.observe(0.03)
    s = h.summary()
    assert s["count"] == 100 and 0.5 < s["p50_ms"] <= 1.0 and 10.0 < s["p99_ms"] <= 30.0
    assert s["max_ms"] == 30.0 and s["mean_ms"] == pytest.approx((98 * 0.7 + 50) / 100)
    h.observe(60.0)  # above the last bound
    assert h.counts[-1] == 1 and h.quantile(1.0) == 60.0
    earlier = h.copy()
    h.observe(0.00001)
    assert h.since(earlier).count == 1 and h.since(earlier).counts[0] == 1
    assert len(h.counts) == len(BUCKETS) + 1


def test_interval_reports_what_happened_since_the_last_take():
    m = ClientMetrics()
    interval = Interval()
    m.answered(b"w", "step", 4, 0.001, None)
    first = interval.take(m)
    assert first["env_steps"] == 4 and first["calls"] == 1 and first["errors"] == 0
    m.answered(b"w", "step", 4, 0.2, RemoteEnvError("boom"))
    m.answered(b"v", "reset", 4, 0.2, None)
    second = interval.take(m)
    assert second["env_steps"] == 4 and second["calls"] == 2 and second["errors"] == 1
    assert second["round_trip_p50_ms"] > 100  # only this interval's calls, not the first's 1 ms
    assert interval.take(m) == {"calls": 0.0, "env_steps": 0.0, "errors": 0.0}


@pytest.fixture
def broker_with_workers(procs, broker_url):
    start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--import", "remoterl_test_envs", "--env", "CartPole-v1",
                 "--env", "RaisingEnv-v0", "--env", "SleepyEnv-v0", "-n", "16", "--procs", "1", expect=1)
    return broker_url


def test_metrics_count_every_call_of_a_run(broker_with_workers):
    url = broker_with_workers
    with Client(url).connect() as client:
        envs = RemoteEnvVec("CartPole-v1", 4, client=client)
        envs.reset(seed=0)
        for _ in range(25):
            envs.step(np.zeros(4, dtype=np.int64))
        snap = remoterl.metrics(client)
        assert snap["calls"] == {"reset": 1, "step": 25}
        assert snap["env_steps"] == 100
        assert snap["errors"] == {}
        assert snap["round_trip"]["count"] == 26 and snap["round_trip"]["p50_ms"] > 0
        (worker, figures), = snap["workers"].items()
        assert bytes.fromhex(worker) == envs.workers[0] and figures["count"] == 26
        envs.close()

        raising = RemoteEnvVec("RaisingEnv-v0", 2, client=client)
        raising.reset(seed=0)
        with pytest.raises(RemoteEnvError):
            for _ in range(20):
                raising.step(raising.action_space.sample())
        raising.close()
        assert remoterl.metrics(client)["errors"] == {"RemoteEnvError": 1}

        sleepy = RemoteEnvVec("SleepyEnv-v0", 1, client=client, timeout=0.05, delay=0.5)
        sleepy.reset()
        with pytest.raises(RemoteTimeoutError):
            sleepy.step(np.zeros(1, dtype=np.int64))
        assert remoterl.metrics(client)["errors"]["RemoteTimeoutError"] == 1


def test_sb3_callback_logs_each_rollout(broker_with_workers):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import KVWriter, Logger

    from remoterl.sb3 import MetricsCallback, RemoteVecEnv

    class Keep(KVWriter):
        def __init__(self):
            self.dumps = []

        def write(self, key_values, key_excluded, step=0):
            self.dumps.append(dict(key_values))

    with Client(broker_with_workers).connect() as client:
        venv = RemoteVecEnv("CartPole-v1", 4, client=client)
        model = PPO("MlpPolicy", venv, n_steps=16, batch_size=64, n_epochs=1, seed=0)
        keep = Keep()
        model.set_logger(Logger(None, [keep]))
        model.learn(total_timesteps=128, callback=MetricsCallback(client))
        venv.close()
    rollouts = [d for d in keep.dumps if "remoterl/env_steps" in d]
    assert len(rollouts) == 2, keep.dumps
    for dump in rollouts:
        assert dump["remoterl/env_steps"] == 64  # 16 vector steps of 4 envs per rollout
        assert dump["remoterl/calls"] == 16 and dump["remoterl/errors"] == 0
        assert 0 < dump["remoterl/round_trip_p50_ms"] <= dump["remoterl/round_trip_p99_ms"]
