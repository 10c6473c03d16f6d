"""The remoterl broker (installed as ``remoterl.broker``).

``core`` is the sans-I/O state machine, composed of one part per concept (``tenants``,
``peers``, ``sessions``, ``placement``, ``registry``, ``majordomo``; shared pieces in
``base``) and answering its own services with ``services``; ``loop`` runs it on a pyzmq
ROUTER socket (with ``links`` and ``waker``); ``bridge`` serves it over WebSocket;
``metrics`` serves its figures to Prometheus (``--metrics``); ``cli`` is the
``remoterl-broker`` command.
"""

__all__: list[str] = []
