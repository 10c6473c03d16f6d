"""gymnasium patches installed by ``remoterl.init()``: ``make`` and ``make_vec`` go remote.

``gymnasium.make(id, ...)`` returns a :class:`~remoterl.RemoteEnv` wrapped exactly as
gymnasium would wrap a local env: the original ``make`` runs on a copy of the env's
spec whose entry point creates the remote env, so ``max_episode_steps``,
``disable_env_checker``, ``order_enforce`` and the spec's additional wrappers apply on
the trainer side. The worker then hosts the bare env (no wrapper applied twice).
``render_mode`` reaches the worker's ``make``, except that ``"human"`` is rendered there as
``"rgb_array"`` and shown here (:mod:`remoterl.render`), and a ``"*_list"`` mode is collected
here by gymnasium's ``RenderCollection``, as ``make`` would add it.

``gymnasium.make_vec(id, num_envs, ...)`` returns a :class:`~remoterl.RemoteEnvVec`
(one message per worker per step, autoreset on the workers; ``vector_kwargs``'s
``autoreset_mode`` is honoured). Per-env ``wrappers`` are callables that cannot
travel: with them, ``make_vec`` builds a ``SyncVectorEnv`` of wrapped ``RemoteEnv``
proxies instead, which is correct but makes one round trip per env per step.

``make_vec`` calls ``gymnasium.envs.registration.make`` through the module, with an
``EnvSpec``: both names are patched, and both accept an ``EnvSpec``.

``gymnasium.register(id=..., entry_point="pkg.mod:Cls", ...)`` registers locally as
usual and, for entry-point strings, mirrors the registration to the workers: only the
string, kwargs and spec fields travel; each worker imports the module only if its
``--allow-import`` list permits (callables cannot travel and stay local).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import gymnasium
from gymnasium.envs import registration
from gymnasium.envs.registration import EnvSpec

from remoterl.errors import NoWorkerError, RemoteRLError

__all__ = ["is_patched", "mirror_registration", "patch", "remote_make", "remote_make_vec", "remote_register",
           "unpatch"]

log = logging.getLogger(__name__)

_originals: dict[str, Any] = {}


def is_patched() -> bool:
    return bool(_originals)


def patch() -> None:
    """Install the patches (idempotent)."""
    if _originals:
        return
    _originals.update(make=registration.make, make_vec=registration.make_vec, register=registration.register,
                      gym_make=gymnasium.make, gym_make_vec=gymnasium.make_vec, gym_register=gymnasium.register)
    gymnasium.make = registration.make = remote_make
    gymnasium.make_vec = registration.make_vec = remote_make_vec
    gymnasium.register = registration.register = remote_register


def unpatch() -> None:
    """Restore gymnasium's own functions (idempotent)."""
    if not _originals:
        return
    registration.make, registration.make_vec = _originals["make"], _originals["make_vec"]
    gymnasium.make, gymnasium.make_vec = _originals["gym_make"], _originals["gym_make_vec"]
    registration.register, gymnasium.register = _originals["register"], _originals["gym_register"]
    _originals.clear()
    _mirrored.clear()


class _RemoteEntryPoint:
    """An entry point that opens a bare remote env (gymnasium applies the wrappers)."""

    def __init__(self, env_id: str) -> None:
        self.env_id = env_id

    def __call__(self, **kwargs: Any) -> Any:
        from remoterl.env import RemoteEnv

        return RemoteEnv(self.env_id, _bare=True, **kwargs)

    def __repr__(self) -> str:
        return f"remoterl:{self.env_id}"


def _find_spec(id: str | EnvSpec) -> EnvSpec | None:
    if isinstance(id, EnvSpec):
        return id
    if not isinstance(id, str):
        raise gymnasium.error.Error(f"Invalid id type: {type(id)}. Expected `str` or `EnvSpec`")
    try:
        return registration._find_spec(id)
    except gymnasium.error.Error:
        return None  # maybe registered on the workers only


def _make_original() -> Any:
    return _originals.get("make", registration.make)


