"""The remoterl wire protocol, sans-I/O: frames in, typed messages out, and back.

Theory of operation
-------------------
Every peer talks to the broker through one ZeroMQ ROUTER socket. A message is a
list of frames; the first frame names the protocol, so the broker can tell the
four kinds of peer apart on the same socket:

``MDPC01`` / ``MDPC02``
    Majordomo clients (ZeroMQ RFC 7 and RFC 18). Plain request/reply.
``MDPW01`` / ``MDPW02``
    Majordomo workers (RFC 7 and RFC 18).
``RLC1`` + command byte
    remoterl clients (trainers): env sessions. Version 1.
``RLW1`` + command byte
    remoterl workers (simulators): env slots. Version 1.

The remoterl extension packs the signature and the command into one frame
(``b"RLC1\\x10"``) because every frame costs a few microseconds of Python on each
hop, and the step path crosses four hops. Control messages carry one msgpack map
(the *header*); calls carry a header that the broker never decodes, then raw
payload frames that it forwards untouched.

MDP/0.1 messages start with an empty delimiter frame (they come from REQ
sockets); MDP/0.2 messages do not. For leniency, an MDP/0.2 message that starts
with an empty frame is accepted as well, and its replies get the same empty frame
back, so a peer that emulates REQ framing still understands them.

One non-RFC client dialect is understood too: majortomo's (the ``majortomo`` package
on PyPI, 0.2.0) ``Client`` numbers client commands like worker commands. It sends
``["" "MDPC02" 0x02 service body...]`` and reads ``["" "MDPC02" 0x03|0x04 body...]``
(PARTIAL/FINAL, no service frame). RFC 18 gives 0x02 from a client no meaning (0x02
PARTIAL and 0x03 FINAL go broker → client), so the empty frame plus 0x02 cannot be
mistaken for an RFC 18 request; see :func:`parse_mdp_client`.

What this module does not do: it keeps no state and touches no socket. It parses
(raising :class:`~remoterl.errors.ProtocolError` on anything malformed) and it
builds frame lists. Routing decisions live in ``remoterl.broker.core``.

Frames may be ``bytes`` or any buffer object (``zmq.Frame``); header and routing
frames are turned into ``bytes`` with :func:`as_bytes`, payload frames are
passed through as they are.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from remoterl.errors import ProtocolError

__all__ = [
    "MDP_CLIENT",
    "MAX_CONTROL_HEADER",
    "MAX_FRAMES",
    "MAX_MESSAGE_SIZE",
    "STATUS_SERVICE",
    "mdp_client_signature",
    "MAX_NAME",
    "MDP_WORKER",
    "PROTOCOL_VERSION",
    "RL_CLIENT",
    "RL_WORKER",
    "ClientCommand",
    "MdpClientRequest",
    "MdpVersion",
    "MdpWorkerMessage",
    "WorkerCommand",
    "as_bytes",
    "client_frame",
    "decode_header",
    "encode_header",
    "mdp_client_reply",
    "mdp_worker_disconnect",
    "mdp_worker_heartbeat",
    "mdp_worker_request",
    "parse_mdp_client",
    "parse_mdp_worker",
    "worker_frame",
]

PROTOCOL_VERSION = 1

# Protocol limits: what one peer may make the broker read, keep or answer, whatever its size
# limit in bytes. A peer over one gets an error reply (where its protocol has one) and a
# counter goes up; nothing it sent is kept.
#
# Frames in one message. Far above anything remoterl sends (signature, ids, a header, one
# frame per array); low enough that a message of millions of empty frames, which libzmq's
# MAXMSGSIZE (a per-frame limit) lets through, is drained instead of read into a list.
MAX_FRAMES = 65_536
# Bytes of one control header (HELLO, OPEN, CLOSE, REGISTER, READY, HEARTBEAT): names,
# env ids, kwargs and specs together. Call and reply headers are bounded by the message size.
MAX_CONTROL_HEADER = 64 * 1024
# Characters of a peer's name, host or env id, and of a Majordomo service name.
MAX_NAME = 256
# Bytes of one message, by default (``remoterl-broker --max-message-size``; the broker tells
# its peers its own limit in WELCOME).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# Frame-0 signatures of the remoterl extension (the command byte follows).
RL_CLIENT = b"RLC1"
RL_WORKER = b"RLW1"
_RL_PREFIXES = (b"RLC", b"RLW")


class MdpVersion(enum.Enum):
    """The two Majordomo versions the broker speaks."""

    V01 = 1  # RFC 7: REQ framing (leading empty frame), no PARTIAL.
    V02 = 2  # RFC 18: DEALER framing, PARTIAL/FINAL.


MDP_CLIENT = {b"MDPC01": MdpVersion.V01, b"MDPC02": MdpVersion.V02}
MDP_WORKER = {b"MDPW01": MdpVersion.V01, b"MDPW02": MdpVersion.V02}
_MDPC = {MdpVersion.V01: b"MDPC01", MdpVersion.V02: b"MDPC02"}
_MDPW = {MdpVersion.V01: b"MDPW01", MdpVersion.V02: b"MDPW02"}

# The Majordomo service the broker answers with its status snapshot (``remoterl status``).
STATUS_SERVICE = b"remoterl.status"


def mdp_client_signature(version: MdpVersion) -> bytes:
    """Frame 0 (MDP/0.2) or 1 (MDP/0.1) of a Majordomo client message of ``version``."""
    return _MDPC[version]


# RFC 18, MDP/Client commands.
MDPC_REQUEST = b"\x01"
MDPC_PARTIAL = b"\x02"
MDPC_FINAL = b"\x03"
# majortomo 0.2.0's client dialect: client commands numbered as RFC 18 numbers worker ones.
MAJORTOMO_REQUEST = b"\x02"
MAJORTOMO_PARTIAL = b"\x03"
MAJORTOMO_FINAL = b"\x04"
# MDP/Worker REQUEST (broker → worker) is 0x02 in RFC 7 and RFC 18 alike.
MDPW_REQUEST = b"\x02"

# MDP/Worker commands by version. RFC 7 has READY REQUEST REPLY HEARTBEAT DISCONNECT;
# RFC 18 splits REPLY into PARTIAL and FINAL and renumbers what follows.
_W_COMMANDS = {
    MdpVersion.V01: {b"\x01": "READY", b"\x02": "REQUEST", b"\x03": "FINAL",
                     b"\x04": "HEARTBEAT", b"\x05": "DISCONNECT"},
    MdpVersion.V02: {b"\x01": "READY", b"\x02": "REQUEST", b"\x03": "PARTIAL",
                     b"\x04": "FINAL", b"\x05": "HEARTBEAT", b"\x06": "DISCONNECT"},
}
_W_CODES = {v: {name: code for code, name in table.items()} for v, table in _W_COMMANDS.items()}


class ClientCommand(enum.IntEnum):
    """Commands between a remoterl client (trainer) and the broker."""

    HELLO = 0x01        # c→b {v, name?, pid?, host?, key?}
    WELCOME = 0x02      # b→c {v, broker, heartbeat, liveness, max_message_size, you}
    OPEN = 0x03         # c→b {r, env, kwargs, opts?, n, max_workers?}
    OPENED = 0x04       # b→c {r, slots: [[slot, worker], ...], env: {...}}
    CLOSE = 0x05        # c→b {r, slots}
    CLOSED = 0x06       # b→c {r, closed: [slots]}
    HEARTBEAT = 0x07    # c→b {id}; b→c {broker, known, id}
    DISCONNECT = 0x08   # c→b {}: the client leaves; its slots are closed
    ERROR = 0x09        # b→c {r?, code, msg}
    WORKER_LOST = 0x0A  # b→c {worker, slots, msg}
    REGISTER = 0x0B     # c→b {r, spec: {id, entry_point, kwargs, ...}}
    REGISTERED = 0x0C   # b→c {r, id, accepted: [worker names], refused: {worker name: reason}}
    CALL = 0x10         # c→b frames: worker, header, *payload (header not decoded by broker)
    REPLY = 0x11        # b→c frames: header, *payload


class WorkerCommand(enum.IntEnum):
    """Commands between a remoterl worker (simulator) and the broker."""

    READY = 0x01        # w→b {v, envs, capacity, name?, pid?, host?, key?}
    WELCOME = 0x02      # b→w {v, broker, heartbeat, liveness, max_message_size, you}
    OPEN = 0x03         # b→w frames: client, {r, env, kwargs, opts, slots}
    OPENED = 0x04       # w→b frames: client, {r, slots, env?|error?}
    CLOSE = 0x05        # b→w frames: client, {slots}; no reply
    HEARTBEAT = 0x07    # w→b {id, stats?}; b→w {broker, known, id}
    DISCONNECT = 0x08   # both ways: the peer leaves / the broker tells a worker to re-register
    ERROR = 0x09        # b→w {code, msg}: READY refused (bad fields, role clash, wrong version,
                        # wrong API key: the worker stops; rate limit: it retries later)
    REGISTER = 0x0B     # b→w {r, spec}: register an env id by its entry-point string
    REGISTERED = 0x0C   # w→b {r, id, ok, msg}
    CALL = 0x10         # b→w frames: client, header, *payload
    REPLY = 0x11        # w→b frames: client, header, *payload


def client_frame(command: ClientCommand) -> bytes:
    """Frame 0 of a remoterl client message, e.g. ``b"RLC1\\x10"`` for CALL."""
    return _CLIENT_FRAMES[command]


def worker_frame(command: WorkerCommand) -> bytes:
    """Frame 0 of a remoterl worker message, e.g. ``b"RLW1\\x10"`` for CALL."""
    return _WORKER_FRAMES[command]


_CLIENT_FRAMES = {c: RL_CLIENT + bytes([c]) for c in ClientCommand}
_WORKER_FRAMES = {c: RL_WORKER + bytes([c]) for c in WorkerCommand}


def as_bytes(frame: Any) -> bytes:
    """The bytes of one frame: ``bytes`` as is, a ``zmq.Frame`` or buffer copied once."""
    if frame.__class__ is bytes:
        return frame
    cached = getattr(frame, "bytes", None)  # zmq.Frame caches its copy
    if isinstance(cached, bytes):
        return cached
    return bytes(frame)


# --- msgpack headers ------------------------------------------------------------------

def encode_header(header: dict) -> bytes:
    """Pack a control header. Headers hold only msgpack-native values."""
    return msgpack.packb(header, use_bin_type=True)


def decode_header(frame: Any, *, what: str = "header") -> dict:
    """Unpack a control header; anything but a msgpack map raises ProtocolError."""
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{what}: not valid msgpack ({exc})") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a msgpack map, got {type(value).__name__}")
    return value


# --- Majordomo ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MdpClientRequest:
    """A Majordomo client REQUEST (RFC 7 or RFC 18).

    ``empty_prefix`` records whether the message came with a leading empty frame, and
    ``majortomo`` whether it was in majortomo's dialect (module docstring), so the reply
    can be framed the way the client expects.
    """

    version: MdpVersion
    service: bytes
    body: list = field(default_factory=list)
    empty_prefix: bool = False
    majortomo: bool = False


def parse_mdp_client(frames: list) -> MdpClientRequest:
    """Parse a message from a Majordomo client (routing frame already removed).

    ``["" "MDPC02" 0x02 service body...]`` is a request in majortomo's dialect
    (``majortomo=True``). Only with the leading empty frame: majortomo's client always
    sends it and rejects replies without it, and no known client sends 0x02 without it,
    so ``["MDPC02" 0x02 ...]`` (the shape of an RFC 18 PARTIAL, broker → client) stays
    malformed rather than be answered in a framing guessed for an unknown peer.

    Raises:
        ProtocolError: not a well-formed MDP client REQUEST.
    """
    empty_prefix = len(frames) > 0 and len(frames[0]) == 0
    rest = frames[1:] if empty_prefix else frames
    if not rest:
        raise ProtocolError("empty MDP client message")
    version = MDP_CLIENT.get(as_bytes(rest[0]))
    if version is None:
        raise ProtocolError(f"unknown MDP client signature {as_bytes(rest[0])[:16]!r}")
    if version is MdpVersion.V01:
        # RFC 7: [empty] "MDPC01" service body...
        if len(rest) < 2:
            raise ProtocolError("MDP/0.1 REQUEST needs a service frame")
        return MdpClientRequest(version, as_bytes(rest[1]), list(rest[2:]), empty_prefix=True)
    # RFC 18: "MDPC02" 0x01 service body...
    if len(rest) < 3:
        raise ProtocolError("MDP/0.2 REQUEST needs command and service frames")
    command = as_bytes(rest[1])
    if command == MAJORTOMO_REQUEST and empty_prefix:
        return MdpClientRequest(version, as_bytes(rest[2]), list(rest[3:]), True, majortomo=True)
    if command != MDPC_REQUEST:
        raise ProtocolError(f"MDP/0.2 client command {command!r} is not REQUEST (0x01)")
    return MdpClientRequest(version, as_bytes(rest[2]), list(rest[3:]), empty_prefix)


def mdp_client_reply(
    version: MdpVersion, service: bytes, body: list, *, final: bool = True,
    empty_prefix: bool = False, majortomo: bool = False,
) -> list:
    """Frames of a reply to a Majordomo client (without the routing frame).

    With ``majortomo``: ``["" "MDPC02" 0x03|0x04 body...]``, what majortomo 0.2.0's
    ``Client._parse_message`` reads (empty frame, header, PARTIAL 0x03 or FINAL 0x04, and
    the body straight after: it has no service frame).
    """
    if majortomo:
        return [b"", b"MDPC02", MAJORTOMO_FINAL if final else MAJORTOMO_PARTIAL, *body]
    if version is MdpVersion.V01:
        return [b"", b"MDPC01", service, *body]
    command = MDPC_FINAL if final else MDPC_PARTIAL
    head = [b""] if empty_prefix else []
    return [*head, b"MDPC02", command, service, *body]


@dataclass(frozen=True, slots=True)
class MdpWorkerMessage:
    """A message from a Majordomo worker: READY, PARTIAL, FINAL, HEARTBEAT or DISCONNECT."""

    version: MdpVersion
    command: str
    service: bytes = b""
    client: bytes = b""
    body: list = field(default_factory=list)
    empty_prefix: bool = False


def parse_mdp_worker(frames: list) -> MdpWorkerMessage:
    """Parse a message from a Majordomo worker (routing frame already removed).

    Raises:
        ProtocolError: malformed, or a command a worker may not send.
    """
    empty_prefix = len(frames) > 0 and len(frames[0]) == 0
    rest = frames[1:] if empty_prefix else frames
    if len(rest) < 2:
        raise ProtocolError("MDP worker message needs signature and command frames")
    version = MDP_WORKER.get(as_bytes(rest[0]))
    if version is None:
        raise ProtocolError(f"unknown MDP worker signature {as_bytes(rest[0])[:16]!r}")
    command = _W_COMMANDS[version].get(as_bytes(rest[1]))
    if command is None or command == "REQUEST":
        raise ProtocolError(f"MDP worker command {as_bytes(rest[1])[:4]!r} is not one a worker sends")
    if command == "READY":
        if len(rest) < 3 or not len(rest[2]):
            raise ProtocolError("MDP READY needs a service name")
        return MdpWorkerMessage(version, command, service=as_bytes(rest[2]), empty_prefix=empty_prefix)
    if command in ("PARTIAL", "FINAL"):
        # [sig, cmd, client, empty, body...]
        if len(rest) < 4 or len(rest[3]) != 0:
            raise ProtocolError(f"MDP {command} needs client address and empty delimiter frames")
        return MdpWorkerMessage(
            version, command, client=as_bytes(rest[2]), body=list(rest[4:]), empty_prefix=empty_prefix
        )
    return MdpWorkerMessage(version, command, empty_prefix=empty_prefix)


def _mdp_worker_frames(version: MdpVersion, empty_prefix: bool, name: str, *rest: Any) -> list:
    head = [b""] if (empty_prefix or version is MdpVersion.V01) else []
    return [*head, _MDPW[version], _W_CODES[version][name], *rest]


def mdp_worker_request(version: MdpVersion, client: bytes, body: list, *, empty_prefix: bool = False) -> list:
    """Frames of a REQUEST to a Majordomo worker (without the routing frame)."""
    return _mdp_worker_frames(version, empty_prefix, "REQUEST", client, b"", *body)


def mdp_worker_heartbeat(version: MdpVersion, *, empty_prefix: bool = False) -> list:
    """Frames of a HEARTBEAT to a Majordomo worker."""
    return _mdp_worker_frames(version, empty_prefix, "HEARTBEAT")


def mdp_worker_disconnect(version: MdpVersion, *, empty_prefix: bool = False) -> list:
    """Frames of a DISCONNECT to a Majordomo worker."""
    return _mdp_worker_frames(version, empty_prefix, "DISCONNECT")


def signature(frame0: bytes) -> tuple[str, int | None]:
    """Classify frame 0: ``("rl-client", cmd)``, ``("rl-worker", cmd)``, ``("mdp-client", None)``,
    ``("mdp-worker", None)``, ``("empty", None)`` (MDP/0.1 framing) or ``("unknown", None)``.

    A remoterl signature with the wrong version gives ``("rl-version", None)``.
    """
    if len(frame0) == 5:
        prefix = frame0[:4]
        if prefix == RL_CLIENT:
            return "rl-client", frame0[4]
        if prefix == RL_WORKER:
            return "rl-worker", frame0[4]
    if frame0[:3] in _RL_PREFIXES:
        return "rl-version", None
    if frame0 in MDP_CLIENT:
        return "mdp-client", None
    if frame0 in MDP_WORKER:
        return "mdp-worker", None
    if not frame0:
        return "empty", None
    return "unknown", None
