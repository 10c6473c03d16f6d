"""The deployment each trial of bench/abuse.py abuses: a fresh key-mode broker and one worker.

:class:`Deployment` starts ``remoterl-broker`` (``--api-keys``, two tenants; ``--ws`` when
asked) and one ``remoterl-worker`` serving CartPole-v1 with the trainer tenant's key, as
subprocesses that die with this process (``PR_SET_PDEATHSIG``), reads the broker's status
and RSS, and kills both process trees when closed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from abuse_session import ENV_ID
from measure import CHILD, free_port

__all__ = ["Deployment"]

class Deployment:
    """``remoterl-broker --bind tcp://127.0.0.1:PORT --api-keys FILE`` (plus ``--ws`` when
    asked) and one ``remoterl-worker --env CartPole-v1 -n SLOTS --procs 1`` holding the
    trainer tenant's key, as subprocesses that die with this process. Two tenants: the
    trainer's (``key``) and another (``other_key``). :meth:`close` kills both process trees
    (SIGTERM, then SIGKILL) and removes the key file."""

    def __init__(self, *, ws: bool = False, slots: int = 16, heartbeat: float = 1.0, liveness: int = 3) -> None:
        self.ws, self.slots, self.heartbeat, self.liveness = ws, slots, heartbeat, liveness
        self.key = "k-" + secrets.token_hex(16)
        self.other_key = "k-" + secrets.token_hex(16)
        self.tcp_url = f"tcp://127.0.0.1:{free_port()}"
        self.ws_url = f"ws://127.0.0.1:{free_port()}" if ws else None
        self.broker: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="remoterl-abuse-")
        self._procs: list[subprocess.Popen] = []
        self._logs: dict[str, str] = {}

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        path = os.pathsep.join(q for q in sys.path if q and os.path.isdir(q))
        log = self._logs[name] = os.path.join(self._dir, f"{name}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(os.getpid()), module, *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": path, **(env or {})}, start_new_session=True)
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        try:
            with open(self._logs[name], "rb") as f:
                return f.read()[-chars:].decode("utf-8", "replace")
        except (KeyError, OSError):
            return ""

    def start(self, timeout: float = 30.0) -> Deployment:
        """Start both; return once the worker is registered. Raises RuntimeError otherwise."""
        keys = os.path.join(self._dir, "keys.txt")
        with open(keys, "w") as f:
            f.write(f"{self.key} trainers\n{self.other_key} others\n")
        os.chmod(keys, 0o600)
        extra = ["--ws", self.ws_url.removeprefix("ws://")] if self.ws_url else []
        self.broker = self._spawn("broker", "remoterl.broker.cli", "--bind", self.tcp_url, "--api-keys", keys,
                                  "--heartbeat", repr(self.heartbeat), "--liveness", str(self.liveness), *extra)
        self.worker = self._spawn("worker", "remoterl.workers.cli", "--env", ENV_ID, "-n", str(self.slots),
                                  "--procs", "1", "--broker", self.tcp_url, "--name", "abuse-bench-worker",
                                  "--heartbeat", repr(self.heartbeat), "--liveness", str(self.liveness),
                                  env={"REMOTERL_API_KEY": self.key})  # not on the command line
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in (("broker", self.broker), ("worker", self.worker)):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if self.status(timeout=0.5)["workers"]:
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not register within {timeout:g} s:\n{self.log_tail('worker')}")
            time.sleep(0.02)

    def status(self, timeout: float = 5.0) -> dict:
        """The broker's ``remoterl.status`` for the trainer's tenant (``remoterl status --json``)."""
        from remoterl.client.status import fetch_status

        return fetch_status(self.tcp_url, timeout=timeout, api_key=self.key)

    def rss(self) -> int | None:
        """The broker's resident set, bytes (None once it is gone)."""
        import psutil

        try:
            return psutil.Process(self.broker.pid).memory_info().rss if self.broker else None
        except psutil.Error:
            return None

    def alive(self) -> dict[str, bool]:
        return {name: proc is not None and proc.poll() is None
                for name, proc in (("broker", self.broker), ("worker", self.worker))}

    def close(self, grace: float = 1.0) -> None:
        """Kill every process started (their children too): SIGTERM, ``grace`` s, SIGKILL."""
        import psutil

        procs, self._procs = self._procs[::-1], []
        tree: list[psutil.Process] = []
        for proc in procs:
            try:
                parent = psutil.Process(proc.pid)
                tree += [*parent.children(recursive=True), parent]
            except psutil.Error:
                pass
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5.0)
        for proc in procs:  # reap, so no zombie is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)

