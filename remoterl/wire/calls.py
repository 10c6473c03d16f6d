"""The call schema, sans-I/O: what a CALL header holds and what its REPLY holds (docs/PROTOCOL.md §5.2, §5.3).

Theory of operation
-------------------
A trainer calls its slots on a worker with one codec map per worker (the CALL header);
the worker's slot host (``remoterl.workers.runtime``) answers with one codec map (the
REPLY header). Both ends build and read these maps with the names defined here and
nowhere else:

* :class:`Op` — the ops a slot host dispatches (``"step"``, ``"reset"``, ``"get_attr"``,
  ``"set_attr"``, ``"call"``, ``"is_wrapped"``, and ``"shm"``, which maps a client's
  shared-memory segment: :mod:`remoterl.io.shm`).
* the field names of requests and replies, as module constants (:data:`ACTIONS` is
  ``"a"``, :data:`MODE` ``"m"``, :data:`REWARDS` ``"rew"``...).
* the autoreset mode codes a batched step carries in ``"m"`` (:data:`AUTORESET_MODES`,
  :func:`mode_code` from gymnasium's ``AutoresetMode``).
* one builder per request (:func:`step`, :func:`reset`, :func:`get_attr`...), so the
  trainer side (``RemoteEnv``, ``RemoteEnvVec``, SB3's ``RemoteVecEnv``) never spells a
  request out by hand; the client adds ``r`` and ``slots`` (``remoterl.client.session``).
* the ``values`` of an attribute reply both ways (:func:`values_reply`,
  :func:`values_from_wire`: ints beyond 64 bits travel as decimal strings), and the
  wrapper class name ``is_wrapped`` carries (:func:`wrapper_name`, :func:`parse_wrapper_name`).

The step path is hot (tens of thousands of calls a second): names are plain ``str`` and
``int`` constants (no enum lookups), and builders are plain functions returning a fresh
dict (the client fills ``r`` and ``slots`` into it). What the env description sent when
slots open holds lives in :mod:`remoterl.wire.envdesc`.
"""

from __future__ import annotations

import reprlib
from typing import Any

from remoterl.errors import ProtocolError

__all__ = [
    "ACTIONS", "ARGS", "AUTORESET_MODES", "BARE", "BIG", "CALLABLE", "COMPRESSION", "DISABLED", "ENDED", "FINAL",
    "FORCE", "INFO", "INFOS", "KWARGS", "MAX_WRAPPER_NAME", "MODE", "NAME", "NEXT_STEP", "OBS", "OK", "OP",
    "OPTIONS", "OUTER", "Op", "PROBE", "REWARDS", "SAME_STEP", "SEEDS", "SEGMENT", "SET", "SHARED", "SINGLE",
    "STRICT", "TERMINATED", "TRUNCATED", "VALUES", "WHY", "WRAPPER",
    "call", "get_attr", "is_module_name", "is_wrapped", "mode_code", "parse_wrapper_name", "reset",
    "reset_single", "set_attr", "shm", "step", "step_single", "values_from_wire", "values_reply", "wrapper_name",
]


class Op:
    """The ops of a CALL (its ``"op"``): plain ``str`` constants, packed and compared as they are."""

    STEP = "step"
    RESET = "reset"
    GET_ATTR = "get_attr"
    SET_ATTR = "set_attr"
    CALL = "call"
    IS_WRAPPED = "is_wrapped"
    SHM = "shm"


# The same names as module globals, for the builders: reading a class attribute costs one
# lookup more, per call on the step path.
_STEP, _RESET, _GET_ATTR, _SET_ATTR, _CALL, _IS_WRAPPED = (
    Op.STEP, Op.RESET, Op.GET_ATTR, Op.SET_ATTR, Op.CALL, Op.IS_WRAPPED)


# --- request fields (§5.2); the client fills in "r" and "slots" ---------------------------------

