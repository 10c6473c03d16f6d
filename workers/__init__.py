"""The remoterl worker runtime (installed as ``remoterl.workers``).

``runtime`` hosts env slots without sockets (a slot is ``slots``'; the env ops are
``stepping`` and ``attrs``); ``loop`` connects it to a broker; ``pool`` supervises worker
processes, ``raypool`` runs them as Ray actors; ``metrics`` serves a worker's figures to
Prometheus (``--metrics``); ``cli`` is the ``remoterl-worker`` command.
"""

__all__: list[str] = []
