"""The five abuses of bench/abuse.py: what each hostile peer sends, and at what size.

Each abuse is a plain function that connects (:func:`abuse_peers.open_peers`), sends, cleans
up and returns what it sent (a :class:`abuse_peers.Sent`). Every one is bounded in count
**and** time (``time_limit``) and stops by itself; nothing here keeps state between calls.
The broker's address picks the transport: ``tcp://`` or ``ws://``.

========= =========================================================================================
kind      what it sends
========= =========================================================================================
frames    (a) one message of ``frames`` frames (``b"JUNK"``, then empty frames) from a peer
          holding no key at all
malformed (b) ``count`` malformed messages from a peer holding a valid key (of any tenant): junk
          signatures, broken msgpack headers, unknown commands, worker READYs with bad fields,
          Majordomo requests for unknown services from throwaway connections, CALLs naming
          workers it has no slots on, and oversized headers the size limit still lets through
flood     (c) ``calls`` step CALLs on one slot of its own, sent without reading a single reply,
          from a client of the key's tenant (so on that tenant's workers)
zero_size (d) step CALLs whose action is a zero-size array of shape ``(rows, 0)`` (int64),
          ``repeats`` times, each waiting (bounded) for its answer
names     (e) ``hellos`` HELLOs whose ``name`` is ``name_bytes`` long, then a ``remoterl.status``
          request from the last of those peers
========= =========================================================================================

:data:`ABUSES` maps each kind to its function (:func:`run_abuse` calls it), :func:`sizes` gives
each kind's keyword arguments (full or ``quick``), :data:`LABELS` how the table names it and
:data:`KEY_OF` whose key it holds in a trial.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

import msgpack
import numpy as np

from abuse_peers import Sent, ZmqPeer, drain, open_peers, pack, read_until, reply_kind, transport
from abuse_session import (CALL, CLIENT_BYE, ENV_ID, HELLO, OPEN, WORKER_BYE, Session, step_header,
                           zero_size_header)
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["ABUSES", "KEY_OF", "KINDS", "LABELS", "call_flood", "huge_names", "malformed", "many_frames", "run_abuse",
           "sizes", "zero_size_actions"]

# The order trials run in, and how the table names them.
KINDS = ("frames", "malformed", "flood", "zero_size", "names")
LABELS = {
    "frames": "(a) keyless peer, 1 message of {frames:,} frames",
    "malformed": "(b) other tenant's key, {count:,} malformed messages",
    "flood": "(c) same tenant, {calls:,} CALLs never read",
    "zero_size": "(d) same tenant, {repeats}× step with an action of shape ({rows:,}, 0)",
    "names": "(e) other tenant's key, {hellos} HELLOs named {name_bytes:,} B + status",
}


def sizes(quick: bool = False) -> dict[str, dict[str, Any]]:
    """Each kind's keyword arguments: the full sizes, or much smaller ones with ``quick``."""
    if quick:
        return {
            "frames": {"frames": 100_000, "time_limit": 5.0, "linger": 0.5},  # still over MAX_FRAMES
            "malformed": {"count": 1_000, "big_header": 1 << 20, "big_every": 500, "throwaway_every": 50,
                          "time_limit": 5.0},
            "flood": {"calls": 5_000, "time_limit": 5.0},
            "zero_size": {"rows": 1 << 18, "repeats": 1, "reply_timeout": 3.0, "time_limit": 5.0},
            "names": {"hellos": 10, "name_bytes": 1_000_000, "status_timeout": 3.0, "time_limit": 5.0},
        }
    return {
        "frames": {"frames": 3_000_000, "time_limit": 30.0},
        "malformed": {"count": 20_000, "big_header": 1 << 20, "big_every": 1_000, "throwaway_every": 20,
                      "time_limit": 60.0},
        "flood": {"calls": 200_000, "time_limit": 60.0},
        "zero_size": {"rows": 1 << 25, "repeats": 3, "reply_timeout": 30.0, "time_limit": 100.0},
        "names": {"hellos": 10, "name_bytes": 40_000_000, "status_timeout": 15.0, "time_limit": 60.0},
    }


@contextlib.contextmanager
def _sending(kind: str, url: str, time_limit: float) -> Iterator[tuple[Sent, float]]:
    """Yield ``(sent, deadline)`` for one abuse. An exception inside ends it with
    ``sent.stopped = "error: ..."`` (an abuse never raises once it has begun); on exit
    ``sent.seconds`` is the time it took, its peers' cleanup included."""
    started = time.monotonic()
    sent = Sent(kind, transport(url))
    try:
        yield sent, started + time_limit
    except Exception as exc:
        sent.stopped = f"error: {type(exc).__name__}: {exc}"
    sent.seconds = round(time.monotonic() - started, 3)


