"""The slot host: env instances on a worker, driven by decoded calls, without sockets.

Theory of operation
-------------------
A worker hosts *slots*; each slot is one env instance created for one client by an
OPEN that the broker placed here. The loop (``remoterl.workers.loop``) hands this
object three kinds of request and sends back what it returns:

* ``open(client, header)`` creates the envs for the listed slot ids and describes
  the env once (spaces, metadata, spec: ``remoterl.wire.envdesc.describe``) for the
  client to cache.
* ``call(client, header_frame, frames)`` runs one batched call for many slots of
  one client — ``reset`` or ``step`` — and returns ONE reply: observations stacked
  per slot order, rewards, flags, and per-slot infos. ``get_attr``, ``set_attr`` and
  ``call`` reach the envs' public attributes and methods by name (gymnasium's
  ``VectorEnv.get_attr``/``set_attr``/``call``, ``Env.get_wrapper_attr``);
  ``is_wrapped`` answers SB3's ``env_is_wrapped`` with the wrapper class's name.
* ``close(client, slots)`` closes envs.

Big arrays of a reply travel as raw frames, compressed when the OPEN asked for it
(``opts.z``: ``"lz4"`` or ``"zstd"``, :mod:`remoterl.wire.compress`), or written into the
client's shared-memory segment when the client runs on this host and the call says so
(``"shm"``; the ``shm`` op maps the segment: :mod:`remoterl.io.shm`). One segment per
client, dropped with the client's last slot.

This module keeps the slots, checks ownership and dispatches each call by its ``op``
(the call schema, op names and fields, is :mod:`remoterl.wire.calls`) to the ops:
``reset`` and ``step`` in :mod:`remoterl.workers.stepping`, where vector semantics
(autoreset, the mode travelling with each step as ``"m"``) follow
``gymnasium.vector.SyncVectorEnv.step`` line for line, so an episode boundary costs no
extra round trip; the attribute ops in :mod:`remoterl.workers.attrs`. A slot and the
error an env's failure becomes are :mod:`remoterl.workers.slots`'.

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
client's own envs (``remoterl.wire.actions.check_attr_name``: no ``_`` prefix, no helper that
takes a name itself, no ``reset``/``step``/``close`` through ``call``, whose slot bookkeeping
lives here); their arguments are codec values, like everything else a client sends.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import reprlib
from typing import Any, Callable

import gymnasium
import msgpack

from remoterl.errors import CodecError, InvalidActionError, ProtocolError, RemoteRLError, error_to_wire
from remoterl.io import shm
from remoterl.wire import codec
from remoterl.wire.calls import (AUTORESET_MODES, BARE, COMPRESSION, ENDED, MAX_WRAPPER_NAME, NAME, OK, OP, SEGMENT,
                                 SHARED, VALUES, WHY, Op, is_module_name)
from remoterl.wire.compress import Compressor
from remoterl.wire.envdesc import describe
from remoterl.workers import attrs, stepping
from remoterl.workers.slots import EnvFailure, Slot, close_env, env_error

# AUTORESET_MODES and MAX_WRAPPER_NAME: the wire's, importable from here as before.
__all__ = ["AUTORESET_MODES", "MAX_WRAPPER_NAME", "SlotHost", "import_modules"]

log = logging.getLogger(__name__)


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
        self.slots: dict[int, Slot] = {}
        # client -> its shared-memory segment on this host (remoterl.io.shm), while it has slots
        self.shared: dict[bytes, shm.Sink] = {}
        self.stats = {"steps": 0, "resets": 0, "calls": 0, "errors": 0}
        # op -> its handler(slots, request) -> reply; the env ops count into stats.
        self._ops: dict[str, Callable[[list[Slot], dict], dict]] = {
            Op.STEP: functools.partial(stepping.step, self.stats),
            Op.RESET: functools.partial(stepping.reset, self.stats),
            Op.GET_ATTR: attrs.get_attr, Op.SET_ATTR: attrs.set_attr, Op.CALL: attrs.call,
            Op.IS_WRAPPED: attrs.is_wrapped,
        }

    def wrap_ops(self, wrap: Callable[[str, Callable[[list[Slot], dict], dict]], Callable[[list[Slot], dict], dict]]
                 ) -> None:
        """Replace each op's handler with ``wrap(op name, handler)``: how ``--metrics``
        (:mod:`remoterl.workers.metrics`) times the ops, so a host without it pays nothing."""
        for name, handler in list(self._ops.items()):
            self._ops[name] = wrap(name, handler)

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
        if not is_module_name(module) or not attr.isidentifier():
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
        if not is_module_name(module):
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
        if not isinstance(opts, dict):
            opts = {}
        bare = bool(opts.get(BARE))
        # A replacement for an env lost with its worker: its episode ended there, so it starts
        # as a slot that just ended (the next NEXT_STEP step resets it; DISABLED wants a reset).
        ended = bool(opts.get(ENDED))
        try:
            compressor = Compressor(opts[COMPRESSION]) if opts.get(COMPRESSION) is not None else None
        except ValueError as exc:
            reply["error"] = {"code": "protocol", "msg": f"OPEN opts: {exc}"}
            return reply
        created: list[Slot] = []
        try:
            for slot_id in slot_ids:
                env = self._make(env_id, **kwargs)
                if bare:
                    # The trainer applies gymnasium's wrappers itself (remoterl.init's make):
                    # host the env without them, so none is applied twice.
                    env = env.unwrapped
                _reset_without_options(env.unwrapped)
                created.append(Slot(slot_id, client, env_id, env, autoreset=ended, compressor=compressor))
            reply["env"] = codec.encode(describe(created[0].env), frame_threshold=1 << 62, name="env")[0]
        except Exception as exc:  # env construction is user code: report, never crash
            for slot in created:
                close_env(slot.env)
            reply["error"] = env_error(exc, f"could not make {env_id!r} with kwargs {kwargs!r}")
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
                close_env(slot.env)
        if client in self.shared and not any(slot.client == client for slot in self.slots.values()):
            self.shared.pop(client).close()

    def close_all(self) -> None:
        """Close every env (the broker session ended)."""
        for slot in self.slots.values():
            close_env(slot.env)
        self.slots.clear()
        for sink in self.shared.values():
            sink.close()
        self.shared.clear()

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
            op = self._ops.get(request.get(OP))
            if op is None and request.get(OP) != Op.SHM:
                raise ProtocolError(f"unknown call op {request.get(OP)!r}")
            slots = self._own(client, request.get("slots"))
            reply = op(slots, request) if op is not None else self._attach(client, request)
            reply["r"] = r
            sink = slots[0].compressor
            if request.get(SHARED) is not None:
                segment = self.shared.get(client)
                if segment is not None and segment.id == request[SHARED]:
                    sink = segment.start() if sink is None else _first(segment.start(), sink)
            try:
                return codec.encode(reply, name="reply", sink=sink)
            except CodecError as exc:
                raise EnvFailure(_unsendable(request, slots, reply, exc)) from exc
        except EnvFailure as failure:
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
            return codec.encode({"r": r, "error": env_error(exc, "internal worker error")})[0], []

    def _attach(self, client: bytes, request: dict) -> dict:
        """The ``shm`` op: map the client's segment (replacing its previous one), if it is on
        this host; ``{"ok": False, "why": ...}`` otherwise (the client keeps to sockets)."""
        segment = request.get(SEGMENT)
        if not isinstance(segment, list) or len(segment) != 3:
            raise ProtocolError("shm needs 'segment', [id, name, size]")
        try:
            sink = shm.attach(*segment)
        except ValueError as exc:
            return {OK: False, WHY: str(exc)}
        old = self.shared.pop(client, None)
        if old is not None:
            old.close()
        self.shared[client] = sink
        return {OK: True}

    def _own(self, client: bytes, slot_ids: Any) -> list[Slot]:
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
                raise EnvFailure({"code": "closed", "msg": f"slot {slot_id!r} is not open on this worker"})
            out.append(slot)
        return out


def _unsendable(request: dict, slots: list[Slot], reply: dict, exc: CodecError) -> dict:
    """The error reply for a reply that cannot be encoded: names the attribute of an attribute
    call, and says which slots stepped (all of them) for a step."""
    op = request.get(OP)
    if op in (Op.GET_ATTR, Op.CALL):
        name = request.get(NAME)
        for slot, value in zip(slots, reply.get(VALUES, ())):
            try:
                codec.encode(value, name=str(name))
            except CodecError as inner:
                return {"code": "codec", "msg": f"the value of env attribute {name!r} in slot {slot.id} "
                                                f"cannot travel: {inner}"}
    desc = error_to_wire(exc)
    if op == Op.STEP:
        desc["stepped"] = [slot.id for slot in slots]
    return desc


def _first(*sinks: Any) -> Callable[..., Any]:
    """A codec sink that tries ``sinks`` in turn (shared memory, then compression)."""
    def sink(frame: Any, prefix: bytes, frames: list) -> Any:
        for one in sinks:
            placed = one(frame, prefix, frames)
            if placed is not None:
                return placed
        return None
    return sink


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


def import_modules(modules: list[str]) -> None:
    """Import user modules so the env ids they register can be served (``--import``)."""
    for name in modules:
        importlib.import_module(name)
