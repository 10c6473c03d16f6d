"""ws:// and wss:// for code that speaks zmq: a local gateway from ``inproc://`` to a WebSocket.

``Client`` and ``WorkerLoop`` open DEALER sockets and ``connect(url)``. For a WebSocket
broker they connect instead to the ``inproc://`` endpoint that :func:`gateway_endpoint`
returns: a ROUTER in a gateway thread of this process. Each local DEALER (known by its
routing id) gets its own WebSocket connection to the broker's bridge, opened on its
first message, so the bridge gives it its own routing id at the broker and the
protocol is unchanged (a trainer's main socket and its heartbeat socket are two
connections, as over tcp). One multipart message ⇄ one binary WebSocket message
(docs/WEBSOCKET.md).

Rules:

* messages wait in a per-peer queue while the connection opens (at most
  ``_QUEUE_LIMIT``; a peer over it loses its connection, logged);
* a connection that fails or closes is forgotten (logged with its close code); the
  peer's next message opens a new one, which the broker sees as a new peer;
* after forwarding a DISCONNECT the gateway closes that peer's connection;
  a connection that only ever carried heartbeats is closed after
  ``_HEARTBEAT_IDLE`` seconds of silence (its socket is gone: heartbeat sockets ping
  every second or so); a reply for a local peer that no longer exists closes its
  connection (the ROUTER is ``ROUTER_MANDATORY``);
* ``wss://`` verifies the server's certificate and host name against the system's
  CAs plus ``ca_file`` (or ``$REMOTERL_TLS_CA``), e.g. a self-signed certificate.

One gateway per process, URL, CA file and zmq context; thread-safe; a forked child
starts its own (the parent's thread does not exist there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import zmq
from websockets.asyncio.client import connect

from remoterl.errors import ProtocolError
from remoterl.io.loopsocket import LoopSocket, run_loop, write_now
from remoterl.wire import protocol as p
from remoterl.wire import wsframes as _wsframes
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["close_gateways", "gateway_endpoint", "resolve_endpoint"]

log = logging.getLogger(__name__)

_ZMQ_SCHEMES = ("tcp", "ipc", "inproc")
_WS_SCHEMES = ("ws", "wss")
_QUEUE_LIMIT = 1000  # messages per local peer waiting for its WebSocket
_HEARTBEAT_IDLE = 30.0
_START_TIMEOUT = 10.0
_OPEN_TIMEOUT = 10.0
_DISCONNECTS = (p.client_frame(C.DISCONNECT), p.worker_frame(W.DISCONNECT))
_HEARTBEATS = (p.client_frame(C.HEARTBEAT), p.worker_frame(W.HEARTBEAT))

_lock = threading.Lock()
_gateways: dict[tuple, _Gateway] = {}
_pid = os.getpid()


def resolve_endpoint(url: str, **kw: Any) -> str:
    """The endpoint a zmq socket should connect to for a broker ``url``.

    ``tcp://``, ``ipc://`` and ``inproc://`` are returned unchanged; ``ws://`` and
    ``wss://`` go through :func:`gateway_endpoint` (``kw``: its keyword arguments).

    Raises:
        ValueError: any other scheme.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in _ZMQ_SCHEMES:
        return url
    if scheme in _WS_SCHEMES:
        return gateway_endpoint(url, **kw)
    raise ValueError(f"unsupported broker URL {url!r}: use tcp://HOST:PORT, ws://HOST:PORT or "
                     f"wss://HOST:PORT (ipc:// and inproc:// also work for local brokers)")


