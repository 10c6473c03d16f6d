"""The socket code: everything that moves bytes between processes.

* :mod:`~remoterl.io.zmqio` — per-message send/receive helpers for pyzmq sockets.
* :mod:`~remoterl.io.link` — the local link (a stream socket pair) between the embedded
  broker and its worker processes.
* :mod:`~remoterl.io.inprocess` — the registry of brokers running in this process, which
  in-process clients hand their frames to.
* :mod:`~remoterl.io.security` — API keys and CURVE keys, and the one DEALER factory
  (:func:`~remoterl.io.security.connect_dealer`) that watches the connection handshake.
* :mod:`~remoterl.io.loopsocket`, :mod:`~remoterl.io.wsgateway` — zmq and websockets on
  one asyncio loop; ws:// and wss:// for code that speaks zmq.
* :mod:`~remoterl.io.process` — child processes that never outlive their parent.
"""
