"""The slot host: env instances on a worker, driven by decoded calls, without sockets.

Theory of operation
-------------------
A worker hosts *slots*; each slot is one env instance created for one client by an
OPEN that the broker placed here. The loop (``remoterl.workers.loop``) hands this
object three kinds of request and sends back what it returns:

* ``open(client, header)`` creates the envs for the listed slot ids and describes
  the env once (spaces, metadata, spec) for the client to cache.
* ``call(client, header_frame, frames)`` runs one batched call for many slots of
  one client — ``reset`` or ``step`` — and returns ONE reply: observations stacked
  per slot order, rewards, flags, and per-slot infos. ``get_attr``, ``set_attr`` and
  ``call`` reach the envs' public attributes and methods by name (gymnasium's
  ``VectorEnv.get_attr``/``set_attr``/``call``, ``Env.get_wrapper_attr``);
  ``is_wrapped`` answers SB3's ``env_is_wrapped`` with the wrapper class's name.
* ``close(client, slots)`` closes envs.

Vector semantics (autoreset) live here, so an episode boundary costs no extra round
trip. The mode travels with each step call (``"m"``) and follows
``gymnasium.vector.SyncVectorEnv.step`` line for line:

========== ===============================================================
NEXT_STEP  a slot that ended on the previous step is reset instead of stepped;
           reward 0, flags False, the reset info is the step info.
SAME_STEP  a slot that ends is reset at once; its final obs and info travel in
           ``final`` beside the reset obs and info.
DISABLED   stepping a slot that ended without a reset is an error.
single     ``"single": true`` instead of ``"m"``: one env, step only, the values
           exactly as the env returns them (``RemoteEnv``).
========== ===============================================================

The client rebuilds the vector ``infos`` dict (``_key`` masks, ``final_obs``) with
gymnasium's own ``VectorEnv._add_info`` in global slot order, since one vector env's
slots may live on several workers.

Failures: an exception inside an env becomes an ``env`` error reply with the
traceback text; the slot host keeps serving every slot. A call naming a slot the
client does not own gets a ``closed`` error. Nothing a client sends raises out of
:meth:`SlotHost.call`. A batched step that fails after some of its slots stepped says
which in the error's ``stepped`` (slot ids), so the client knows how far its envs moved.

Hostile input (the broker may sit on a public address, and one worker hosts many
clients' slots): no call may make the worker run work out of proportion to what the
client legitimately owns, since a long call holds the GIL, heartbeats stop and every
client on the worker loses its slots. So actions are checked whole against the slot
count and the action space (structure, shapes, dtypes: ``remoterl.wire.actions.check_actions``,
the check the client ran before sending) before anything is iterated, and a bad one
gets an ``action`` error (``InvalidActionError`` on the client); a call names each
slot once; the codec bounds what a zero-size array may span. Nothing from the wire
makes the worker import a module ``--import``/``--allow-import`` do not permit:
neither a registration's entry point nor an env id written ``module:Env-v0``, which
``gymnasium.make`` would otherwise import. Attribute calls reach only public names of the
client's own envs (``remoterl.env.check_attr_name``: no ``_`` prefix, no helper that takes
a name itself, no ``reset``/``step``/``close`` through ``call``, whose slot bookkeeping lives
here); their arguments are codec values, like everything else a client sends.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import logging
import reprlib
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium
import msgpack
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from remoterl.wire import codec
from remoterl.wire.actions import check_action, check_actions, check_attr_name
from remoterl.errors import (CodecError, InvalidActionError, ProtocolError, RemoteAttributeError, RemoteRLError,
                             UnsupportedSpaceError, error_to_wire)
from remoterl.wire.spaces import space_to_wire

__all__ = ["AUTORESET_MODES", "SlotHost"]

log = logging.getLogger(__name__)

_ARRAY_SPACES = (gymnasium.spaces.Box, gymnasium.spaces.Discrete, gymnasium.spaces.MultiDiscrete,
                 gymnasium.spaces.MultiBinary)

# Autoreset modes on the wire ("m" in a step call), named as in gymnasium.vector.AutoresetMode.
AUTORESET_MODES = {0: "next_step", 1: "same_step", 2: "disabled"}
_NEXT_STEP, _SAME_STEP, _DISABLED = 0, 1, 2

# msgpack ints are 64-bit; a seed gymnasium draws itself (np_random_seed before any seeded
# reset) has 128. An attribute value that is such an int travels as its decimal string,
# its position listed in the reply's "big".
_INT_MIN, _INT_END = -(2**63), 2**64


@dataclass(eq=False)
class _Slot:
    id: int
    client: bytes
    env_id: str
    env: Any
    autoreset: bool = False
    # (action space, k, batch_space(action space, k)) of the last batched step led by this slot.
    # Holding the space itself keeps the identity check sound: an id() can be reused once its
    # object is freed, a referenced object's cannot.
    batched: tuple | None = None


class SlotHost:
    """Env slots of one worker process.

    Args:
        env_ids: env ids this worker serves; ``None`` serves every id registered in
            gymnasium (the embedded default).
        capacity: the most slots hosted at once (announced in READY).
        make: the env factory, ``gymnasium.make`` by default.
        allow_import: modules (and their submodules) that registrations and ``module:Id``
            env ids may import; ``None`` allows any module (the embedded default, a private
            worker of one trainer), ``()`` none.
    """

    def __init__(self, env_ids: list[str] | None, capacity: int, make: Callable[..., Any] | None = None,
                 allow_import: list[str] | None = ()) -> None:
        self.env_ids = None if env_ids is None else list(dict.fromkeys(env_ids))
        self.capacity = capacity
        # Modules a trainer's registration may name (prefix match); None: any importable module.
        self.allow_import = None if allow_import is None else list(allow_import)
        self._make = make or gymnasium.make
        self.slots: dict[int, _Slot] = {}
        self.stats = {"steps": 0, "resets": 0, "calls": 0, "errors": 0}
        self._ops = {"step": self._step, "reset": self._reset, "get_attr": self._get_attr,
                     "set_attr": self._set_attr, "call": self._call, "is_wrapped": self._is_wrapped}

    # --- what the broker is told ------------------------------------------------------------

    def served(self) -> list[str]:
        """Env ids for READY; ``["*"]`` means any id registered in gymnasium here (a ``module:Id``
        form only for a module the allow-list permits)."""
        return ["*"] if self.env_ids is None else list(self.env_ids)

    # --- registration mirroring -----------------------------------------------------------------

    def register(self, spec: dict) -> tuple[bool, str]:
        """Register an env id a trainer registered, by its entry-point string.

        Only the module named by the entry point is imported, and only if the allow-list
        permits it (``--allow-import``, plus the modules given to ``--import``). Nothing
        executable crosses the wire: just the string, kwargs and spec fields. The entry point
        must be ``module:Name`` where ``Name`` is an env class (a ``gymnasium.Env`` subclass) or
        a callable defined in an allowed module: an allowed module's imports (``os.system``,
        ``importlib.import_module``) are not entry points, since ``gymnasium.make`` would call
        them with the kwargs of any OPEN.

        Returns:
            ``(True, "")`` when the id is now served here, else ``(False, reason)``.
        """
        env_id, entry, kwargs = spec.get("id"), spec.get("entry_point"), spec.get("kwargs") or {}
        if not isinstance(env_id, str) or not isinstance(entry, str) or ":" not in entry \
                or not isinstance(kwargs, dict):
            return False, "a registration needs an env id, an entry point 'module:Attribute' and kwargs (a map)"
        module, _, attr = entry.partition(":")
        if not _is_module_name(module) or not attr.isidentifier():
            return False, f"entry point {entry!r} is not 'module:Attribute' (a dotted module path, one name)"
        if ":" in env_id:
            # gymnasium.make would read "x:Id" as "import x, then make Id".
            return False, f"env id {env_id!r} has a module part; register the id without 'module:'"
        if not self._may_import(module):
            return False, self._not_allowed(module)
        try:
            target = getattr(importlib.import_module(module), attr, None)
        except Exception as exc:  # an import runs user code: report, never crash
            return False, f"module {module!r} cannot be imported on this worker: {type(exc).__name__}: {exc}"
        if target is None:
            return False, f"module {module!r} has no attribute {attr!r} on this worker"
        if not self._is_entry_point(target):
            return False, (f"entry point {entry!r} is not an env class or a callable defined in an allowed module "
                           f"(it is {type(target).__name__} {getattr(target, '__module__', '?')}."
                           f"{getattr(target, '__qualname__', '?')})")
        fields = {k: spec[k] for k in ("reward_threshold", "nondeterministic", "max_episode_steps",
                                       "order_enforce", "disable_env_checker") if spec.get(k) is not None}
        try:
            if env_id not in gymnasium.registry or gymnasium.registry[env_id].entry_point != entry:
                gymnasium.register(id=env_id, entry_point=entry, kwargs=dict(kwargs), **fields)
        except Exception as exc:
            return False, f"gymnasium.register failed: {type(exc).__name__}: {exc}"
        if self.env_ids is not None and env_id not in self.env_ids:
            self.env_ids.append(env_id)
        return True, ""

    def _may_import(self, module: str) -> bool:
        """Whether the allow-list permits importing ``module`` (prefix match on package names)."""
        if not _is_module_name(module):
            return False
        return self.allow_import is None or any(
            module == prefix or module.startswith(prefix + ".") for prefix in self.allow_import)

    def _not_allowed(self, module: str) -> str:
        listing = ", ".join(self.allow_import or []) or "nothing"
        return f"module {module!r} is not allowed here (--allow-import allows: {listing}); {_how_to_allow(module)}"

    def _is_entry_point(self, target: Any) -> bool:
        if self.allow_import is None:  # any module may be imported: any of its names is reachable anyway
            return True
        while isinstance(target, functools.partial):
            target = target.func
        if isinstance(target, type) and issubclass(target, gymnasium.Env):
            return True
        home = getattr(target, "__module__", None)
        return callable(target) and isinstance(home, str) and self._may_import(home)

    # --- open / close ----------------------------------------------------------------------

    def open(self, client: bytes, header: dict) -> dict:
        """Create envs for the slots of an OPEN; return the OPENED header.

        On failure every env created for this OPEN is closed again and the header
        carries ``error`` instead of ``env``.
        """
        r, env_id, kwargs, slot_ids = header.get("r"), header.get("env"), header.get("kwargs") or {}, header.get("slots")
        reply: dict = {"r": r, "slots": slot_ids}
        if not isinstance(env_id, str) or not isinstance(slot_ids, list) or not isinstance(kwargs, dict):
            reply["error"] = {"code": "protocol", "msg": "OPEN needs env (str), kwargs (map) and slots (list)"}
            return reply
        if self.env_ids is not None and env_id not in self.env_ids:
            reply["error"] = {"code": "no_worker", "msg": f"this worker does not serve {env_id!r}"}
            return reply
        if ":" in env_id:
            # gymnasium.make("pkg.mod:Env-v0") imports pkg.mod first: from the wire, that is any
            # module on the worker's path, whatever --import/--allow-import say. "*" means the ids
            # registered here, so only an allowed module may be named.
            module = env_id.partition(":")[0]
            if not self._may_import(module):
                reply["error"] = {"code": "no_worker", "msg": (
                    f"env id {env_id!r} names the module {module!r}, which this worker may not import. "
                    f"Open the env by its registered id (without '{module}:') on a worker that serves it, "
                    f"or {_how_to_allow(module)}")}
                return reply
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in slot_ids) \
                or len(set(slot_ids)) != len(slot_ids) or any(s in self.slots for s in slot_ids):
            reply["error"] = {"code": "protocol", "msg": f"OPEN slots {slot_ids!r} must be distinct new integers"}
            return reply
        if len(self.slots) + len(slot_ids) > self.capacity:
            reply["error"] = {"code": "capacity", "msg": f"this worker has {self.capacity - len(self.slots)} free slots"}
            return reply
        opts = header.get("opts") or {}
        bare = isinstance(opts, dict) and bool(opts.get("bare"))
        created: list[_Slot] = []
        try:
            for slot_id in slot_ids:
                env = self._make(env_id, **kwargs)
                if bare:
                    # The trainer applies gymnasium's wrappers itself (remoterl.init's make):
                    # host the env without them, so none is applied twice.
                    env = env.unwrapped
                _reset_without_options(env.unwrapped)
                created.append(_Slot(slot_id, client, env_id, env))
            reply["env"] = codec.encode(_describe(created[0].env), frame_threshold=1 << 62, name="env")[0]
        except Exception as exc:  # env construction is user code: report, never crash
            for slot in created:
                _close_env(slot.env)
            reply["error"] = _env_error(exc, f"could not make {env_id!r} with kwargs {kwargs!r}")
            if isinstance(exc, gymnasium.error.UnregisteredEnv):
                # gymnasium's own words first: they name the close ids ("Did you mean: ...",
                # "It provides versioned environments: [ v0, v1 ]").
                reply["error"]["code"] = "no_worker"
                reply["error"]["msg"] = f"{env_id!r} is not a registered env id: {exc}"
                if self.env_ids is None:  # serving "*": say how an id becomes served here
                    reply["error"]["msg"] += (
                        " If it is your own env: this worker serves every env id registered in gymnasium in its "
                        "process, so register it in the trainer after remoterl.init() (gymnasium.register(id=..., "
                        "entry_point='package.module:Class')), or import its module in the worker.")
            return reply
        for slot in created:
            self.slots[slot.id] = slot
        return reply

    def close(self, client: bytes, slot_ids: list) -> None:
        """Close the client's envs in ``slot_ids``; unknown or foreign slots are ignored."""
        for slot_id in slot_ids:
            slot = self.slots.get(slot_id)
            if slot is not None and slot.client == client:
                del self.slots[slot_id]
                _close_env(slot.env)

    def close_all(self) -> None:
        """Close every env (the broker session ended)."""
        for slot in self.slots.values():
            _close_env(slot.env)
        self.slots.clear()

    # --- calls ---------------------------------------------------------------------------------

    def call(self, client: bytes, header: Any, frames: list, start: int = 0) -> tuple[bytes, list]:
        """Run one batched call; return the reply ``(header_bytes, array_frames)``.

        Args:
            client: the calling client's routing id (slot ownership is checked against it).
            header: the call's codec header frame.
            frames: the message frames; array frames start at ``frames[start]``.
        """
        self.stats["calls"] += 1
        r = None
        try:
            try:
                request = codec.decode(header, frames, start)
            except ProtocolError:
                r = _peek_request_id(header)  # so the client can match the error to its call
                raise
            if not isinstance(request, dict):
                raise ProtocolError("a call must be a map")
            r = request.get("r")
            op = self._ops.get(request.get("op"))
            if op is None:
                raise ProtocolError(f"unknown call op {request.get('op')!r}")
            slots = self._own(client, request.get("slots"))
            reply = op(slots, request)
            reply["r"] = r
            try:
                return codec.encode(reply, name="reply")
            except CodecError as exc:
                raise _EnvFailure(_unsendable(request, slots, reply, exc)) from exc
        except _EnvFailure as failure:
            self.stats["errors"] += 1
            return codec.encode({"r": r, "error": failure.desc})[0], []
        except InvalidActionError as exc:
            # "action": the client raises InvalidActionError, as when its own check refuses (spelt
            # out here rather than left to error_to_wire, which maps only the classes it knows).
            self.stats["errors"] += 1
            return codec.encode({"r": r, "error": {"code": "action", "msg": str(exc)}})[0], []
        except RemoteRLError as exc:
            self.stats["errors"] += 1
            return codec.encode({"r": r, "error": error_to_wire(exc)})[0], []
        except Exception as exc:  # a bug here must not take the worker down
            log.exception("internal error in a call")
            return codec.encode({"r": r, "error": _env_error(exc, "internal worker error")})[0], []

    def _own(self, client: bytes, slot_ids: Any) -> list[_Slot]:
        if not isinstance(slot_ids, list) or not slot_ids:
            raise ProtocolError("a call needs a non-empty list of slots")
        try:
            distinct = len(set(slot_ids)) == len(slot_ids)
        except TypeError:  # an unhashable slot id
            distinct = False
        if not distinct:
            # One step per slot per call: a slot named N times would cost N steps of its env for
            # N bytes, and block every other client's slots on this worker meanwhile.
            raise ProtocolError(f"a call must name each of its slots once, got {reprlib.repr(slot_ids)}")
        out = []
        for slot_id in slot_ids:
            slot = self.slots.get(slot_id)
            if slot is None or slot.client != client:
                raise _EnvFailure({"code": "closed", "msg": f"slot {slot_id!r} is not open on this worker"})
            out.append(slot)
        return out

    def _reset(self, slots: list[_Slot], request: dict) -> dict:
        seeds = request.get("seeds")
        options = request.get("options")
        if seeds is None:
            seeds = [None] * len(slots)
        if not isinstance(seeds, list) or len(seeds) != len(slots):
            raise ProtocolError("reset seeds must be a list with one entry per slot")
        obs_list, infos = [], []
        # Options only when given, as SB3's DummyVecEnv passes them: an env whose reset takes none
        # is reset as it would be locally.
        given = {} if options is None else {"options": options}
        for slot, seed in zip(slots, seeds):
            try:
                obs, info = slot.env.reset(seed=seed, **given)
            except Exception as exc:
                raise _EnvFailure(_env_error(exc, f"reset failed in slot {slot.id}", slot.id)) from exc
            slot.autoreset = False
            obs_list.append(obs)
            infos.append(info)
        self.stats["resets"] += len(slots)
        if request.get("single"):
            return {"obs": obs_list[0], "info": infos[0]}
        return {"obs": self._stack(slots, obs_list), "infos": infos}

    def _step(self, slots: list[_Slot], request: dict) -> dict:
        if request.get("single"):
            return self._step_single(slots, request)
        mode = request.get("m")
        if mode not in AUTORESET_MODES:
            raise ProtocolError(f"step 'm' must be an autoreset mode {sorted(AUTORESET_MODES)}, got {mode!r}")
        k = len(slots)
        # Shapes and dtypes first, whole (InvalidActionError): iterating a batch that does not fit
        # can cost without bound — a zero-size array of shape (2**25, 0) is 42 bytes on the wire
        # and 2**25 Python objects to iterate, with the GIL held and heartbeats stopped.
        batch = check_actions(slots[0].env.action_space, request.get("a"), k)
        space = self._batched_space(slots[0], k)
        try:
            actions = list(iterate(space, batch))
        except Exception as exc:
            raise ProtocolError(f"actions do not match the batched action space {space}: {exc}") from exc
        if len(actions) != k:
            raise ProtocolError(f"got {len(actions)} actions for {k} slots")
        obs_list: list = [None] * k
        infos: list = [None] * k
        # Plain lists in the loop (numpy element access costs ~0.1 us a time, several times per
        # env); converted once at the end, with SyncVectorEnv's dtypes (float64, bool).
        rewards: list = [0.0] * k
        terminated: list = [False] * k
        truncated: list = [False] * k
        final: list = []
        steps = resets = 0
        try:
            for i, (slot, action) in enumerate(zip(slots, actions)):
                env = slot.env
                done = moved = False
                try:
                    if slot.autoreset and mode == _NEXT_STEP:
                        obs_list[i], infos[i] = env.reset()
                        resets += 1
                    else:
                        if slot.autoreset and mode == _DISABLED:
                            raise AssertionError(
                                f"slot {slot.id} ended and was not reset (autoreset mode DISABLED)")
                        obs, rewards[i], term, trunc, info = env.step(action)
                        steps += 1
                        moved = True  # from here on, this slot has stepped whatever follows
                        terminated[i], truncated[i] = term, trunc
                        done = bool(term) or bool(trunc)
                        if done and mode == _SAME_STEP:
                            final.append([i, obs, info])
                            obs, info = env.reset()
                            resets += 1
                        obs_list[i], infos[i] = obs, info
                except Exception as exc:
                    desc = _env_error(exc, f"step failed in slot {slot.id}", slot.id)
                    # The slots before this one stepped (or autoreset), and this one if its
                    # env.step returned: the client's vector is out of step with them.
                    desc["stepped"] = [s.id for s in slots[:i + 1 if moved else i]]
                    raise _EnvFailure(desc) from exc
                slot.autoreset = done
        finally:
            self.stats["steps"] += steps
            self.stats["resets"] += resets
        try:
            obs = self._stack(slots, obs_list)
        except Exception as exc:  # observations that do not fit the space (user code)
            desc = _env_error(exc, "the observations of the step cannot be stacked into a batch")
            desc["stepped"] = [s.id for s in slots]
            raise _EnvFailure(desc) from exc
        reply = {"obs": obs, "rew": np.array(rewards, dtype=np.float64),
                 "term": np.array(terminated, dtype=np.bool_), "trunc": np.array(truncated, dtype=np.bool_),
                 "infos": infos}
        if final:
            reply["final"] = final
        return reply

    def _step_single(self, slots: list[_Slot], request: dict) -> dict:
        # RemoteEnv: one slot, the action and the results exactly as the env gives them.
        if len(slots) != 1:
            raise ProtocolError("a single-env step names exactly one slot")
        slot = slots[0]
        action = request.get("a")
        check_action(slot.env.action_space, action)  # as RemoteEnv.step did before sending
        try:
            obs, reward, terminated, truncated, info = slot.env.step(action)
        except Exception as exc:
            raise _EnvFailure(_env_error(exc, f"step failed in slot {slot.id}", slot.id)) from exc
        self.stats["steps"] += 1
        return {"obs": obs, "rew": reward, "term": terminated, "trunc": truncated, "info": info}

    def _stack(self, slots: list[_Slot], obs_list: list) -> Any:
        space = self._single_space(slots[0])
        if type(space) in _ARRAY_SPACES:
            # What gymnasium's concatenate does for these spaces (np.stack into an array of the
            # space's dtype), without its generic dispatch; np.array builds the same array from
            # equal-shaped parts in a third of np.stack's time (7 vs 21 µs for 64 CartPole obs)
            # and refuses ragged ones just the same.
            return np.array(obs_list, dtype=space.dtype)
        out = create_empty_array(space, len(obs_list))
        return concatenate(space, obs_list, out)

    def _single_space(self, slot: _Slot) -> Any:
        return slot.env.observation_space

    def _batched_space(self, slot: _Slot, k: int) -> Any:
        """``batch_space(slot's action space, k)``, cached on the slot for as long as its env
        keeps that very space object (identity held, so never confused with a freed one)."""
        space = slot.env.action_space
        cached = slot.batched
        if cached is not None and cached[0] is space and cached[1] == k:
            return cached[2]
        batched = batch_space(space, k)
        slot.batched = (space, k, batched)
        return batched

    # --- attributes: get_attr, set_attr, call ----------------------------------------------------

    def _get_attr(self, slots: list[_Slot], request: dict) -> dict:
        """Each slot's ``env.get_wrapper_attr(name)``. A callable attribute is not called: its
        value is nil and its position is listed in ``callable`` (the client proxies it). With
        ``probe``: each slot's ``env.has_wrapper_attr(name)`` instead."""
        name = _attr_name(request, "get_attr")
        if request.get("probe"):
            return {"values": [_has_attr(slot, name) for slot in slots]}
        values: list = []
        callables: list[int] = []
        for i, slot in enumerate(slots):
            value = _lookup(slot, name)
            if callable(value):
                callables.append(i)
                value = None
            values.append(value)
        reply = _values_reply(values)
        if callables:
            reply["callable"] = callables
        return reply

    def _call(self, slots: list[_Slot], request: dict) -> dict:
        """``VectorEnv.call`` per slot: ``env.get_wrapper_attr(name)``, called with ``args`` and
        ``kwargs`` if callable, else the value itself (as ``SyncVectorEnv.call``). With ``strict``
        (SB3's ``env_method``, which calls what it finds) a value that is not callable is the
        ``TypeError`` calling it raises locally."""
        name = _attr_name(request, "call")
        if name in _NOT_CALLABLE_REMOTELY:
            raise RemoteAttributeError(f"{name!r} cannot be called through 'call' (use the {name} call itself)")
        args, kwargs, strict = request.get("args") or [], request.get("kwargs") or {}, request.get("strict", False)
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) \
                or not all(isinstance(key, str) for key in kwargs) or not isinstance(strict, bool):
            raise ProtocolError("call 'args' must be a list, 'kwargs' a map with str keys and 'strict' a bool")
        values = []
        for slot in slots:
            value = _lookup(slot, name)
            if strict and not callable(value):
                exc = TypeError(f"{type(value).__name__!r} object is not callable")
                raise _EnvFailure(_env_error(exc, f"call {name!r} failed in slot {slot.id}", slot.id))
            if callable(value):
                try:
                    value = value(*args, **kwargs)
                except Exception as exc:  # user code
                    raise _EnvFailure(_env_error(exc, f"call {name!r} failed in slot {slot.id}", slot.id)) from exc
            values.append(value)
        return _values_reply(values)

    def _set_attr(self, slots: list[_Slot], request: dict) -> dict:
        """``env.set_wrapper_attr(name, value, force=force)`` per slot, one value per slot;
        replies ``set``: what each returned (whether the attribute was set). With ``outer``:
        ``setattr(env, name, value)`` on the slot's outermost env object instead, as SB3's
        ``DummyVecEnv.set_attr`` sets it (the wrapped envs below keep their own value)."""
        name = _attr_name(request, "set_attr")
        values, force, outer = request.get("values"), request.get("force", True), request.get("outer", False)
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
                raise _EnvFailure(_env_error(exc, f"set_attr {name!r} failed in slot {slot.id}", slot.id)) from exc
        return {"set": done}

    def _is_wrapped(self, slots: list[_Slot], request: dict) -> dict:
        """SB3's ``env_util.is_wrapped`` per slot, by name: whether a wrapper in the slot's env
        chain (``.env`` down to the innermost env) is an instance of the class ``wrapper`` names,
        ``"module:QualName"``: a class in the wrapper's MRO has that module and qualified name.
        The class cannot travel (nothing executable crosses the wire) and the name imports
        nothing: a class no module here defined wraps no env here."""
        module, qualname = _wrapper_name(request)
        return {"values": [_wrapped_by(slot.env, module, qualname) for slot in slots]}


