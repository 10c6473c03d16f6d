"""``RemoteEnv``: one env slot on a remote worker, as a ``gymnasium.Env``.

The spaces, metadata, render mode and spec are fetched once, when the slot opens,
and cached. ``reset``, ``step``, ``close`` and ``render`` are forwarded; each is one
round trip through the broker (a frame travels as a raw array, like an observation).
With ``render_mode="human"`` the worker renders ``"rgb_array"`` and the frames are shown
in a window on this machine after every ``reset`` and ``step`` (:mod:`remoterl.render`).
Everything else is the local ``gymnasium.Env`` machinery, so gymnasium's wrappers and
env checker work on it unchanged.

The env's other attributes live on the worker. ``env.get_wrapper_attr(name)``,
``set_wrapper_attr`` and ``has_wrapper_attr`` reach them (one round trip each; a method
comes back as a :class:`RemoteMethod` that runs on the worker when called), so
gymnasium's ``SyncVectorEnv.get_attr``/``call`` and SB3's ``DummyVecEnv.get_attr``/
``env_method`` work on wrapped ``RemoteEnv``s. Plain attribute access does not cross the
wire: ``env.unwrapped`` is the ``RemoteEnv`` itself, and ``env.unwrapped.gravity`` raises
an ``AttributeError`` that points at ``get_wrapper_attr`` (an attribute read that silently
made a network round trip, or that ``hasattr`` turned into a remote call, would surprise).
Names starting with ``_`` never travel (:func:`check_attr_name`).
"""

from __future__ import annotations

from typing import Any

import gymnasium

from remoterl.client.registry import default_compression, get_client
from remoterl.errors import EnvClosedError, ProtocolError, RemoteAttributeError
from remoterl.failover import LOST_FLAG, LostClient, check_policy, hosting_opts, is_lost, reopen
from remoterl.render import for_worker, show_frame
from remoterl.wire import calls
from remoterl.wire.actions import check_action, check_attr_name
from remoterl.wire.calls import INFO, OBS, REWARDS, TERMINATED, TRUNCATED, values_from_wire
from remoterl.wire.envdesc import EnvDescription, metadata_from_wire, spec_from_wire

# check_action, metadata_from_wire, spec_from_wire and values_from_wire live in remoterl.wire
# (shared with the workers); importable from here as before.
__all__ = ["RemoteEnv", "RemoteMethod", "check_action", "metadata_from_wire", "spec_from_wire",
           "values_from_wire"]


