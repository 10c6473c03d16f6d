"""``--ray``: worker processes as Ray actors, spread over a Ray cluster.

Each actor is an ordinary remoterl worker (its own socket, heartbeats and share of the
slots, built from a :class:`~remoterl.workers.pool.WorkerSpec` as ``run_worker`` builds
one) whose :class:`~remoterl.workers.loop.WorkerLoop` runs in a thread of the actor, so
the actor still answers ``info()`` and ``stop()``. Ray restarts an actor whose process
dies (``max_restarts=-1``); the new process's worker registers with the broker by itself.

Ray is imported inside functions only: importing this module never imports Ray.

    with RayWorkerPool(specs, address="auto", cpus_per_actor=1.0) as pool:
        pool.start()                  # returns once every actor's worker has registered
        ...                           # the broker's trainers use the slots
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remoterl.errors import RemoteRLError

if TYPE_CHECKING:
    from remoterl.workers.pool import WorkerSpec

__all__ = ["INSTALL_HINT", "RayPoolError", "RayWorkerPool", "cluster_cpus", "connect"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'remoterl[ray]' (or 'remoterl[rllib]')"
# Seconds a TCP connection to a Ray address may take before we call it unreachable (Ray
# itself keeps retrying an unreachable GCS for minutes).
_PROBE_TIMEOUT = 5.0


class RayPoolError(RemoteRLError):
    """Ray is missing or unreachable, or the actors did not all register in time."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayPoolError(f"--ray needs Ray: {INSTALL_HINT}") from exc
    return ray


