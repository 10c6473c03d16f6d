"""What both ends share, without I/O: messages, values, spaces, actions, framing.

Nothing here opens a socket or reads a clock, so the broker, the workers and the client
build and parse every message with the same code, and tests drive it directly.

* :mod:`~remoterl.wire.protocol` — commands, frames and typed message builders/parsers
  (remoterl's env-session extension and Majordomo 0.1/0.2), limits in bytes and counts.
* :mod:`~remoterl.wire.codec` — values ⇄ one msgpack header plus raw array frames (no pickle);
  the array payload in :mod:`~remoterl.wire.arrays`, why a value cannot travel in
  :mod:`~remoterl.wire.unsendable`.
* :mod:`~remoterl.wire.spaces` — gymnasium spaces ⇄ msgpack descriptions.
* :mod:`~remoterl.wire.calls` — the call schema: op names, request keys, autoreset codes.
* :mod:`~remoterl.wire.envdesc` — the env description a worker sends when a slot opens.
* :mod:`~remoterl.wire.actions` — actions checked whole against a space; attribute names that may travel.
* :mod:`~remoterl.wire.wsframes` — one multipart message ⇄ one WebSocket message.
"""
