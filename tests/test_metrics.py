"""``--metrics`` on the broker and workers (remoterl.broker.metrics, remoterl.workers.metrics),
and ``--log-format json`` (remoterl.logs): real broker and worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import remoterl
from conftest import T, cli, start_broker, start_worker, status, wait_for
from remoterl.broker.metrics import BUCKETS, Histogram, parse_address
from remoterl.client.status import fetch_status
from remoterl.wire import protocol as p
from remoterl.wire.protocol import WorkerCommand as W

STEPS = 25
NUM_ENVS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, key: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=T) as response:
        return response.read().decode()


def samples(text: str) -> dict:
    """``{(sample name, frozenset of label items): value}`` of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[name, frozenset(labels.items())]


def test_counters_histograms_and_gauges_follow_a_trainer(procs, broker_url):
    bport, wport = free_port(), free_port()
    start_broker(procs, broker_url, "--metrics", str(bport))
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", str(NUM_ENVS), "--procs", "1", "--name", "w0",
                 "--metrics", f"127.0.0.1:{wport}", expect=1)
    before = samples(scrape(bport))
    assert value(before, "remoterl_broker_workers") == 1 and value(before, "remoterl_broker_clients") == 0
    with remoterl.Client(broker_url).connect() as client:
        # SAME_STEP: every slot steps on every call (NEXT_STEP would reset ended slots instead).
        vec = remoterl.RemoteEnvVec("CartPole-v1", NUM_ENVS, client=client, autoreset_mode="SameStep")
        vec.reset(seed=0)
        ended = 0
        for _ in range(STEPS):
            _, _, terminated, truncated, _ = vec.step(np.zeros(NUM_ENVS, np.int64))
            ended += int(np.sum(terminated | truncated))
        broker, worker, snapshot = samples(scrape(bport)), samples(scrape(wport)), status(broker_url)
        vec.close()
    env = {"env_id": "CartPole-v1"}
    # The worker: exactly the steps, resets and calls taken, every call and slot-step timed.
    assert value(worker, "remoterl_worker_env_steps_total", **env) == STEPS * NUM_ENVS
    assert value(worker, "remoterl_worker_resets_total", **env) == NUM_ENVS + ended
    assert value(worker, "remoterl_worker_env_step_duration_seconds_count", **env) == STEPS * NUM_ENVS
    assert value(worker, "remoterl_worker_calls_total", op="step") == STEPS
    assert value(worker, "remoterl_worker_call_duration_seconds_count", op="step") == STEPS
    assert value(worker, "remoterl_worker_calls_total", op="reset") == 1
    assert value(worker, "remoterl_worker_slots", **env) == NUM_ENVS
    assert value(worker, "remoterl_worker_connected") == 1
    assert value(worker, "remoterl_worker_info", worker="w0") == 1
    worker_calls = sum(v for (name, _), v in worker.items() if name == "remoterl_worker_calls_total")
    # The broker: the same calls, each one's round trip timed; gauges as `remoterl status` has them.
    row = next(w for w in snapshot["workers"] if w.get("name") == "w0")
    calls = value(broker, "remoterl_broker_calls_total", worker="w0", **env)
    assert calls == row["calls"] == worker_calls
    assert value(broker, "remoterl_broker_call_duration_seconds_count", worker="w0") == calls
    assert value(broker, "remoterl_broker_call_duration_seconds_bucket", worker="w0", le="+Inf") == calls
    assert value(broker, "remoterl_broker_slots", **env) == snapshot["open_slots"] == NUM_ENVS
    assert value(broker, "remoterl_broker_workers") == len(snapshot["workers"]) == 1
    assert value(broker, "remoterl_broker_clients") == len(snapshot["clients"]) == 1
    assert value(broker, "remoterl_broker_received_bytes_total") > 0
    assert value(broker, "remoterl_broker_sent_bytes_total") > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= BUCKETS[-1] * 1000
    # Closed: the slot gauges drop on both sides.
    wait_for(lambda: ("remoterl_broker_slots", frozenset(env.items())) not in samples(scrape(bport)),
             what="the broker's slots closed")
    wait_for(lambda: ("remoterl_worker_slots", frozenset(env.items())) not in samples(scrape(wport)),
             what="the worker's slots closed")


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("key-alpha alpha\nkey-beta beta\n")
    return path