def _probe(address: str) -> None:
    """Fail fast when nothing listens at ``host:port`` (Ray would retry for minutes)."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # let Ray parse what it accepts
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT).close()
    except OSError as exc:
        raise RayPoolError(f"Ray cannot be reached at {address}: {exc.strerror or exc}. "
                           f"Is a Ray cluster running there (`ray start --head`)?") from exc


def connect(address: str, *, temp_dir: str | None = None) -> bool:
    """Connect this process to Ray; return True if this call did (the caller then calls
    ``ray.shutdown()``), False if Ray was already initialized here.

    Args:
        address: ``auto`` (the cluster running on this node, as ``ray start`` left it, or
            ``$RAY_ADDRESS``), ``host:port`` (a cluster's GCS), ``ray://host:port`` (Ray
            Client), or ``local``: a private Ray instance in this process.
        temp_dir: Ray's temp dir for ``local`` (else ``$RAY_TMPDIR``/ray or /tmp/ray).

    Raises:
        RayPoolError: Ray is not installed, or cannot be reached at ``address``.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"address": address, "include_dashboard": False}
    if address == "local":
        kwargs["_temp_dir"] = temp_dir
    else:
        _probe(address)
        kwargs.pop("include_dashboard")  # only for a cluster this call starts
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        if address == "auto":
            raise RayPoolError("no Ray cluster found (address 'auto'): start one with `ray start --head`, set "
                               "$RAY_ADDRESS, name its address, or use 'local' for a Ray instance in this "
                               "process") from exc
        raise RayPoolError(f"Ray cannot be reached at {address}: {exc}") from exc
    except Exception as exc:  # Ray raises several types for bad addresses
        raise RayPoolError(f"Ray cannot be reached at {address}: {type(exc).__name__}: {exc}") from exc
    return True


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to."""
    return float(_import_ray().cluster_resources().get("CPU", 0.0))


class _RayWorker:
    """The actor: one remoterl worker, its loop in a thread, reachable by small methods."""

    def __init__(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("remoterl").setLevel(spec.log_level)
        self._spec = spec
        self._error: str | None = None
        from remoterl.workers.pool import make_worker_loop

        if spec.link_fd is not None:
            raise ValueError("a Ray actor cannot use a local link (WorkerSpec.link_fd)")
        self._loop = make_worker_loop(spec)  # an import or env error fails the actor's creation
        self._thread = threading.Thread(target=self._run, name="remoterl-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop.run()
        except RemoteRLError as exc:  # the broker refused us (the loop logged it): a restart will not help
            self._error = f"{type(exc).__name__}: {exc}"
        except BaseException:
            log.exception("worker %s crashed; exiting so that Ray restarts this actor", self._loop.name)
            time.sleep(1.0)  # no tight crash loop
            os._exit(1)

    def info(self) -> dict:
        """pid, node, name, registered, error (why the worker stopped), running."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "name": self._loop.name,
                "capacity": self._spec.capacity, "registered": self._loop.registered.is_set(),
                "error": self._error, "running": self._thread.is_alive()}

    def wait_registered(self, timeout: float) -> dict:
        """``info()`` once the worker is registered, stopped, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and not self._loop.registered.wait(0.05) and time.monotonic() < deadline:
            pass
        return self.info()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the worker (the call in flight finishes, then DISCONNECT); True once it has."""
        self._loop.stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class RayWorkerPool:
    """``len(specs)`` remoterl workers as Ray actors (``cpus_per_actor`` CPUs each).

    Args:
        specs: one per actor (as for :class:`~remoterl.workers.pool.WorkerPool`).
        address: where Ray runs (see :func:`connect`); ignored when Ray is already
            initialized in this process. ``stop()`` shuts Ray down only if ``start()``
            connected it.
        cpus_per_actor: the CPUs each actor asks of Ray (may be fractional).
        temp_dir: Ray's temp dir for ``address="local"``.
    """

    def __init__(self, specs: list[WorkerSpec], *, address: str = "auto", cpus_per_actor: float = 1.0,
                 temp_dir: str | None = None) -> None:
        if not specs:
            raise ValueError("a RayWorkerPool needs at least one WorkerSpec")
        self.specs = specs
        self.address = address
        self.cpus_per_actor = cpus_per_actor
        self.temp_dir = temp_dir
        self.actors: list = []
        self.infos: list[dict | None] = [None] * len(specs)  # as each actor's worker registered
        self._owns_ray = False

    def start(self, timeout: float = 120.0, progress: Callable[[int, dict], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> None:
        """Create the actors and return once every actor's worker has registered.

        Args:
            timeout: seconds to wait for all of them.
            progress: called as ``progress(i, info)`` when actor ``i``'s worker registers.
            cancelled: polled while waiting; when it returns True, the actors are stopped
                and :class:`RayPoolError` is raised.

        Raises:
            RayPoolError: Ray unreachable, an actor failed, the broker refused a worker, or
                not every worker registered within ``timeout`` (the actors are stopped).
        """
        ray = _import_ray()
        self._owns_ray = connect(self.address, temp_dir=self.temp_dir) or self._owns_ray
        actor_cls = ray.remote(_RayWorker).options(
            num_cpus=self.cpus_per_actor, max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD")
        self.actors = [actor_cls.remote(spec) for spec in self.specs]
        try:
            self._wait_registered(ray, timeout, progress, cancelled)
        except BaseException:
            self.stop()
            raise

    def _wait_registered(self, ray: Any, timeout: float, progress: Callable[[int, dict], None] | None,
                         cancelled: Callable[[], bool] | None) -> None:
        from ray.exceptions import RayError

        start = time.monotonic()
        deadline = start + timeout
        next_note = start + 15.0
        pending: dict[Any, int] = {}  # in-flight wait_registered() call -> actor index
        retry_at: dict[int, float] = {i: 0.0 for i in range(len(self.actors))}  # actors to ask again
        while True:
            now = time.monotonic()
            for i, at in list(retry_at.items()):
                if at <= now:
                    del retry_at[i]
                    pending[self.actors[i].wait_registered.remote(1.0)] = i
            if not pending and not retry_at:
                return
            if cancelled is not None and cancelled():
                raise RayPoolError("cancelled while starting the Ray worker actors")
            if now > deadline:
                raise RayPoolError(self._timeout_message(timeout))
            if now > next_note:
                next_note = now + 15.0
                done_n = sum(info is not None for info in self.infos)
                log.warning("%d of %d Ray worker actors registered after %.0f s; waiting up to %g s (is the broker "
                            "at %s running and reachable from the Ray nodes?)", done_n, len(self.specs), now - start,
                            timeout, self.specs[0].url)
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(1.0, max(0.0, deadline - now)))
            for ref in done:
                i = pending.pop(ref)
                try:
                    info = ray.get(ref, timeout=5.0)
                except RayError as exc:
                    if getattr(exc, "actor_init_failed", False):  # e.g. an import error: Ray gives up on it
                        raise RayPoolError(f"worker actor {self.specs[i].name or i} failed to start: {exc}") from exc
                    # Restarting after a crash, or not placed yet: ask again soon.
                    log.info("worker actor %d not available yet: %s", i, type(exc).__name__)
                    retry_at[i] = time.monotonic() + 0.5
                    continue
                if info["error"]:
                    raise RayPoolError(f"worker {info['name']} stopped: {info['error']}")
                if info["registered"]:
                    self.infos[i] = info
                    if progress is not None:
                        progress(i, info)
                else:
                    retry_at[i] = 0.0

    def _timeout_message(self, timeout: float) -> str:
        missing = [spec.name or str(i) for i, spec in enumerate(self.specs) if self.infos[i] is None]
        msg = (f"{len(missing)} of {len(self.specs)} Ray worker actors did not register within {timeout:g} s "
               f"({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}).")
        try:
            import ray

            total = ray.cluster_resources().get("CPU", 0.0)
            free = ray.available_resources().get("CPU", 0.0)
            msg += (f" The cluster has {total:g} CPUs ({free:g} free) and each actor asks for "
                    f"{self.cpus_per_actor:g} (--ray-cpus);")
        except Exception:  # only a hint
            pass
        return msg + f" is the broker at {self.specs[0].url} reachable from the Ray nodes?"

    def alive(self, timeout: float = 5.0) -> list[dict | None]:
        """Each actor's ``info()`` now (None for one that did not answer within ``timeout``)."""
        ray = _import_ray()
        refs = [actor.info.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out: list[dict | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=0.1) if ref in ready else None)
            except Exception:  # dead or restarting
                out.append(None)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers (DISCONNECT, within ``timeout``), kill the actors for good, and
        shut Ray down if :meth:`start` connected it."""
        try:
            import ray
        except ImportError:
            return
        if self.actors and ray.is_initialized():
            refs = [actor.stop.remote(max(0.5, timeout - 1.0)) for actor in self.actors]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=timeout)
            except Exception:  # killing them below is what counts
                pass
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayWorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
