"""API keys and ZeroMQ CURVE keys: loading, generating, applying to sockets.

Key files:

* API keys (``remoterl-broker --api-keys FILE`` or ``$REMOTERL_API_KEYS``): one
  ``KEY TENANT`` pair a line; blank lines and ``#`` comments are ignored. Keys are
  secrets: nothing here logs them.
* CURVE (``remoterl keygen DIR``): ``broker.key`` holds the public key (give it to
  trainers and workers: ``$REMOTERL_CURVE_SERVERKEY`` or ``curve_serverkey=``) and
  ``broker.key_secret`` the secret one (for ``remoterl-broker --curve-secret``), in
  ZeroMQ's certificate format (``zmq.auth``).

Keys at the ZeroMQ handshake (tcp:// and ipc://): a broker with API keys and no CURVE
is a PLAIN server (ZeroMQ RFC 24) and checks the key itself as the socket's ZAP handler
(RFC 27, ``remoterl.broker.loop``), so a peer without a valid key cannot deliver a single
message. Clients present username ``remoterl`` and the API key as password
(:func:`apply_client_security`) and watch the handshake while they wait for the broker's
first answer (:func:`connect_dealer`), so a refused key is an :class:`AuthenticationError`
at once instead of a silent timeout. PLAIN sends the key in clear text, as HELLO does:
over untrusted networks use CURVE (then the key travels in HELLO only, encrypted) or
wss://. ``inproc://`` has no handshake (the embedded broker, the WebSocket gateway and
bridge): there the key travels in HELLO/READY only, as it always did.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PLAIN_USERNAME", "ZAP_DOMAIN", "apply_client_security", "apply_curve_client", "apply_curve_server",
           "connect_dealer", "curve_serverkey_from_env", "has_handshake", "keygen", "load_api_keys",
           "load_curve_secret"]

log = logging.getLogger(__name__)

# PLAIN credentials of a remoterl peer: this username, the API key as password.
PLAIN_USERNAME = b"remoterl"
# The ZAP domain of a key-mode broker's socket (RFC 27); its ZAP handler refuses any other.
ZAP_DOMAIN = b"remoterl"


def load_api_keys(source: str) -> dict[str, str]:
    """Read ``KEY TENANT`` lines from a file path, or from the text itself if it is not a file.

    Raises:
        ValueError: a line that is not ``KEY TENANT`` (its number is given, never its key).
    """
    path = Path(source)
    text = path.read_text() if path.is_file() else source.replace(";", "\n").replace(",", "\n")
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"API key line {number}: expected 'KEY TENANT'")
        keys[parts[0]] = parts[1]
    if not keys:
        raise ValueError("no API keys found")
    return keys


def keygen(directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write a CURVE key pair for a broker into ``directory``; return (public, secret) paths."""
    import zmq.auth

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), "broker")
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_curve_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) keys from a ``*.key_secret`` certificate file."""
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file from `remoterl keygen`)")
    return public, secret


def curve_serverkey_from_env() -> bytes | None:
    """The broker's public key from ``$REMOTERL_CURVE_SERVERKEY`` (z85 text, or a .key file path)."""
    value = os.environ.get("REMOTERL_CURVE_SERVERKEY")
    if not value:
        return None
    return _public_key(value)


def _public_key(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if Path(value).is_file():
        import zmq.auth

        public, _ = zmq.auth.load_certificate(value)
        return public
    return value.encode()


def apply_curve_server(sock: Any, secret_file: str | os.PathLike) -> None:
    """Make ``sock`` a CURVE server: tcp peers must know its public key (inproc is exempt)."""
    public, secret = load_curve_secret(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def apply_curve_client(sock: Any, serverkey: str | bytes | None) -> None:
    """Encrypt ``sock``'s tcp connections to a CURVE broker whose public key is ``serverkey``."""
    if not serverkey:
        return
    import zmq

    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = _public_key(serverkey)
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def has_handshake(endpoint: str) -> bool:
    """True for endpoints whose connections run a ZeroMQ security handshake (tcp://, ipc://);
    inproc:// (the embedded broker, the WebSocket gateway) has none."""
    return endpoint.startswith(("tcp://", "ipc://"))


def apply_client_security(sock: Any, endpoint: str, serverkey: str | bytes | None, api_key: str | None) -> bool:
    """Credentials for ``sock``'s connection to a broker at ``endpoint`` (before ``connect``).

    CURVE when ``serverkey`` is given (the API key then travels in HELLO only, encrypted);
    else PLAIN with ``api_key`` for tcp:// and ipc:// endpoints, so that a key-mode broker
    lets the connection through its handshake. Returns True when PLAIN was applied.
    """
    apply_curve_client(sock, serverkey)
    if serverkey or not api_key or not has_handshake(endpoint):
        return False
    sock.plain_username = PLAIN_USERNAME
    sock.plain_password = api_key.encode()
    return True


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
    import zmq

    deadline = time.monotonic() + timeout
    use_key = bool(api_key)
    while True:
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            for option, value in options:
                sock.setsockopt(option, value)
            plain = apply_client_security(sock, endpoint, serverkey, api_key if use_key else None)
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
    """What to check when nothing answered at ``url``, from what :func:`connect_dealer` saw."""
    where = url.split("://", 1)[-1]
    if "handshake" in seen:
        return (f"a ZeroMQ peer at {where} took the connection but did not answer as a remoterl broker: is it "
                f"the broker's --bind address (not a worker's or another service's port), and is the broker "
                f"overloaded or stopped (`remoterl status --broker {url}`)?")
    if "connected" in seen:
        return (f"something at {where} accepted the connection but does not speak ZeroMQ: if it is the "
                f"broker's WebSocket bridge (--ws), use ws://{where}; else check the port")
    if "refused" in seen:
        return (f"nothing accepts connections at {where} (connection refused): is remoterl-broker running "
                f"there, and is this the port of its --bind (default 5555)?")
    if url.startswith(("tcp://", "ipc://")):
        return (f"no connection to {where} could be made: check the host name, the network path and firewalls "
                f"between here and the broker")
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
    import zmq
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
