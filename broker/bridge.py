"""The WebSocket bridge: WebSocket peers become ordinary DEALER peers of the broker.

The broker core never sees a WebSocket. For each WebSocket connection the bridge
opens one zmq DEALER to the broker's ROUTER (over an ``inproc://`` endpoint that
:class:`~remoterl.broker.loop.Broker` also binds) with a fresh routing id, and
shuttles messages both ways: one binary WebSocket message ⇄ one multipart message,
framed as docs/WEBSOCKET.md describes. Heartbeats, slots and errors are the core's,
exactly as for a tcp:// peer.

Rules this loop implements:

* **Routing ids** are ``0x01`` + 15 random bytes: never equal to libzmq's automatic
  ids (they start with ``0x00``) nor to remoterl's own explicit ids (``"C"``/``"W"``).
  WELCOME's ``you`` tells the peer which id the broker sees, for its heartbeats.
* **Bad input closes that connection only**: a text message gets close code 1003, a
  message whose framing is broken 1007, one over ``max_size`` 1009 (websockets);
  nothing a peer sends can stop the bridge or the broker.
* **Bounded memory and no stalls**: the server reads at most ``max_message_size`` (plus
  framing) per message; each DEALER queues at most ``queue_limit`` messages each way
  (the broker's ROUTER drops what a full peer cannot take; it never blocks); a send to
  a peer that does not read within ``send_timeout`` closes that peer with code 1013.
* **A connection that ends frees its slots at once**: the bridge sends DISCONNECT on
  its behalf (client or worker, by the signature of the first message it sent), so the
  broker does not wait for the heartbeat expiry.

Everything runs on one asyncio loop in a daemon thread; the DEALERs are plain sockets
of the broker's context driven by that loop (:class:`~remoterl.io.loopsocket.LoopSocket`,
cheaper per message than ``zmq.asyncio``). :meth:`WsBridge.stop` is bounded. Message
contents are never logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
import threading

import zmq
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from remoterl.errors import ProtocolError
from remoterl.io.loopsocket import LoopSocket, bounded, run_loop, write_now
from remoterl.wire import protocol as p
from remoterl.wire import wsframes
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["WsBridge"]

log = logging.getLogger(__name__)

# DISCONNECT as each kind of peer says it (docs/PROTOCOL.md §3.1, command 0x08).
_FAREWELL = {
    p.RL_CLIENT[:3]: [p.client_frame(C.DISCONNECT), p.encode_header({})],
    p.RL_WORKER[:3]: [p.worker_frame(W.DISCONNECT)],
}
_SLOW = "remoterl: peer too slow (send queue full)"
# Room for the 4-byte length prefixes, so every message the broker accepts fits one WebSocket message.
_FRAMING_ALLOWANCE = 4 * wsframes.MAX_FRAMES
_START_TIMEOUT = 10.0


class WsBridge:
    """Serve the broker's protocol over WebSocket (``ws://`` or, with ``ssl_context``, ``wss://``).

    Args:
        host: address to listen on (``"0.0.0.0"`` for every interface).
        port: TCP port; 0 picks a free one (read it from :meth:`start`'s URL).
        broker_endpoint: an endpoint the broker's ROUTER binds, normally
            ``inproc://…`` (pass the same ``context`` as the broker's).
        ssl_context: a server-side ``ssl.SSLContext`` (certificate loaded) for wss://.
        max_message_size: the broker's limit; larger WebSocket messages close the
            connection with 1009.
        context: the zmq context the broker uses (inproc needs the same one);
            ``zmq.Context.instance()`` by default.
        send_timeout: seconds one send to a peer may wait for it to read; then the
            peer is closed with 1013.
        queue_limit: messages each DEALER queues each way (its SNDHWM and RCVHWM).
    """

    def __init__(self, host: str, port: int, broker_endpoint: str, *, ssl_context: ssl.SSLContext | None = None,
                 max_message_size: int = p.MAX_MESSAGE_SIZE, context: zmq.Context | None = None,
                 send_timeout: float = 10.0, queue_limit: int = 1000) -> None:
        self.host = host
        self.port = port
        self.broker_endpoint = broker_endpoint
        self.ssl_context = ssl_context
        self.max_message_size = max_message_size
        self.send_timeout = send_timeout
        self.queue_limit = queue_limit
        self.url: str | None = None
        # connections, closed_slow, closed_malformed, disconnects_sent, ... (read from any thread)
        self.counters: collections.Counter = collections.Counter()
        self._ctx = context or zmq.Context.instance()
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def open_connections(self) -> int:
        """WebSocket connections being served now."""
        return self._open

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> str:
        """Listen in a daemon thread; return the URL actually bound (``ws://host:port``).

        Raises:
            OSError: the address cannot be bound (in use, not local...).
            RuntimeError: already started, or the server did not come up in time.
        """
        if self._thread is not None:
            raise RuntimeError("this WsBridge was already started")
        self._thread = threading.Thread(target=self._run, name="remoterl-ws-bridge", daemon=True)
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError(f"the WebSocket bridge did not start within {_START_TIMEOUT:g} s")
        if self._error is not None:
            raise self._error
        assert self.url is not None
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection (code 1001; DISCONNECTs go to the broker) and the server.

        Bounded by ``timeout`` seconds; safe to call twice and from any thread.
        """
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            run_loop(self._serve())
        except BaseException as exc:  # reported by start(); a bug after start is logged
            if not self._started.is_set():
                self._error = exc
                self._started.set()
            else:
                log.exception("WebSocket bridge failed")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await serve(self._handle, self.host, self.port, ssl=self.ssl_context,
                             max_size=self.max_message_size + _FRAMING_ALLOWANCE,
                             compression=None,  # arrays and msgpack compress poorly; deflate costs CPU per message
                             close_timeout=min(self.send_timeout, 5.0))
        sockname = server.sockets[0].getsockname()
        host = sockname[0] if ":" not in sockname[0] else f"[{sockname[0]}]"
        self.url = f"{'wss' if self.ssl_context else 'ws'}://{host}:{sockname[1]}"
        log.info("WebSocket bridge listening on %s for broker %s", self.url, self.broker_endpoint)
        self._started.set()
        await self._stop.wait()
        server.close()  # 1001 to every connection; their handlers send DISCONNECT and close DEALERs
        try:
            await bounded(server.wait_closed(), max(self.send_timeout, 1.0))
        except asyncio.TimeoutError:
            log.warning("WebSocket bridge: connections did not close in time; aborting them")
            for connection in list(server.connections):
                connection.transport.abort()
        log.info("WebSocket bridge on %s stopped", self.url)

    async def _handle(self, ws: ServerConnection) -> None:
        """One connection: a DEALER for it, both directions pumped until the connection ends."""
        peer = b"\x01" + os.urandom(15)
        name = f"{peer.hex()[:12]} ({_address(ws)})"
        # The broker's own context: inproc:// reaches only sockets of the same libzmq context.
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, peer)
        dealer.setsockopt(zmq.SNDHWM, self.queue_limit)
        dealer.setsockopt(zmq.RCVHWM, self.queue_limit)
        pump = _ToPeer(self, ws, name)
        farewell: list | None = None
        sock = None
        self._open += 1
        try:
            dealer.connect(self.broker_endpoint)
            sock = pump.sock = LoopSocket(asyncio.get_running_loop(), dealer, pump.deliver)
            self.counters["connections"] += 1
            log.info("ws peer %s connected", name)
            farewell = await self._to_broker(ws, sock, name)
        finally:
            pump.cancel()
            if farewell is not None and sock is not None:
                # DEALER → inproc ROUTER: the message is in the pipe once send returns, so
                # closing with linger 0 right after does not lose it.
                try:
                    sock.send_nowait(farewell)
                    self.counters["disconnects_sent"] += 1
                except zmq.ZMQError as exc:
                    log.warning("ws peer %s: could not tell the broker it left (%s); its session "
                                "expires after the heartbeat window", name, exc)
            if sock is not None:
                sock.close(linger=0)
            else:
                dealer.close(linger=0)
            self._open -= 1
            log.info("ws peer %s closed (code %s)", name, ws.close_code)

    async def _to_broker(self, ws: ServerConnection, sock: LoopSocket, name: str) -> list | None:
        """WebSocket → broker until the connection ends; return the DISCONNECT to send for it."""
        recv, send_nowait, unpack = ws.recv, sock.send_nowait, wsframes.unpack
        farewell: list | None = None
        first = True
        while True:
            try:
                data = await recv()
            except ConnectionClosed:
                return farewell
            if type(data) is str:
                await self._close_bad(ws, name, 1003, "remoterl: binary messages only")
                return farewell
            try:
                frames = unpack(data)
            except ProtocolError as exc:
                await self._close_bad(ws, name, 1007, f"remoterl: bad framing: {exc}")
                return farewell
            if first:
                first = False
                farewell = _FAREWELL.get(bytes(frames[0][:3]))
            try:
                send_nowait(frames)
            except zmq.Again:  # the DEALER's queue is full: back-pressure on this peer alone
                await sock.send(frames)

    async def _close_bad(self, ws: ServerConnection, name: str, code: int, reason: str) -> None:
        self.counters["closed_malformed"] += 1
        log.warning("ws peer %s: %s; closing it with %d", name, reason, code)
        await self._close(ws, code, reason[:120])  # a close reason must fit 123 bytes

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close handshake, bounded: a peer that does not read cannot hold it open."""
        try:
            await bounded(ws.close(code, reason), max(self.send_timeout, 1.0))
        except asyncio.TimeoutError:
            ws.transport.abort()


class _ToPeer:
    """Broker → one WebSocket peer, called for each message the DEALER receives.

    A message goes out at once when the connection's buffer is empty (:func:`write_now`);
    otherwise the DEALER is paused (messages wait in it, at most ``queue_limit``, then
    the broker drops them) until ``await ws.send`` has taken it, within ``send_timeout``.
    A peer that takes longer is closed with 1013.
    """

    def __init__(self, bridge: WsBridge, ws: ServerConnection, name: str) -> None:
        self.bridge = bridge
        self.ws = ws
        self.name = name
        self.sock: LoopSocket | None = None
        self.sending: asyncio.Task | None = None
        self.pack = wsframes.pack

    def deliver(self, frames: list) -> None:
        data = self.pack(frames)
        if write_now(self.ws, data):
            return
        assert self.sock is not None
        self.sock.pause()
        self.sending = asyncio.get_running_loop().create_task(self._send(data))

    async def _send(self, data: bytes) -> None:
        bridge, ws = self.bridge, self.ws
        try:
            await bounded(ws.send(data), bridge.send_timeout)
        except asyncio.TimeoutError:
            bridge.counters["closed_slow"] += 1
            log.warning("ws peer %s: does not read (a send waited %g s); closing it with 1013",
                        self.name, bridge.send_timeout)
            await bridge._close(ws, 1013, _SLOW)
            return
        except ConnectionClosed:
            return
        self.sending = None
        if self.sock is not None:
            self.sock.resume()

    def cancel(self) -> None:
        if self.sending is not None:
            self.sending.cancel()


def _address(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except Exception:  # a transport without a peer name (tests, unix sockets)
        return "?"