def test_a_tenant_scoped_scrape_shows_only_that_tenant(procs, broker_url, keys_file):
    port = free_port()
    start_broker(procs, broker_url, "--api-keys", str(keys_file), "--metrics", str(port), "--metrics-tenant-labels")
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", "--api-key", "key-alpha",
                 "--name", "alpha-w")
    start_worker(procs, broker_url, "--env", "Acrobot-v1", "-n", "2", "--procs", "1", "--api-key", "key-beta",
                 "--name", "beta-w")
    wait_for(lambda: all(len(fetch_status(broker_url, timeout=T, api_key=k)["workers"]) == 1
                         for k in ("key-alpha", "key-beta")), what="both tenants' workers")
    for key, env_id, n in (("key-alpha", "CartPole-v1", 3), ("key-beta", "Acrobot-v1", 2)):
        with remoterl.Client(broker_url, api_key=key).connect() as client:
            vec = remoterl.RemoteEnvVec(env_id, 2, client=client)
            vec.reset(seed=0)
            for _ in range(n):
                vec.step(np.zeros(2, np.int64))
            vec.close()
    alpha = scrape(port, "key-alpha")
    for secret in ("beta", "Acrobot", "key-", "tenant="):
        assert secret not in alpha, f"{secret!r} in alpha's scrape:\n{alpha}"
    mine = samples(alpha)
    assert value(mine, "remoterl_broker_calls_total", env_id="CartPole-v1", worker="alpha-w") == 4  # reset + 3
    assert value(mine, "remoterl_broker_workers") == 1
    assert not any(name.startswith(("remoterl_broker_received", "remoterl_broker_mdp")) for name, _ in mine)
    # The operator's scrape (no key) has every tenant, labelled as asked.
    every = samples(scrape(port))
    assert value(every, "remoterl_broker_calls_total", env_id="Acrobot-v1", worker="beta-w", tenant="beta") == 3
    assert value(every, "remoterl_broker_workers", tenant="alpha") == 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(port, "key-wrong")
    assert refused.value.code == 401


def test_log_format_json_lines_parse(procs, broker_url):
    broker = start_broker(procs, broker_url, "--log-format", "json", "-v")
    worker = start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "1", "--procs", "1", "--name", "wj",
                          "--log-format", "json", "-v", expect=1)
    for proc in (worker, broker):
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        lines = [line for line in proc.output().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line: one JSON object
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("listening on" in r["message"] for r in records)  # the broker's, last in the loop


@pytest.mark.parametrize("command", ["remoterl-broker", "remoterl-worker"])
def test_metrics_port_in_use_fails_clearly(command, broker_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = ["--bind", broker_url] if command == "remoterl-broker" else ["--broker", broker_url, "--procs", "1"]
        out = subprocess.run([*cli(command), *extra, "--metrics", str(port)], capture_output=True, text=True,
                             timeout=T * 3)
    assert out.returncode != 0
    assert "--metrics" in out.stderr and "in use" in out.stderr, out.stderr


def test_histogram_quantiles_and_addresses():
    hist = Histogram()
    assert hist.quantile(0.5) is None
    for _ in range(99):
        hist.observe(0.0003)  # in the (0.00025, 0.0005] bucket
    hist.observe(20.0)  # past the last bound
    assert hist.count == 100 and 0.00025 < hist.quantile(0.5) <= 0.0005
    assert hist.quantile(1.0) == BUCKETS[-1]
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError):
        parse_address("host:")


def collected(core, **kwargs) -> dict:
    from remoterl.broker.metrics import BrokerCollector

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in BrokerCollector(core, **kwargs).collect() for s in family.samples}