def remote_make(id: str | EnvSpec, max_episode_steps: int | None = None,
                disable_env_checker: bool | None = None, **kwargs: Any) -> gymnasium.Env:
    """``gymnasium.make`` whose env runs on a remote worker (see the module docstring)."""
    try:
        return _remote_make(id, max_episode_steps, disable_env_checker, **kwargs)
    except NoWorkerError as exc:
        raise _explain_local_only(id, exc) from exc


def _remote_make(id: str | EnvSpec, max_episode_steps: int | None, disable_env_checker: bool | None,
                 **kwargs: Any) -> gymnasium.Env:
    spec = _find_spec(id)
    if spec is None:
        # Not registered here: the workers' registration decides everything, wrappers included.
        from remoterl.env import RemoteEnv

        extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
        if disable_env_checker is not None:
            extra["disable_env_checker"] = disable_env_checker
        return RemoteEnv(id, **extra, **kwargs)
    local = dataclasses.replace(spec, entry_point=_RemoteEntryPoint(spec.id), kwargs=dict(spec.kwargs))
    render_mode = kwargs.get("render_mode", spec.kwargs.get("render_mode"))
    collect = isinstance(render_mode, str) and render_mode.endswith("_list")
    if collect:
        # gymnasium's make reads the modes an env supports from its entry point, which the remote
        # one cannot know: collect frames here, as make does for an env without a "_list" mode
        # (the worker hosts the bare env, without the RenderCollection its make would add).
        kwargs = {**kwargs, "render_mode": render_mode[:-len("_list")]}
    env = _make_original()(local, max_episode_steps=max_episode_steps,
                           disable_env_checker=disable_env_checker, **kwargs)
    if collect:
        env = gymnasium.wrappers.RenderCollection(env)
    # Show the spec as registered (its real entry point), with the kwargs used.
    env.unwrapped.spec = dataclasses.replace(env.unwrapped.spec, entry_point=spec.entry_point)
    return env


def remote_make_vec(id: str | EnvSpec, num_envs: int = 1, vectorization_mode: Any = None,
                    vector_kwargs: dict[str, Any] | None = None, wrappers: Any = None,
                    **kwargs: Any) -> gymnasium.vector.VectorEnv:
    """``gymnasium.make_vec`` whose envs run on remote workers (see the module docstring)."""
    try:
        return _remote_make_vec(id, num_envs, vectorization_mode, vector_kwargs, wrappers, **kwargs)
    except NoWorkerError as exc:
        raise _explain_local_only(id, exc) from exc


def _remote_make_vec(id: str | EnvSpec, num_envs: int, vectorization_mode: Any, vector_kwargs: dict[str, Any] | None,
                     wrappers: Any, **kwargs: Any) -> gymnasium.vector.VectorEnv:
    from remoterl.env import RemoteEnv
    from remoterl.vector import RemoteEnvVec

    spec = _find_spec(id)
    env_id = spec.id if spec is not None else id
    env_kwargs = {**(spec.kwargs if spec is not None else {}), **kwargs}
    vector_kwargs = dict(vector_kwargs or {})
    autoreset_mode = vector_kwargs.pop("autoreset_mode", gymnasium.vector.AutoresetMode.NEXT_STEP)
    if vectorization_mode is not None:
        log.debug("make_vec(vectorization_mode=%r): remote envs use remoterl's own vectorization", vectorization_mode)
    if wrappers:
        def single() -> gymnasium.Env:
            env = RemoteEnv(env_id, **env_kwargs)
            for wrapper in wrappers:
                env = wrapper(env)
            return env

        log.info("make_vec(%r, wrappers=...): per-env wrappers run here, so each env steps in its own round trip",
                 env_id)
        keep = {k: v for k, v in vector_kwargs.items() if k in ("copy", "observation_mode")}
        return gymnasium.vector.SyncVectorEnv([single] * num_envs, autoreset_mode=autoreset_mode, **keep)
    if vector_kwargs:
        log.debug("make_vec: vector_kwargs %s do not apply to remote envs", sorted(vector_kwargs))
    return RemoteEnvVec(env_id, num_envs, autoreset_mode=autoreset_mode, **env_kwargs)


