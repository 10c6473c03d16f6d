"""``remoterl-worker --ray``: worker processes as Ray actors on a private local Ray instance.

Real processes: a broker, the CLI (which starts Ray with ``--ray local``), a trainer in
this process. Ray's files go to a short temp dir of our own (its socket paths must stay
under 108 characters), so nothing here touches another Ray instance on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from conftest import HEARTBEAT, LIVENESS, T, cli, free_url, start_broker, status, wait_for  # noqa: E402

import remoterl  # noqa: E402


@pytest.fixture
def ray_tmp():
    """``RAY_TMPDIR`` for one test; afterwards no process may still use it."""
    path = tempfile.mkdtemp(prefix="rrl-", dir="/tmp")
    try:
        yield path
        deadline = time.monotonic() + T
        while (left := _ray_processes(path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"Ray processes still running {T:g} s after the test:\n" + "\n".join(left)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _ray_processes(path: str) -> list[str]:
    """Processes started with ``RAY_TMPDIR=path`` (Ray's workers rename themselves, but
    keep their environment) or naming ``path``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if (any(path in arg for arg in proc.info["cmdline"] or ())
                    or proc.environ().get("RAY_TMPDIR") == path):
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or ())[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _ray_env(path: str) -> dict:
    return {"RAY_TMPDIR": path, "RAY_USAGE_STATS_ENABLED": "0"}


def _workers(url: str) -> dict[str, dict]:
    """The broker's workers by name."""
    workers = status(url)["workers"]
    by_name = {w["name"]: w for w in workers}
    assert len(by_name) == len(workers), f"two workers with one name: {workers}"
    return by_name


def _step(url: str, steps: int = 5) -> None:
    with remoterl.Client(url).connect() as client:
        envs = remoterl.RemoteEnvVec("CartPole-v1", 4, client=client)
        try:
            envs.reset(seed=0)
            for _ in range(steps):
                envs.step(envs.action_space.sample())
        finally:
            envs.close()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ray_actors_serve_restart_and_stop(procs, broker_url, ray_tmp):
    start_broker(procs, broker_url)
    worker = procs([*cli("remoterl-worker"), "--ray", "local", "--env", "CartPole-v1", "-n", "4", "--procs", "2",
                    "--ray-cpus", "0.1", "--broker", broker_url, "--heartbeat", str(HEARTBEAT),
                    "--liveness", str(LIVENESS)], _ray_env(ray_tmp))

    def registered():
        assert worker.proc.poll() is None, worker.output()
        found = _workers(broker_url)
        return found if set(found) == {"ray-0", "ray-1"} else None

    found = wait_for(registered, timeout=6 * T, what="ray-0 and ray-1 registered")
    assert sum(w["capacity"] for w in found.values()) == 4
    pids = {name: w["pid"] for name, w in found.items()}
    assert worker.pid not in pids.values()  # actors are processes of Ray, not the CLI itself
    _step(broker_url)

    # Ray restarts an actor whose process dies; its new worker registers by itself.
    os.kill(pids["ray-0"], signal.SIGKILL)

    def restarted():
        assert worker.proc.poll() is None, worker.output()
        ws = status(broker_url)["workers"]
        new = [w for w in ws if w["name"] == "ray-0" and w["pid"] != pids["ray-0"]]
        # ... and the broker dropped the dead one (heartbeat × liveness).
        return new if new and len(ws) == 2 else None

    wait_for(restarted, timeout=4 * T, what="ray-0 restarted by Ray and registered again")
    new_pid = _workers(broker_url)["ray-0"]["pid"]
    _step(broker_url)  # 4 slots on 2 workers of 2: the restarted worker serves too
    assert _workers(broker_url)["ray-0"]["calls"] > 0

    worker.signal(signal.SIGTERM)
    assert worker.wait(3 * T) == 0, worker.output()
    wait_for(lambda: status(broker_url)["workers"] == [], what="the workers gone from the broker")
    wait_for(lambda: all(_gone(pid) for pid in (new_pid, pids["ray-1"])), what="actor processes gone")


def test_help_mentions_ray_and_import_does_not_load_ray():
    code = ("import sys\n"
            "from remoterl.workers import cli, raypool\n"
            "try:\n"
            "    cli.main(['--help'], standalone_mode=False)\n"
            "finally:\n"
            "    assert 'ray' not in sys.modules, 'ray was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # as wrapped for any terminal width
    assert "--ray ADDRESS" in text and "--ray-cpus" in text and "--ray local" in text and "remoterl[ray]" in text


def test_unreachable_ray_address_is_a_clear_error(procs):
    address = free_url().removeprefix("tcp://")  # nothing listens there
    proc = procs([*cli("remoterl-worker"), "--ray", address, "--env", "CartPole-v1", "-n", "2",
                  "--broker", free_url()])
    assert proc.wait(T) == 1
    assert f"Error: Ray cannot be reached at {address}" in proc.output()
    # ('auto' is not tested: it would join any Ray instance running on this machine.)
