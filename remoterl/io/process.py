"""Child processes that never outlive their parent (Linux ``PR_SET_PDEATHSIG``).

Used by the worker pool and the embedded default: when a trainer is killed with
SIGKILL, its broker and worker processes get SIGTERM from the kernel and exit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

__all__ = ["die_with_parent", "keep_signals_for_main_thread"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Args:
        parent_pid: the pid the parent had when it started us; if it is already gone
            (we were re-parented before this call), exit at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except OSError:
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)  # the parent died before we could arm the signal


def keep_signals_for_main_thread() -> None:
    """Call at the start of a helper thread: SIGINT/SIGTERM then go to the main thread.

    The kernel delivers a process signal to any thread that does not block it. If a
    heartbeat thread takes it, the main thread sleeping in a zmq call is not interrupted
    and runs the Python handler only when that call times out (a whole heartbeat later).
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