class _EnvFailure(Exception):
    """An env (user code) failed; ``desc`` is the wire error."""

    def __init__(self, desc: dict) -> None:
        super().__init__(desc.get("msg"))
        self.desc = desc


# Names ``call`` refuses: the slot host runs these itself (autoreset flags, slot bookkeeping),
# as AsyncVectorEnv's workers refuse them in ``call``.
_NOT_CALLABLE_REMOTELY = frozenset({"reset", "step", "close"})

# gymnasium.Env.set_wrapper_attr took no ``force`` before gymnasium 1.1.
_SET_TAKES_FORCE = "force" in inspect.signature(gymnasium.Env.set_wrapper_attr).parameters


def _attr_name(request: dict, op: str) -> str:
    name = request.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"{op} needs 'name', an attribute name (str)")
    check_attr_name(name)  # RemoteAttributeError: the wire code "attr"
    return name


# The longest wrapper class name is_wrapped takes ("module:QualName"): a name, never a payload.
MAX_WRAPPER_NAME = 512


def _wrapper_name(request: dict) -> tuple[str, str]:
    """``(module, qualname)`` of is_wrapped's ``wrapper``; ``ProtocolError`` unless it is
    ``"dotted.module:Qual.Name"`` (a class defined in a function has ``<locals>`` in its name)."""
    name = request.get("wrapper")
    if isinstance(name, str) and len(name) <= MAX_WRAPPER_NAME:
        module, _, qualname = name.partition(":")
        if _is_module_name(module) and qualname and \
                all(part.isidentifier() or part == "<locals>" for part in qualname.split(".")):
            return module, qualname
    raise ProtocolError(f"is_wrapped needs 'wrapper', a class name 'module:QualName' of at most "
                        f"{MAX_WRAPPER_NAME} characters, got {reprlib.repr(name)}")


