"""Actions checked against an action space, whole and before any work; attribute names that may travel. ◇

Shared by both ends: the trainer (:class:`~remoterl.RemoteEnv`, :class:`~remoterl.RemoteEnvVec`)
checks before it sends anything, and the worker (``remoterl.workers.runtime``) checks again on
arrival, since a peer may send anything. Every check compares structure, shapes and dtypes
whole; nothing is iterated element by element, so the work is bounded by the space, never by
what was sent (a zero-size array of shape ``(2**25, 0)`` is 42 bytes on the wire and 2**25
Python objects to iterate).
"""

from __future__ import annotations

import itertools
import reprlib
from typing import Any

import gymnasium
import numpy as np

from remoterl.errors import InvalidActionError, RemoteAttributeError

__all__ = ["MAX_ATTR_NAME", "check_action", "check_actions", "check_attr_name"]

# Characters of an attribute or method name that may travel (get_attr, set_attr, call).
MAX_ATTR_NAME = 256
# gymnasium helpers that take a name themselves: past the name check they would reach any name.
_NAME_TAKERS = frozenset({"get_wrapper_attr", "set_wrapper_attr", "has_wrapper_attr"})


# What numpy dtype kinds an action (or each env's part of a batch) may have, per array space:
# numbers where gymnasium's own spaces accept them (a float64 action for a float32 Box, a float
# 0/1 array for MultiBinary as SB3's Bernoulli policies give), integers where they must be
# integers (Discrete, MultiDiscrete: gymnasium's contains() refuses floats there). Strings,
# bytes, datetimes, complex and void arrays fit no space and are refused.
_KINDS: dict[type, str] = {
    gymnasium.spaces.Box: "biuf",
    gymnasium.spaces.MultiBinary: "biuf",
    gymnasium.spaces.MultiDiscrete: "biu",
    gymnasium.spaces.Discrete: "iu",
}


def check_action(space: gymnasium.spaces.Space, action: Any, path: str = "action") -> None:
    """Refuse an action whose structure, shape or dtype cannot fit ``space``, before it is used.

    The client (:class:`RemoteEnv`) calls it before sending anything; the worker calls it again
    on what arrived, since a peer may send anything. Cheap checks only, and every one of them
    before the action is iterated or converted element by element: the work is bounded by the
    space, not by the action. Bounds are the env's business, as locally.

    - Box, MultiDiscrete, MultiBinary: an array (or what numpy reads as one) of exactly the
      space's shape, of a number dtype (MultiDiscrete: integers or bools).
    - Discrete: one integer (``int``, a numpy integer, or a 0-d integer array; no bools).
    - Text: a ``str``.
    - Dict: a ``dict`` with exactly the space's keys; Tuple: a tuple, list or array with
      exactly one item per subspace. Each item is checked against its subspace.

    Raises:
        InvalidActionError: naming where in the action (``action['arm'][1]``), the space and
            what was given.
    """
    spaces = gymnasium.spaces
    if isinstance(space, spaces.Discrete):
        if not _is_int(action):
            raise InvalidActionError(f"{path} {_short(action)} ({type(action).__name__}) is not an integer "
                                     f"for {space}")
        return
    kinds = _kinds(space)
    if kinds is not None:
        array = _as_array(action, path)
        if array.shape != space.shape:
            raise InvalidActionError(f"{path} of shape {array.shape} does not fit {space} (shape {space.shape})")
        if array.dtype.kind not in kinds:
            raise InvalidActionError(f"{path} of dtype {array.dtype} does not fit {space}")
        return
    if isinstance(space, spaces.Dict):
        _check_keys(space, action, path)
        for key, sub in space.spaces.items():
            check_action(sub, action[key], f"{path}[{key!r}]")
        return
    if isinstance(space, spaces.Tuple):
        # gymnasium's Tuple.contains takes lists and arrays too; an array is measured by its
        # shape first (len), so it is never walked beyond one item per subspace.
        count = len(action) if isinstance(action, (tuple, list)) else \
            action.shape[0] if isinstance(action, np.ndarray) and action.ndim else None
        if count != len(space.spaces):
            raise InvalidActionError(f"{path} must be a tuple of {len(space.spaces)} items for {space}, "
                                     f"got {_describe(action)}")
        for k, sub in enumerate(space.spaces):
            check_action(sub, action[k], f"{path}[{k}]")
        return
    if isinstance(space, spaces.Text):
        if not isinstance(action, str):
            raise InvalidActionError(f"{path} must be a str for {space}, got {type(action).__name__}")
        return
    if not space.contains(action):  # no other space travels (remoterl.wire.spaces); kept for safety
        raise InvalidActionError(f"{path} {_short(action)} is not in the action space {space}")