OP = "op"
SEEDS = "seeds"        # reset: one seed (or nil) per slot
OPTIONS = "options"    # reset: passed to every slot's env.reset
ACTIONS = "a"          # step: the batched actions (single: the action)
MODE = "m"             # batched step: the autoreset mode code
SINGLE = "single"      # RemoteEnv: one slot, results not batched
NAME = "name"          # get_attr, set_attr, call: the attribute name
ARGS = "args"          # call
KWARGS = "kwargs"      # call
STRICT = "strict"      # call: the attribute must be callable (SB3's env_method)
VALUES = "values"      # set_attr: one value per slot (also the values of a reply)
FORCE = "force"        # set_attr: set_wrapper_attr's force
OUTER = "outer"        # set_attr: setattr on the outermost env object (SB3's set_attr)
PROBE = "probe"        # get_attr: has_wrapper_attr instead of the value
WRAPPER = "wrapper"    # is_wrapped: the class name "module:QualName"
SHARED = "shm"         # any call: the id of the client's segment its big arrays may go to
SEGMENT = "segment"    # shm: [id, name, size] of the segment to map
OK = "ok"              # shm reply: whether it is mapped (else "why")
WHY = "why"

# --- OPEN hosting options ("opts" of an OPEN; the broker passes them to the worker) -------------

BARE = "bare"          # host the env without gymnasium's wrappers (the trainer applies them)
ENDED = "ended"        # a replacement slot: starts as an env that just ended
COMPRESSION = "z"      # compress the replies' big arrays: "lz4" or "zstd" (remoterl.wire.compress)

# --- reply fields (§5.3) ---------------------------------------------------------------------

OBS = "obs"            # reset, step: stacked observations (single: the observation)
INFOS = "infos"        # batched reset and step: one info per slot
INFO = "info"          # single reset and step: the info
REWARDS = "rew"
TERMINATED = "term"
TRUNCATED = "trunc"
FINAL = "final"        # SAME_STEP: [[position in slots, final obs, final info], ...]
BIG = "big"            # get_attr, call: positions of ints sent as decimal strings
CALLABLE = "callable"  # get_attr: positions whose attribute is callable (value nil)
SET = "set"            # set_attr: one bool per slot

# --- autoreset modes ("m" in a batched step) ------------------------------------------------

# code -> the gymnasium.vector.AutoresetMode member's name, lower case (AutoresetMode.NEXT_STEP,
# whose value is "NextStep", is 0).
NEXT_STEP, SAME_STEP, DISABLED = 0, 1, 2
AUTORESET_MODES = {NEXT_STEP: "next_step", SAME_STEP: "same_step", DISABLED: "disabled"}
_MODE_CODES = {name.upper(): code for code, name in AUTORESET_MODES.items()}


def mode_code(mode: Any) -> int:
    """The wire code of an autoreset mode: a ``gymnasium.vector.AutoresetMode`` or its string value.

    Raises:
        ValueError: not an ``AutoresetMode`` (gymnasium's own error).
    """
    from gymnasium.vector import AutoresetMode  # gymnasium >= 1.1; workers of 1.0 never map one

    return _MODE_CODES[AutoresetMode(mode).name]


# --- request builders (trainer side) -------------------------------------------------------

def step(actions: Any, mode: int) -> dict:
    """A batched step: ``actions`` batched over the call's slots, ``mode`` an autoreset code."""
    return {OP: _STEP, ACTIONS: actions, MODE: mode}


def step_single(action: Any) -> dict:
    """A ``RemoteEnv`` step: one slot, the action as is, the results as the env returns them."""
    return {OP: _STEP, ACTIONS: action, SINGLE: True}


def reset(seeds: list, options: Any = None) -> dict:
    """A batched reset: one seed (or None) per slot; ``options`` for every slot's ``env.reset``."""
    return {OP: _RESET, SEEDS: seeds, OPTIONS: options}


def reset_single(seed: Any, options: Any = None) -> dict:
    """A ``RemoteEnv`` reset: one slot, the observation and info as the env returns them."""
    return {OP: _RESET, SEEDS: [seed], OPTIONS: options, SINGLE: True}


def get_attr(name: str, *, probe: bool = False) -> dict:
    """Each slot's ``env.get_wrapper_attr(name)``; with ``probe``, ``has_wrapper_attr(name)``."""
    if probe:
        return {OP: _GET_ATTR, NAME: name, PROBE: True}
    return {OP: _GET_ATTR, NAME: name}


def set_attr(name: str, values: list | None = None, *, force: bool | None = None, outer: bool = False) -> dict:
    """Set ``name`` on each slot's env: ``values`` one per slot (or added per worker later, as
    ``RemoteEnvVec.request_envs`` does); ``force`` for ``set_wrapper_attr`` (the worker's default
    is True); ``outer``: plain ``setattr`` on the outermost env object (SB3's ``set_attr``)."""
    request: dict = {OP: _SET_ATTR, NAME: name}
    if values is not None:
        request[VALUES] = values
    if force is not None:
        request[FORCE] = bool(force)
    if outer:
        request[OUTER] = True
    return request


