"""One hosted slot, and how a failure in its env becomes a wire error.

Shared by the slot host (``remoterl.workers.runtime``) and its ops
(``remoterl.workers.stepping``, ``remoterl.workers.attrs``). An env is user code: whatever
it raises is caught where it was called and raised on as :class:`EnvFailure`, whose
``desc`` is the error map the reply carries (``code`` ``"env"`` with the exception's type
and traceback, and the slot id), so the slot host answers the call and keeps serving every
slot.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any

from remoterl.errors import CodecError, UnsupportedSpaceError

__all__ = ["EnvFailure", "Slot", "close_env", "env_error"]

# The slot host's logger: what an env's close raises is logged under the same name as before.
log = logging.getLogger("remoterl.workers.runtime")


@dataclass(eq=False)
class Slot:
    """One env instance, created for one client by an OPEN."""

    id: int
    client: bytes
    env_id: str
    env: Any
    # Whether the env ended (term or trunc) on its last batched step: what autoreset acts on.
    autoreset: bool = False
    # (action space, k, batch_space(action space, k)) of the last batched step led by this slot.
    # Holding the space itself keeps the identity check sound: an id() can be reused once its
    # object is freed, a referenced object's cannot.
    batched: tuple | None = None
    # The OPEN's compression (a remoterl.wire.compress.Compressor, shared by its slots), or None.
    compressor: Any = None


class EnvFailure(Exception):
    """An env (user code) failed; ``desc`` is the wire error."""

    def __init__(self, desc: dict) -> None:
        super().__init__(desc.get("msg"))
        self.desc = desc


def env_error(exc: BaseException, context: str, slot: int | None = None) -> dict:
    """The wire error for ``exc``, raised by an env (or by stacking its values) in ``context``:
    ``code`` ``"env"`` with its type and traceback, or ``"codec"``/``"unsupported_space"`` for a
    value that cannot travel."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, CodecError):
        code = "unsupported_space" if isinstance(exc, UnsupportedSpaceError) else "codec"
        return {"code": code, "msg": f"{context}: {exc}"}
    desc = {"code": "env", "msg": f"{context}: {type(exc).__name__}: {exc}", "type": type(exc).__name__, "tb": tb}
    if slot is not None:
        desc["slot"] = slot
    return desc


def close_env(env: Any) -> None:
    """``env.close()``; what it raises is logged, never raised."""
    try:
        env.close()
    except Exception:  # closing user code: log, carry on
        log.exception("env.close() raised")
