"""Stable-Baselines3 on remote simulators: ``RemoteVecEnv`` and the ``make_vec_env`` patch.

``RemoteVecEnv`` is an SB3 ``VecEnv`` over a :class:`~remoterl.RemoteEnvVec` in
SAME_STEP autoreset mode, which is SB3's contract: a finished env is reset within
the step, its last observation goes to ``infos[i]["terminal_observation"]``,
``infos[i]["TimeLimit.truncated"]`` says whether time ran out, and ``reset()``
returns observations only. Each step is ONE message per worker, not one round trip
per env as in a ``DummyVecEnv`` of remote envs. ``get_attr``, ``set_attr``, ``env_method``
and ``env_is_wrapped`` behave as ``DummyVecEnv``'s, ``indices`` included, run on the workers
(one message per worker holding a picked env); values travel as codec values, and
``env_is_wrapped`` sends the wrapper class's name, never the class. ``step`` also takes
``DummyVecEnv``'s list of one action per env (dicts for a Dict space...). ``get_images``
and ``render`` are ``DummyVecEnv``'s too, with the frames rendered on the workers (so
``VecVideoRecorder`` records remote envs); ``render_mode="human"`` shows them here.

After ``remoterl.init()``, ``make_vec_env(env_id, n_envs)`` returns a ``RemoteVecEnv``
under ``VecMonitor`` (what the per-env ``Monitor`` would report). With a
``wrapper_class`` or another ``vec_env_cls`` (``SubprocVecEnv``...), the envs are
built one by one as SB3 builds them, from picklable env functions that carry the
broker's address: ``SubprocVecEnv`` starts its children with forkserver/spawn, where
patches made in the trainer do not exist. (Remote envs gain nothing from subprocesses:
the simulation already runs elsewhere and a ``RemoteVecEnv`` batches the calls.)

``make_vec_env`` is commonly imported (``from stable_baselines3.common.env_util
import make_vec_env``) before ``remoterl.init()`` runs, so the patch swaps the code
of SB3's function object itself instead of rebinding the module attribute; every
reference sees it. ``unpatch`` swaps it back.

This module imports Stable-Baselines3 (and so torch): it is loaded only when SB3 is.
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from typing import Any, Callable

import gymnasium
import numpy as np
from stable_baselines3.common import env_util
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from remoterl.errors import InvalidActionError, ProtocolError
from remoterl.wire import calls
from remoterl.wire.actions import check_action, check_attr_name
from remoterl.wire.calls import values_from_wire

__all__ = ["RemoteEnvFn", "RemoteVecEnv", "patch", "remote_make_vec_env", "unpatch"]

log = logging.getLogger(__name__)

# Env attributes get_attr answers from the description the workers sent when the slots opened:
# the spaces and the spec cannot travel as values, and SB3's VecEnv.__init__ asks for render_mode
# (for this vec env and for each VecEnvWrapper around it), where a round trip would cost.
_LOCAL_ATTRS = ("observation_space", "action_space", "spec", "render_mode")

_ARRAY_SPACES = (gymnasium.spaces.Box, gymnasium.spaces.Discrete, gymnasium.spaces.MultiDiscrete,
                 gymnasium.spaces.MultiBinary)


class RemoteVecEnv(VecEnv):
    """An SB3 ``VecEnv`` of ``n_envs`` remote slots, stepped with one message per worker.

    Args:
        env_id: a gymnasium env id the workers serve.
        n_envs: number of envs.
        broker: the broker's URL (default: the one ``remoterl.init`` configured).
        client: an explicit :class:`remoterl.Client`.
        max_workers: spread the slots over at most this many workers.
        env_kwargs: for ``gymnasium.make`` on the workers.
        timeout: seconds to wait for each step.
        on_worker_lost: ``"raise"`` or ``"truncate"`` (default: ``remoterl.init``'s, else
            ``"raise"``): with ``"truncate"``, the envs of a worker that died are re-opened
            elsewhere and their episodes end there (``TimeLimit.truncated``,
            ``terminal_observation`` the last observation, ``info["remoterl_worker_lost"]``).
        compression: ``"lz4"`` or ``"zstd"`` for the workers' replies (default:
            ``remoterl.init``'s, else none).
    """

    def __init__(self, env_id: str, n_envs: int = 1, *, broker: str | None = None, client: Any = None,
                 max_workers: int | None = None, env_kwargs: dict | None = None,
                 timeout: float | None = None, on_worker_lost: str | None = None,
                 compression: str | None = None) -> None:
        from remoterl.vector import RemoteEnvVec

        self.venv = RemoteEnvVec(env_id, n_envs, autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP,
                                 broker=broker, client=client, max_workers=max_workers, timeout=timeout,
                                 on_worker_lost=on_worker_lost, compression=compression,
                                 **(env_kwargs or {}))
        # (attribute of _LOCAL_ATTRS, env index) -> the value set_attr set there since (an env
        # hosted without wrappers takes a render_mode; what cannot travel is never set).
        self._set_since: dict[tuple[str, int], Any] = {}
        super().__init__(n_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self.render_mode = self.venv.render_mode
        self.metadata = self.venv.metadata
        self.env_id = env_id

    def reset(self) -> Any:
        """Reset every env with the seeds/options set by ``seed()``/``set_options()`` (used once)."""
        options = [o or None for o in self._options]
        if any(o != options[0] for o in options):
            raise NotImplementedError("RemoteVecEnv: different reset options per env are not supported; "
                                      "set the same options for all envs")
        obs, env_infos = self.venv.reset_envs(list(self._seeds), options[0])
        for i, info in env_infos:
            self.reset_infos[i] = info
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: Any) -> None:
        """Send the actions: the arrays SB3's algorithms give (``(n,)`` integers for Discrete,
        ``(n, *shape)`` otherwise) go as they are; a list of one action per env, which
        ``DummyVecEnv`` takes (``actions[i]`` for env ``i``: dicts for a Dict space, tuples for a
        Tuple space...), is batched first. ``RemoteEnvVec``'s checks refuse anything else with
        ``InvalidActionError`` before sending (and the workers run them again).

        A tuple is one action per env too, except for a Tuple action space, where it is
        gymnasium's batch (a tuple of batches, one per subspace) as before.
        """
        if isinstance(actions, (list, tuple)):
            actions = _batch(self.action_space, actions, self.num_envs)
        self.venv.step_async(actions)

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict]]:
        obs, rewards, terminated, truncated, env_infos, finals = self.venv.wait_envs()
        dones = terminated | truncated
        infos: list[dict] = []
        for i, info in enumerate(env_infos):
            final = finals.get(i)
            if final is not None:
                # SB3: the info of the step that ended the episode; the reset's goes to reset_infos.
                self.reset_infos[i] = info
                info = dict(final[1])
                info["terminal_observation"] = final[0]
            else:
                info = dict(info)
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            infos.append(info)
        # DummyVecEnv's reward buffer is float32.
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Seeds for the next reset: ``seed + i`` for env ``i`` (as DummyVecEnv)."""
        if seed is None:
            seed = int(np.random.randint(0, np.iinfo(np.uint32).max, dtype=np.uint32))
        self._seeds = [seed + idx for idx in range(self.num_envs)]
        return self._seeds

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``env.get_wrapper_attr(attr_name)`` of each env ``indices`` picks, as ``DummyVecEnv``:
        read on the workers (one message per worker), and a method comes back as a callable that
        runs it there. The spaces and the spec, which cannot travel as values, and the render
        mode are answered from what the workers described when the slots opened (or what
        :meth:`set_attr` set since).

        Raises:
            RemoteAttributeError: an env has no such attribute, or the name may not travel
                (starts with ``_``...): an ``AttributeError``, as ``DummyVecEnv`` raises.
            CodecError: the value cannot travel (``np_random``...).
            IndexError: an index out of range.
        """
        envs = self._target_envs(indices)
        if attr_name in _LOCAL_ATTRS:
            value = getattr(self.venv, "single_" + attr_name if attr_name.endswith("_space") else attr_name)
            return [self._set_since.get((attr_name, i), value) for i in envs]
        check_attr_name(attr_name)
        values = self._per_env(envs, calls.get_attr(attr_name), f"get_attr({attr_name})", _attr_values)
        return [_EnvMethod(self, attr_name, i) if value is _CALLABLE else value for i, value in zip(envs, values)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """``setattr(env, attr_name, value)`` on each env ``indices`` picks, on its worker, as
        ``DummyVecEnv``: on the env object the worker hosts (its outermost wrapper); an attribute
        it lacks is created there. ``value`` must travel (codec values: numbers, strings, lists,
        dicts, numpy arrays...).

        Raises:
            RemoteAttributeError: the name may not travel, or is a read-only property.
            CodecError: ``value`` cannot travel.
        """
        envs = self._target_envs(indices)
        check_attr_name(attr_name)
        self._per_env(envs, calls.set_attr(attr_name, outer=True), f"set_attr({attr_name})",
                      lambda reply, k: [None] * k, same={calls.VALUES: value})
        if attr_name in _LOCAL_ATTRS:
            self._set_since.update(((attr_name, i), value) for i in envs)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """``env.get_wrapper_attr(method_name)(*method_args, **method_kwargs)`` on each env
        ``indices`` picks, run on its worker, as ``DummyVecEnv``; the arguments and results must
        travel. ``reset``, ``step`` and ``close`` are refused: the workers keep the slots'
        bookkeeping (use the vec env's own).

        Raises:
            RemoteAttributeError: an env has no such attribute, or the name may not travel.
            RemoteEnvError: the method raised on its worker, or the attribute is not callable
                (``remote_type`` ``TypeError``).
            ValueError: ``reset``, ``step`` or ``close``.
            CodecError: an argument or a result cannot travel.
        """
        envs = self._target_envs(indices)
        check_attr_name(method_name, call=True)
        request = calls.call(method_name, method_args, method_kwargs, strict=True)
        return self._per_env(envs, request, f"env_method({method_name})", values_from_wire)

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        """Whether each env ``indices`` picks is wrapped, on its worker, by ``wrapper_class``
        (SB3's ``env_util.is_wrapped``). The class cannot travel: the worker compares its name,
        ``"module:QualName"``, with the classes of each wrapper's MRO.

        Raises:
            TypeError: ``wrapper_class`` is not a class.
            ProtocolError: the worker refused the class's name (not ``module:QualName``).
        """
        if not isinstance(wrapper_class, type):
            raise TypeError(f"env_is_wrapped takes a wrapper class, got {type(wrapper_class).__name__}")
        envs = self._target_envs(indices)
        return self._per_env(envs, calls.is_wrapped(wrapper_class), "env_is_wrapped", _flags)

    def _target_envs(self, indices: VecEnvIndices) -> list[int]:
        """The env indices ``indices`` picks, read as ``DummyVecEnv`` reads ``self.envs[i]``:
        a negative one counts from the end, one out of range is an ``IndexError``."""
        envs = range(self.num_envs)
        return [envs[i] for i in self._get_indices(indices)]

    def _per_env(self, envs: list[int], request: dict, what: str, read: Callable[[dict, int], list],
                 same: dict[str, Any] | None = None) -> list[Any]:
        """``request`` sent to the envs ``envs`` (one message per worker); one value per entry.

        ``read(reply, k)`` gives the values of a reply for its ``k`` envs; ``same`` holds fields
        with one value for every env (the worker takes one per slot). A call names each slot
        once, so an env that ``envs`` repeats is asked again in a further round: ``DummyVecEnv``
        runs a method once per mention.
        """
        out: list[Any] = [None] * len(envs)
        todo = list(range(len(envs)))
        while todo:
            first: dict[int, int] = {}  # env -> its position in envs, for this round
            later = []
            for pos in todo:
                if envs[pos] in first:
                    later.append(pos)
                else:
                    first[envs[pos]] = pos
            positions = list(first.values())
            per_env = {key: [value] * len(first) for key, value in (same or {}).items()}
            for covered, reply in self.venv.request_envs(request, list(first), what, per_env=per_env):
                for p, value in zip(covered, read(reply, len(covered))):
                    out[positions[p]] = value
            todo = later
        return out

    def get_images(self) -> list[Any]:
        """Every env's frame, as ``DummyVecEnv.get_images``: with ``render_mode="rgb_array"``
        rendered on the workers (one message per worker; raw arrays on the wire), otherwise a
        warning and ``None`` per env."""
        if self.render_mode != "rgb_array":
            warnings.warn(f"The render mode is {self.render_mode}, but this method assumes it is `rgb_array` to "
                          "obtain images.")
            return [None for _ in range(self.num_envs)]
        return list(self.venv.render())

    def render(self, mode: str | None = None) -> Any:
        """SB3's ``VecEnv.render``: with ``"rgb_array"``, the envs' frames tiled into one image
        (``tile_images``), so ``VecVideoRecorder`` records remote envs. With ``render_mode="human"``
        the workers render ``"rgb_array"`` and the frames are shown, tiled, in the window of the
        :class:`~remoterl.RemoteEnvVec` on this machine (after every step too); returns ``None``."""
        if self.render_mode == "human" and mode in (None, "human"):
            self.venv.render()
            return None
        return super().render(mode=mode)

    @property
    def workers(self) -> list[bytes]:
        """Routing ids of the workers holding the slots."""
        return self.venv.workers


def _batch(space: gymnasium.spaces.Space, actions: list | tuple, n: int) -> Any:
    """One action per env (``DummyVecEnv``'s form) as the batch ``RemoteEnvVec`` sends; each is
    checked against the space first, so a bad one is named by its env (``actions[2]['arm']``)."""
    if isinstance(space, gymnasium.spaces.Tuple) and isinstance(actions, tuple):
        return actions  # gymnasium's batch of a Tuple space
    if len(actions) != n:
        raise InvalidActionError(f"step() takes {n} actions, one per env, got {len(actions)}")
    for i, action in enumerate(actions):
        check_action(space, action, f"actions[{i}]")
    return _stack(space, actions)


def _stack(space: gymnasium.spaces.Space, items: list | tuple) -> Any:
    """Checked single actions stacked along a new env axis, values as given (no cast to the
    space's dtype: each env gets what ``DummyVecEnv`` would give it)."""
    if isinstance(space, gymnasium.spaces.Dict):
        return {key: _stack(sub, [item[key] for item in items]) for key, sub in space.spaces.items()}
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(_stack(sub, [item[k] for item in items]) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        return np.asarray(items)
    return list(items)  # Text: the batch is a sequence of single actions


class _EnvMethod:
    """A method of env ``index`` of a :class:`RemoteVecEnv`, as ``DummyVecEnv.get_attr`` gives a
    bound method: calling it runs the method on the env's worker (:meth:`RemoteVecEnv.env_method`)."""

    __slots__ = ("index", "name", "venv")

    def __init__(self, venv: RemoteVecEnv, name: str, index: int) -> None:
        self.venv, self.name, self.index = venv, name, index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.venv.env_method(self.name, *args, indices=[self.index], **kwargs)[0]

    def __repr__(self) -> str:
        return f"<remote method {self.name} of env {self.index} of {self.venv.venv!r}>"


# A callable attribute in a get_attr reply (its value does not travel): proxied by an _EnvMethod.
_CALLABLE = object()


def _attr_values(reply: dict, k: int) -> list:
    """The values of a get_attr reply for ``k`` envs, ``_CALLABLE`` where the attribute is callable."""
    values = values_from_wire(reply, k)
    marked = reply.get(calls.CALLABLE) or []
    if not isinstance(marked, list) or not all(isinstance(j, int) and 0 <= j < k for j in marked):
        raise ProtocolError("a get_attr reply's 'callable' must list positions in its values")
    for j in marked:
        values[j] = _CALLABLE
    return values


def _flags(reply: dict, k: int) -> list[bool]:
    """The bools of an is_wrapped reply for ``k`` envs."""
    values = values_from_wire(reply, k)
    if not all(isinstance(v, bool) for v in values):
        raise ProtocolError("an is_wrapped reply needs 'values', one bool per slot")
    return values


class RemoteEnvFn:
    """A picklable env function for SB3 vec envs: builds one remote env as ``make_vec_env`` would.

    It carries the broker's address (and API key), so it works in ``SubprocVecEnv``
    children, where remoterl was never initialised.
    """

    def __init__(self, env_id: str, rank: int, *, broker: str, api_key: str | None = None,
                 seed: int | None = None, monitor_dir: str | None = None, wrapper_class: Any = None,
                 env_kwargs: dict | None = None, monitor_kwargs: dict | None = None,
                 wrapper_kwargs: dict | None = None) -> None:
        self.env_id, self.rank, self.broker, self.api_key, self.seed = env_id, rank, broker, api_key, seed
        self.monitor_dir, self.wrapper_class = monitor_dir, wrapper_class
        self.env_kwargs, self.monitor_kwargs, self.wrapper_kwargs = env_kwargs or {}, monitor_kwargs or {}, wrapper_kwargs or {}

    def __call__(self) -> gymnasium.Env:
        from remoterl.env import RemoteEnv
        from remoterl.client.registry import settings

        if self.api_key and settings() is None:
            os.environ.setdefault("REMOTERL_API_KEY", self.api_key)
        env: gymnasium.Env = RemoteEnv(self.env_id, broker=self.broker, **self.env_kwargs)
        if self.seed is not None:
            env.action_space.seed(self.seed + self.rank)
        monitor_path = os.path.join(self.monitor_dir, str(self.rank)) if self.monitor_dir is not None else None
        if monitor_path is not None:
            os.makedirs(self.monitor_dir, exist_ok=True)  # type: ignore[arg-type]
        env = Monitor(env, filename=monitor_path, **self.monitor_kwargs)
        if self.wrapper_class is not None:
            env = self.wrapper_class(env, **self.wrapper_kwargs)
        return env


def remote_make_vec_env(env_id: str | Callable[..., gymnasium.Env], n_envs: int = 1, seed: int | None = None,
                        start_index: int = 0, monitor_dir: str | None = None, wrapper_class: Any = None,
                        env_kwargs: dict | None = None, vec_env_cls: type | None = None,
                        vec_env_kwargs: dict | None = None, monitor_kwargs: dict | None = None,
                        wrapper_kwargs: dict | None = None) -> VecEnv:
    """SB3's ``make_vec_env`` with remote envs (see the module docstring)."""
    from remoterl.client.registry import settings

    current = settings()
    if not isinstance(env_id, str) or current is None:
        return _original(env_id, n_envs, seed, start_index, monitor_dir, wrapper_class, env_kwargs, vec_env_cls,
                         vec_env_kwargs, monitor_kwargs, wrapper_kwargs)
    if wrapper_class is None and vec_env_cls in (None, DummyVecEnv) and not vec_env_kwargs:
        venv: VecEnv = RemoteVecEnv(env_id, n_envs, env_kwargs=env_kwargs)
        filename = os.path.join(monitor_dir, "vec") if monitor_dir is not None else None
        if monitor_dir is not None:
            os.makedirs(monitor_dir, exist_ok=True)
        venv = VecMonitor(venv, filename=filename, **{k: v for k, v in (monitor_kwargs or {}).items()
                                                      if k == "info_keywords"})
        if seed is not None:
            venv.action_space.seed(seed)
        venv.seed(seed)
        return venv
    fns = [RemoteEnvFn(env_id, start_index + i, broker=current.children_broker, api_key=current.api_key, seed=seed,
                       monitor_dir=monitor_dir, wrapper_class=wrapper_class, env_kwargs=env_kwargs,
                       monitor_kwargs=monitor_kwargs, wrapper_kwargs=wrapper_kwargs) for i in range(n_envs)]
    venv = (vec_env_cls or DummyVecEnv)(fns, **(vec_env_kwargs or {}))
    venv.seed(seed)
    return venv


# --- patching ------------------------------------------------------------------------------

_saved: dict[str, Any] = {}


def _original(*args: Any) -> VecEnv:
    return _saved["function"](*args)


def patch() -> None:
    """Route SB3's ``make_vec_env`` (the function object itself) to ``remote_make_vec_env``."""
    if _saved:
        return
    target = env_util.make_vec_env
    # A copy of the original function, to call when remoterl does not apply.
    _saved["function"] = types.FunctionType(target.__code__, target.__globals__, target.__name__,
                                            target.__defaults__, target.__closure__)
    _saved["code"] = target.__code__
    env_util.__dict__["_remoterl_make_vec_env"] = remote_make_vec_env
    target.__code__ = _trampoline.__code__


def unpatch() -> None:
    """Give SB3's ``make_vec_env`` its own code back."""
    if not _saved:
        return
    env_util.make_vec_env.__code__ = _saved["code"]
    env_util.__dict__.pop("_remoterl_make_vec_env", None)
    _saved.clear()


def _trampoline(env_id, n_envs=1, seed=None, start_index=0, monitor_dir=None, wrapper_class=None,  # noqa: ANN001
                env_kwargs=None, vec_env_cls=None, vec_env_kwargs=None, monitor_kwargs=None,
                wrapper_kwargs=None):  # noqa: ANN202
    # Runs as SB3's make_vec_env (its globals are env_util's): forwards to remoterl.
    return _remoterl_make_vec_env(env_id, n_envs, seed, start_index, monitor_dir, wrapper_class,  # noqa: F821
                                  env_kwargs, vec_env_cls, vec_env_kwargs, monitor_kwargs, wrapper_kwargs)