def gateway_endpoint(url: str, *, ca_file: str | None = None, context: zmq.Context | None = None) -> str:
    """Start (once) a gateway to the WebSocket broker ``url``; return its ``inproc://`` endpoint.

    Connect zmq DEALER sockets of ``context`` to the endpoint as if it were the broker.

    Args:
        url: ``ws://HOST:PORT[/path]`` or ``wss://…``.
        ca_file: a PEM file of extra certificates to trust for wss:// (default
            ``$REMOTERL_TLS_CA``).
        context: the zmq context of the sockets that will connect
            (``zmq.Context.instance()`` by default, as ``Client`` and ``WorkerLoop`` use).

    Raises:
        ValueError: not a ws:// or wss:// URL.
        OSError, ssl.SSLError: ``ca_file`` cannot be read.
        RuntimeError: the gateway thread did not start.
    """
    global _pid
    parts = urlsplit(url)
    if parts.scheme.lower() not in _WS_SCHEMES or not parts.hostname:
        raise ValueError(f"not a WebSocket broker URL: {url!r} (expected ws://HOST:PORT or wss://HOST:PORT)")
    ca_file = ca_file or os.environ.get("REMOTERL_TLS_CA") or None
    ctx = context or zmq.Context.instance()
    with _lock:
        if os.getpid() != _pid:  # forked: the parent's gateway threads do not exist here
            _gateways.clear()
            _pid = os.getpid()
        key = (url, ca_file, ctx.underlying)
        gateway = _gateways.get(key)
        if gateway is None or not gateway.alive:
            ssl_context = None
            if parts.scheme.lower() == "wss":
                ssl_context = ssl.create_default_context()  # verifies the chain and the host name
                if ca_file:
                    ssl_context.load_verify_locations(cafile=ca_file)
            gateway = _Gateway(url, ssl_context, ctx, _display(parts))
            gateway.start()
            _gateways[key] = gateway
        return gateway.endpoint


def close_gateways(timeout: float = 2.0) -> None:
    """Stop every gateway of this process (their WebSocket connections close). Bounded."""
    with _lock:
        gateways = list(_gateways.values()) if os.getpid() == _pid else []
        _gateways.clear()
    for gateway in gateways:
        gateway.stop(timeout)


def _display(parts: Any) -> str:
    """The URL without credentials (``ws://user:secret@host`` must not reach logs)."""
    host = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(eq=False)
class _Link:
    """One local peer's WebSocket connection."""

    peer: bytes
    queue: asyncio.Queue
    last_in: float
    heartbeats_only: bool = True
    task: asyncio.Task | None = None
    ws: Any = None  # the connection once open


