"""Multipart messages over a local stream socket: the embedded broker's links to its workers.

Why not zmq here: zmq moves every message through its I/O threads, so a round trip
between a trainer and a worker process wakes four of them before the two that do the
work. On a 2-core VM that costs ~120 µs, against ~20 µs for the same bytes over a
``socket.socketpair()``, where the kernel wakes the reading thread directly (measured
in ``bench/README.md``, "Where the time goes"). The embedded default's broker and the
worker processes it starts therefore talk over such a link; the messages on it are
the same remoterl frames that travel on zmq (``docs/PROTOCOL.md``, "Local links").

Wire format, little-endian, one message after another::

    u32 body length | u32 frame count | u32 length of each frame ... | the frames' bytes

Both ends use non-blocking sockets: :meth:`Link.send` writes what the kernel takes at
once and queues the rest for :meth:`Link.flush` (the broker never blocks on a busy
worker); :meth:`Link.receive` returns the messages complete so far. :meth:`Link.wait`
and :meth:`Link.send_all` give the worker its blocking view.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from typing import Any

from remoterl.errors import ProtocolError
from remoterl.wire import protocol as p

__all__ = ["Link", "LinkClosed", "LinkTransport"]

_U32 = struct.Struct("<I")
_SCRATCH = 1 << 16  # bytes read per recv; bigger messages get a buffer of their own
_SNDBUF = 4 << 20
_MAX_IOV = 512  # buffers per sendmsg (the kernel's IOV_MAX is 1024)
_AS_BYTES = 3  # leading frames handed out as bytes (signature, ids, header), as the zmq loops do


_HEADS: dict[int, struct.Struct] = {}


def _head_struct(count: int) -> struct.Struct:
    head = _HEADS[count] = struct.Struct(f"<II{count}I")
    return head


class LinkClosed(ConnectionError):
    """The other end closed the link (or it broke)."""


class Link:
    """One end of a message link over a connected stream socket (made non-blocking here).

    Args:
        sock: a connected ``AF_UNIX`` stream socket (one end of ``socket.socketpair()``).
        max_message_size: a longer message from the other end breaks the link
            (:class:`ProtocolError` from :meth:`receive`).
    """

    def __init__(self, sock: socket.socket, max_message_size: int = p.MAX_MESSAGE_SIZE) -> None:
        sock.setblocking(False)
        # Big observations in few writes: the default ~200 KB buffer splits an 800 KB reply into
        # four wake-ups of each side. The kernel caps this at net.core.wmem_max.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        except OSError:
            pass
        self.sock = sock
        self.max_message_size = max_message_size
        self._scratch = bytearray(_SCRATCH)
        self._start = self._end = 0  # unparsed bytes: self._scratch[start:end]
        self._big: bytearray | None = None  # a message longer than the scratch buffer, being read
        self._big_got = 0
        self._queue: list[memoryview] = []  # bytes accepted by send() and not yet written
        self._poll_in = select.poll()  # for the blocking views (wait, send_all)
        self._poll_in.register(sock, select.POLLIN)
        self._poll_out = select.poll()
        self._poll_out.register(sock, select.POLLOUT)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        """True while sent messages wait in the queue (poll for writability, then :meth:`flush`)."""
        return bool(self._queue)

    # --- sending ---------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        """Queue one message and write as much as the socket takes now.

        ``frames`` are bytes-like objects (bytes, memoryview, C-contiguous numpy arrays,
        ``zmq.Frame``); they are referenced, not copied, until written.

        Raises:
            LinkClosed: the other end is gone.
        """
        views = [f if type(f) is bytes else memoryview(f).cast("B") for f in frames]
        lengths = [len(v) for v in views]
        count, size = len(lengths), sum(lengths)
        head_struct = _HEADS.get(count) or _head_struct(count)
        head = head_struct.pack(4 + 4 * count + size, count, *lengths)
        if self._queue:  # keep the order: behind what is already waiting
            self._queue.append(memoryview(head))
            self._queue.extend(memoryview(v) for v in views if len(v))
            return
        buffers = [head, *views]
        total = len(head) + size
        try:
            sent = self.sock.sendmsg(buffers) if len(buffers) <= _MAX_IOV else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise LinkClosed(f"link closed: {exc}") from exc
        if sent < total:
            self._queue = _skip([memoryview(b) for b in buffers if len(b)], sent)
            self.flush()

    def flush(self) -> bool:
        """Write queued bytes; True once the queue is empty.

        Raises:
            LinkClosed: the other end is gone.
        """
        while self._queue:
            try:
                sent = self.sock.sendmsg(self._queue[:_MAX_IOV])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise LinkClosed(f"link closed: {exc}") from exc
            self._queue = _skip(self._queue, sent)
        return True

    def send_all(self, frames: list[Any], timeout: float | None = None) -> None:
        """Send one message and wait until it is written (the worker's blocking send).

        Raises:
            LinkClosed: the other end is gone.
            TimeoutError: not written within ``timeout`` seconds.
        """
        self.send(frames)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.flush():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("the link's other end does not read")
            _wait(self._poll_out, remaining)

    # --- receiving ---------------------------------------------------------------------------------

    def receive(self) -> list[list[Any]]:
        """The messages complete so far (perhaps none): one ``recv`` per call.

        Each message is a list of frames: the first three as ``bytes``, the rest as
        writeable memoryviews of a buffer of their own (arrays decoded from them are
        writeable, as from zmq frames received without a copy).

        Raises:
            LinkClosed: the other end closed the link.
            ProtocolError: a malformed or oversized message (the link is unusable after it).
        """
        if self._big is not None:
            return self._receive_big()
        if self._end == _SCRATCH:  # compact: move the partial message to the front
            rest = self._scratch[self._start:self._end]
            self._scratch[:len(rest)] = rest
            self._start, self._end = 0, len(rest)
        n = self._recv_into(memoryview(self._scratch)[self._end:])
        if not n:
            return []
        self._end += n
        messages = []
        scratch = self._scratch
        while self._end - self._start >= 4:
            size = _U32.unpack_from(scratch, self._start)[0]
            if size > self.max_message_size:
                raise ProtocolError(f"a message of {size} bytes on the link exceeds the limit of "
                                    f"{self.max_message_size} bytes")
            have = self._end - self._start - 4
            if have >= size:
                begin = self._start + 4
                messages.append(_parse(scratch[begin:begin + size]))  # a slice: a copy of its own
                self._start = begin + size
                continue
            if size + 4 > _SCRATCH:  # too big for the scratch buffer: read it into its own
                self._big = bytearray(size)
                self._big[:have] = scratch[self._start + 4:self._end]
                self._big_got = have
                self._start = self._end = 0
            break
        if self._start == self._end:
            self._start = self._end = 0
        return messages

    def _receive_big(self) -> list[list[Any]]:
        big = self._big
        assert big is not None
        view = memoryview(big)
        while self._big_got < len(big):  # as far as the writer got: fewer polls per message
            n = self._recv_into(view[self._big_got:])
            if not n:
                return []
            self._big_got += n
        self._big = None
        return [_parse(big)]

    def _recv_into(self, view: memoryview) -> int:
        """Bytes read into ``view`` (not empty); 0 when none are there now.

        Raises:
            LinkClosed: the other end closed the link.
        """
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise LinkClosed(f"link closed: {exc}") from exc
        if n == 0:
            raise LinkClosed("the other end closed the link")
        return n

    def wait(self, timeout: float | None) -> list[list[Any]]:
        """Block until at least one message is complete or ``timeout`` seconds pass (the worker's recv).

        Raises:
            LinkClosed, ProtocolError: as :meth:`receive`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Poll first: the next message is usually not there yet, and a recv that finds
            # nothing costs an exception on top of the poll.
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return self.receive()
            _wait(self._poll_in, remaining)
            messages = self.receive()
            if messages:
                return messages

    def close(self) -> None:
        self._queue = []
        self.sock.close()


def _parse(body: bytearray) -> list[Any]:
    """Split one message body into its frames."""
    if len(body) < 4:
        raise ProtocolError("a link message without a frame count")
    count = _U32.unpack_from(body, 0)[0]
    offset = 4 + 4 * count
    if count == 0 or offset > len(body):
        raise ProtocolError(f"a link message claims {count} frames")
    lengths = struct.unpack_from(f"<{count}I", body, 4)
    if offset + sum(lengths) != len(body):
        raise ProtocolError("a link message's frame lengths do not add up to its size")
    view = memoryview(body)
    frames: list[Any] = []
    for i, length in enumerate(lengths):
        frame = view[offset:offset + length]
        frames.append(bytes(frame) if i < _AS_BYTES else frame)
        offset += length
    return frames


def _skip(buffers: list[memoryview], sent: int) -> list[memoryview]:
    """``buffers`` less their first ``sent`` bytes."""
    i = 0
    while i < len(buffers) and sent >= len(buffers[i]):
        sent -= len(buffers[i])
        i += 1
    rest = buffers[i:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


def _wait(poller: Any, timeout: float | None) -> None:
    poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))


class LinkTransport:
    """A worker's :class:`~remoterl.io.transport.Transport` over a link to the embedded broker.

    Args:
        link: the worker's end.
        send_timeout: seconds a send may wait for the broker to read; past that the broker
            is as good as gone (:class:`LinkClosed`).
    """

    def __init__(self, link: Link, send_timeout: float) -> None:
        self.link = link
        self.send_timeout = send_timeout
        self._inbox: list[list] = []  # messages read, not yet taken (last first)

    def send(self, frames: list) -> None:
        try:
            self.link.send_all(frames, timeout=self.send_timeout)
        except TimeoutError as exc:
            raise LinkClosed(f"the broker has not read our link for {self.send_timeout:g} s") from exc

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def receive(self, timeout: float) -> list | None:
        if not self._inbox:
            try:
                self._inbox = self.link.wait(timeout)
            except ProtocolError as exc:  # garbled: nothing after it can be trusted
                raise LinkClosed(f"the link broke: {exc}") from exc
            if not self._inbox:
                return None
            self._inbox.reverse()
        return self._inbox.pop()

    def drop_received(self) -> None:
        """Forget messages read but not taken (the session they belong to ended)."""
        self._inbox = []

    def close(self, goodbye: list | None = None) -> None:
        try:
            if goodbye is not None:
                self.link.send(goodbye)  # best effort: no wait
            self.link.flush()
        except LinkClosed:
            pass
        self.link.close()
