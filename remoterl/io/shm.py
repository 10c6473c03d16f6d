"""Shared-memory segments for large observations when a worker shares the trainer's host.

Theory of operation
-------------------
A batch of image observations costs most of its step time being copied through sockets
(8 × 210×160×3 is 806 KB a step). When a worker runs on the trainer's machine — the
embedded default's local workers, or any worker whose ``/dev/shm`` is the trainer's — its
replies can leave the big arrays in memory both processes map, and the message carries
only their headers (the codec's ext 6).

One segment per (client, worker), made by the trainer, which reads it:

1. After an OPEN whose observations are big (at least :data:`MIN_SHARED` bytes per reply),
   the client creates ``/dev/shm/remoterl-<pid>-<random>`` (:class:`Segment`, sized for two
   batches of that worker's slots, so a ``final_obs`` fits beside the observations), maps it,
   and calls the worker's ``shm`` op with its name, size and id.
2. The worker maps it if it can (:func:`attach`: a strict name, a regular file of exactly
   that size, never following links), and **unlinks it at once**; the trainer unlinks it
   too when the answer comes, whatever it says. From then on the segment has no name: the
   kernel frees it when the last of the two processes unmaps it or dies, so a SIGKILL of
   either end leaves nothing behind. A worker on another host (or in another container)
   finds no such file and says so; the client then keeps sockets for that worker.
3. A call may use the segment only when none of the client's other calls to that worker
   is using it (the client marks it busy: :meth:`Segment.claim`); such a call carries
   ``"shm": id``, and the worker writes the reply's big arrays into the segment
   (:class:`Sink`, one after another from offset 0) as long as they fit, the rest as
   ordinary frames. The client copies them out while decoding the reply, then frees the
   segment for the next call.

A name that was created but never attached (the trainer was killed between the two) is
removed by :func:`sweep`, which every new segment runs for names whose process is gone.

Linux only (``/dev/shm``); elsewhere :func:`available` is False and nothing changes.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
from typing import Any

import gymnasium
import msgpack
import numpy as np

from remoterl.wire.arrays import EXT_SHARED

__all__ = ["MAX_SHARED", "MIN_SHARED", "Segment", "Sink", "attach", "available", "space_nbytes", "sweep"]

log = logging.getLogger(__name__)

_DIR = "/dev/shm"
_PREFIX = "remoterl-"
_NAME = re.compile(r"remoterl-(\d{1,10})-[0-9a-f]{16}")

# Replies whose big arrays come to fewer bytes than this keep to sockets: below it a copy
# through the socket costs about what the segment's bookkeeping does.
MIN_SHARED = 64 * 1024

# The largest segment a worker maps for a client (a bound on what a client can make it map).
MAX_SHARED = 1 << 30

# Arrays are placed at offsets aligned to this (cache lines; numpy's preferred alignment).
_ALIGN = 64


def available() -> bool:
    """Whether this host has POSIX shared memory where this module looks for it."""
    return os.path.isdir(_DIR) and os.access(_DIR, os.W_OK)


class Segment:
    """The trainer's end: a named segment it created, mapped read-write.

    Args:
        ident: the id calls and ext 6 arrays name it by (unique within the client).
        size: bytes.
    """

    def __init__(self, ident: int, size: int) -> None:
        sweep()
        self.id = ident
        self.size = size
        self.name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.busy = False
        fd = os.open(os.path.join(_DIR, self.name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        self.view = memoryview(self._map)

    def unlink(self) -> None:
        """Remove the name (the memory stays mapped here). Idempotent."""
        try:
            os.unlink(os.path.join(_DIR, self.name))
        except FileNotFoundError:
            pass

    def claim(self) -> bool:
        """Mark the segment in use by one call; False if another call holds it."""
        if self.busy:
            return False
        self.busy = True
        return True

    def release(self) -> None:
        self.busy = False

    def close(self) -> None:
        """Unlink and unmap. An array still viewing the map keeps it alive until it is freed."""
        self.unlink()
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # still exported somewhere: the map goes when that view does
            pass


class Sink:
    """The worker's end of one segment: maps it, and places a reply's big arrays in it.

    Use :func:`attach` to make one. As a codec frame sink (``codec.encode(..., sink=...)``),
    call :meth:`start` before each reply it may write.
    """

    def __init__(self, ident: int, view: memoryview, mapped: mmap.mmap) -> None:
        self.id = ident
        self.view = view
        self._map = mapped
        self._tag = ident.to_bytes(4, "little")
        self._at = 0

    def start(self) -> Sink:
        """Begin a reply: arrays are written from the segment's start again."""
        self._at = 0
        return self

    def __call__(self, frame: np.ndarray, prefix: bytes, frames: list) -> msgpack.ExtType | None:
        at, n = self._at, frame.nbytes
        if at + n > len(self.view):
            return None  # does not fit: an ordinary frame
        self.view[at:at + n] = memoryview(frame).cast("B")
        self._at = at + n + (-n % _ALIGN)
        return msgpack.ExtType(EXT_SHARED, prefix + self._tag + at.to_bytes(8, "little"))

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass


def attach(ident: Any, name: Any, size: Any) -> Sink:
    """Map the segment a client created on this host, and unlink its name.

    Raises:
        ValueError: a malformed request (name, size or id), or no such segment here (another
            host, another container), or a file that is not that segment.
    """
    if not isinstance(ident, int) or isinstance(ident, bool) or not 0 <= ident < 1 << 32:
        raise ValueError("shm needs an id, an integer below 2**32")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_SHARED:
        raise ValueError(f"shm needs a size of 1 to {MAX_SHARED} bytes")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("shm needs the name of a remoterl segment")
    path = os.path.join(_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"no shared-memory segment {name} on this host ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size or info.st_uid != os.getuid():
            raise ValueError(f"{name} is not a segment of {size} bytes of this user")
        mapped = mmap.mmap(fd, size)
    finally:
        os.close(fd)
        try:
            os.unlink(path)  # from now on only the two mappings hold it
        except FileNotFoundError:
            pass
    return Sink(ident, memoryview(mapped), mapped)


def sweep() -> int:
    """Unlink segment names left by processes that are gone; returns how many."""
    removed = 0
    try:
        names = os.listdir(_DIR)
    except OSError:
        return 0
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(_DIR, name))
            removed += 1
        except OSError:
            pass
    return removed


def space_nbytes(space: Any) -> int:
    """Bytes of one observation of ``space`` held in arrays (Box, and Dict/Tuple of them);
    the small discrete spaces count as 0."""
    if isinstance(space, gymnasium.spaces.Box):
        return int(np.prod(space.shape, dtype=np.int64)) * space.dtype.itemsize
    if isinstance(space, gymnasium.spaces.Dict):
        return sum(space_nbytes(sub) for sub in space.spaces.values())
    if isinstance(space, gymnasium.spaces.Tuple):
        return sum(space_nbytes(sub) for sub in space.spaces)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
