"""The remoterl exception tree.

Every failure remoterl reports is rooted at :class:`RemoteRLError`, so one
``except remoterl.RemoteRLError`` catches them all. Where a builtin family fits,
an error also derives from it (a timeout is a ``TimeoutError``, a lost peer a
``ConnectionError``), so generic handlers keep working.

::

    RemoteRLError
    ├── ProtocolError                  a peer sent something the protocol does not allow
    │   └── MessageTooLargeError       a message over the configured size limit
    ├── CodecError (TypeError)         a value cannot travel: names the key and the type
    │   └── UnsupportedSpaceError      a gymnasium space with no wire description
    ├── BrokerUnavailableError (ConnectionError)
    │                                  no broker answers at the URL (says how to start one)
    ├── NoWorkerError                  nobody serves that env id (says what is served)
    │   └── CapacityError              workers serve it, but all their slots are taken
    ├── WorkerLostError (ConnectionError)
    │                                  the worker holding a slot died: the env's state is gone
    ├── RemoteEnvError                 the env raised on the simulator: carries its traceback
    ├── RemoteAttributeError (AttributeError)
    │                                  an env attribute the remote env lacks, or that may not be
    │                                  reached over the wire (a name starting with ``_``)
    ├── EnvClosedError                 you closed it (not "it broke")
    ├── ResetNeededError               a vector env out of step with its workers (a step failed
    │                                  or timed out): only ``reset()`` brings it back
    ├── InvalidActionError (ValueError)
    │                                  an action that cannot fit the action space (not sent)
    │   └── ActionNotBatchedError (TypeError)
    │                                  a vector step given something that is no batch at all
    ├── RemoteTimeoutError (TimeoutError, multiprocessing.TimeoutError)
    │                                  no reply within the call's timeout
    ├── AuthenticationError            wrong or missing API key
    └── LimitExceededError             a broker limit (slots per tenant, new connections a second)

"You closed it" (:class:`EnvClosedError`) is kept apart from "it broke"
(:class:`WorkerLostError`): the first is a bug in the caller, the second an
event in the world.
"""

from __future__ import annotations

import multiprocessing

__all__ = [
    "ActionNotBatchedError",
    "RemoteAttributeError",
    "ResetNeededError",
    "AuthenticationError",
    "BrokerUnavailableError",
    "CapacityError",
    "CodecError",
    "EnvClosedError",
    "InvalidActionError",
    "LimitExceededError",
    "MessageTooLargeError",
    "NoWorkerError",
    "ProtocolError",
    "RemoteEnvError",
    "RemoteRLError",
    "RemoteTimeoutError",
    "RenderUnavailableError",
    "UnsupportedSpaceError",
    "WorkerLostError",
    "error_from_wire",
    "error_to_wire",
]


class RemoteRLError(Exception):
    """Base class of every error remoterl raises.

    Attributes:
        stepped_slots: on an error a worker answered a step with, the ids of the slots of that
            call that had stepped (or been reset by autoreset) before it failed, as the worker
            reported them; ``None`` when the worker did not say (not a step, or an older worker).
        stepped_envs: on an error raised by a :class:`~remoterl.RemoteEnvVec` step, the env
            indices that stepped on their workers before the step failed, sorted: every env
            of a worker that answered the step, and those a failing worker reported in
            ``stepped_slots``. Envs whose worker did not answer (a timeout, a lost worker) are
            not listed: whether they stepped is unknown. ``None`` elsewhere.
    """

    stepped_slots: tuple[int, ...] | None = None
    stepped_envs: tuple[int, ...] | None = None


class ProtocolError(RemoteRLError):
    """A peer sent a message the protocol does not allow (malformed, unknown, out of order)."""


class MessageTooLargeError(ProtocolError):
    """A message exceeded the configured maximum size."""


class CodecError(RemoteRLError, TypeError):
    """A value cannot be encoded for the wire; the message names the key and the type."""


class UnsupportedSpaceError(CodecError):
    """A gymnasium space type that has no wire description."""


class BrokerUnavailableError(RemoteRLError, ConnectionError):
    """No broker answered at the configured URL, or contact with it was lost."""


class NoWorkerError(RemoteRLError):
    """No connected worker serves the requested env id."""


class CapacityError(NoWorkerError):
    """Workers serve the env id, but they have too few free slots for the request."""


class WorkerLostError(RemoteRLError, ConnectionError):
    """The worker that held a slot is gone; the env's state is lost with it.

    A slot is never silently re-routed to another worker: ``step`` is not idempotent.
    """