class RemoteEnv(gymnasium.Env):
    """An environment that lives on a remote worker.

    Args:
        env_id: a gymnasium env id the workers serve.
        broker: the broker's URL; default: the one ``remoterl.init`` configured, else
            ``$REMOTERL_BROKER``.
        client: an explicit :class:`remoterl.Client` (overrides ``broker``).
        timeout: seconds to wait for each reply (default: the client's).
        on_worker_lost: ``"raise"`` (``WorkerLostError``; the default unless ``remoterl.init``
            says otherwise) or ``"truncate"``: when the worker dies (or the broker restarts),
            the env is re-opened on a worker still serving the id (waiting up to ``timeout``)
            and the step returns the last observation, reward 0, ``truncated=True`` and
            ``info["remoterl_worker_lost"] = True``; the next ``reset()`` starts on the new env.
        compression: ``"lz4"`` or ``"zstd"``: the worker compresses big observation and frame
            arrays before sending them (worth it across a WAN; default: ``remoterl.init``'s,
            else none; False: none).
        **kwargs: passed to ``gymnasium.make`` on the worker (``max_episode_steps``,
            env constructor arguments, ...).

    Raises:
        NoWorkerError: no worker serves ``env_id`` (the message lists what is served).
        BrokerUnavailableError: no broker answers.
        RemoteEnvError: the env could not be created on the worker.
    """

    def __init__(self, env_id: str, *, broker: str | None = None, client: Any = None,
                 timeout: float | None = None, on_worker_lost: str | None = None,
                 compression: str | None = None, _bare: bool = False, **kwargs: Any) -> None:
        self._on_lost = check_policy(on_worker_lost)
        self._client = client if client is not None else get_client(broker)
        self._clients = LostClient(self._client, client is None, broker)
        self._timeout = timeout
        self._opts = hosting_opts(default_compression(compression), bare=_bare)
        # render_mode="human": the worker renders "rgb_array" frames, shown in a window here.
        kwargs, self.render_window = for_worker(kwargs, f"remoterl: {env_id}")
        self._kwargs = kwargs
        self._last_obs: Any = None
        opened = self._client.open(env_id, 1, kwargs, opts=self._opts, timeout=timeout)
        self._slot = opened.slots[0]
        self._worker = opened.workers[0]
        self._slots = [self._slot]
        self._closed = False
        desc = EnvDescription.from_wire(opened.env)
        self.env_id = env_id
        self.observation_space = desc.observation_space
        self.action_space = desc.action_space
        self.metadata = desc.metadata
        self.render_mode = desc.render_mode if self.render_window is None else "human"
        if self.render_window is not None:
            self.render_window.fps = self.metadata.get("render_fps")
        self.spec = desc.spec

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the remote env; ``seed`` and ``options`` as in ``gymnasium.Env.reset``."""
        super().reset(seed=seed)
        self._ensure_open()
        request = calls.reset_single(seed, options)
        try:
            reply = self._client.call(self._worker, self._slots, request, self._timeout)
        except Exception as exc:
            if self._on_lost != "truncate" or not is_lost(exc):
                raise
            self._replace(exc)
            reply = self._client.call(self._worker, self._slots, calls.reset_single(seed, options), self._timeout)
            reply[INFO] = {**reply[INFO], LOST_FLAG: True}
        self._last_obs = reply[OBS]
        if self.render_window is not None:  # human mode renders after every reset and step
            self.render()
        return reply[OBS], reply[INFO]

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        """Step the remote env; returns what it returned, types included.

        Raises:
            InvalidActionError: the action cannot fit the action space (nothing sent; the
                worker runs the same check on arrival).
        """
        self._ensure_open()
        check_action(self.action_space, action)
        try:
            reply = self._client.call(self._worker, self._slots, calls.step_single(action), self._timeout)
        except Exception as exc:
            if self._on_lost != "truncate" or not is_lost(exc):
                raise
            self._replace(exc)  # the episode ends here; reset() starts on the replacement
            return self._last_obs, 0.0, False, True, {LOST_FLAG: True}
        self._last_obs = reply[OBS]
        if self.render_window is not None:
            self.render()
        return reply[OBS], reply[REWARDS], reply[TERMINATED], reply[TRUNCATED], reply[INFO]

    def _replace(self, why: BaseException) -> None:
        """Re-open this env's slot on a worker still serving the id (``on_worker_lost="truncate"``)."""
        old = self._clients.client
        bound = self._timeout if self._timeout is not None else old.timeout
        if old.lost is None and not old.closed:
            # Forgotten before the re-open: a restarted broker numbers slots afresh, and the
            # replacement may get this very id.
            old.close_slots(self._slots)
        opened = reopen(self._clients, self.env_id, 1, self._kwargs, self._opts, bound, why)
        self._client = self._clients.client
        self._slot, self._worker = opened.slots[0], opened.workers[0]
        self._slots = [self._slot]

    def render(self) -> Any:
        """The env's ``render()`` on its worker (one round trip), as a local env returns it: an
        RGB array for ``"rgb_array"`` (a raw frame on the wire, like an observation), a list of
        them for ``"rgb_array_list"``, ``None`` without a render mode. In ``"human"`` mode the
        worker renders ``"rgb_array"`` and the frame is shown in :attr:`render_window` here
        (:mod:`remoterl.render`); it returns ``None``, and ``reset``/``step`` call it themselves.

        Raises:
            EnvClosedError: the env was closed.
            RemoteEnvError: the env's ``render()`` raised on the worker.
            ValueError: human mode, and the worker's env rendered no image.
        """
        frame = self.call_remote("render")
        if self.render_window is None:
            return frame
        show_frame(self.render_window, frame, repr(self))
        return None

    def close(self) -> None:
        """Release the slot; the env is closed on its worker. Closing twice is harmless."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self.render_window is not None:
            self.render_window.close()
        self._client.close_slots(self._slots)
        if self._clients.owned is not None:  # a client made here to replace a lost one
            self._clients.owned.close()

    # --- remote attributes -------------------------------------------------------------------

    def get_wrapper_attr(self, name: str) -> Any:
        """The attribute ``name``: this object's own if it has one (spaces, metadata, spec,
        ``reset``...), else the remote env's, as ``gymnasium.Env.get_wrapper_attr`` on the
        worker finds it (one round trip). A remote method comes back as a :class:`RemoteMethod`.

        Raises:
            RemoteAttributeError: the remote env has no such attribute, or ``name`` may not
                travel (:func:`check_attr_name`); an ``AttributeError`` either way.
            CodecError: the value cannot travel (the message names the attribute).
            EnvClosedError: the env was closed.
        """
        if _has_local(self, name):
            return getattr(self, name)
        check_attr_name(name)
        reply = self._attr_call(calls.get_attr(name))
        if reply.get(calls.CALLABLE):
            return RemoteMethod(self, name)
        return values_from_wire(reply, 1)[0]

    def set_wrapper_attr(self, name: str, value: Any, *, force: bool = True) -> bool:
        """Set ``name`` here if this object has it, else on the remote env with
        ``set_wrapper_attr(name, value, force=force)`` there (``value`` must travel).

        Returns:
            Whether the attribute was set (with ``force=False``, only an existing one is).
        """
        if _has_local(self, name):
            setattr(self, name, value)
            return True
        check_attr_name(name)
        reply = self._attr_call(calls.set_attr(name, [value], force=force))
        done = reply.get(calls.SET)
        if not isinstance(done, list) or len(done) != 1 or not isinstance(done[0], bool):
            raise ProtocolError("a set_attr reply needs 'set', one bool per slot")
        return done[0]

    def has_wrapper_attr(self, name: str) -> bool:
        """Whether this object or the remote env has ``name`` (a name that may not travel: False)."""
        if _has_local(self, name):
            return True
        try:
            check_attr_name(name)
        except (RemoteAttributeError, TypeError):
            return False
        reply = self._attr_call(calls.get_attr(name, probe=True))
        return bool(values_from_wire(reply, 1)[0])

    def call_remote(self, name: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run ``env.get_wrapper_attr(name)(*args, **kwargs)`` on the worker (the attribute
        itself if it is not callable) and return the result: what :class:`RemoteMethod` does."""
        check_attr_name(name, call=True)
        reply = self._attr_call(calls.call(name, args, kwargs))
        return values_from_wire(reply, 1)[0]

    def _attr_call(self, request: dict) -> dict:
        self._ensure_open()
        return self._client.call(self._worker, self._slots, request, self._timeout)

    def __getattr__(self, name: str) -> Any:
        # Only for names this object lacks: say where the env's attributes are, without a round trip.
        if name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}: the env runs on a worker and only its "
            f"spaces, metadata, render_mode and spec are kept here; read the remote env's attribute with "
            f"env.get_wrapper_attr({name!r})")

    def _ensure_open(self) -> None:
        if self._closed:
            raise EnvClosedError(f"RemoteEnv({self.env_id!r}) is closed")

    def __repr__(self) -> str:
        return f"<RemoteEnv {self.env_id} slot={self._slot} worker={self._worker.hex()[:8]}>"


class RemoteMethod:
    """A method of a remote env: calling it runs the method on the worker (one round trip) and
    returns its result; arguments and result must travel (codec values, numpy arrays included)."""

    __slots__ = ("_env", "name")

    def __init__(self, env: RemoteEnv, name: str) -> None:
        self._env = env
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._env.call_remote(self.name, args, kwargs)

    def __repr__(self) -> str:
        return f"<RemoteMethod {self.name} of {self._env!r}>"


def _has_local(env: RemoteEnv, name: str) -> bool:
    """Whether ``name`` resolves on the local object (never a round trip: see ``__getattr__``)."""
    return isinstance(name, str) and hasattr(env, name)