def _wrapped_by(env: Any, module: str, qualname: str) -> bool:
    """Whether a wrapper of ``env`` is an instance of the class named ``module:qualname``
    (``stable_baselines3.common.env_util.unwrap_wrapper``'s walk, comparing names)."""
    while isinstance(env, gymnasium.Wrapper):
        if any(cls.__module__ == module and cls.__qualname__ == qualname for cls in type(env).__mro__):
            return True
        env = env.env
    return False


def _reset_without_options(env: Any) -> None:
    """Let ``env`` (an innermost env) be reset without options when its ``reset`` takes none.

    gymnasium's wrappers (``OrderEnforcing``, ``PassiveEnvChecker``...) pass ``options=None``
    down, so such an env made with ``gymnasium.make`` cannot be reset on a worker, while SB3's
    ``DummyVecEnv`` resets it (without options) locally. Its ``reset`` is replaced, on this
    instance only, by one that drops ``options`` when it is None; given options still reach it
    (and fail there, as locally)."""
    try:
        params = inspect.signature(env.reset).parameters.values()
    except (TypeError, ValueError):  # no signature to read: leave it as it is
        return
    if any(p.name == "options" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    reset = env.reset

    def reset_without_options(*args: Any, options: Any = None, **kwargs: Any) -> Any:
        if options is not None:
            kwargs["options"] = options
        return reset(*args, **kwargs)

    env.reset = reset_without_options


def _lookup(slot: _Slot, name: str) -> Any:
    """``env.get_wrapper_attr(name)``, as gymnasium's vector envs look attributes up."""
    try:
        return slot.env.get_wrapper_attr(name)
    except AttributeError as exc:
        raise RemoteAttributeError(f"the env in slot {slot.id} has no attribute {name!r} ({exc})") from exc
    except Exception as exc:  # a property getter is user code
        raise _EnvFailure(_env_error(exc, f"get_attr {name!r} failed in slot {slot.id}", slot.id)) from exc


def _has_attr(slot: _Slot, name: str) -> bool:
    env = slot.env
    try:
        return bool(env.has_wrapper_attr(name) if hasattr(env, "has_wrapper_attr") else hasattr(env, name))
    except Exception as exc:  # a property getter is user code
        raise _EnvFailure(_env_error(exc, f"has_attr {name!r} failed in slot {slot.id}", slot.id)) from exc


def _setattr(slot: _Slot, name: str, value: Any) -> None:
    """``setattr(env, name, value)``: the ``AttributeError`` of a read-only property stays one
    (``RemoteAttributeError``), as locally; what else a property setter raises is an env error."""
    try:
        setattr(slot.env, name, value)
    except AttributeError as exc:
        raise RemoteAttributeError(f"{name!r} cannot be set on the env in slot {slot.id}: {exc}") from exc
    except Exception as exc:  # a property setter is user code
        raise _EnvFailure(_env_error(exc, f"set_attr {name!r} failed in slot {slot.id}", slot.id)) from exc


def _set_wrapper_attr(env: Any, name: str, value: Any, force: bool) -> bool:
    if _SET_TAKES_FORCE:
        return bool(env.set_wrapper_attr(name, value, force=force))
    env.set_wrapper_attr(name, value)  # gymnasium 1.0: sets it (returns nothing)
    return True


def _values_reply(values: list) -> dict:
    """``{"values": values}``; ints beyond 64 bits as decimal strings, their positions in ``big``."""
    big = [i for i, v in enumerate(values) if type(v) is int and not _INT_MIN <= v < _INT_END]
    for i in big:
        values[i] = str(values[i])
    return {"values": values, "big": big} if big else {"values": values}


def _unsendable(request: dict, slots: list[_Slot], reply: dict, exc: CodecError) -> dict:
    """The error reply for a reply that cannot be encoded: names the attribute of an attribute
    call, and says which slots stepped (all of them) for a step."""
    op = request.get("op")
    if op in ("get_attr", "call"):
        name = request.get("name")
        for slot, value in zip(slots, reply.get("values", ())):
            try:
                codec.encode(value, name=str(name))
            except CodecError as inner:
                return {"code": "codec", "msg": f"the value of env attribute {name!r} in slot {slot.id} "
                                                f"cannot travel: {inner}"}
    desc = error_to_wire(exc)
    if op == "step":
        desc["stepped"] = [slot.id for slot in slots]
    return desc


def _env_error(exc: BaseException, context: str, slot: int | None = None) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, CodecError):
        code = "unsupported_space" if isinstance(exc, UnsupportedSpaceError) else "codec"
        return {"code": code, "msg": f"{context}: {exc}"}
    desc = {"code": "env", "msg": f"{context}: {type(exc).__name__}: {exc}", "type": type(exc).__name__, "tb": tb}
    if slot is not None:
        desc["slot"] = slot
    return desc