class _Gateway:
    """A ROUTER at an inproc endpoint and one WebSocket per local peer, on an asyncio loop thread."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None, context: zmq.Context, display: str) -> None:
        self.connect_url = url
        self.url = display  # for logs and names: without user:password@
        self.ssl_context = ssl_context
        # The URL in the name makes "no broker answered at inproc://…" errors say where.
        self.endpoint = f"inproc://remoterl-ws-{uuid.uuid4().hex[:12]}/{display}"
        self._ctx = context
        self._links: dict[bytes, _Link] = {}
        self._router: LoopSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="remoterl-ws-gateway", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            raise RuntimeError(f"the WebSocket gateway for {self.url} did not start within {_START_TIMEOUT:g} s")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            run_loop(self._main())
        except asyncio.CancelledError:  # stop()
            pass
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("WebSocket gateway for %s failed", self.url)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        router = self._ctx.socket(zmq.ROUTER)  # the peers' context: inproc reaches no other
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply for a vanished peer raises instead of vanishing
        router.setsockopt(zmq.SNDHWM, _QUEUE_LIMIT)
        router.setsockopt(zmq.RCVHWM, _QUEUE_LIMIT)
        router.bind(self.endpoint)
        self._router = LoopSocket(self._loop, router, self._from_local)
        self._ready.set()
        log.info("WebSocket gateway %s → %s", self.endpoint, self.url)
        reaper = asyncio.create_task(self._reap())
        try:
            await self._loop.create_future()  # serve until stop() cancels this task
        finally:
            reaper.cancel()
            links = list(self._links.values())
            for link in links:
                self._drop(link)
            await asyncio.gather(*(link.task for link in links if link.task), return_exceptions=True)
            self._router.close(linger=0)

    def _from_local(self, msg: list) -> None:
        """A message from a local peer: queue it on that peer's link (opening one if needed)."""
        if len(msg) < 2:
            return
        peer = msg[0]
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link(peer, asyncio.Queue(), 0.0)
            link.task = asyncio.create_task(self._run_link(link))
        elif link.queue.qsize() >= _QUEUE_LIMIT:
            log.warning("ws gateway %s: local peer %s has %d messages waiting; dropping its connection",
                        self.url, peer.hex()[:12], _QUEUE_LIMIT)
            self._drop(link)
            return
        frame0 = msg[1]
        link.last_in = self._loop.time()
        if frame0 not in _HEARTBEATS:
            link.heartbeats_only = False
        data = _wsframes.pack(msg[1:])
        # Straight out when nothing is queued before it (the connection is open and idle).
        if link.ws is None or not link.queue.empty() or not write_now(link.ws, data):
            link.queue.put_nowait(data)
        if frame0 in _DISCONNECTS:
            link.queue.put_nowait(None)  # the writer closes the connection after sending it

    def _drop(self, link: _Link) -> None:
        """Forget ``link``; its task closes the connection (the next message opens a new one)."""
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        if link.task is not None and not link.task.done() and link.task is not asyncio.current_task():
            link.task.cancel()

    async def _reap(self) -> None:
        """Close connections that only carried heartbeats and went quiet (their socket is gone)."""
        while True:
            await asyncio.sleep(_HEARTBEAT_IDLE / 4)
            now = asyncio.get_running_loop().time()
            for link in list(self._links.values()):
                if link.heartbeats_only and now - link.last_in > _HEARTBEAT_IDLE:
                    log.debug("ws gateway %s: closing the idle heartbeat connection of %s",
                              self.url, link.peer.hex()[:12])
                    self._drop(link)

    # --- one link ---------------------------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        name = f"{self.url} (local peer {link.peer.hex()[:12]})"
        try:
            ws = await connect(self.connect_url, ssl=self.ssl_context, compression=None, max_size=None,
                               open_timeout=_OPEN_TIMEOUT, close_timeout=2.0)
        except Exception as exc:  # refused, TLS, HTTP status, timeout...: the peer's request times out
            log.warning("ws gateway: cannot connect to %s: %s", name, exc)
            self._drop(link)
            return
        log.debug("ws gateway: connected %s", name)
        link.ws = ws
        writer = asyncio.create_task(self._write(link, ws))
        reader = asyncio.create_task(self._read(link, ws, name))
        lost = False
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            # The writer ends after a DISCONNECT, the reader when the local peer is gone (True):
            # both expected. Anything else (closed by the broker, network, errors) is worth a warning.
            lost = not (writer in done and writer.exception() is None
                        or reader in done and reader.exception() is None and reader.result())
        finally:  # also on cancel (dropped, gateway stopping): close this connection
            writer.cancel()
            reader.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            self._drop(link)
            try:
                await asyncio.wait_for(ws.close(), 3.0)
            except asyncio.CancelledError:
                ws.transport.abort()
                raise
            except Exception:
                ws.transport.abort()
            if lost:
                log.warning("ws gateway: connection %s lost (close code %s%s)", name, ws.close_code,
                            f", {ws.close_reason}" if ws.close_reason else "")
            else:
                log.debug("ws gateway: %s closed (code %s)", name, ws.close_code)

    async def _write(self, link: _Link, ws: Any) -> None:
        get, send = link.queue.get, ws.send
        while True:
            data = await get()
            if data is None:  # the peer said DISCONNECT: nothing more will come
                return
            await send(data)

    async def _read(self, link: _Link, ws: Any, name: str) -> bool:
        """Broker → local peer until the connection ends; True when the local peer is gone."""
        router = self._router
        assert router is not None
        send, unpack, head = router.send_nowait, _wsframes.unpack, [link.peer]
        async for data in ws:
            if type(data) is str:
                log.warning("ws gateway: %s sent a text message; closing", name)
                return False
            try:
                frames = unpack(data)
            except ProtocolError as exc:
                log.warning("ws gateway: %s sent a badly framed message (%s); closing", name, exc)
                return False
            try:
                send(head + frames)
            except zmq.Again:
                log.warning("ws gateway: local peer of %s does not read; dropping a message", name)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:  # the local socket is closed
                    log.debug("ws gateway: local peer of %s is gone; closing", name)
                    return True
                raise
        return False
