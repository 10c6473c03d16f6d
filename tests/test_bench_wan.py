"""``bench/relay.py`` and the ``wan`` case: the relay delays, paces and keeps bytes intact;
it stops by itself; the case's figures are measured across it.

No speed is asserted: the relay's delay and cap are lower bounds (a loaded machine only
adds to them), and the case's rows are checked for numbers and bytes, not for rates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import T, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"remoterl_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def relay():
    return _load("relay")


@pytest.fixture
def echo():
    """A tcp echo server on 127.0.0.1 (each connection echoes until its peer stops sending)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(T)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(T)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=T)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 16, n - len(out)))
        assert chunk, f"connection closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def test_relay_adds_its_delay_each_way(relay, echo):
    delay = 0.03
    r = relay.Relay(echo, delay=delay, time_limit=3 * T).start()
    try:
        with _connect(r.url) as sock:
            for i in range(5):
                start = time.monotonic()
                sock.sendall(bytes([i]))
                assert _recv_exactly(sock, 1) == bytes([i])
                # Two ways, each held at least `delay` after it was read: never sooner.
                assert time.monotonic() - start >= 2 * delay
    finally:
        r.stop()


def test_relay_paces_at_its_cap_and_keeps_bytes_in_order(relay, echo):
    mbit, size = 80.0, 1_000_000
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    r = relay.Relay(echo, mbit=mbit, time_limit=3 * T, buffer_kb=256).start()
    try:
        with _connect(r.url) as sock:
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(_recv_exactly(sock, size)), daemon=True)
            start = time.monotonic()
            reader.start()
            sock.sendall(data)
            reader.join(3 * T)
            elapsed = time.monotonic() - start
            assert got and got[0] == data  # every byte, in order, both ways
            # Each direction sends at most `mbit`: the echo cannot come back sooner.
            assert elapsed >= size * 8 / (mbit * 1e6)
            stats = r.stats()
        assert stats["up"] == size and stats["down"] == size and stats["accepted"] == 1, stats
    finally:
        r.stop()


def test_relay_stops_by_itself(relay, echo):
    cmd = [sys.executable, os.path.join(BENCH, "relay.py"), "--to", echo]
    # After its time limit, even with its stdin still open.
    limited = subprocess.Popen([*cmd, "--time-limit", "0.5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    # At the end of its stdin, with --stdin (what the bench's Relay does).
    watching = subprocess.Popen([*cmd, "--stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for proc in (limited, watching):
            assert proc.stdout is not None and proc.stdout.readline().startswith("127.0.0.1:")
        assert limited.wait(T) == 0
        assert watching.poll() is None
        assert watching.stdin is not None
        watching.stdin.close()
        assert watching.wait(T) == 0
    finally:
        for proc in (limited, watching):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_relay_dies_with_its_parent(echo):
    """A process that started a relay with ``Relay`` is SIGKILLed: the relay exits too."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from relay import Relay; "
         "r = Relay(sys.argv[2], time_limit=60).start(); print(r._proc.pid, flush=True); sys.stdin.read()",
         BENCH, echo], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _running(pid)
        parent.kill()
        parent.wait(T)
        wait_for(lambda: not _running(pid), what="the relay to exit after its parent died")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for stream in (parent.stdin, parent.stdout):
            stream.close()


def test_pixels_env_is_cartpoles_own_render():
    envs = _load("remoterl_bench_envs")
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    env = envs.CartPolePixelsEnv()
    reference = CartPoleEnv(render_mode="rgb_array")
    try:
        obs, _ = env.reset(seed=3)
        reference.reset(seed=3)
        rows, cols = np.linspace(0, 399, 84).round().astype(int), np.linspace(0, 599, 84).round().astype(int)
        for action in (0, 1, 1, 0, 1):
            expected = reference.render()[rows[:, None], cols[None, :]]
            assert obs.shape == (84, 84, 3) and obs.dtype == np.uint8 and obs.flags.c_contiguous
            np.testing.assert_array_equal(obs, expected)
            obs, reward, terminated, truncated, _ = env.step(action)
            _, ref_reward, ref_terminated, _, _ = reference.step(action)
            assert (reward, terminated, truncated) == (ref_reward, ref_terminated, False)
        assert len(np.unique(obs.reshape(-1, 3), axis=0)) > 3  # the cart, the pole, the axle on white
    finally:
        env.close()
        reference.close()


def test_wan_case_measures_across_the_relay(tmp_path):
    out = tmp_path / "wan.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--case", "wan", "--quick",
                           "--duration", "0.1", "--no-progress", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=6 * T)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["errors"] == []
    figures = {f["name"]: f for f in result["figures"]}
    assert len(figures) == 9 and {f["case"] for f in figures.values()} == {"wan"}
    for n in (8, 32, 64):
        f = figures[f"RemoteEnvVec({n}) CartPole-v1, +20 ms RTT"]
        assert f["value"] > 0 and f["baseline"] == pytest.approx(n / 0.02), f
    frame_bytes = 8 * 84 * 84 * 3
    for link in ("100 Mbit/s", "100 Mbit/s, +20 ms RTT"):
        name = f"RemoteEnvVec(8) CartPole frames 84×84×3, {link}"
        raw = figures[f"{name}, uncompressed"]
        # Every frame crossed the relay (no shared memory around it): a step's reply holds 8 frames.
        assert raw["value"] > 0 and raw["extra"]["bytes_per_step"]["down"] >= frame_bytes, raw
        for algo in ("lz4", "zstd"):
            f = figures[f"{name}, {algo}"]
            if f["na"] is not None:
                assert f["na"].startswith("n/a: skipped"), f
                continue
            assert f["value"] > 0 and f["baseline"] == raw["value"], f
            assert f["extra"]["bytes_per_step"]["down"] < frame_bytes / 4, f  # rendered frames compress
    assert figures["RemoteEnvVec(8) CartPole frames 84×84×3, 100 Mbit/s, lz4"]["target"] == ">= 3.0"