def check_actions(space: gymnasium.spaces.Space, actions: Any, n: int, path: str = "actions") -> Any:
    """Refuse batched actions that cannot be ``n`` actions of ``space``; return them normalised.

    The batched form of :func:`check_action`, as ``gymnasium.vector.utils.batch_space`` lays
    a batch out: an array of shape ``(n, *space.shape)`` per array space (Discrete: ``(n,)``
    integers), a dict of batches for Dict, a tuple of batches for Tuple, and ``n`` strings
    for Text. Run by :class:`~remoterl.RemoteEnvVec` before sending and by the worker before
    anything is iterated: a zero-size array of shape ``(2**25, 0)`` costs no bytes on the wire
    but 2**25 Python objects to iterate, so shapes are compared whole, never walked. The cost
    is a few attribute reads per array leaf, whatever the batch holds.

    Returns:
        ``actions`` with every array leaf as a numpy array (the same objects where they
        already were), Dicts in the space's key order.

    Raises:
        InvalidActionError: naming the leaf, what was given and what was expected.
    """
    kinds = _kinds(space)
    if kinds is not None:
        array = actions if type(actions) is np.ndarray else _as_array(actions, path)
        shape = array.shape
        if len(shape) != 1 + len(space.shape) or shape[0] != n or shape[1:] != space.shape:
            raise InvalidActionError(f"{path} of shape {shape} do not fit {n} envs of {space} "
                                     f"(expected shape {(n, *space.shape)})")
        if array.dtype.kind not in kinds:
            if kinds == "iu":
                raise InvalidActionError(f"{path} for {space} must be integers, got dtype {array.dtype}")
            raise InvalidActionError(f"{path} of dtype {array.dtype} do not fit {space}")
        return array
    spaces = gymnasium.spaces
    if isinstance(space, spaces.Dict):
        _check_keys(space, actions, path)
        return {key: check_actions(sub, actions[key], n, f"{path}[{key!r}]") for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        if not isinstance(actions, tuple) or len(actions) != len(space.spaces):
            raise InvalidActionError(f"{path} must be a tuple of {len(space.spaces)} batches for {space}, "
                                     f"got {_describe(actions)}")
        return tuple(check_actions(sub, actions[k], n, f"{path}[{k}]") for k, sub in enumerate(space.spaces))
    # Text (and any other space without an array form): batch_space makes a Tuple of n spaces,
    # whose batch is a sequence of n single actions.
    if not isinstance(actions, (tuple, list)) or len(actions) != n:
        raise InvalidActionError(f"{path} must hold {n} actions for {space}, got {_describe(actions)}")
    if isinstance(space, spaces.Text) and not all(isinstance(a, str) for a in actions):
        raise InvalidActionError(f"{path} for {space} must be strings")
    return actions


def _kinds(space: gymnasium.spaces.Space) -> str | None:
    kinds = _KINDS.get(type(space))
    if kinds is None and not isinstance(space, (gymnasium.spaces.Dict, gymnasium.spaces.Tuple)):
        for cls, cls_kinds in _KINDS.items():  # a subclass: what its base takes
            if isinstance(space, cls):
                return cls_kinds
    return kinds


def _as_array(value: Any, path: str) -> np.ndarray:
    """``value`` as numpy reads it; what numpy cannot read (ragged lists) is an invalid action."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidActionError(f"{path} is not an array: {exc}") from None


def _check_keys(space: gymnasium.spaces.Dict, value: Any, path: str) -> None:
    if not isinstance(value, dict) or len(value) != len(space.spaces) or \
            any(key not in value for key in space.spaces):
        raise InvalidActionError(f"{path} must be a dict with keys {list(space.spaces)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    """What was given, in a few words (never the whole value: it may be huge)."""
    if isinstance(value, dict):
        return f"a dict with keys {reprlib.repr(list(itertools.islice(value, 8)))}" + \
            (" ..." if len(value) > 8 else "")
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _short(value: Any) -> str:
    # reprlib bounds the work as well as the text: a peer's list may hold a million items.
    return f"array of shape {value.shape}" if isinstance(value, np.ndarray) else reprlib.repr(value)


def _is_int(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, np.ndarray) and value.shape == () and np.issubdtype(value.dtype, np.integer)


def check_attr_name(name: Any, *, call: bool = False) -> None:
    """Refuse an attribute name that may not travel, before anything is sent.

    The client checks; the worker (``remoterl.workers.runtime``) checks again, since a peer
    may send anything. A name that travels is an identifier of at most ``MAX_ATTR_NAME``
    characters that does not start with ``_`` (private state, dunders: ``__class__``,
    ``__init__``) and is not one of gymnasium's helpers that take a name themselves
    (``get_wrapper_attr``, ``set_wrapper_attr``, ``has_wrapper_attr``), which would reach any
    name past this check.

    Args:
        name: the attribute name.
        call: the name is for ``VectorEnv.call``/``get_attr``: ``reset``, ``step`` and ``close``
            are refused too, with ``AsyncVectorEnv``'s ``ValueError`` (use them directly).

    Raises:
        TypeError: ``name`` is not a str (as ``getattr`` raises).
        RemoteAttributeError: the name may not travel.
        ValueError: ``call`` and ``name`` is ``reset``, ``step`` or ``close``.
    """
    if not isinstance(name, str):
        raise TypeError(f"attribute name must be a str, not {type(name).__name__}")
    if len(name) > MAX_ATTR_NAME or not name.isidentifier():
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise RemoteAttributeError(f"{shown!r} is not an attribute name (an identifier of at most "
                                   f"{MAX_ATTR_NAME} characters)")
    if name.startswith("_"):
        raise RemoteAttributeError(f"{name!r} is private: names starting with '_' are not reached on remote envs")
    if name in _NAME_TAKERS:
        raise RemoteAttributeError(f"{name!r} takes an attribute name itself and is not called remotely: "
                                   f"use it on the local object")
    if call and name in ("reset", "step", "close"):
        raise ValueError(f"Trying to call function `{name}` with `call`, use `{name}` directly instead.")
