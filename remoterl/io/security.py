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
first answer (:func:`remoterl.io.dealer.connect_dealer`), so a refused key is an :class:`AuthenticationError`
at once instead of a silent timeout. PLAIN sends the key in clear text, as HELLO does:
over untrusted networks use CURVE (then the key travels in HELLO only, encrypted) or
wss://. ``inproc://`` has no handshake (the embedded broker, the WebSocket gateway and
bridge): there the key travels in HELLO/READY only, as it always did.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["PLAIN_USERNAME", "ZAP_DOMAIN", "apply_client_security", "apply_curve_client", "apply_curve_server",
           "curve_serverkey_from_env", "has_handshake", "keygen", "load_api_keys", "load_curve_secret", "uses_plain"]

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
    if not uses_plain(endpoint, serverkey, api_key):
        return False
    sock.plain_username = PLAIN_USERNAME
    sock.plain_password = api_key.encode()  # type: ignore[union-attr]
    return True


def uses_plain(endpoint: str, serverkey: str | bytes | None, api_key: str | None) -> bool:
    """Whether :func:`apply_client_security` gives a connection PLAIN credentials."""
    return bool(api_key) and not serverkey and has_handshake(endpoint)
