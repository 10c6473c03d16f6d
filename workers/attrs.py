"""The attribute ops of the slot host: ``get_attr``, ``set_attr``, ``call`` and ``is_wrapped``.

Theory of operation
-------------------
These reach the envs' public attributes and methods by name, as gymnasium's
``VectorEnv.get_attr``/``set_attr``/``call`` and ``Env.get_wrapper_attr`` do locally, one
message per worker for all of a client's slots there; ``is_wrapped`` answers SB3's
``env_is_wrapped`` with the wrapper class's name. The request and reply fields are
:mod:`remoterl.wire.calls`'.

Hostile input: an attribute call reaches only public names of the client's own envs
(``remoterl.wire.actions.check_attr_name``: no ``_`` prefix, no helper that takes a name
itself, no ``reset``/``step``/``close`` through ``call``, whose slot bookkeeping the slot
host keeps); arguments and values are codec values, like everything else a client sends.
``is_wrapped`` compares class names and imports nothing. None of these reads or updates a
slot's "ended" flag.

Each op takes the call's slots and the decoded request, and returns the reply map (``r``
is added by the slot host). What an env raises (a property getter or setter, a method) is
an :class:`~remoterl.workers.slots.EnvFailure`; a name the env lacks a
:class:`~remoterl.errors.RemoteAttributeError` (the wire code ``attr``).
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium

from remoterl.errors import ProtocolError, RemoteAttributeError
from remoterl.wire.actions import check_attr_name
from remoterl.wire.calls import (ARGS, CALLABLE, FORCE, KWARGS, NAME, OUTER, PROBE, SET, STRICT, VALUES, WRAPPER,
                                 parse_wrapper_name, values_reply)
from remoterl.workers.slots import EnvFailure, Slot, env_error

__all__ = ["call", "get_attr", "is_wrapped", "set_attr"]

# Names ``call`` refuses: the slot host runs these itself (autoreset flags, slot bookkeeping),
# as AsyncVectorEnv's workers refuse them in ``call``.
_NOT_CALLABLE_REMOTELY = frozenset({"reset", "step", "close"})

# gymnasium.Env.set_wrapper_attr took no ``force`` before gymnasium 1.1.
_SET_TAKES_FORCE = "force" in inspect.signature(gymnasium.Env.set_wrapper_attr).parameters


def get_attr(slots: list[Slot], request: dict) -> dict:
    """Each slot's ``env.get_wrapper_attr(name)``. A callable attribute is not called: its
    value is nil and its position is listed in ``callable`` (the client proxies it). With
    ``probe``: each slot's ``env.has_wrapper_attr(name)`` instead."""
    name = _attr_name(request, "get_attr")
    if request.get(PROBE):
        return {VALUES: [_has_attr(slot, name) for slot in slots]}
    values: list = []
    callables: list[int] = []
    for i, slot in enumerate(slots):
        value = _lookup(slot, name)
        if callable(value):
            callables.append(i)
            value = None
        values.append(value)
    reply = values_reply(values)
    if callables:
        reply[CALLABLE] = callables
    return reply


def call(slots: list[Slot], request: dict) -> dict:
    """``VectorEnv.call`` per slot: ``env.get_wrapper_attr(name)``, called with ``args`` and
    ``kwargs`` if callable, else the value itself (as ``SyncVectorEnv.call``). With ``strict``
    (SB3's ``env_method``, which calls what it finds) a value that is not callable is the
    ``TypeError`` calling it raises locally."""
    name = _attr_name(request, "call")
    if name in _NOT_CALLABLE_REMOTELY:
        raise RemoteAttributeError(f"{name!r} cannot be called through 'call' (use the {name} call itself)")
    args, kwargs, strict = request.get(ARGS) or [], request.get(KWARGS) or {}, request.get(STRICT, False)
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) \
            or not all(isinstance(key, str) for key in kwargs) or not isinstance(strict, bool):
        raise ProtocolError("call 'args' must be a list, 'kwargs' a map with str keys and 'strict' a bool")
    values = []
    for slot in slots:
        value = _lookup(slot, name)
        if strict and not callable(value):
            exc = TypeError(f"{type(value).__name__!r} object is not callable")
            raise EnvFailure(env_error(exc, f"call {name!r} failed in slot {slot.id}", slot.id))
        if callable(value):
            try:
                value = value(*args, **kwargs)
            except Exception as exc:  # user code
                raise EnvFailure(env_error(exc, f"call {name!r} failed in slot {slot.id}", slot.id)) from exc
        values.append(value)
    return values_reply(values)