def many_frames(url: str, frames: int = 3_000_000, *, first: bytes = b"JUNK", time_limit: float = 30.0,
                linger: float = 2.0) -> Sent:
    """(a) One message of ``frames`` frames (``first``, then empty ones) from a peer with no
    key and no credentials. Over tcp, a plain ``send(b"", SNDMORE)`` per frame; over ws,
    one binary message of that many length-prefixed frames."""
    with (_sending("frames", url, time_limit) as (sent, deadline),
          open_peers(url, None, "none", deadline, linger, sent) as open_peer):
        peer = open_peer()
        if isinstance(peer, ZmqPeer):
            n = peer.send_stream(first, frames - 1, deadline)
            sent.frames, sent.bytes = n, len(first)
            if n == frames:
                sent.messages = 1
            else:
                sent.stopped = "time limit"
                peer.close(0)  # discards the incomplete message
        else:
            data = pack([first]) + pack([b""]) * (frames - 1)
            if peer.send_packed(data, deadline):  # type: ignore[attr-defined]
                sent.messages, sent.frames, sent.bytes = 1, frames, len(first)
            else:
                sent.cut_short(deadline)
        drain(peer, sent, 0.05)
    return sent


def _malformed_templates(key: str, worker_ids: list[bytes]) -> list[tuple[str, Callable[[int], list]]]:
    """(target, i -> frames): target ``client`` (the HELLO'd peer) or ``worker`` (READYs)."""
    h = p.encode_header
    ready = p.worker_frame(W.READY)
    wids = worker_ids or [b"W" + os.urandom(15)]
    good_hello = h({"v": p.PROTOCOL_VERSION, "key": key, "name": "malformed"})
    return [
        # junk signatures
        ("client", lambda i: [b"JUNK" + i.to_bytes(4, "little"), b"payload"]),
        ("client", lambda i: [b"\xff" * 40]),
        ("client", lambda i: [b"MDPX99", b"\x01", b"svc"]),
        ("client", lambda i: [b"RLC2\x01", good_hello]),  # another protocol version
        # truncated or garbage msgpack headers
        ("client", lambda i: [p.client_frame(C.OPEN), b"\x85\xa1r"]),  # a map cut short
        ("client", lambda i: [p.client_frame(C.OPEN), b"\xc1\xc1\xc1"]),  # never-used bytes
        ("client", lambda i: [p.client_frame(C.REGISTER), msgpack.packb([1, 2, 3])]),  # not a map
        ("client", lambda i: [p.client_frame(C.CLOSE), b"\xdf\xff\xff\xff\xff"]),  # a map of 4G entries, empty
        ("client", lambda i: [p.client_frame(C.CLOSE), h({"r": i, "slots": "not a list"})]),
        ("client", lambda i: [p.client_frame(C.HEARTBEAT), b""]),
        # unknown remoterl commands
        ("client", lambda i: [b"RLC1\x7f", h({})]),
        ("client", lambda i: [b"RLW1\x7f", h({})]),
        ("client", lambda i: [b"RLC1\x00"]),
        # worker READYs with bad fields (from a socket of their own)
        ("worker", lambda i: [ready, h({"v": 1, "envs": ENV_ID, "capacity": 8, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 1, "envs": [ENV_ID], "capacity": -1, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 1, "envs": ["x" * 300], "capacity": 8, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 1, "envs": [1, None], "capacity": True, "key": key})]),
        ("worker", lambda i: [ready, h({"v": 99, "envs": [], "capacity": "8", "key": key})]),
        ("worker", lambda i: [ready, b"\x93\x01"]),
        # CALLs naming workers this peer holds no slot on
        ("client", lambda i: [CALL, wids[i % len(wids)], h({"r": i, "op": "step", "slots": [0], "m": 0})]),
        ("client", lambda i: [CALL, wids[i % len(wids)]]),
        ("client", lambda i: [CALL, os.urandom(16), h({"r": i, "op": "reset", "slots": [i]})]),
    ]