def remote_register(id: str, entry_point: Any = None, **kwargs: Any) -> None:
    """``gymnasium.register`` that also registers the env on the workers.

    Only a string travels: an entry-point string as given, or for a class or function the
    ``"module:Name"`` it can be imported by. One that cannot be imported by name elsewhere
    (defined in ``__main__`` or inside a function) is registered here only, and making it
    later says how to make it reach the workers.
    """
    _originals.get("register", registration.register)(id, entry_point, **kwargs)
    _local_only.pop(id, None)
    _mirrored.pop(id, None)
    if isinstance(entry_point, str):
        mirror_registration(id)
    elif entry_point is not None:
        path, why = _import_path(entry_point)
        if path is not None:
            mirror_registration(id, path)
        else:
            _local_only[id] = why


# Env ids registered here with an entry point the workers cannot import, and why.
_local_only: dict[str, str] = {}


def _import_path(entry_point: Any) -> tuple[str | None, str]:
    """``("module:Name", "")`` for an object importable by that name, else ``(None, why)``."""
    module = getattr(entry_point, "__module__", None)
    name = getattr(entry_point, "__qualname__", None)
    what = f"{name or entry_point!r}"
    if module == "__main__":
        import __main__

        script = getattr(__main__, "__file__", None) or "your script"
        return None, (f"its entry point {what} is defined in __main__ ({os.path.basename(script)}), which workers "
                      f"cannot import. Move it to a module (say myenvs.py), register it with "
                      f"entry_point='myenvs:{name or 'MyEnv'}', and start workers with --import myenvs")
    if not isinstance(module, str) or not isinstance(name, str) or not name.isidentifier():
        return None, (f"its entry point {what} cannot be imported by name (defined inside a function?). "
                      f"Register it with an entry-point string 'package.module:Class' that workers can import")
    return f"{module}:{name}", ""


def _explain_local_only(env_id: Any, exc: NoWorkerError) -> NoWorkerError:
    why = _local_only.get(env_id.id if isinstance(env_id, EnvSpec) else env_id)
    return NoWorkerError(f"{exc} {env_id!r} is registered in this process, but {why}") if why else exc


def mirror_registration(env_id: str, entry_point: str | None = None) -> dict:
    """Send the local registration of ``env_id`` to the workers; log the ones that refuse.

    Args:
        entry_point: the ``"module:Name"`` to send, when the local spec holds the object itself.

    Returns:
        The broker's answer: ``{"id", "accepted": [...], "refused": {worker: reason}}``.
    """
    from remoterl.client.registry import get_client, on_client_replaced

    spec = registration.registry[env_id]
    wire = {
        "id": spec.id, "entry_point": entry_point or spec.entry_point, "kwargs": dict(spec.kwargs or {}),
        "reward_threshold": spec.reward_threshold, "nondeterministic": spec.nondeterministic,
        "max_episode_steps": spec.max_episode_steps, "order_enforce": spec.order_enforce,
        "disable_env_checker": spec.disable_env_checker,
    }
    on_client_replaced(_register_again)
    _mirrored[env_id] = wire
    return _send_registration(get_client(), wire)


# Registrations this process sent to the broker, by env id: sent again to a restarted broker.
_mirrored: dict[str, dict] = {}


def _send_registration(client: Any, wire: dict) -> dict:
    answer = client.register(wire)
    for worker, reason in (answer.get("refused") or {}).items():
        log.warning("worker %s refused to register %r: %s", worker, wire["id"], reason)
    return answer


def _register_again(client: Any) -> None:
    """A new client replaced one that lost its broker: the broker may be a restarted one
    that knows none of this process's registrations."""
    for wire in list(_mirrored.values()):
        try:
            _send_registration(client, wire)
        except RemoteRLError as exc:  # the env fails later with its own NoWorkerError
            log.warning("registering %r again with the broker failed: %s", wire["id"], exc)
