"""Per-message I/O for the WebSocket bridge and gateway: zmq and websockets on one asyncio loop.

**LoopSocket**: a plain pyzmq socket driven by an asyncio loop, a reader callback instead of futures.

``zmq.asyncio`` resolves one future per message and schedules a follow-up check after
every call; on the WebSocket bridge's per-message path that cost more than the
WebSocket itself (measured: an inproc echo through a zmq.asyncio ROUTER 47–90 µs per
round trip, through this 34–49 µs, a plain blocking thread 31–51 µs). Here the loop
watches the socket's file descriptor and calls ``on_message(frames)`` for every
message, with no future and no task in between.

ZeroMQ's descriptor is edge-triggered: it signals "something changed", and any
``send``/``recv`` may consume that signal. So the callback drains while ``EVENTS``
says POLLIN, and every send here checks ``EVENTS`` again and schedules a drain when a
message is waiting (what ``zmq.asyncio`` does after each call).

Flow control: :meth:`pause` stops delivering (messages stay in the socket, bounded by
its RCVHWM); :meth:`resume` starts again. :meth:`send` waits for POLLOUT when the
socket is at its SNDHWM.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import zmq
from websockets.protocol import State

__all__ = ["LoopSocket", "bounded", "run_loop", "write_now"]

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_AS_BYTES = 4

log = logging.getLogger(__name__)


class LoopSocket:
    """Deliver ``sock``'s messages to ``on_message`` from ``loop``; send without blocking the loop.

    Create, use and close it on the loop's thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket,
                 on_message: Callable[[list], Any]) -> None:
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.paused = False
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._writable: asyncio.Future | None = None
        self._closed = False
        loop.add_reader(self._fd, self._drain)
        self._kick()  # messages may already be waiting (the edge came before add_reader)

    def send_nowait(self, frames: list) -> None:
        """Send one multipart message now.

        Raises:
            zmq.Again: the socket is at its SNDHWM.
            zmq.ZMQError: e.g. EHOSTUNREACH from a ``ROUTER_MANDATORY`` socket.
        """
        send, last = self.sock.send, len(frames) - 1
        # The first frame decides (ROUTER: the peer; DEALER: HWM): later frames cannot fail.
        for i, frame in enumerate(frames):
            send(frame, _SNDMORE_NOBLOCK if i < last else _NOBLOCK, copy=False)
        self._check()

    async def send(self, frames: list) -> None:
        """Send one multipart message; wait (without blocking the loop) while the socket is full."""
        while True:
            try:
                self.send_nowait(frames)
                return
            except zmq.Again:
                if self._closed:
                    raise
                self._writable = self.loop.create_future()
                self._kick()
                try:
                    await self._writable
                finally:
                    self._writable = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._kick()

    def close(self, linger: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._fd)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self.sock.close(linger=linger)

    # --- internals ------------------------------------------------------------------------

    def _check(self) -> None:
        # A send may have consumed the descriptor's edge while a message arrived.
        if not self._closed and self.sock.getsockopt(_EVENTS) & _POLLIN and not self.paused:
            self._kick()

    def _kick(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock, deliver = self.sock, self.on_message
        recv, more = sock.recv, sock.getsockopt
        events = sock.getsockopt(_EVENTS)
        while events & _POLLIN and not self.paused:
            # Routing, signature and header frames as bytes (cheaper when small); payloads
            # as zmq.Frame (no copy), as remoterl.io.zmqio.recv_frames does.
            frames = [recv(_NOBLOCK)]
            while more(_RCVMORE):
                frames.append(recv(_NOBLOCK, copy=len(frames) < _AS_BYTES))
            try:
                deliver(frames)
            except Exception:  # a bug in a callback must not silence the socket
                log.exception("error handling a message from a zmq socket")
            if self._closed:
                return
            events = sock.getsockopt(_EVENTS)
        if events & _POLLOUT and self._writable is not None and not self._writable.done():
            self._writable.set_result(None)


def run_loop(main: Any) -> Any:
    """``asyncio.run(main)`` on a selector loop (Windows' default proactor loop has no ``add_reader``)."""
    loop = asyncio.SelectorEventLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


# --- WebSocket sends without a coroutine when nothing can wait ----------------------------------------

_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11: no extra task per bounded await


async def bounded(awaitable: Any, seconds: float) -> Any:
    """Await ``awaitable`` for at most ``seconds``.

    Raises:
        TimeoutError: it took longer (it is cancelled).
    """
    if _timeout is not None:
        async with _timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover (Python 3.10)


def write_now(ws: Any, data: bytes) -> bool:
    """Send ``data`` as one binary message on a ``websockets.asyncio`` connection, if it cannot wait.

    ``await ws.send(data)`` does the same through an async context manager and a drain,
    a large part of the per-message cost (with LoopSocket, this took a small message's
    round trip through gateway and bridge from ~560 µs to ~330 µs). When the connection is open and its
    transport has nothing buffered, sending cannot wait, so this writes the frame through
    the connection's Sans-I/O protocol (``send_binary``, ``data_to_send``) and its
    transport directly. Returns False when it did nothing: then use ``await ws.send``,
    which waits for the buffer to drain (flow control and close handling stay its own).
    """
    try:
        protocol, transport = ws.protocol, ws.transport
        if protocol.state is not State.OPEN or transport.get_write_buffer_size() or transport.is_closing():
            return False
        protocol.send_binary(data)
        for chunk in protocol.data_to_send():
            transport.write(chunk)
        return True
    except AttributeError:  # pragma: no cover (a websockets version without these attributes)
        return False


