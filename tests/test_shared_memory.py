"""Shared memory for big observations when a worker shares the trainer's host.

Segments on their own (names, sizes, links refused; unlinked once both ends map them),
then real broker and worker processes: observations through shared memory equal those
through sockets under every autoreset mode (final observations included), a worker on
"another host" is declined cleanly, and no segment outlives a SIGKILLed trainer or worker.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode

import remoterl_image_envs
from conftest import T, TEST_ENV, TESTS_DIR, start_broker, start_worker, wait_for
from remoterl import Client, RemoteEnvVec, WorkerLostError
from remoterl.errors import ProtocolError
from remoterl.io import shm
from remoterl.wire import codec

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm on this host")

PATTERN = remoterl_image_envs.PATTERN_ID
N, STEPS = 8, 15


def _names(pid: int | None = None) -> list[str]:
    return glob.glob(f"/dev/shm/remoterl-{pid if pid is not None else ''}*")


def _mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "/dev/shm/remoterl-" in maps.read()


def test_a_segment_loses_its_name_once_attached_and_carries_arrays():
    segment = shm.Segment(7, 1 << 20)
    assert os.path.exists(f"/dev/shm/{segment.name}")
    sink = shm.attach(7, segment.name, segment.size)
    assert not os.path.exists(f"/dev/shm/{segment.name}"), "the worker unlinks the name at once"
    obs = np.arange(8 * 84 * 84 * 3, dtype=np.uint32).reshape(8, 84, 84, 3)
    header, frames = codec.encode({"obs": obs, "small": np.ones(3)}, sink=sink.start())
    assert frames == [], "the big array went to the segment"
    out = codec.decode(header, frames, segments={7: segment.view})["obs"]
    assert np.array_equal(out, obs) and out.flags.writeable
    obs[:] = 0
    codec.encode({"obs": obs}, sink=sink.start())  # the next reply overwrites the segment...
    assert out[0, 0, 0, 1] == 1, "...but a decoded array was copied out"
    with pytest.raises(ProtocolError, match="not mapped"):
        codec.decode(header, frames, segments={})
    with pytest.raises(ProtocolError, match="not mapped"):
        codec.decode(header, frames)
    too_big = np.zeros(2 << 20, np.uint8)
    header, frames = codec.encode({"x": too_big}, sink=sink.start())
    assert len(frames) == 1, "what does not fit travels as a frame"
    sink.close()
    segment.close()


def test_attach_refuses_what_is_not_a_segment(tmp_path):
    segment = shm.Segment(1, 65536)
    try:
        for name in ("../etc/passwd", "remoterl-1-xyz", f"/dev/shm/{segment.name}", None, 5):
            with pytest.raises(ValueError, match="name"):
                shm.attach(1, name, 65536)
        with pytest.raises(ValueError, match="no shared-memory segment"):
            shm.attach(1, segment.name[:-4] + "0000", 65536)
        with pytest.raises(ValueError, match="size"):
            shm.attach(1, segment.name, 0)
        with pytest.raises(ValueError, match="is not a segment"):
            shm.attach(1, segment.name, 4096)  # another size than the file's
        link = f"/dev/shm/remoterl-{os.getpid()}-{'ab' * 8}"
        os.symlink(str(tmp_path / "target"), link)
        try:
            with pytest.raises(ValueError, match="no shared-memory segment"):
                shm.attach(1, os.path.basename(link), 65536)
        finally:
            if os.path.lexists(link):
                os.unlink(link)
    finally:
        segment.close()


def test_sweep_removes_names_of_dead_processes_only():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = f"/dev/shm/remoterl-{int(dead.stdout)}-{'cd' * 8}"
    open(stale, "wb").close()
    open(stale + "0", "wb").close()  # not a segment name: never touched
    try:
        assert shm.sweep() >= 1
        assert not os.path.exists(stale) and os.path.exists(stale + "0")
    finally:
        os.unlink(stale + "0")
    open(stale, "wb").close()
    mine = shm.Segment(2, 65536)  # each new segment sweeps first
    try:
        assert not os.path.exists(stale) and os.path.exists(f"/dev/shm/{mine.name}")
        assert shm.sweep() == 0
    finally:
        mine.close()
    assert not os.path.exists(f"/dev/shm/{mine.name}")


@pytest.fixture
def pattern_worker(procs, broker_url):
    start_broker(procs, broker_url)
    return start_worker(procs, broker_url, "--import", "remoterl_image_envs", "--env", PATTERN, "-n", "32",
                        "--procs", "1", expect=1)


def _run(envs: RemoteEnvVec, mode: AutoresetMode) -> list:
    envs.reset(seed=11)
    records = []
    for action in np.random.default_rng(3).integers(0, 3, size=(STEPS, N)):
        obs, rew, term, trunc, info = envs.step(action)
        records.append((obs.copy(), rew.copy(), term.copy(), trunc.copy(), info))
        if mode is AutoresetMode.DISABLED and (term | trunc).any():
            envs.reset(options={"reset_mask": term | trunc})
    return records


@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.name)
def test_shared_memory_observations_equal_socket_ones(pattern_worker, broker_url, mode):
    runs = {}
    for shared in (False, True):
        with Client(broker_url, shared_memory=shared).connect() as client:
            envs = RemoteEnvVec(PATTERN, N, client=client, autoreset_mode=mode)
            assert bool(client.core.shared) is shared
            runs[shared] = _run(envs, mode)
            envs.close()
            assert not client.core.shared, "the segment goes with the client's last slot there"
    for step, (want, got) in enumerate(zip(runs[False], runs[True])):
        assert data_equivalence(want, got), f"step {step}"
    assert any(r[3].any() for r in runs[True]), "episodes should end within the run"
    if mode is AutoresetMode.SAME_STEP:
        assert any("final_obs" in r[4] for r in runs[True])
    assert _names(os.getpid()) == []


def test_small_observations_and_other_hosts_keep_to_sockets(pattern_worker, broker_url, monkeypatch):
    with Client(broker_url).connect() as client:
        small = RemoteEnvVec(PATTERN, 2, client=client, shape=[16, 16, 3])
        assert not client.core.shared, "a 1.5 KB reply is not worth a segment"
        small.close()
        # A worker on another host finds no such segment: it declines and the client goes on.
        real_init = shm.Segment.__init__

        def elsewhere(self, *args):
            real_init(self, *args)
            self.unlink()
            self.name = f"remoterl-{os.getpid()}-{'0' * 16}"  # what the worker's host lacks

        monkeypatch.setattr(shm.Segment, "__init__", elsewhere)
        envs = RemoteEnvVec(PATTERN, N, client=client)
        assert not client.core.shared
        obs, _ = envs.reset(seed=1)
        assert obs.shape == (N, 84, 84, 3) and obs[:, 20, :, 1].any()
        envs.close()


_TRAINER = textwrap.dedent("""
    import sys
    import remoterl_image_envs
    from remoterl import Client, RemoteEnvVec
    client = Client(sys.argv[1], timeout=30).connect()
    envs = RemoteEnvVec(remoterl_image_envs.PATTERN_ID, 8, client=client)
    assert client.core.shared, "no segment"
    envs.reset(seed=0)
    for _ in range(5):
        envs.step(envs.action_space.sample())
    print("stepping", flush=True)
    while True:
        envs.step(envs.action_space.sample())