def test_core_times_calls_counts_misses_and_refusals_with_a_fake_clock():
    from broker_core_helpers import C1, W1, Harness, call

    h = Harness(heartbeat=1.0, liveness=3)
    h.add_worker(W1, name="w1")
    h.add_client(C1)
    slots = h.open_ok(C1, 2)
    reply = [p.worker_frame(W.REPLY), C1, b"header"]
    h.send(C1, call(W1, 1), now=10.0)
    h.send(W1, reply, now=10.0003)
    h.send(C1, call(W1, 2), now=11.0)  # pipelined: two in flight, answered in order
    h.send(C1, call(W1, 3), now=11.001)
    h.send(W1, reply, now=11.002)
    h.send(W1, reply, now=11.003)
    h.send(W1, [p.worker_frame(W.HEARTBEAT), p.encode_header({})], now=12.002)
    h.send(C1, call(b"nobody", 9), now=13.0)  # refused: no slot there
    found = collected(h.core)
    assert value(found, "remoterl_broker_calls_total", env_id="CartPole-v1", worker="w1") == 3
    assert value(found, "remoterl_broker_call_duration_seconds_count", worker="w1") == 3
    assert value(found, "remoterl_broker_call_duration_seconds_bucket", worker="w1", le="0.0005") == 1
    assert value(found, "remoterl_broker_call_duration_seconds_bucket", worker="w1", le="0.0025") == 3
    assert value(found, "remoterl_broker_refused_total", reason="call_no_slot") == 1
    assert value(found, "remoterl_broker_slots", env_id="CartPole-v1") == len(slots) == 2
    row = services_status(h.core)["workers"][0]
    assert row["calls"] == 3 and 0.25 < row["p50_ms"] <= 2.5 and row["p99_ms"] <= 2.5
    # Silence: the worker was last heard at 12.002, the client at 11.001 (a refused CALL does not
    # refresh it); each interval past the first counts once, however often the core sweeps,
    # until the peers expire (3 s: two intervals missed each).
    for t in np.arange(13.0, 16.5, 0.05):
        h.tick(float(t))
    found = collected(h.core)
    assert value(found, "remoterl_broker_heartbeat_misses_total", peer="worker") == 2
    assert value(found, "remoterl_broker_heartbeat_misses_total", peer="client") == 2
    assert value(found, "remoterl_broker_expired_total", peer="worker") == 1
    assert value(found, "remoterl_broker_expired_total", peer="client") == 1
    assert value(found, "remoterl_broker_workers") == 0


def services_status(core) -> dict:
    from remoterl.broker import services

    return services.status(core)


def test_two_brokers_in_one_process_serve_their_own_metrics():
    from remoterl.broker.loop import Broker
    from remoterl.broker.metrics import broker_metrics_server

    brokers = [Broker("tcp://127.0.0.1:*") for _ in range(2)]
    servers = []
    try:
        for broker in brokers:
            broker.start()
            servers.append(broker_metrics_server("127.0.0.1:0", broker.core))
        with remoterl.Client(brokers[0].url).connect():
            wait_for(lambda: value(samples(scrape(servers[0].port)), "remoterl_broker_clients") == 1,
                     what="the first broker's client")
            assert value(samples(scrape(servers[1].port)), "remoterl_broker_clients") == 0
    finally:
        for server in servers:
            server.close()
        for broker in brokers:
            broker.stop()


def test_worker_counts_calls_steps_and_errors_by_kind():
    from workers_runtime_helpers import SLOTS, call, opened_host

    from remoterl.workers.metrics import WorkerCollector, WorkerMetrics

    host = opened_host("RaisingEnv-v0")
    metrics = WorkerMetrics(host)
    k = len(SLOTS)
    assert "error" not in call(host, {"r": 1, "op": "reset", "slots": SLOTS, "seeds": [0] * k})
    assert "error" not in call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.zeros(k, np.int64), "m": 0})
    assert call(host, {"r": 3, "op": "step", "slots": SLOTS, "a": np.ones(k, np.int64), "m": 0})["error"]["code"] == "env"
    assert call(host, {"r": 4, "op": "step", "slots": SLOTS, "a": np.zeros(k + 1, np.int64), "m": 0})["error"]
    assert call(host, {"r": 5, "op": "step", "slots": [99], "a": np.zeros(1, np.int64), "m": 0})["error"]
    assert call(host, {"r": 6, "op": "teleport", "slots": SLOTS})["error"]

    class Loop:  # what the collector reads of a WorkerLoop: not registered with any broker
        name = "wt"
        registered = threading.Event()

    found = {(s.name, frozenset(s.labels.items())): s.value
             for family in WorkerCollector(metrics, Loop()).collect() for s in family.samples}
    env = {"env_id": "RaisingEnv-v0"}
    assert value(found, "remoterl_worker_env_steps_total", **env) == k  # the failing step's first slot raised
    assert value(found, "remoterl_worker_resets_total", **env) == k
    assert value(found, "remoterl_worker_calls_total", op="step") == 3
    assert value(found, "remoterl_worker_calls_total", op="reset") == 1
    assert value(found, "remoterl_worker_calls_total", op="other") == 2  # never reached an op
    assert value(found, "remoterl_worker_call_duration_seconds_count", op="step") == 3
    assert value(found, "remoterl_worker_errors_total", kind="env") == 1
    assert value(found, "remoterl_worker_errors_total", kind="action") == 1
    assert value(found, "remoterl_worker_errors_total", kind="request") == 2
    assert value(found, "remoterl_worker_slots", **env) == k and value(found, "remoterl_worker_connected") == 0
    assert value(found, "remoterl_worker_info", worker="wt") == 1
