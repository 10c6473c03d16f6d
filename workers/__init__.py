"""The remoterl worker runtime (installed as ``remoterl.workers``).

``runtime`` hosts env slots without sockets; ``loop`` connects it to a broker;
``pool`` supervises worker processes; ``cli`` is the ``remoterl-worker`` command.
"""

__all__: list[str] = []