""")


def test_no_segment_outlives_a_sigkilled_trainer(pattern_worker, broker_url):
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, broker_url], stdout=subprocess.PIPE,
                               env={**os.environ, **TEST_ENV}, cwd=TESTS_DIR, text=True)
    try:
        assert trainer.stdout.readline().strip() == "stepping"
        assert _mapped(trainer.pid) and _mapped(pattern_worker_child(pattern_worker.pid))
        assert _names(trainer.pid) == [], "both ends mapped it: the name is gone already"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(T)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert _names(trainer.pid) == []
    # The broker expires the trainer; the worker closes its slots and unmaps the segment.
    wait_for(lambda: not _mapped(pattern_worker_child(pattern_worker.pid)),
             what="the worker unmapped the dead trainer's segment")


def pattern_worker_child(pid: int) -> int:
    """The pid of the worker process (``remoterl-worker --procs 1`` runs it as a child)."""
    import psutil

    children = psutil.Process(pid).children()
    return children[0].pid if children else pid


def test_no_segment_outlives_a_sigkilled_worker(pattern_worker, broker_url):
    with Client(broker_url).connect() as client:
        envs = RemoteEnvVec(PATTERN, N, client=client)
        assert client.core.shared
        envs.reset(seed=0)
        envs.step(envs.action_space.sample())
        os.kill(pattern_worker_child(pattern_worker.pid), signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            for _ in range(1000):
                envs.step(envs.action_space.sample())
        assert not client.core.shared and not client.core.segments
        envs.close()
    assert not _mapped(os.getpid())
    assert _names(os.getpid()) == []
