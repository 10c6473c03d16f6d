"""API keys and ZeroMQ CURVE keys: loading, generating, applying to sockets.

Key files:

* API keys (``remoterl-broker --api-keys FILE`` or ``$REMOTERL_API_KEYS``): one
  ``KEY TENANT`` pair a line; blank lines and ``#`` comments are ignored. Keys are
  secrets: nothing here logs them.
* CURVE (``remoterl keygen DIR``): ``broker.key`` holds the public key (give it to
  trainers and workers: ``$REMOTERL_CURVE_SERVERKEY`` or ``curve_serverkey=``) and
  ``broker.key_secret`` the secret one (for ``remoterl-broker --curve-secret``), in
  ZeroMQ's certificate format (``zmq.auth``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["apply_curve_client", "apply_curve_server", "curve_serverkey_from_env", "keygen", "load_api_keys",
           "load_curve_secret"]


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
