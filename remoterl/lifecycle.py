"""``remoterl.init()`` and ``remoterl.shutdown()``: settings, patches, embedded default.

Settings come from the arguments, else the environment: ``REMOTERL_BROKER`` (the
broker's URL) and ``REMOTERL_API_KEY``. With no broker URL anywhere, ``init`` starts
the embedded default (a private broker and local workers, see ``remoterl.embedded``).

With ``role="trainer"`` (the default) ``init`` patches gymnasium so that ``make`` and
``make_vec`` return remote proxies, and, once they are imported, Stable-Baselines3's
``make_vec_env`` and RLlib's ``AlgorithmConfig.environment``/``build_algo`` (see
``remoterl.integrations``); ``shutdown`` restores the originals, closes the
process's clients and stops the embedded processes. It also runs at interpreter exit.
Calling ``init`` twice, or ``shutdown`` without ``init``, is harmless.

With ``role="simulator"`` the calling process becomes a worker serving the env ids
registered in it, until interrupted.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
from typing import Any

from remoterl.client.registry import Settings, close_clients, configure, get_client, settings
from remoterl.failover import POLICIES
from remoterl.io.wsgateway import close_gateways
from remoterl.wire.compress import check_algorithm

__all__ = ["Settings", "get_client", "init", "patch_loaded", "settings", "shutdown"]

log = logging.getLogger(__name__)


_lock = threading.RLock()
_atexit_registered = False


def init(api_key: str | None = None, role: str = "trainer", *, broker: str | None = None,
         num_workers: int | None = None, slots_per_worker: int = 256, timeout: float = 60.0,
         heartbeat: float = 1.0, liveness: int = 3, patch: bool = True,
         on_worker_lost: str | None = None, compression: str | None = None) -> Settings | None:
    """Configure remoterl for this process.

    Args:
        api_key: presented to the broker; default ``$REMOTERL_API_KEY``.
        role: ``"trainer"`` (patch gymnasium; proxies step remote envs) or
            ``"simulator"`` (serve the env ids registered here; blocks until interrupted).
        broker: the broker's URL; default ``$REMOTERL_BROKER``; with neither, an embedded
            broker and ``num_workers`` local worker processes are started.
        num_workers: embedded worker processes (default: 1; cheap envs run fastest
            batched on one worker, slow simulators want more).
        slots_per_worker: env slots each embedded worker hosts.
        timeout: default seconds to wait for each remote call.
        heartbeat, liveness: for the embedded broker (and a simulator's worker).
        patch: patch ``gymnasium.make`` / ``make_vec`` / ``register`` (trainer role).
        on_worker_lost: what envs do when their worker dies or the broker restarts:
            ``"raise"`` (default: ``WorkerLostError``) or ``"truncate"`` (the envs are re-opened
            on the workers still serving the env id and their episodes end with
            ``truncated=True`` and ``info["remoterl_worker_lost"] = True``; training goes on).
            The default for ``RemoteEnv``, ``RemoteEnvVec``, ``make``/``make_vec``, SB3's
            ``RemoteVecEnv`` and RLlib's env runners.
        compression: ``"lz4"`` or ``"zstd"``: workers compress big observation and frame
            arrays before sending them (worth it across a WAN, where bandwidth bounds image
            observations; off by default). The default of every remote env, as above.

    Returns:
        The settings (trainer role); a simulator returns None when interrupted.

    Calling it again returns the same settings; asking then for another broker or API key
    raises ``ValueError`` (call :func:`shutdown` first).

    Raises:
        ValueError: unknown role or ``on_worker_lost``, the simulator role without a broker
            URL, or a second call asking for another broker, key or ``on_worker_lost``.
        BrokerUnavailableError: no broker answers at the URL.
    """
    global _atexit_registered
    if role not in ("trainer", "simulator"):
        raise ValueError(f"role must be 'trainer' or 'simulator', got {role!r}")
    if on_worker_lost not in (None, *POLICIES):
        raise ValueError(f"on_worker_lost must be one of {POLICIES}, got {on_worker_lost!r}")
    check_algorithm(compression)
    explicit_key = api_key
    api_key = api_key or os.environ.get("REMOTERL_API_KEY") or None
    url = broker or os.environ.get("REMOTERL_BROKER") or None
    if role == "simulator":
        if url is None:
            raise ValueError("remoterl.init(role='simulator') needs broker=URL (or $REMOTERL_BROKER)")
        _run_simulator(url, slots_per_worker, heartbeat, liveness)
        return None
    with _lock:
        current = settings()
        if current is not None:
            _check_same(current, broker, explicit_key)
            if on_worker_lost is not None and on_worker_lost != current.on_worker_lost:
                raise ValueError(f"remoterl.init() already runs with on_worker_lost={current.on_worker_lost!r}; "
                                 f"call remoterl.shutdown() first to change it")
            if compression is not None and compression != current.compression:
                raise ValueError(f"remoterl.init() already runs with compression={current.compression!r}; "
                                 f"call remoterl.shutdown() first to change it")
            return current  # init twice with nothing new: harmless, the settings stay
        embedded = None
        children_url = url
        if url is None:
            from remoterl.embedded import Embedded

            embedded = Embedded(num_workers or 1, slots_per_worker, heartbeat=heartbeat, liveness=liveness,
                                imports=_registering_modules())
            children_url = embedded.start()
            url = embedded.local_url or children_url
        current = Settings(role, url, api_key, timeout, embedded, children_broker=children_url or "",
                           on_worker_lost=on_worker_lost or "raise", compression=compression)
        configure(current)
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True
        try:
            get_client()  # fail now, with the URL, if nothing answers
        except BaseException:
            shutdown()
            raise
        if patch:
            from remoterl.integrations import gymnasium as gym_patch

            gym_patch.patch()
            current.patched = True
            _patch_frameworks_when_imported()
        return current


def shutdown() -> None:
    """Undo ``init``: restore gymnasium, close clients, stop embedded processes. Idempotent."""
    with _lock:
        current = configure(None)
        if current is not None and current.patched:
            from remoterl.integrations import gymnasium as gym_patch

            gym_patch.unpatch()
            _unpatch_frameworks()
        close_clients()
        close_gateways()
        if current is not None and current.embedded is not None:
            current.embedded.stop()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a framework's patch right after module ``target`` loads, so ``import remoterl``
    and ``init()`` never import the framework (SB3 and torch, Ray) themselves."""

    def __init__(self, target: str, integration: str) -> None:
        self.target = target
        self.integration = integration  # a remoterl.integrations module with patch()/unpatch()

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.target:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                loader_exec = spec.loader.exec_module

                def exec_module(module: Any) -> None:
                    loader_exec(module)
                    _remove_hook(self.integration)
                    # When the integration itself is importing the framework, this returns it
                    # half loaded (the import in progress in this thread).
                    integration = importlib.import_module(self.integration)
                    if not hasattr(integration, "patch"):
                        # The integration is importing the framework itself (``import
                        # remoterl.sb3`` after init()): it is only half loaded here, and
                        # remoterl.sb3 / remoterl.rllib call patch_loaded() once it is whole.
                        return
                    patch_loaded(self.integration)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


# integration module -> (the module whose import triggers its patch, the distribution to look for).
# RLlib: after the ray.rllib package has run its __init__, its submodules import safely.
_HOOKED = {
    "remoterl.integrations.sb3": ("stable_baselines3.common.env_util", "stable_baselines3"),
    "remoterl.integrations.rllib": ("ray.rllib", "ray"),
}
_hooks: dict[str, _AfterImport] = {}
_patched: set[str] = set()  # integrations whose framework is patched


def _imported(module: str) -> bool:
    """Whether ``module`` is already imported here, without importing it: a framework is
    patched at once when it is (importing SB3 or Ray ourselves would cost seconds), and the
    embedded workers import only env modules the trainer has imported."""
    return module in sys.modules


def _patch_frameworks_when_imported() -> None:
    for integration, (target, top) in _HOOKED.items():
        if _imported(target):
            patch_loaded(integration)
        elif integration not in _hooks and importlib.util.find_spec(top) is not None:
            _hooks[integration] = _AfterImport(target, integration)
            sys.meta_path.insert(0, _hooks[integration])


def _check_same(current: Settings, broker: str | None, api_key: str | None) -> None:
    """A second ``init()`` may repeat the first; asking for another broker or key is an error,
    never silently ignored (the envs made so far would keep talking to the first broker)."""
    where = "the embedded broker" if current.embedded is not None else current.broker
    if broker is not None and (current.embedded is not None or broker != current.broker):
        raise ValueError(f"remoterl.init() already runs with {where}; call remoterl.shutdown() first "
                         f"to use {broker}")
    if api_key is not None and api_key != current.api_key:
        raise ValueError(f"remoterl.init() already runs with another API key for {where}; "
                         f"call remoterl.shutdown() first to change it")


def patch_loaded(integration: str) -> None:
    """Patch a framework through its integration module (``remoterl.integrations.sb3``, ...)
    if ``init()`` asked for patches; a no-op otherwise, and when already patched."""
    current = settings()
    if current is not None and current.patched:
        importlib.import_module(integration).patch()
        _patched.add(integration)


def _remove_hook(integration: str) -> None:
    hook = _hooks.pop(integration, None)
    if hook is not None:
        try:
            sys.meta_path.remove(hook)
        except ValueError:
            pass


def _unpatch_frameworks() -> None:
    for integration in _HOOKED:
        _remove_hook(integration)
        if integration in _patched:
            importlib.import_module(integration).unpatch()
            _patched.discard(integration)


def _registering_modules() -> list[str]:
    """Modules already imported here that registered env ids (not gymnasium's own).

    The embedded workers import them too, so env ids registered before ``init`` are served.
    """
    import gymnasium

    modules = []
    for spec in gymnasium.registry.values():
        entry = spec.entry_point
        if not isinstance(entry, str) or ":" not in entry:
            continue
        module = entry.partition(":")[0]
        if module.split(".")[0] in ("gymnasium", "__main__") or not _imported(module):
            continue
        modules.append(module)
    return list(dict.fromkeys(modules))


def _run_simulator(url: str, slots: int, heartbeat: float, liveness: int) -> None:
    import signal

    from remoterl.workers.loop import WorkerLoop
    from remoterl.workers.runtime import SlotHost

    loop = WorkerLoop(url, SlotHost(None, slots), heartbeat=heartbeat, liveness=liveness)
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, lambda *_: loop.stop())
        try:
            loop.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    else:
        loop.run()