def set_attr(slots: list[Slot], request: dict) -> dict:
    """``env.set_wrapper_attr(name, value, force=force)`` per slot, one value per slot;
    replies ``set``: what each returned (whether the attribute was set). With ``outer``:
    ``setattr(env, name, value)`` on the slot's outermost env object instead, as SB3's
    ``DummyVecEnv.set_attr`` sets it (the wrapped envs below keep their own value)."""
    name = _attr_name(request, "set_attr")
    values, force, outer = request.get(VALUES), request.get(FORCE, True), request.get(OUTER, False)
    if not isinstance(values, list) or len(values) != len(slots) or not isinstance(force, bool) \
            or not isinstance(outer, bool):
        raise ProtocolError("set_attr needs 'values', a list with one value per slot, and 'force' and "
                            "'outer' bools")
    done = []
    for slot, value in zip(slots, values):
        if outer:
            _setattr(slot, name, value)
            done.append(True)
            continue
        try:
            done.append(_set_wrapper_attr(slot.env, name, value, force))
        except Exception as exc:  # a property setter is user code
            raise EnvFailure(env_error(exc, f"set_attr {name!r} failed in slot {slot.id}", slot.id)) from exc
    return {SET: done}


def is_wrapped(slots: list[Slot], request: dict) -> dict:
    """SB3's ``env_util.is_wrapped`` per slot, by name: whether a wrapper in the slot's env
    chain (``.env`` down to the innermost env) is an instance of the class ``wrapper`` names,
    ``"module:QualName"``: a class in the wrapper's MRO has that module and qualified name.
    The class cannot travel (nothing executable crosses the wire) and the name imports
    nothing: a class no module here defined wraps no env here."""
    module, qualname = parse_wrapper_name(request.get(WRAPPER))
    return {VALUES: [_wrapped_by(slot.env, module, qualname) for slot in slots]}


def _attr_name(request: dict, op: str) -> str:
    name = request.get(NAME)
    if not isinstance(name, str):
        raise ProtocolError(f"{op} needs 'name', an attribute name (str)")
    check_attr_name(name)  # RemoteAttributeError: the wire code "attr"
    return name


def _wrapped_by(env: Any, module: str, qualname: str) -> bool:
    """Whether a wrapper of ``env`` is an instance of the class named ``module:qualname``
    (``stable_baselines3.common.env_util.unwrap_wrapper``'s walk, comparing names)."""
    while isinstance(env, gymnasium.Wrapper):
        if any(cls.__module__ == module and cls.__qualname__ == qualname for cls in type(env).__mro__):
            return True
        env = env.env
    return False


def _lookup(slot: Slot, name: str) -> Any:
    """``env.get_wrapper_attr(name)``, as gymnasium's vector envs look attributes up."""
    try:
        return slot.env.get_wrapper_attr(name)
    except AttributeError as exc:
        raise RemoteAttributeError(f"the env in slot {slot.id} has no attribute {name!r} ({exc})") from exc
    except Exception as exc:  # a property getter is user code
        raise EnvFailure(env_error(exc, f"get_attr {name!r} failed in slot {slot.id}", slot.id)) from exc


def _has_attr(slot: Slot, name: str) -> bool:
    env = slot.env
    try:
        return bool(env.has_wrapper_attr(name) if hasattr(env, "has_wrapper_attr") else hasattr(env, name))
    except Exception as exc:  # a property getter is user code
        raise EnvFailure(env_error(exc, f"has_attr {name!r} failed in slot {slot.id}", slot.id)) from exc


def _setattr(slot: Slot, name: str, value: Any) -> None:
    """``setattr(env, name, value)``: the ``AttributeError`` of a read-only property stays one
    (``RemoteAttributeError``), as locally; what else a property setter raises is an env error."""
    try:
        setattr(slot.env, name, value)
    except AttributeError as exc:
        raise RemoteAttributeError(f"{name!r} cannot be set on the env in slot {slot.id}: {exc}") from exc
    except Exception as exc:  # a property setter is user code
        raise EnvFailure(env_error(exc, f"set_attr {name!r} failed in slot {slot.id}", slot.id)) from exc


def _set_wrapper_attr(env: Any, name: str, value: Any, force: bool) -> bool:
    if _SET_TAKES_FORCE:
        return bool(env.set_wrapper_attr(name, value, force=force))
    env.set_wrapper_attr(name, value)  # gymnasium 1.0: sets it (returns nothing)
    return True
