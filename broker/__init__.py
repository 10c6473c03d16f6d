"""The remoterl broker (installed as ``remoterl.broker``).

``core`` is the sans-I/O state machine; ``loop`` runs it on a pyzmq ROUTER socket;
``cli`` is the ``remoterl-broker`` command.
"""

__all__: list[str] = []
