"""``remoterl.init`` / ``remoterl.shutdown`` and the gymnasium patches, with real processes.

Against a CLI broker and worker: ``gymnasium.make`` / ``make_vec`` go remote and
wrap exactly as gymnasium does locally. The embedded default runs in subprocesses
(so this process's state stays clean); the done-when item: a trainer killed with
SIGKILL leaves no broker or worker process behind.

Every test ends with ``remoterl.shutdown()`` (the autouse fixture) and checks that
gymnasium's own functions are back.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import psutil
import pytest

import gymnasium
from conftest import process_group, TEST_ENV, T, assert_same, free_url, start_broker, start_worker, status, wait_for
from gymnasium.envs import registration
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import RecordEpisodeStatistics

import remoterl
from remoterl import RemoteEnv, RemoteEnvVec
from remoterl.lifecycle import settings

ORIGINALS = {"gymnasium.make": gymnasium.make, "gymnasium.make_vec": gymnasium.make_vec,
             "registration.make": registration.make, "registration.make_vec": registration.make_vec,
             "gymnasium.register": gymnasium.register, "registration.register": registration.register}


def current_functions() -> dict:
    return {"gymnasium.make": gymnasium.make, "gymnasium.make_vec": gymnasium.make_vec,
            "registration.make": registration.make, "registration.make_vec": registration.make_vec,
            "gymnasium.register": gymnasium.register, "registration.register": registration.register}


@pytest.fixture(autouse=True)
def shut_down(monkeypatch):
    """No broker from the environment unless a test sets one; shutdown() after every test."""
    monkeypatch.delenv("REMOTERL_BROKER", raising=False)
    try:
        yield
    finally:
        remoterl.shutdown()
        assert current_functions() == ORIGINALS, "shutdown() must restore gymnasium's own functions"
        assert settings() is None


@pytest.fixture(scope="module")
def url():
    """A CLI broker and one worker serving every registered env id, for the whole module."""
    broker_url = free_url()
    with process_group() as start:
        start_broker(start, broker_url)
        start_worker(start, broker_url, "-n", "32", "--procs", "1", expect=1)
        yield broker_url


def wrapper_chain(env) -> list[type]:
    chain = []
    while isinstance(env, gymnasium.Wrapper):
        chain.append(type(env))
        env = env.env
    return chain + [type(env)]


def step_until_done(vec, limit: int = 200) -> dict:
    """Step a CartPole vector (always left) until an episode ends; return that step's infos."""
    for _ in range(limit):
        _, _, terminated, truncated, infos = vec.step(vec.action_space.sample() * 0)
        if (terminated | truncated).any():
            return infos
    pytest.fail(f"no episode ended in {limit} steps")


# --- against a CLI broker ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"max_episode_steps": 7}, {"disable_env_checker": True},
                                    {"render_mode": "rgb_array"}], ids=["plain", "steps", "no-checker", "render"])
def test_make_wraps_a_remote_env_like_a_local_one(url, kwargs):
    local = gymnasium.make("CartPole-v1", **kwargs)  # before init: gymnasium's own make
    settings_ = remoterl.init(broker=url)
    assert settings_.broker == url and settings_.embedded is None
    assert gymnasium.make is not ORIGINALS["gymnasium.make"]
    env = gymnasium.make("CartPole-v1", **kwargs)
    try:
        assert isinstance(env.unwrapped, RemoteEnv)
        assert wrapper_chain(env)[:-1] == wrapper_chain(local)[:-1]
        if not kwargs:
            assert [t.__name__ for t in wrapper_chain(env)[:-1]] == ["TimeLimit", "OrderEnforcing",
                                                                      "PassiveEnvChecker"]
            assert env._max_episode_steps == 500
        assert env._max_episode_steps == local._max_episode_steps
        assert env.spec == local.spec
        assert env.render_mode == local.render_mode
        assert env.observation_space == local.observation_space and env.action_space == local.action_space
        env.reset(seed=0)
        assert env.step(0)[0].shape == (4,)
    finally:
        env.close()
        local.close()


def test_make_honours_max_episode_steps(url):
    remoterl.init(broker=url)
    env = gymnasium.make("CartPole-v1", max_episode_steps=5)
    try:
        env.reset(seed=0)
        for step in range(1, 6):
            _, _, terminated, truncated, _ = env.step(step % 2)  # alternate: the pole stays up
            assert not terminated
            assert truncated is (step == 5)
    finally:
        env.close()