def malformed(url: str, key: str, count: int = 20_000, *, worker_ids: list[bytes] = (),
              big_header: int = 1 << 20, big_every: int = 1_000, throwaway_every: int = 20,
              time_limit: float = 60.0, linger: float = 1.0, auth: str = "auto") -> Sent:
    """(b) Exactly ``count`` malformed messages (fewer only if ``time_limit`` passes) from a
    peer holding ``key``: it says HELLO first (a session of the key's tenant) and DISCONNECT
    last, neither counted. Every ``throwaway_every``-th message is a Majordomo request for
    an unknown service from a new connection closed right after; every ``big_every``-th a
    header of ``big_header`` bytes (a HELLO with a huge ``host``, or an OPEN with huge
    kwargs for an env nobody serves). ``worker_ids``: real workers to name in CALLs."""
    templates = _malformed_templates(key, list(worker_ids))
    big = [
        [HELLO, p.encode_header({"v": p.PROTOCOL_VERSION, "key": key, "name": "big", "host": "h" * big_header})],
        [OPEN, p.encode_header({"r": 1, "env": "NoSuchEnv-v0", "n": 1, "kwargs": {"blob": "k" * big_header}})],
    ]
    kinds: dict[str, int] = {}
    with (_sending("malformed", url, time_limit) as (sent, deadline),
          open_peers(url, key, auth, deadline, linger, sent) as open_peer):
        client = Session(open_peer(), key, sent, deadline)
        sent.notes["hello"] = client.hello("malformed")
        sent.recount()  # the count is of malformed messages only
        worker = open_peer()
        done = 0
        while done < count:
            if time.monotonic() >= deadline:
                sent.stopped = "time limit"
                break
            if big_every and done % big_every == big_every - 1:
                what, target, frames = "big_header", "client", big[(done // big_every) % 2]
            elif throwaway_every and done % throwaway_every == throwaway_every - 1:
                what, target = "mdp_unknown_service", "throwaway"
                service = f"no.such.service.{done}".encode()
                frames = ([b"MDPC02", b"\x01", service, b"body"] if (done // throwaway_every) % 2
                          else [b"", b"MDPC01", service, b"body"])
            else:
                target, make = templates[done % len(templates)]
                what, frames = f"template_{done % len(templates)}", make(done)
            if target == "throwaway":
                peer = open_peer()
                ok = peer.send(frames, deadline)
                peer.close(0.2 if ok else 0)
            else:
                ok = (client.peer if target == "client" else worker).send(frames, deadline)
            if not ok:
                sent.cut_short(deadline)
                break
            sent.count(frames)
            kinds[what] = kinds.get(what, 0) + 1
            done += 1
            if done % 256 == 0:  # read what piled up, so the replies can be counted
                drain(client.peer, sent, 0.0, 512)
                drain(worker, sent, 0.0, 512)
        drain(client.peer, sent, 0.2)
        drain(worker, sent, 0.05)
        client.bye()
        worker.send(WORKER_BYE, deadline)
    sent.notes["sent_by_kind"] = {"throwaway_mdp": kinds.pop("mdp_unknown_service", 0),
                                  "big_header": kinds.pop("big_header", 0), "templates": sum(kinds.values())}
    return sent


def call_flood(url: str, key: str, calls: int = 200_000, *, env_id: str = ENV_ID, time_limit: float = 60.0,
               linger: float = 2.0, heartbeat: float = 0.5, auth: str = "auto") -> Sent:
    """(c) A client of ``key``'s tenant says HELLO, OPENs one slot of ``env_id``, resets it
    once, sends ``calls`` step CALLs on it without reading any reply (HEARTBEATs every
    ``heartbeat`` seconds, as a live client does), then DISCONNECT. Only the CALLs count in
    ``messages``."""
    with (_sending("flood", url, time_limit) as (sent, deadline),
          open_peers(url, key, auth, deadline, linger, sent) as open_peer):
        client = Session(open_peer(), key, sent, deadline)
        opened = client.start("flood", env_id)
        if opened is None:
            return sent
        slot, worker = opened
        header, frames = step_header(slot, 3, np.zeros(1, np.int64))
        message = [CALL, worker, header, *frames]
        size = sum(len(f) for f in message)
        send, monotonic = client.peer.send, time.monotonic
        next_beat = monotonic() + heartbeat
        for i in range(calls):
            if not send(message, deadline):
                sent.cut_short(deadline)
                break
            sent.messages += 1
            if i & 255 == 255:
                now = monotonic()
                if now >= deadline:
                    sent.stopped = "time limit"
                    break
                if now >= next_beat:
                    client.beat()
                    next_beat = now + heartbeat
        sent.frames, sent.bytes = sent.messages * len(message), sent.messages * size
        client.bye()
    return sent


def zero_size_actions(url: str, key: str, rows: int = 1 << 25, repeats: int = 3, *, env_id: str = ENV_ID,
                      reply_timeout: float = 30.0, time_limit: float = 100.0, linger: float = 0.5,
                      auth: str = "auto") -> Sent:
    """(d) A client of ``key``'s tenant opens one slot of ``env_id`` and sends ``repeats``
    step CALLs on it whose action is an int64 array of shape ``(rows, 0)`` (zero bytes),
    each waiting up to ``reply_timeout`` for its answer (HEARTBEATs meanwhile); stops early
    when a worker is lost or an answer does not come. ``notes["answers"]``: what each got."""
    with _sending("zero_size", url, time_limit) as (sent, deadline):
        answers: list[dict] = []
        sent.notes["answers"] = answers
        with open_peers(url, key, auth, deadline, linger, sent) as open_peer:
            client = Session(open_peer(), key, sent, deadline)
            opened = client.start("zero-size", env_id)
            if opened is None:
                return sent
            slot, worker = opened
            for i in range(repeats):
                r = 10 + i
                wait = min(reply_timeout, deadline - time.monotonic())
                if wait <= 0:
                    sent.stopped = "time limit"
                    break
                what, seconds = client.call(worker, zero_size_header(slot, r, rows), [], r, wait)
                answers.append({"answer": what, "seconds": seconds})
                if what in ("not sent", "no answer", "WORKER_LOST"):
                    sent.stopped = f"stopped: {what}"
                    break
            client.bye()
    return sent


def huge_names(url: str, key: str, hellos: int = 10, name_bytes: int = 40_000_000, *,
               status_timeout: float = 15.0, time_limit: float = 60.0, linger: float = 1.0,
               auth: str = "auto") -> Sent:
    """(e) ``hellos`` peers holding ``key`` each say HELLO with a ``name`` of ``name_bytes``
    characters; then the last of them asks ``remoterl.status`` (Majordomo, the key as body)
    and waits up to ``status_timeout``; then all say DISCONNECT. ``notes``: the answers to
    the HELLOs, and the status answer's size and time (``None``: no answer)."""
    header = p.encode_header({"v": p.PROTOCOL_VERSION, "key": key, "name": "n" * name_bytes})
    with (_sending("names", url, time_limit) as (sent, deadline),
          open_peers(url, key, auth, deadline, linger, sent) as open_peer):
        peers = []
        for _ in range(hellos):
            if time.monotonic() >= deadline:
                sent.stopped = "time limit"
                break
            peer = open_peer()
            frames = [HELLO, header]
            if not peer.send(frames, deadline):
                sent.cut_short(deadline)
                break
            sent.count(frames)
            peers.append(peer)
        answered = 0
        for peer in peers:  # WELCOME or ERROR each, all within one status_timeout
            left = max(0.05, min(status_timeout, deadline - time.monotonic()) / max(1, len(peers)))
            if read_until(peer, sent, lambda f: reply_kind(f) != "other", left):
                answered += 1
        sent.notes["hello_answers"] = answered
        status = None
        if peers:
            request = [b"MDPC02", b"\x01", b"remoterl.status", key.encode()]
            asked = time.monotonic()
            if peers[-1].send(request, deadline):
                sent.count(request)
                wait = max(0.05, min(status_timeout, deadline - time.monotonic()))
                reply = read_until(peers[-1], sent, lambda f: reply_kind(f) == "MDP", wait)
                if reply is not None:
                    status = {"seconds": round(time.monotonic() - asked, 3), "bytes": len(reply[-1])}
        sent.notes["status"] = status
        for peer in peers:
            peer.send(CLIENT_BYE, deadline)
    return sent


ABUSES: dict[str, Callable[..., Sent]] = {
    "frames": many_frames,
    "malformed": malformed,
    "flood": call_flood,
    "zero_size": zero_size_actions,
    "names": huge_names,
}
# Whose key each abuse holds in a trial: the trainer's tenant, another tenant's, or none.
KEY_OF = {"frames": None, "malformed": "other", "flood": "trainer", "zero_size": "trainer", "names": "other"}


def run_abuse(kind: str, url: str, key: str | None, **kwargs: Any) -> Sent:
    """Abuse ``kind`` against ``url``, with ``key`` when that kind holds one (:data:`KEY_OF`)."""
    return ABUSES[kind](url, key, **kwargs) if KEY_OF[kind] else ABUSES[kind](url, **kwargs)
