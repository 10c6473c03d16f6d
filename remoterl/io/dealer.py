"""The one DEALER factory: sockets to a broker, with credentials, and a first answer awaited.

Trainers (:class:`~remoterl.client.connection.Client`), workers
(:class:`~remoterl.workers.loop.WorkerLoop`), their heartbeat sockets
(:mod:`remoterl.io.heartbeat`) and ``remoterl status`` all reach a broker through
:func:`dealer`; the ones that say something first and wait for the answer use
:func:`connect_dealer`, which watches the ZeroMQ handshake meanwhile so a refused key is
an :class:`~remoterl.errors.AuthenticationError` at once, and :func:`no_answer_hint` says
what to check when nothing answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from remoterl.io.security import apply_client_security, has_handshake, uses_plain

__all__ = ["connect_dealer", "dealer", "no_answer_hint"]

log = logging.getLogger(__name__)


def dealer(context: zmq.Context, endpoint: str, *, serverkey: str | bytes | None = None,
           api_key: str | None = None, options: tuple[tuple[int, Any], ...] = (), connect: bool = True) -> zmq.Socket:
    """A DEALER to ``endpoint`` with LINGER 0, ``options`` and the credentials of
    :func:`~remoterl.io.security.apply_client_security` (``api_key``: PLAIN, for tcp/ipc).

    Args:
        connect: connect it now (False: the caller connects, e.g. after attaching a monitor).
    """
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        for option, value in options:
            sock.setsockopt(option, value)
        apply_client_security(sock, endpoint, serverkey, api_key)
        if connect:
            sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def connect_dealer(context: Any, url: str, endpoint: str, first: list, timeout: float, *,
                   api_key: str | None = None, serverkey: str | bytes | None = None,
                   options: tuple[tuple[int, Any], ...] = (),
                   stop: Callable[[], bool] | None = None, seen: set[str] | None = None) -> tuple[Any, bool] | None:
    """A DEALER connected to the broker at ``url`` that sent ``first`` and has an answer to read.

    The one place where trainers, workers and ``remoterl status`` meet the handshake:
    credentials per :func:`apply_client_security`, then, while waiting for the first
    answer, a socket monitor tells a refused handshake from a silent broker.

    * A key-mode broker refused the API key (ZAP status 400): :class:`AuthenticationError`.
    * Mechanism mismatch without a key (a key-mode or CURVE broker): AuthenticationError
      saying the broker requires an API key (or its CURVE public key).
    * Mechanism mismatch with PLAIN: the broker runs without API keys (open mode, which
      ignores keys), or uses CURVE. The socket is replaced by one without PLAIN credentials
      and ``first`` sent again, so a key in ``$REMOTERL_API_KEY`` keeps working against
      open brokers (the embedded default's tcp address included) as it did before the
      handshake check; it costs that connect 0.1-0.2 s on loopback (libzmq mostly reports
      the mismatch as a closed connection: see _CLOSED_IN_HANDSHAKE). A NULL connection
      never gets past a key-mode broker, so this cannot downgrade one.
    * Mismatch with CURVE: the broker does not use CURVE.
    * The broker closing the connection during the handshake twice in a row: taken as a
      mismatch (what it mostly is; also what a port that is not a broker looks like).

    Args:
        context: the zmq context.
        url: the broker's URL, for messages.
        endpoint: what to connect to (``resolve_endpoint(url)``).
        first: the message to send (HELLO, READY, a status request).
        timeout: seconds to wait for an answer.
        api_key, serverkey: credentials (see :func:`apply_client_security`).
        options: ``(option, value)`` pairs set on the socket before connecting.
        stop: polled every 0.1 s; True gives up (returns None).
        seen: filled with how far the connection got (tcp:// and ipc:// only): "refused"
            (a connect attempt failed), "connected" (a peer accepted it), "handshake" (the
            peer speaks ZeroMQ); :func:`no_answer_hint` turns it into advice.

    Returns:
        ``(socket, plain)`` with an answer waiting on the socket (``plain``: PLAIN credentials
        got it through; side sockets to the same broker should use them too), or None when
        nothing answered within ``timeout`` (the socket is closed then).

    Raises:
        AuthenticationError: the handshake was refused (the message never includes the key).
        zmq.ZMQError: an endpoint zmq cannot connect to.
    """
    deadline = time.monotonic() + timeout
    use_key = bool(api_key)
    while True:
        key = api_key if use_key else None
        sock = dealer(context, endpoint, serverkey=serverkey, api_key=key, options=options, connect=False)
        plain = uses_plain(endpoint, serverkey, key)
        try:
            outcome = _first_answer(sock, url, endpoint, first, deadline, plain, api_key, serverkey, stop,
                                    seen if seen is not None else set())
        except BaseException:
            sock.close(0)
            raise
        if outcome is True:
            return sock, plain
        sock.close(0)
        if outcome is None:
            return None
        use_key = False  # mechanism mismatch with PLAIN: an open broker; once more without credentials
        log.debug("the broker at %s speaks no PLAIN; connecting without handshake credentials", url)


def no_answer_hint(url: str, seen: set[str]) -> str:
    """What to check when nothing answered at ``url``, from what :func:`connect_dealer` saw
    (whole sentences, ending in their own punctuation)."""
    where = url.split("://", 1)[-1]
    if "handshake" in seen:
        return (f"a ZeroMQ peer at {where} took the connection but did not answer as a remoterl broker: is it "
                f"the broker's --bind address (not a worker's or another service's port), and is the broker "
                f"overloaded or stopped (`remoterl status --broker {url}`)?")
    if "connected" in seen:
        return (f"something at {where} accepted the connection but does not speak ZeroMQ: if it is the "
                f"broker's WebSocket bridge (--ws), use ws://{where}; else check the port.")
    if "refused" in seen:
        return (f"nothing accepts connections at {where} (connection refused): is remoterl-broker running "
                f"there, and is this the port of its --bind (default 5555)?")
    if url.startswith(("tcp://", "ipc://")):
        return (f"no connection to {where} could be made: check the host name, the network path and firewalls "
                f"between here and the broker.")
    return f"is a broker serving {url}?"


_MISMATCH = object()
# Handshakes in a row that the peer cut short before we call it a refusal (libzmq reconnects
# every 100 ms, so about 0.1 s). A PLAIN server meeting a NULL client (or the reverse) closes
# the connection; the client mostly sees the close (EPIPE) before the server's greeting
# (measured on loopback: 1 in 5-15 attempts reports the mismatch itself).
_CLOSED_IN_HANDSHAKE = 2


def _first_answer(sock: Any, url: str, endpoint: str, first: list, deadline: float, plain: bool,
                  api_key: str | None, serverkey: str | bytes | None, stop: Callable[[], bool] | None,
                  seen: set[str]) -> Any:
    """Connect, send ``first`` and wait: True (an answer is waiting), None (timeout or stop),
    or _MISMATCH (PLAIN met a broker without it). Raises AuthenticationError."""
    from zmq.utils.monitor import recv_monitor_message

    from remoterl.errors import AuthenticationError

    events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
    monitor = sock.get_monitor_socket(events) if has_handshake(endpoint) else None
    try:
        sock.connect(endpoint)
        sock.send_multipart(first)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        closed = 0  # connections the broker closed during the handshake
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop()):
                return None
            ready = dict(poller.poll(min(left, 0.1) * 1000 if stop is not None else left * 1000))
            if sock in ready:
                return True
            if monitor is None or monitor not in ready:
                continue
            message = recv_monitor_message(monitor)
            event, value = message["event"], message["value"]
            if event == zmq.EVENT_CONNECTED:
                seen.add("connected")
            elif event == zmq.EVENT_CONNECT_RETRIED:
                seen.add("refused")
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # from here on only the answer matters
                seen.add("handshake")
                poller.unregister(monitor)
                sock.disable_monitor()
                monitor.close(0)
                monitor = None
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationError(
                    f"the broker at {url} refused this API key at the connection handshake (ZAP status "
                    f"{value}): wrong or revoked key; check api_key= / --api-key / $REMOTERL_API_KEY")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                if plain:
                    return _MISMATCH
                raise _mismatch(url, api_key, serverkey, sure=True)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and serverkey:
                raise AuthenticationError(f"the CURVE handshake with the broker at {url} failed (protocol error "
                                          f"{value:#x}): is curve_serverkey the broker's public key?")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # The peer closed the connection during the handshake. Mostly a mechanism
                # mismatch that the broker noticed first (then our next write fails: EPIPE or
                # ECONNRESET, before we read its greeting); once in a while a broker stopping.
                # libzmq reconnects every 100 ms: a few in a row are a refusal.
                closed += 1
                log.debug("handshake with %s: connection closed (errno %s), %d time(s)", url, value, closed)
                if closed >= _CLOSED_IN_HANDSHAKE:
                    if plain:
                        return _MISMATCH
                    raise _mismatch(url, api_key, serverkey, sure=False)
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(0)


def _mismatch(url: str, api_key: str | None, serverkey: str | bytes | None, sure: bool) -> Exception:
    """The error for a broker that will not take this connection's mechanism (NULL or CURVE;
    PLAIN falls back to NULL before this): ``sure`` when libzmq said mechanism mismatch, else
    the broker kept closing the connection during the handshake."""
    from remoterl.errors import AuthenticationError

    other = "" if sure else ", or it is not a remoterl broker"
    if serverkey:
        return AuthenticationError(
            f"the broker at {url} refused the CURVE handshake: it does not use CURVE (it runs without "
            f"--curve-secret: don't pass its public key), or curve_serverkey is not its public key{other}")
    if api_key:  # PLAIN was refused first, and no credentials are either: CURVE
        return AuthenticationError(
            f"the broker at {url} refused the connection with and without the API key at the handshake: it "
            f"uses CURVE (give its public key: curve_serverkey= / --curve-serverkey / "
            f"$REMOTERL_CURVE_SERVERKEY){other}")
    return AuthenticationError(
        f"the broker at {url} refused the connection: it requires an API key (api_key= / --api-key / "
        f"$REMOTERL_API_KEY), or uses CURVE (then give its public key: curve_serverkey= / "
        f"--curve-serverkey / $REMOTERL_CURVE_SERVERKEY){other}")