def test_make_vec_returns_a_remote_env_vec(url):
    remoterl.init(broker=url)
    envs = gymnasium.make_vec("CartPole-v1", num_envs=4)
    try:
        assert isinstance(envs, RemoteEnvVec)
        assert envs.num_envs == 4 and envs.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (4, 4)
        assert "final_obs" not in step_until_done(envs)
    finally:
        envs.close()


def test_make_vec_passes_env_kwargs(url):
    remoterl.init(broker=url)
    envs = gymnasium.make_vec("CartPole-v1", num_envs=2, max_episode_steps=5)
    try:
        envs.reset(seed=0)
        for step in range(1, 6):
            _, _, terminated, truncated, _ = envs.step(np.full(2, step % 2))
            assert not terminated.any()
            assert truncated.tolist() == [step == 5] * 2
    finally:
        envs.close()


def test_make_vec_honours_the_autoreset_mode(url):
    remoterl.init(broker=url)
    envs = gymnasium.make_vec("CartPole-v1", num_envs=4, vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    try:
        assert isinstance(envs, RemoteEnvVec)
        assert envs.autoreset_mode is envs.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
        envs.reset(seed=0)
        assert "final_obs" in step_until_done(envs)
    finally:
        envs.close()


def test_make_vec_with_wrappers(url):
    remoterl.init(broker=url)
    envs = gymnasium.make_vec("CartPole-v1", num_envs=2, wrappers=[RecordEpisodeStatistics])
    try:
        assert isinstance(envs, SyncVectorEnv)
        assert all(isinstance(env, RecordEpisodeStatistics) and isinstance(env.unwrapped, RemoteEnv)
                   for env in envs.envs)
        envs.reset(seed=0)
        assert "episode" in step_until_done(envs)
    finally:
        envs.close()


def test_registration_make_is_patched_and_takes_an_env_spec(url):
    remoterl.init(broker=url)
    env = registration.make(gymnasium.spec("CartPole-v1"))
    try:
        assert isinstance(env.unwrapped, RemoteEnv)
        assert env.spec.id == "CartPole-v1" and env.spec.max_episode_steps == 500
    finally:
        env.close()
    assert registration.make_vec is gymnasium.make_vec is not ORIGINALS["gymnasium.make_vec"]


def test_init_twice_and_shutdown_twice_are_harmless(url):
    remoterl.shutdown()  # without init
    first = remoterl.init(broker=url)
    assert remoterl.init(broker=url) is first
    assert remoterl.init() is first  # the first settings stay
    patched = gymnasium.make
    remoterl.shutdown()
    remoterl.shutdown()
    assert gymnasium.make is ORIGINALS["gymnasium.make"] is not patched
    assert remoterl.init(broker=url) is not first  # init after shutdown starts afresh


def test_init_again_with_another_broker_or_key_is_refused(url):
    first = remoterl.init(broker=url)
    with pytest.raises(ValueError, match="shutdown"):
        remoterl.init(broker="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="API key"):
        remoterl.init(broker=url, api_key="another")
    assert settings() is first and first.broker == url


SB3_AFTER_INIT = """
import remoterl
remoterl.init(broker={url!r})
import remoterl.sb3  # imports Stable-Baselines3 itself, after init()
from stable_baselines3.common.env_util import make_vec_env
venv = make_vec_env("CartPole-v1", n_envs=2)
print(type(venv.venv).__name__, flush=True)
venv.close()
"""


def test_import_remoterl_sb3_after_init(url):
    out = subprocess.run([sys.executable, "-c", SB3_AFTER_INIT.format(url=url)], capture_output=True, text=True,
                         timeout=6 * T)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RemoteVecEnv"


def test_broker_from_the_environment(url, monkeypatch):
    monkeypatch.setenv("REMOTERL_BROKER", url)
    current = remoterl.init()
    assert current.broker == url and current.embedded is None
    env = gymnasium.make("CartPole-v1")
    try:
        assert isinstance(env.unwrapped, RemoteEnv)
    finally:
        env.close()


def test_init_refuses_bad_roles():
    with pytest.raises(ValueError, match="broker"):
        remoterl.init(role="simulator")
    with pytest.raises(ValueError, match="role"):
        remoterl.init(role="x")
    assert current_functions() == ORIGINALS


# --- the embedded default, in subprocesses ------------------------------------------------------------


def python_env() -> dict:
    env = dict(os.environ)
    env.pop("REMOTERL_BROKER", None)
    return env


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Trainer:
    """A trainer script in a subprocess; its stdout is read line by line, every wait bounded."""

    def __init__(self, args: list[str], cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=python_env(), cwd=cwd, stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 3 * T) -> str:
        """The first (next) line starting with ``prefix``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line {prefix!r} within {timeout:g} s; output so far:\n" + "\n".join(self.seen))
            if line is None:
                pytest.fail(f"exited ({self.proc.poll()}) before printing {prefix!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def pids(self) -> list[int]:
        pids = [int(x) for x in self.expect("PIDS").split()[1:]]
        # One worker process; the broker is a thread of the trainer unless
        # REMOTERL_EMBEDDED_BROKER=process (then it is a process too).
        expected = 2 if os.environ.get("REMOTERL_EMBEDDED_BROKER") == "process" else 1
        assert len(pids) == expected, pids
        return pids

    def finish(self, timeout: float = 3 * T) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the trainer did not exit within {timeout:g} s:\n" + "\n".join(self.seen))
        try:
            while (line := self.lines.get(timeout=T)) is not None:
                self.seen.append(line)
        except queue.Empty:  # a child kept the pipe open: it outlived the trainer
            pytest.fail(f"the trainer's output did not end within {T:g} s of its exit:\n" + "\n".join(self.seen))
        return rc, "\n".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(T)


def kill_leftovers(pids: list[int]) -> None:
    """Cleanup after a failed assertion: the pids are processes this test caused to start."""
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


TRAINER = textwrap.dedent("""
    import remoterl, remoterl.lifecycle, gymnasium
    remoterl.init()
    envs = gymnasium.make_vec("CartPole-v1", num_envs=8)
    assert type(envs).__name__ == "RemoteEnvVec", envs
    envs.reset(seed=0)
    for _ in range(10):
        envs.step(envs.action_space.sample())
    # The fast path: the trainer drives the broker thread itself, its worker is on a local link.
    assert remoterl.lifecycle.get_client().in_process
    assert len(remoterl.lifecycle.settings().embedded._broker_thread._links) == 1
    print("PIDS", *remoterl.lifecycle.settings().embedded.pids, flush=True)
""")


def test_embedded_default_starts_and_stops_its_processes():
    trainer = Trainer([sys.executable, "-c", TRAINER + "envs.close()\nremoterl.shutdown()\nprint('DONE')\n"])
    pids: list[int] = []
    try:
        pids = trainer.pids()
        rc, output = trainer.finish()
        assert rc == 0, output
        assert output.endswith("DONE")
        wait_for(lambda: not any(map(alive, pids)), what=f"embedded processes {pids} gone")
    finally:
        trainer.kill()
        kill_leftovers(pids)


def test_sigkilled_trainer_leaves_no_embedded_process_behind():
    trainer = Trainer([sys.executable, "-c", TRAINER + "import time\ntime.sleep(600)\n"])
    pids: list[int] = []
    try:
        pids = trainer.pids()
        assert all(map(alive, pids))
        os.kill(trainer.proc.pid, signal.SIGKILL)
        trainer.proc.wait(T)
        wait_for(lambda: not any(map(alive, pids)), what=f"embedded processes {pids} gone after SIGKILL")
    finally:
        trainer.kill()
        kill_leftovers(pids)


def test_ctrl_c_in_the_trainer_stops_the_embedded_processes():
    # The children ignore SIGINT (it belongs to the trainer); the trainer's atexit shutdown stops them.
    trainer = Trainer([sys.executable, "-c", TRAINER + "import time\ntime.sleep(600)\n"])
    pids: list[int] = []
    try:
        pids = trainer.pids()
        os.kill(trainer.proc.pid, signal.SIGINT)
        rc, output = trainer.finish()
        # Python exits by re-raising SIGINT on itself once its atexit handlers have run.
        assert rc == -signal.SIGINT and "KeyboardInterrupt" in output, output
        wait_for(lambda: not any(map(alive, pids)), what=f"embedded processes {pids} gone after Ctrl-C")
    finally:
        trainer.kill()
        kill_leftovers(pids)


def test_embedded_default_serves_env_ids_the_trainer_registered():
    script = textwrap.dedent("""
        import remoterl_test_envs, remoterl, gymnasium
        remoterl.init()
        env = gymnasium.make("DictObsEnv-v0")
        env.reset(seed=0)
        env.step(env.action_space.sample())
        env.close()
        print("MADE", type(env.unwrapped).__name__, flush=True)
    """)
    trainer = Trainer([sys.executable, "-c", script], cwd=os.path.dirname(os.path.abspath(__file__)))
    rc, output = trainer.finish()
    assert rc == 0, output
    assert "MADE RemoteEnv" in output


def test_script_without_main_guard(tmp_path):
    # Embedded children must not re-import __main__: this script would run again in each.
    script = tmp_path / "train.py"
    script.write_text(TRAINER + "envs.close()\nprint('RAN')\n")  # shutdown left to atexit
    trainer = Trainer([sys.executable, str(script)], cwd=str(tmp_path))
    pids: list[int] = []
    try:
        pids = trainer.pids()
        rc, output = trainer.finish()
        assert rc == 0, output
        assert output.count("RAN") == 1 and output.count("PIDS") == 1, output
        wait_for(lambda: not any(map(alive, pids)), what=f"embedded processes {pids} gone at exit")
    finally:
        trainer.kill()
        kill_leftovers(pids)


SIMULATOR = """
import sys, gymnasium, remoterl
gymnasium.register(id="Counting-v9", entry_point="remoterl_custom_env:CountingEnv", kwargs={"limit": 2})
remoterl.init(role="simulator", broker=sys.argv[1])   # blocks until SIGINT/SIGTERM
print("stopped", flush=True)
"""


def test_simulator_role_serves_its_registered_env_ids(procs, broker_url):
    start_broker(procs, broker_url)
    sim = procs([sys.executable, "-c", SIMULATOR, broker_url], TEST_ENV)
    wait_for(lambda: len(status(broker_url)["workers"]) == 1, what="simulator registered")
    env = remoterl.RemoteEnv("Counting-v9", broker=broker_url)
    env.reset(seed=0)
    assert env.step(1)[1:3] == (1.0, False)
    assert env.step(1)[2] is True
    env.close()
    sim.signal(signal.SIGTERM)
    assert sim.wait() == 0
    assert "stopped" in sim.output()


def test_a_new_env_after_a_broker_restart_just_works(procs, broker_url):
    """A trainer that lost its broker recovers without shutdown() + init(): the lost client's
    envs raise BrokerUnavailableError, the next env gets a fresh client."""
    from remoterl.errors import BrokerUnavailableError
    from remoterl.lifecycle import get_client

    broker = start_broker(procs, broker_url)
    worker_args = ("--env", "CartPole-v1", "-n", "4", "--procs", "1", "--allow-import", "remoterl_custom_env")
    worker = start_worker(procs, broker_url, *worker_args, expect=1)
    remoterl.init(broker=broker_url)
    gymnasium.register(id="Counting-v8", entry_point="remoterl_custom_env:CountingEnv", kwargs={"limit": 2})
    old = gymnasium.make("CartPole-v1")
    old.reset(seed=0)
    first = get_client()
    broker.signal(signal.SIGKILL)
    worker.stop()  # the new worker knows only what the trainer registers again
    broker.wait()
    start_broker(procs, broker_url)
    start_worker(procs, broker_url, *worker_args, expect=1)
    wait_for(lambda: first.lost is not None, what="the client noticed the broker restart")
    with pytest.raises(BrokerUnavailableError):
        old.step(0)
    env = gymnasium.make("CartPole-v1")
    assert get_client() is not first and first.closed
    local = gymnasium.make("CartPole-v1", disable_env_checker=True)
    assert_same(env.reset(seed=3), local.reset(seed=3), "reset after the restart")
    assert_same(env.step(1), local.step(1), "step after the restart")
    env.close()
    # The new client registered this process's env ids again with the restarted broker.
    counting = gymnasium.make("Counting-v8")
    counting.reset(seed=0)
    assert counting.step(1)[1:3] == (1.0, False)
    counting.close()
    registration.registry.pop("Counting-v8", None)
