"""Ray RLlib (new API stack) on remote simulators: ``RemoteEnvRunner`` and the config patch.

Theory of operation
-------------------
RLlib's env runners are Ray actors in other processes (other machines, on a cluster):
a patch made in the trainer does not exist there, and remoterl was never initialised
there. Two things therefore travel inside the ``AlgorithmConfig`` itself, which Ray
ships to every runner (and which survives ``to_dict``/``from_dict`` round trips, as
in Tune):

- ``config.env_runner_cls = RemoteEnvRunner``, a ``SingleAgentEnvRunner`` whose
  ``make_env`` builds the runner's ``num_envs_per_env_runner`` envs as ONE
  :class:`~remoterl.RemoteEnvVec` (one message per worker per vector step, NEXT_STEP
  autoreset on the workers, as RLlib expects) instead of a ``SyncVectorEnv``;
- the broker's address, as other processes must use it (``Settings.children_broker``),
  the API key and the call timeout, in ``config.extra_python_environs_for_worker``
  under ``REMOTERL_BROKER``, ``REMOTERL_API_KEY`` and ``REMOTERL_TIMEOUT``.

``RemoteEnvRunner.make_env`` runs RLlib's own ``make_env`` (env context, the
``on_environment_created`` callback, the ``DictInfoToList`` wrapper) with
``gymnasium.make_vec`` swapped, for that call only, for a function that opens the
``RemoteEnvVec``; RLlib's ``gym_env_vectorize_mode`` does not apply (the vectorisation
is remoterl's). What it opens depends on ``config.env``:

- a gymnasium id (``"CartPole-v1"``): that id, with ``config.env_config`` as keyword
  arguments of ``gymnasium.make`` on the workers (what RLlib passes locally);
- a ``tune.register_env(name, creator)`` name, or a creator given directly: only the
  creator's import path travels. It is registered on the workers as
  ``"rllib/<name>"`` with entry point ``"module:creator"`` (the same registration
  mirroring and ``--allow-import`` list as ``gymnasium.register``), and each env is
  made as ``creator(<first parameter>=env_config)``. The creator receives a plain dict
  (an ``EnvContext``'s ``worker_index`` and friends do not exist on the simulator). A
  lambda, a closure, a ``functools.partial`` or anything defined in ``__main__`` cannot
  be imported by name on a simulator: that is a ``ValueError`` saying so.

After ``remoterl.init()``, :func:`patch` makes ``AlgorithmConfig.environment(...)`` and
``AlgorithmConfig.build_algo()`` call :func:`remote_env_runners`, so a trainer's
``PPOConfig().environment("CartPole-v1")...build_algo()`` steps remote envs unchanged.
:func:`remote_env_runners` is the same thing without patching.

What it does not do: the old API stack (``RolloutWorker``) and multi-agent envs are
refused with a ``ValueError``; nothing is re-routed when a simulator dies: the runner's
step raises :class:`~remoterl.WorkerLostError`, which reaches the driver from
``algo.train()`` with ``restart_failed_env_runners=False``. RLlib's default instead ends
the runner and, after ``delay_between_env_runner_restarts_s`` (60 s), starts a new one,
whose ``RemoteEnvVec`` opens on the workers still alive: training goes on.

This module imports Ray RLlib: it is loaded only when RLlib is.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.tune.registry import ENV_CREATOR, _global_registry

from remoterl.client.metrics import Interval
from remoterl.errors import NoWorkerError, RemoteRLError

__all__ = ["RemoteEnvRunner", "RemoteTarget", "check_config", "creator_entry_point", "is_patched", "patch",
           "remote_env_runners", "resolve_env", "unpatch"]

log = logging.getLogger(__name__)

# Keys of config.extra_python_environs_for_worker that carry remoterl's settings to the runners
# (the names remoterl.init reads; REMOTERL_TIMEOUT is read by RemoteEnvRunner only).
BROKER_KEY, API_KEY_KEY, TIMEOUT_KEY = "REMOTERL_BROKER", "REMOTERL_API_KEY", "REMOTERL_TIMEOUT"
ON_LOST_KEY = "REMOTERL_ON_WORKER_LOST"
COMPRESSION_KEY = "REMOTERL_COMPRESSION"

_OLD_STACK = (
    "remoterl supports RLlib's new API stack only (EnvRunner, RLModule, Learner), and this config "
    "enables the old one (enable_rl_module_and_learner={rl}, enable_env_runner_and_connector_v2={er}). "
    "Use config.api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True) "
    "(RLlib's default).")


class RemoteEnvRunner(SingleAgentEnvRunner):
    """A ``SingleAgentEnvRunner`` whose envs are one :class:`~remoterl.RemoteEnvVec`.

    Set by :func:`remote_env_runners` (``config.env_runners(env_runner_cls=...)``); it
    reads the broker's address from ``config.extra_python_environs_for_worker``
    (``REMOTERL_BROKER``, else ``$REMOTERL_BROKER``). Subclass it to customise a
    runner further.

    Raises:
        ValueError: the config enables the old API stack or is multi-agent.
    """

    def __init__(self, *, config: AlgorithmConfig, **kwargs: Any) -> None:
        check_config(config)
        self._remoterl_interval = Interval()
        super().__init__(config=config, **kwargs)

    def get_metrics(self) -> Any:
        """RLlib's metrics, plus remoterl's of the iteration under ``remoterl/``: round trips
        (mean, p50, p99 ms; averaged over the runners) and calls, env-steps and errors (summed):
        they reach ``algo.train()``'s results under ``env_runners``, and TensorBoard or W&B with
        them (:mod:`remoterl.client.metrics` says what is measured)."""
        from remoterl.client.registry import collect

        vector = getattr(getattr(self, "env", None), "unwrapped", None)
        client = getattr(getattr(vector, "_clients", None), "client", None)
        if client is not None:
            for key, value in self._remoterl_interval.take(collect(client)).items():
                summed = key in ("calls", "env_steps", "errors")
                if summed:
                    self.metrics.log_value(("remoterl", key), value, reduce="sum")
                else:
                    self.metrics.log_value(("remoterl", key), value, reduce="mean", window=1)
        return super().get_metrics()

    def make_env(self) -> None:
        """RLlib's ``make_env``, with the vector env opened remotely (see the module docstring).

        Raises:
            BrokerUnavailableError, NoWorkerError, RemoteEnvError: from opening the slots.
            ValueError: the env's creator cannot be served remotely.
        """
        from remoterl.vector import RemoteEnvVec

        # RLlib looks gymnasium.make_vec up at call time: swap it for this call only.
        local_make_vec = gymnasium.make_vec
        gymnasium.make_vec = self._make_remote_vec
        try:
            super().make_env()
        finally:
            gymnasium.make_vec = local_make_vec
        if not isinstance(self.env.unwrapped, RemoteEnvVec):
            raise RuntimeError(
                f"{type(self).__name__}: RLlib built {self.env.unwrapped!r} without gymnasium.make_vec; "
                f"this Ray version is not supported by remoterl (tested with Ray 2.60)")

    def apply(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """RLlib's ``FaultAwareApply.apply``, except that a remoterl error reaches the driver.

        RLlib ends a runner whose call raised (``sys.exit(1)``), so the driver sees only
        ``ActorDiedError``. With ``restart_failed_env_runners=False`` nothing is restarted
        anyway: a :class:`~remoterl.RemoteRLError` behind the failure (``WorkerLostError``
        when a simulator died) is raised instead, and ``algo.train()`` raises it in the driver
        (as a ``RayTaskError`` that is also an instance of it). Otherwise RLlib's policy stands.
        """
        try:
            return func(self, *args, **kwargs)
        except Exception as exc:
            remote = _remote_cause(exc)
            if remote is None or self.config.restart_failed_env_runners:
                return super().apply(_raise, exc)  # RLlib's way: log, end the actor (Ray may restart it)
            log.error("%s: %s: %s", type(self).__name__, type(remote).__name__, remote)
            raise remote.with_traceback(remote.__traceback__) from None

    def _make_remote_vec(self, env_name: Any, num_envs: int = 1, vectorization_mode: Any = None,
                         vector_kwargs: dict | None = None, wrappers: Any = None,
                         **env_kwargs: Any) -> gymnasium.vector.VectorEnv:
        # Called by SingleAgentEnvRunner.make_env in place of gymnasium.make_vec.
        from remoterl.vector import RemoteEnvVec

        if wrappers:
            raise ValueError("RemoteEnvRunner: per-env gymnasium wrappers cannot run on remote simulators")
        target = resolve_env(self.config.env, self.config.env_config, env_kwargs)
        client = _client(self.config)
        if target.registration is not None:
            _mirror(client, target)
        carried = _carried(self.config)
        timeout = carried.get(TIMEOUT_KEY)
        return RemoteEnvVec(target.env_id, num_envs, autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP,
                            client=client, timeout=float(timeout) if timeout else None,
                            on_worker_lost=carried.get(ON_LOST_KEY) or None,
                            compression=carried.get(COMPRESSION_KEY) or None, **target.kwargs)


def _raise(runner: Any, exc: BaseException) -> Any:
    raise exc


def _remote_cause(exc: BaseException) -> RemoteRLError | None:
    """The remoterl error behind ``exc`` (RLlib raises ``RuntimeError() from`` an env's error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RemoteRLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# --- what the workers are asked to make -------------------------------------------------------


@dataclass(frozen=True)
class RemoteTarget:
    """How the runners open ``config.env`` remotely.

    Attributes:
        env_id: the id the workers make.
        kwargs: keyword arguments of ``gymnasium.make`` on the workers.
        registration: the spec to register on the workers first (a creator's entry point),
            or None for an id they already serve.
    """

    env_id: str
    kwargs: dict
    registration: dict | None = None


def resolve_env(env: Any, env_config: Any, env_kwargs: dict | None = None) -> RemoteTarget:
    """What the workers must make for RLlib's ``config.env``.

    Args:
        env: ``config.env``: a gymnasium id, a ``tune.register_env`` name or a creator.
        env_config: ``config.env_config`` (a creator's argument).
        env_kwargs: what RLlib passes to ``gymnasium.make_vec`` for a gymnasium id
            (default: ``env_config``).

    Raises:
        ValueError: no env, or a creator that simulators cannot import by name.
    """
    if not env:
        raise ValueError("config.env is not set: call config.environment('CartPole-v1') or another env")
    if isinstance(env, str) and _global_registry.contains(ENV_CREATOR, env):
        return _creator_target(env, _global_registry.get(ENV_CREATOR, env), env_config)
    if isinstance(env, str):
        return RemoteTarget(env, dict(env_config or {}) if env_kwargs is None else dict(env_kwargs))
    if callable(env):
        return _creator_target(getattr(env, "__name__", type(env).__name__), env, env_config)
    raise ValueError(f"config.env must be a gymnasium id, a tune.register_env name or an env creator, got {env!r}")


def _creator_target(name: str, creator: Callable, env_config: Any) -> RemoteTarget:
    entry_point = creator_entry_point(name, creator)
    param = _config_parameter(name, creator)
    env_id = "rllib/" + re.sub(r"[^\w.-]", "_", name)
    registration = {"id": env_id, "entry_point": entry_point, "kwargs": {}}
    return RemoteTarget(env_id, {param: dict(env_config or {})}, registration)


def creator_entry_point(name: str, creator: Callable) -> str:
    """``"module:attribute"`` by which a simulator can import an RLlib env creator.

    Raises:
        ValueError: a lambda, closure, partial, bound method or anything defined in
            ``__main__`` (simulators import creators by name; code never travels).
    """
    module = getattr(creator, "__module__", None)
    qualname = getattr(creator, "__qualname__", None)
    why = None
    if isinstance(creator, functools.partial):
        why = "is a functools.partial"
    elif not isinstance(module, str) or not isinstance(qualname, str) or inspect.ismethod(creator):
        why = "is not a module-level function or class"
    elif qualname == "<lambda>" or qualname.endswith(".<lambda>"):
        why = "is a lambda"
    elif "<locals>" in qualname or "." in qualname:
        why = "is defined inside a function or class"
    elif module == "__main__":
        why = "is defined in __main__ (the script being run)"
    else:
        try:
            found = getattr(importlib.import_module(module), qualname, None)
        except ImportError:
            found = None
        if found is not creator:
            why = f"cannot be found again as {module}:{qualname}"
    if why is not None:
        raise ValueError(
            f"RLlib env {name!r} cannot be served by remote simulators: its creator {creator!r} {why}. "
            f"Simulators import env creators by name ('module:function'); code never travels. Define it "
            f"as a module-level function or class in an importable module, register that "
            f"(tune.register_env({name!r}, mymodule.make_env)), and start the simulators with "
            f"remoterl-worker --allow-import mymodule")
    return f"{module}:{qualname}"


def _config_parameter(name: str, creator: Callable) -> str:
    # RLlib calls creator(env_context); gymnasium.make on the worker passes keywords only.
    try:
        params = list(inspect.signature(creator).parameters.values())
    except (TypeError, ValueError):
        params = []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not params or params[0].kind not in kinds:
        raise ValueError(
            f"RLlib env {name!r}: its creator {creator!r} must take the env config as a named first "
            f"parameter (def make_env(config): ...), which the simulator passes by keyword")
    return params[0].name


def _mirror(client: Any, target: RemoteTarget) -> None:
    """Register a creator's entry point on the workers; raise if every worker refused."""
    spec = target.registration
    assert spec is not None
    answer = client.register(spec)
    refused = answer.get("refused") or {}
    for worker, reason in refused.items():
        log.warning("worker %s refused to register %r: %s", worker, spec["id"], reason)
    if refused and not answer.get("accepted"):
        reasons = "; ".join(f"{worker}: {reason}" for worker, reason in refused.items())
        raise NoWorkerError(f"no worker can serve {spec['id']!r} (creator {spec['entry_point']}): {reasons}")


# --- settings carried in the config -------------------------------------------------------


def _carried(config: AlgorithmConfig) -> dict:
    return dict(getattr(config, "extra_python_environs_for_worker", None) or {})


def _client(config: AlgorithmConfig) -> Any:
    """This process's client for the broker the config names (the driver's own, if it is it)."""
    from remoterl.client.registry import get_client, settings

    carried = _carried(config)
    url = carried.get(BROKER_KEY) or os.environ.get("REMOTERL_BROKER")
    current = settings()
    if current is not None and (url is None or url in (current.broker, current.children_broker)):
        return get_client()  # in the trainer's process: its own client (inproc to an embedded broker)
    if not url:
        from remoterl.errors import BrokerUnavailableError

        raise BrokerUnavailableError(
            "RemoteEnvRunner: no broker URL in config.extra_python_environs_for_worker['REMOTERL_BROKER'] "
            "or $REMOTERL_BROKER: call remoterl.rllib.remote_env_runners(config) after remoterl.init()")
    if carried.get(API_KEY_KEY):
        os.environ["REMOTERL_API_KEY"] = carried[API_KEY_KEY]  # read by get_client without init
    return get_client(url)


def check_config(config: AlgorithmConfig) -> None:
    """Refuse what remoterl cannot run: the old API stack, multi-agent configs.

    Raises:
        ValueError: saying which and what to do instead.
    """
    rl, er = config.enable_rl_module_and_learner, config.enable_env_runner_and_connector_v2
    if not (rl and er):
        raise ValueError(_OLD_STACK.format(rl=rl, er=er))
    if config.is_multi_agent:
        raise ValueError("remoterl's RLlib integration supports single-agent envs only; this config is "
                         "multi-agent (config.multi_agent(...)). Build it without remoterl (remoterl.shutdown()).")


def remote_env_runners(config: AlgorithmConfig, *, broker: str | None = None,
                       api_key: str | None = None, on_worker_lost: str | None = None,
                       compression: str | None = None) -> AlgorithmConfig:
    """Make ``config``'s env runners step remote envs: one ``RemoteEnvVec`` per runner.

    Sets ``env_runner_cls`` to :class:`RemoteEnvRunner` and carries the broker's address,
    API key and timeout in ``extra_python_environs_for_worker`` (see the module
    docstring). Idempotent. When ``config.env`` names a creator, its registration is
    mirrored to the workers now, so a refusal shows here rather than in a runner.

    Args:
        config: an RLlib ``AlgorithmConfig`` on the new API stack (modified in place).
        broker: the broker's URL as the runners reach it (default: what ``remoterl.init``
            configured for other processes, else ``$REMOTERL_BROKER``).
        api_key: default: ``remoterl.init``'s, else ``$REMOTERL_API_KEY``.
        on_worker_lost: ``"raise"`` or ``"truncate"`` for the runners' ``RemoteEnvVec``
            (default: ``remoterl.init``'s, else ``"raise"``): with ``"truncate"``, a dead
            simulator's envs are re-opened elsewhere, their episodes truncated, and
            ``algo.train()`` goes on.
        compression: ``"lz4"`` or ``"zstd"`` for the runners' ``RemoteEnvVec`` replies
            (default: ``remoterl.init``'s, else none).

    Returns:
        ``config``, for chaining.

    Raises:
        ValueError: old API stack, multi-agent, another ``env_runner_cls``, or an env
            creator that simulators cannot import by name.
        BrokerUnavailableError: no broker configured.
        NoWorkerError: every worker refused to register the env's creator.
    """
    from remoterl.client.registry import settings
    from remoterl.errors import BrokerUnavailableError
    from remoterl.failover import check_policy
    from remoterl.wire.compress import check_algorithm

    check_config(config)
    current = settings()
    runner_cls = config.env_runner_cls
    if runner_cls is not None and not (isinstance(runner_cls, type) and issubclass(runner_cls, RemoteEnvRunner)):
        raise ValueError(f"config.env_runner_cls is {runner_cls!r}; remoterl needs "
                         f"remoterl.rllib.RemoteEnvRunner or a subclass of it")
    carried = _carried(config)
    # An address given (now or before) wins over init's: remote_env_runners(config, broker=URL)
    # stays as it is when the patched build_algo configures the config again.
    url = broker or carried.get(BROKER_KEY) or (current.children_broker if current is not None else None) \
        or os.environ.get("REMOTERL_BROKER")
    if not url:
        raise BrokerUnavailableError(
            "no broker configured: call remoterl.init() first, or pass broker='tcp://HOST:5555'")
    if url.startswith("inproc://"):
        raise ValueError(f"RLlib's env runners are other processes: they cannot reach {url}; pass a tcp:// URL")
    carried[BROKER_KEY] = url
    key = api_key or carried.get(API_KEY_KEY) or (current.api_key if current is not None else None) \
        or os.environ.get("REMOTERL_API_KEY")
    if key:
        carried[API_KEY_KEY] = key
    if current is not None:
        carried.setdefault(TIMEOUT_KEY, repr(float(current.timeout)))
    policy = on_worker_lost or carried.get(ON_LOST_KEY) or (current.on_worker_lost if current is not None else None)
    if policy is not None:
        carried[ON_LOST_KEY] = check_policy(policy)
    packing = compression or carried.get(COMPRESSION_KEY) or (current.compression if current is not None else None)
    if packing is not None:
        carried[COMPRESSION_KEY] = check_algorithm(packing)
    if runner_cls is None:
        config.env_runners(env_runner_cls=RemoteEnvRunner)
    if carried != _carried(config):
        config.python_environment(extra_python_environs_for_worker=carried)
    if config.env:
        target = resolve_env(config.env, config.env_config)
        if target.registration is not None:
            _mirror(_client(config), target)
    return config


# --- the patch installed by remoterl.init() ----------------------------------------------------

_originals: dict[str, Any] = {}


def is_patched() -> bool:
    return bool(_originals)


def patch() -> None:
    """Route ``AlgorithmConfig.environment`` and ``build_algo`` through :func:`remote_env_runners`
    (idempotent)."""
    if _originals:
        return
    _originals.update(environment=AlgorithmConfig.environment, build_algo=AlgorithmConfig.build_algo)
    # wraps: the patched methods keep RLlib's names, docstrings and signatures (help(), IDEs).
    AlgorithmConfig.environment = functools.wraps(_originals["environment"])(_environment)  # type: ignore
    AlgorithmConfig.build_algo = functools.wraps(_originals["build_algo"])(_build_algo)  # type: ignore


def unpatch() -> None:
    """Give ``AlgorithmConfig`` its own methods back (idempotent). Configs already made remote stay so."""
    if not _originals:
        return
    AlgorithmConfig.environment = _originals["environment"]  # type: ignore[method-assign]
    AlgorithmConfig.build_algo = _originals["build_algo"]  # type: ignore[method-assign]
    _originals.clear()


def _environment(self: AlgorithmConfig, *args: Any, **kwargs: Any) -> AlgorithmConfig:
    # AlgorithmConfig.environment, then the settings that make the runners remote.
    _originals["environment"](self, *args, **kwargs)
    if getattr(self, "_is_frozen", False):
        return self  # RLlib's own frozen copies: build_algo configured them already
    return remote_env_runners(self)


def _build_algo(self: AlgorithmConfig, env: Any = None, use_copy: bool = True) -> Any:
    # Catches configs whose environment() ran before remoterl.init(), and later api_stack() changes.
    config = self
    if getattr(self, "_is_frozen", False):
        config, use_copy = self.copy(copy_frozen=False), False
    if env is not None:
        config.env = env
    remote_env_runners(config)
    return _originals["build_algo"](config, env=env, use_copy=use_copy)

