"""The trainer's side of the wire.

* :mod:`~remoterl.client.session` — sans-I/O: request ids, pending calls, what replies mean.
* :mod:`~remoterl.client.connection` — :class:`~remoterl.client.connection.Client` over
  a transport: a zmq socket, or a broker running in this process (:mod:`remoterl.io.inprocess`).
* :mod:`~remoterl.client.registry` — this process's settings and one client per broker URL.
* :mod:`~remoterl.client.status` — ``fetch_status``: a broker's status snapshot.
"""
