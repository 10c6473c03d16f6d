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
    ├── EnvClosedError                 you closed it (not "it broke")
    ├── InvalidActionError (ValueError)
    │                                  an action that cannot fit the action space (not sent)
    ├── RemoteTimeoutError (TimeoutError)
    │                                  no reply within the call's timeout
    ├── AuthenticationError            wrong or missing API key
    └── LimitExceededError             a broker limit (slots per tenant, new connections a second)

"You closed it" (:class:`EnvClosedError`) is kept apart from "it broke"
(:class:`WorkerLostError`): the first is a bug in the caller, the second an
event in the world.
"""

from __future__ import annotations

__all__ = [
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
    "UnsupportedSpaceError",
    "WorkerLostError",
    "error_from_wire",
    "error_to_wire",
]


class RemoteRLError(Exception):
    """Base class of every error remoterl raises."""


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


class EnvClosedError(RemoteRLError):
    """The env (or vector env) was closed by its owner and cannot be used any more."""


class InvalidActionError(RemoteRLError, ValueError):
    """An action whose shape or type cannot fit the action space; nothing was sent."""


class RemoteTimeoutError(RemoteRLError, TimeoutError):
    """A remote call got no reply within its timeout."""


class AuthenticationError(RemoteRLError):
    """The broker refused the API key (wrong or missing)."""


class LimitExceededError(RemoteRLError):
    """A broker limit was reached: open slots per tenant, or new connections a second."""


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
    if cls is RemoteEnvError:
        slot = desc.get("slot")
        return RemoteEnvError(
            msg,
            remote_type=str(desc.get("type", "")),
            remote_traceback=str(desc.get("tb", "")),
            slot=slot if isinstance(slot, int) else None,
        )
    return cls(msg)