def call(name: str, args: Any = (), kwargs: dict | None = None, *, strict: bool = False) -> dict:
    """Each slot's ``env.get_wrapper_attr(name)(*args, **kwargs)`` (a non-callable attribute as is,
    unless ``strict``: then it is the ``TypeError`` calling it raises, as SB3's ``env_method``)."""
    request = {OP: _CALL, NAME: name, ARGS: list(args), KWARGS: dict(kwargs or {})}
    if strict:
        request[STRICT] = True
    return request


def is_wrapped(wrapper_class: type) -> dict:
    """Whether each slot's env is wrapped by ``wrapper_class``, sent by name (:func:`wrapper_name`)."""
    return {OP: _IS_WRAPPED, WRAPPER: wrapper_name(wrapper_class)}


def shm(ident: int, name: str, size: int) -> dict:
    """Map the client's shared-memory segment ``name`` of ``size`` bytes as ``ident``."""
    return {OP: Op.SHM, SEGMENT: [ident, name, size]}


# --- attribute values (get_attr, call replies) -----------------------------------------------

# msgpack ints are 64-bit; a seed gymnasium draws itself (np_random_seed before any seeded
# reset) has 128. An attribute value that is such an int travels as its decimal string,
# its position listed in the reply's "big".
_INT_MIN, _INT_END = -(2**63), 2**64


def values_reply(values: list) -> dict:
    """``{"values": values}`` (worker side); ints beyond 64 bits as decimal strings, their
    positions in ``big``. ``values`` is changed in place."""
    big = [i for i, v in enumerate(values) if type(v) is int and not _INT_MIN <= v < _INT_END]
    for i in big:
        values[i] = str(values[i])
    return {VALUES: values, BIG: big} if big else {VALUES: values}


def values_from_wire(reply: Any, n: int) -> list:
    """The ``values`` of an attribute reply, one per slot, with ints beyond 64 bits restored
    (they travel as decimal strings, their positions in ``big``).

    Raises:
        ProtocolError: the reply is not ``n`` values, or ``big`` does not name decimal strings.
    """
    values = reply.get(VALUES) if isinstance(reply, dict) else None
    if not isinstance(values, list) or len(values) != n:
        raise ProtocolError(f"an attribute reply needs 'values', a list of {n}")
    for i in reply.get(BIG) or ():
        if not isinstance(i, int) or not 0 <= i < n or not isinstance(values[i], str):
            raise ProtocolError("an attribute reply's 'big' must list positions of decimal strings")
        try:
            values[i] = int(values[i])
        except ValueError:
            raise ProtocolError("an attribute reply's 'big' must list positions of decimal strings") from None
    return values


# --- is_wrapped's class name ---------------------------------------------------------------

# The longest wrapper class name is_wrapped takes ("module:QualName"): a name, never a payload.
MAX_WRAPPER_NAME = 512


def wrapper_name(wrapper_class: type) -> str:
    """``"module:QualName"`` of a class: what ``is_wrapped`` sends instead of the class."""
    return f"{wrapper_class.__module__}:{wrapper_class.__qualname__}"


def parse_wrapper_name(name: Any) -> tuple[str, str]:
    """``(module, qualname)`` of is_wrapped's ``wrapper``; ``ProtocolError`` unless it is
    ``"dotted.module:Qual.Name"`` (a class defined in a function has ``<locals>`` in its name)."""
    if isinstance(name, str) and len(name) <= MAX_WRAPPER_NAME:
        module, _, qualname = name.partition(":")
        if is_module_name(module) and qualname and \
                all(part.isidentifier() or part == "<locals>" for part in qualname.split(".")):
            return module, qualname
    raise ProtocolError(f"is_wrapped needs 'wrapper', a class name 'module:QualName' of at most "
                        f"{MAX_WRAPPER_NAME} characters, got {reprlib.repr(name)}")


def is_module_name(name: str) -> bool:
    """A dotted module path, absolute (``pkg.sub``): nothing else is ever imported from the wire."""
    return bool(name) and all(part.isidentifier() for part in name.split("."))
