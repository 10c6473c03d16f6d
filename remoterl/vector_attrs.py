"""``RemoteEnvVec``'s attribute calls: ``get_attr``, ``set_attr`` and ``call``, and the per-env form behind them.

gymnasium's ``VectorEnv.get_attr``/``set_attr``/``call`` (and the ``call_async``/``call_wait``
split ``AsyncVectorEnv`` has) reach the remote envs' public attributes as ``SyncVectorEnv``
defines them: each env looks the name up with ``env.get_wrapper_attr(name)`` on its worker,
one message per worker (built by :mod:`remoterl.wire.calls`); names and values travel as
codec values, never pickle. The spaces and the spec, which cannot travel as values, are
answered from the description the workers sent at OPEN. :meth:`VectorAttrs.request_envs`
sends a call to some envs only (SB3's ``indices``).

:class:`VectorAttrs` is a mixin of :class:`remoterl.vector.RemoteEnvVec`: it uses the
vector's slot layout, its client and its call state (see the annotations on the class).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from gymnasium.error import NoAsyncCallError
from gymnasium.vector.async_vector_env import AsyncState

from remoterl.wire import calls
from remoterl.wire.actions import check_attr_name
from remoterl.wire.calls import values_from_wire

__all__ = ["VectorAttrs"]

# Env attributes that cannot travel as values (spaces, EnvSpec), answered by get_attr/call from
# the description the workers sent at OPEN: env attribute -> this vector's attribute.
_DESCRIBED = {"observation_space": "single_observation_space", "action_space": "single_action_space",
              "spec": "spec"}


class VectorAttrs:
    """The attribute calls of :class:`~remoterl.vector.RemoteEnvVec` (a mixin over its state)."""

    # What the vector holds (remoterl.vector.RemoteEnvVec sets these); it also gives the methods
    # _send (one call per worker), _ensure_open and _ensure_idle.
    num_envs: int
    _client: Any
    _timeout: float | None
    _groups: list[tuple[bytes, list[int], int, int]]  # (worker, its slots, first env, end env)
    _state: AsyncState
    _pending: list
    _answered: tuple | None

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call ``name`` on every env with ``args`` and ``kwargs`` (an attribute that is not
        callable is returned as is), as ``SyncVectorEnv.call``: a tuple, one result per env.

        The envs look the name up with ``env.get_wrapper_attr(name)`` on their workers. Arguments
        and results must travel (codec values: numbers, strings, lists, dicts, tuples, numpy
        arrays); one message per worker. ``observation_space``, ``action_space`` and ``spec``,
        which cannot travel as values, are answered here from what the workers described
        when the slots opened (every env's is the same).

        Raises:
            RemoteAttributeError: an env has no attribute ``name``, or ``name`` may not travel
                (starts with ``_``...): an ``AttributeError``.
            ValueError: ``name`` is ``reset``, ``step`` or ``close`` (as ``AsyncVectorEnv.call``).
            CodecError: an argument or a result cannot travel (the message names the attribute).
            RemoteEnvError: the method raised on a worker (with its traceback).
        """
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Send :meth:`call` to the workers; collect the results with :meth:`call_wait`."""
        self._ensure_idle("call_async")
        check_attr_name(name, call=True)
        if name in _DESCRIBED:
            value = getattr(self, _DESCRIBED[name])
            self._answered = tuple(value for _ in range(self.num_envs))
            self._state = AsyncState.WAITING_CALL
            return
        self._pending = self._send([(worker, slots, calls.call(name, args, kwargs))
                                    for worker, slots, _, _ in self._groups], f"call({name})")
        self._state = AsyncState.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Wait for the results of :meth:`call_async`: a tuple, one result per env.

        Raises:
            NoAsyncCallError: no call is pending.
            RemoteTimeoutError: no reply within ``timeout``.
        """
        self._ensure_open()
        if self._state is not AsyncState.WAITING_CALL:
            raise NoAsyncCallError("Calling `call_wait` without any prior call to `call_async`.",
                                   AsyncState.WAITING_CALL.value)
        pending, self._pending = self._pending, []
        answered, self._answered = self._answered, None
        self._state = AsyncState.DEFAULT
        if answered is not None:
            return answered
        replies = self._client.wait(pending, timeout if timeout is not None else self._timeout)
        return tuple(value for (_, _, start, stop), reply in zip(self._groups, replies)
                     for value in values_from_wire(reply, stop - start))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """``name`` of every env, a tuple (as ``SyncVectorEnv.get_attr``, which is ``call(name)``:
        a method is called without arguments). Raises as :meth:`call`."""
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """Set ``name`` on every env with ``env.set_wrapper_attr(name, value)`` on its worker,
        as ``SyncVectorEnv.set_attr``: ``values`` is one value per env (a list or tuple), or
        any other value, set on every env.

        Raises:
            ValueError: a list or tuple whose length is not ``num_envs`` (gymnasium's words).
            RemoteAttributeError: ``name`` may not travel (starts with ``_``...).
            CodecError: a value cannot travel.
            AlreadyPendingCallError: another call has not been waited for.
        """
        self._ensure_open()
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(self.num_envs)]
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of environments. "
                f"Got `{len(values)}` values for {self.num_envs} environments.")
        check_attr_name(name)
        self.request_envs(calls.set_attr(name, force=True), range(self.num_envs), f"set_attr({name})",
                          per_env={calls.VALUES: values})

    def request_envs(self, request: dict, envs: Sequence[int], what: str,
                     per_env: Mapping[str, Sequence] | None = None) -> list[tuple[list[int], dict]]:
        """Send an attribute call (``get_attr``, ``set_attr``, ``call``, ``is_wrapped``) to the
        envs ``envs`` only, one message per worker holding any of them, and wait for the replies:
        the per-env form behind :meth:`set_attr` and SB3's ``RemoteVecEnv``, whose ``indices``
        pick envs.

        Args:
            request: the call: its ``op`` and fields (``slots`` and ``r`` are added per worker).
            envs: distinct env indices, in any order.
            what: the call, as errors name it.
            per_env: fields holding one value per entry of ``envs``: each worker gets its envs'.

        Returns:
            ``(positions in envs, reply)`` per worker: the reply's per-slot values are for the
            envs at those positions, in that order.

        Raises:
            ValueError: ``envs`` repeats an env or names one out of range.
            AlreadyPendingCallError: another call has not been waited for.
            And the typed errors of the replies (``RemoteAttributeError``, ``RemoteEnvError``...).
        """
        envs = list(envs)
        if len(set(envs)) != len(envs) or not all(0 <= i < self.num_envs for i in envs):
            raise ValueError(f"envs must be distinct env indices below {self.num_envs}, got {reprlib.repr(envs)}")
        self._ensure_idle(what)
        covered, requests = [], []
        for worker, slots, start, stop in self._groups:
            positions = [p for p, i in enumerate(envs) if start <= i < stop]
            if positions:
                fields = {key: [values[p] for p in positions] for key, values in (per_env or {}).items()}
                covered.append(positions)
                requests.append((worker, [slots[envs[p] - start] for p in positions], {**request, **fields}))
        if not requests:
            return []
        replies = self._client.wait(self._send(requests, what), self._timeout)
        return list(zip(covered, replies))

    @property
    def np_random_seed(self) -> tuple[int, ...]:
        """Every env's ``np_random_seed``, read on its worker, as ``SyncVectorEnv``: ``(42, 43, ...)``
        after ``reset(seed=42)``, the seeds given after ``reset(seed=[...])``, and each env's own
        draw (a random int, up to 128 bits) while it was never seeded."""
        return self.get_attr("np_random_seed")
