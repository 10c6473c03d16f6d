"""``bench/run.py``: the quick suite runs end to end and produces every figure.

Never asserts a speed: the numbers depend on the machine and its load. What must hold
is that every case still runs, and that each figure has numbers or an explicit n/a.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import HEARTBEAT, LIVENESS, T, cli, free_url, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")
ABUSE = os.path.join(ROOT, "bench", "abuse.py")


@pytest.fixture
def run():
    """bench/run.py as a module; sys.path and sys.modules are restored afterwards."""
    path, modules = list(sys.path), set(sys.modules)  # run.py puts bench/ on sys.path
    spec = importlib.util.spec_from_file_location("remoterl_bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    bench = os.path.dirname(RUN) + os.sep
    for name in set(sys.modules) - modules:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(bench):
            del sys.modules[name]  # cases, floor...: not importable by those names elsewhere


def test_quick_run_produces_every_figure(tmp_path, run):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, RUN, "--quick", "--no-progress", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=6 * T)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())

    assert result["errors"] == []
    assert result["options"]["cases"] == list(run.CASES)
    for key in ("cpu_count", "cpu_model", "python", "pyzmq", "libzmq", "gymnasium", "numpy", "pinning", "date"):
        assert result["machine"][key], key
    figures = result["figures"]
    assert {f["case"] for f in figures} == set(run.CASES)
    for f in figures:
        if f["na"] is not None:
            assert f["na"].startswith("n/a"), f
            continue
        assert isinstance(f["value"], float) and f["value"] >= 0, f
        if f["baseline_name"] is not None:
            assert isinstance(f["baseline"], float) and f["baseline"] > 0, f
            assert isinstance(f["ratio"], float), f
        if f["target"] is not None:
            assert isinstance(f["passed"], bool), f
    # Each target of issue 5 has its row, with numbers: every feature it measures exists now
    # (SB3 is an optional extra: without it, the sb3 row says how to install it).
    has_sb3 = importlib.util.find_spec("stable_baselines3") is not None
    for case in ("latency", "throughput", "slow", "bigobs", "ws", "sb3", "scale", "metrics"):
        rows = [f for f in figures if f["case"] == case and f["target"]]
        assert rows, case
        if case == "sb3" and not has_sb3:
            assert [f["na"] for f in rows] == ["n/a: pip install remoterl[sb3]"], rows
            continue
        for f in rows:
            assert f["na"] is None and isinstance(f["passed"], bool), f
    # The metrics case scraped both endpoints of its metrics-on deployment while measuring.
    for f in (f for f in figures if f["case"] == "metrics"):
        assert f["extra"]["scrapes"]["broker"] >= 1 and f["extra"]["scrapes"]["worker"] >= 1, f
        assert f["extra"]["series_last_scrape"]["broker"] > 0 and f["extra"]["series_last_scrape"]["worker"] > 0, f
        assert len(f["extra"]["ratio_per_pair"]) == f["extra"]["pairs"] == len(f["extra"]["cpu_ms_per_1000_env_steps"])
    # The table went to stdout with every case in it.
    for case in run.CASES:
        assert f"| {case}" in proc.stdout, case


def test_table_shows_na_and_verdicts(run):
    Figure = run.Figure

    text = run.table([
        Figure("latency", "p50", 150.0, "µs", "floor", 100.0, "<= 2.0"),
        Figure("throughput", "8 envs", 10.0, "env-steps/s", "async", 20.0, ">= 1.5"),
        Figure("sb3", "PPO wall time", target="<= 1.25", na="n/a: pip install remoterl[sb3]"),
    ])
    lines = text.splitlines()
    assert "1.50×" in lines[2] and "PASS" in lines[2]
    assert "0.50×" in lines[3] and "FAIL" in lines[3]
    assert "n/a: pip install remoterl[sb3]" in lines[4] and "≤ 1.25×" in lines[4]


def test_options(run):
    args = run.parse_args(["--quick", "--case", "latency", "--num-envs", "2,4", "--pin", "0"])
    assert args.cases == ["latency"] and args.num_envs == (2, 4) and args.duration < 1
    assert run._cpus("0,2-3") == {0, 2, 3}


def test_timeline_stamps_steps_in_order():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "timeline.py"), "--steps", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=3 * T)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    stamped = int(lines[0].split(": ")[1].split()[0])
    assert stamped >= 50, proc.stdout  # most steps stamped in the expected order
    assert "call → call done" in proc.stdout and "whole step" in lines[-1]


@pytest.fixture
def abuse():
    """bench/abuse.py as a module; it puts bench/ on sys.path for its abuse_* modules, so
    sys.path and sys.modules are restored afterwards."""
    path, modules = list(sys.path), set(sys.modules)
    spec = importlib.util.spec_from_file_location("remoterl_bench_abuse", ABUSE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path
        bench = os.path.dirname(ABUSE) + os.sep
        for name in set(sys.modules) - modules:
            if name == spec.name or (getattr(sys.modules[name], "__file__", None) or "").startswith(bench):
                del sys.modules[name]


def test_hostile_peers_send_what_they_say_and_stop(abuse, procs, tmp_path):
    """Each abuse of bench/abuse.py, tiny, over tcp:// and ws://: it sends exactly what it
    reports, within its time limit, and the broker still answers afterwards."""
    from remoterl.client.status import fetch_status

    key, other = "k-abuse-trainers", "k-abuse-others"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{key} trainers\n{other} others\n")
    url = free_url()
    ws_url = free_url().replace("tcp://", "ws://")
    hb = ["--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS)]
    procs([*cli("remoterl-broker"), "--bind", url, "--api-keys", str(keys), "--ws", ws_url[5:], *hb])
    procs([*cli("remoterl-worker"), "--broker", url, "--env", "CartPole-v1", "-n", "4", "--procs", "1",
           "--api-key", key, *hb])

    def registered():
        try:
            return fetch_status(url, timeout=0.5, api_key=key)["workers"]
        except Exception:
            return None

    workers = wait_for(registered, what="the worker registered")
    limit = 5.0
    for target in (url, ws_url):
        transport = target.split(":")[0]
        sent = {
            "frames": abuse.many_frames(target, frames=70_000, time_limit=limit, linger=0.5),
            "malformed": abuse.malformed(target, other, count=300, worker_ids=[bytes.fromhex(workers[0]["id"])],
                                         big_header=100_000, big_every=100, throwaway_every=30, time_limit=limit),
            "flood": abuse.call_flood(target, key, calls=500, time_limit=limit),
            "zero_size": abuse.zero_size_actions(target, key, rows=1 << 16, repeats=2, reply_timeout=2.0,
                                                 time_limit=limit),
            "names": abuse.huge_names(target, other, hellos=2, name_bytes=100_000, status_timeout=2.0,
                                      time_limit=limit),
        }
        for kind, s in sent.items():
            assert s.kind == kind and s.transport == transport, s
            assert s.stopped == "done", s
            assert s.seconds <= limit + 2.0, s
        assert sent["frames"].messages == 1 and sent["frames"].frames == 70_000
        assert sent["malformed"].messages == 300 and sent["malformed"].notes["hello"] is True
        assert sent["malformed"].notes["sent_by_kind"] == {"throwaway_mdp": 9, "big_header": 3, "templates": 288}
        assert any(k.startswith("ERROR") for k in sent["malformed"].replies), sent["malformed"]
        assert sent["flood"].messages == 500 and sent["flood"].notes["reset"] == "REPLY"
        assert len(sent["zero_size"].notes["answers"]) == 2
        assert sent["names"].messages == 3 and sent["names"].notes["hello_answers"] == 2
    after = fetch_status(url, timeout=T, api_key=key)
    assert [w["id"] for w in after["workers"]] == [w["id"] for w in workers]
