"""``fetch_status``: a broker's status snapshot, as ``remoterl status`` and tests read it.

One MDP/0.2 request to the broker's ``remoterl.status`` service over a DEALER that watches
the connection handshake (:func:`remoterl.io.security.connect_dealer`).
"""

from __future__ import annotations

import json

__all__ = ["fetch_status"]


def fetch_status(url: str, timeout: float = 5.0, api_key: str | None = None,
                 curve_serverkey: str | None = None) -> dict:
    """Ask the broker's ``remoterl.status`` service (an MDP/0.2 request) for a snapshot.

    Args:
        api_key: required by a broker with API keys; the answer covers that key's tenant.
        curve_serverkey: the broker's CURVE public key, if it uses CURVE.

    Raises:
        BrokerUnavailableError: no answer within ``timeout``.
        AuthenticationError: the broker wants a (different) key (refused at the connection
            handshake by a key-mode broker over tcp/ipc, or in the status reply).
    """
    import zmq

    from remoterl.errors import AuthenticationError, BrokerUnavailableError
    from remoterl.io.dealer import connect_dealer, no_answer_hint
    from remoterl.io.security import curve_serverkey_from_env
    from remoterl.io.wsgateway import resolve_endpoint
    from remoterl.wire import protocol as p

    request = [p.mdp_client_signature(p.MdpVersion.V02), p.MDPC_REQUEST, p.STATUS_SERVICE, *([api_key.encode()] if api_key else [])]
    # Watches the tcp handshake too: a key-mode broker refuses a wrong or missing key there.
    seen: set[str] = set()
    connected = connect_dealer(zmq.Context.instance(), url, resolve_endpoint(url), request, timeout,
                               api_key=api_key, serverkey=curve_serverkey or curve_serverkey_from_env(), seen=seen)
    if connected is None:
        raise BrokerUnavailableError(
            f"no remoterl broker answered at {url} within {timeout:g} s: {no_answer_hint(url, seen)} "
            f"Start one with: remoterl-broker --bind {url}")
    sock = connected[0]
    try:
        frames = sock.recv_multipart()
    finally:
        sock.close()
    snap = json.loads(frames[-1])
    if snap.get("error") == "auth":
        raise AuthenticationError(snap.get("msg", "the broker refused the API key"))
    return snap