class RemoteEnvError(RemoteRLError):
    """The environment raised an exception on the simulator.

    Attributes:
        remote_type: the exception's class name on the simulator.
        remote_traceback: the traceback text as the simulator saw it.
        slot: the slot whose env raised, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        remote_type: str = "",
        remote_traceback: str = "",
        slot: int | None = None,
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.slot = slot

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class RemoteAttributeError(RemoteRLError, AttributeError):
    """An env attribute that cannot be read, set or called remotely.

    Either the remote env has no such attribute (what ``getattr`` would raise locally), or
    the name may not cross the wire: names starting with ``_``, and the helpers that take
    an attribute name themselves (``get_wrapper_attr``...), are refused by the client and,
    again, by the worker.
    """


class EnvClosedError(RemoteRLError):
    """The env (or vector env) was closed by its owner and cannot be used any more."""


class ResetNeededError(RemoteRLError):
    """A vector env is out of step with its workers and must be reset before it steps again.

    Raised by :class:`~remoterl.RemoteEnvVec` when asked to step after a step (or reset)
    failed or timed out: the workers may have stepped some envs, or may still step them,
    without the trainer seeing the results, so the next transition would not follow the
    last one it saw. A full ``reset()`` (no ``reset_mask``) brings the vector back in step.
    """


class InvalidActionError(RemoteRLError, ValueError):
    """An action whose shape or type cannot fit the action space; nothing was sent."""


class ActionNotBatchedError(InvalidActionError, TypeError):
    """A vector env was given actions that are no batch at all (a scalar, ``None``, a non-dict
    for a Dict action space...); nothing was sent.

    An :class:`InvalidActionError` (so a ``ValueError``) and, as gymnasium's vector envs
    raise for the same input, a ``TypeError``.
    """


class RemoteTimeoutError(RemoteRLError, TimeoutError, multiprocessing.TimeoutError):
    """A remote call got no reply within its timeout.

    A builtin ``TimeoutError`` and a ``multiprocessing.TimeoutError`` (what
    ``AsyncVectorEnv.step_wait`` raises), so handlers written for either catch it.
    """


class AuthenticationError(RemoteRLError):
    """The broker refused the API key (wrong or missing)."""


class LimitExceededError(RemoteRLError):
    """A broker limit was reached: open slots per tenant, or new connections a second."""


class RenderUnavailableError(RemoteRLError, RuntimeError):
    """``render_mode="human"`` cannot show a window here: pygame is missing, or it cannot
    open a display. The message says which, and what to do (never sent on the wire)."""


# Error codes on the wire. The broker and workers send ``{"code": ..., "msg": ...}``;
# the client turns it back into the matching class.
_CODES: dict[str, type[RemoteRLError]] = {
    "protocol": ProtocolError,
    "too_large": MessageTooLargeError,
    "codec": CodecError,
    "unsupported_space": UnsupportedSpaceError,
    "no_worker": NoWorkerError,
    "capacity": CapacityError,
    "worker_lost": WorkerLostError,
    "env": RemoteEnvError,
    "closed": EnvClosedError,
    "timeout": RemoteTimeoutError,
    "auth": AuthenticationError,
    "limit": LimitExceededError,
    "action": InvalidActionError,
    "attr": RemoteAttributeError,
}
_NAMES = {cls: code for code, cls in _CODES.items()}


def error_to_wire(exc: BaseException, **extra: object) -> dict:
    """Describe an exception as a msgpack-able dict (``code``, ``msg`` and extras)."""
    code = "env"
    for cls in type(exc).__mro__:
        if cls in _NAMES:
            code = _NAMES[cls]
            break
    out: dict = {"code": code, "msg": str(exc)}
    out.update(extra)
    return out


def error_from_wire(desc: dict) -> RemoteRLError:
    """Rebuild the typed exception a peer described with :func:`error_to_wire`."""
    code = desc.get("code") if isinstance(desc, dict) else None
    cls = _CODES.get(code, ProtocolError) if isinstance(code, str) else ProtocolError
    msg = desc.get("msg", "") if isinstance(desc, dict) else repr(desc)
    if not isinstance(msg, str):
        msg = repr(msg)
    exc: RemoteRLError
    if cls is RemoteEnvError:
        slot = desc.get("slot")
        exc = RemoteEnvError(
            msg,
            remote_type=str(desc.get("type", "")),
            remote_traceback=str(desc.get("tb", "")),
            slot=slot if isinstance(slot, int) and not isinstance(slot, bool) else None,
        )
    else:
        exc = cls(msg)
    stepped = desc.get("stepped") if isinstance(desc, dict) else None
    if isinstance(stepped, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stepped):
        exc.stepped_slots = tuple(stepped)
    return exc