def _close_env(env: Any) -> None:
    try:
        env.close()
    except Exception:  # closing user code: log, carry on
        log.exception("env.close() raised")


def _describe(env: Any) -> dict:
    """What a client caches about an env: spaces, metadata, render mode, spec."""
    spec = getattr(env, "spec", None)
    return {
        "observation_space": space_to_wire(env.observation_space, name="observation_space"),
        "action_space": space_to_wire(env.action_space, name="action_space"),
        "metadata": _plain(dict(getattr(env, "metadata", {}) or {})),
        "render_mode": getattr(env, "render_mode", None),
        "spec": _spec_dict(spec),
    }


def _spec_dict(spec: Any) -> dict | None:
    if spec is None:
        return None
    entry = spec.entry_point if isinstance(spec.entry_point, str) else None
    return _plain({
        "id": spec.id, "entry_point": entry, "reward_threshold": spec.reward_threshold,
        "nondeterministic": spec.nondeterministic, "max_episode_steps": spec.max_episode_steps,
        "order_enforce": spec.order_enforce, "disable_env_checker": spec.disable_env_checker,
        "kwargs": dict(spec.kwargs or {}),
    })


def _plain(value: Any) -> Any:
    """Keep only what can travel: metadata and spec kwargs may hold arbitrary objects.
    Enums (gymnasium's ``AutoresetMode`` in metadata) travel as their value."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if isinstance(k, str) and _travels(v)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value if _travels(v))
    return value


def _travels(value: Any) -> bool:
    if isinstance(value, enum.Enum):
        return _travels(value.value)
    if value is None or isinstance(value, (bool, int, float, str, bytes, np.ndarray, np.generic)):
        return True
    if isinstance(value, (list, tuple, dict)):
        return True
    return False


def _peek_request_id(header: Any) -> int | None:
    """The ``r`` of a call the codec refused (a bad array, say), read with every array skipped."""
    try:
        request = msgpack.unpackb(header, ext_hook=lambda code, data: None, raw=False, strict_map_key=False)
    except Exception:
        return None
    r = request.get("r") if isinstance(request, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _how_to_allow(module: str) -> str:
    return f"start the worker with --import {module} or --allow-import {module}"


def _is_module_name(name: str) -> bool:
    """A dotted module path, absolute (``pkg.sub``): nothing else is ever imported from the wire."""
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def import_modules(modules: list[str]) -> None:
    """Import user modules so the env ids they register can be served (``--import``)."""
    for name in modules:
        importlib.import_module(name)
