"""The broker state machine: workers, services, slots, clients and timers, without sockets.

Theory of operation
-------------------
The broker owns one ROUTER socket; the loop (``remoterl.broker.loop``) feeds every
message it receives to :meth:`BrokerCore.receive` as ``(sender, frames, now)``, calls
:meth:`BrokerCore.tick` when :meth:`BrokerCore.next_deadline` passes, and sends what
:meth:`BrokerCore.messages_to_send` returns. Nothing here blocks, reads a clock or
raises on what a peer sent: malformed input becomes an error reply (where the sender
can be answered), a log line and a counter; a well-formed request the broker will not
serve becomes a typed error reply (:class:`~remoterl.broker.base.Refusal`).

Peers, told apart by frame 0 (see ``remoterl.wire.protocol``), and the parts of the
core that serve them (each module's docstring has its rules):

* **remoterl workers** (``RLW1``) and **clients** (``RLC1``): sessions, liveness and
  the per-call path in ``sessions``; their slots (placement, OPEN, CLOSE) in
  ``placement``; env ids registered by trainers in ``registry``; the tables all three
  share in ``peers``.
* **Majordomo workers and clients** (MDP/0.1, MDP/0.2): request/reply routing per
  service in ``majordomo``, which answers ``mmi.service`` (RFC 8) and ``remoterl.status``
  with ``services``.
* **Keys and tenants** (``tenants``): with API keys configured (:meth:`BrokerCore.set_api_keys`),
  HELLO and READY must present one; each peer gets the key's tenant, and placement,
  registrations, the status service and error messages only ever involve the caller's
  own tenant.

:class:`BrokerCore` composes the parts and hands each what it shares with others
(``remoterl.broker.base``: the settings and one outbox for messages, counters and
warnings); it dispatches messages, runs the timers, and answers for what the loop could
not deliver.

Rules that hold for every part
------------------------------
* *A peer has one role.* A routing id is a remoterl worker, a remoterl client or a
  Majordomo worker; a message that would give it a second role is bad input.
* *Bounded state.* Every table entry belongs to a live peer or an open request with
  a deadline; bad input never creates entries. Queued MDP requests are capped and
  expire.
* *Time is given.* Every handler and timer takes ``now`` (monotonic seconds) from the
  loop; wall-clock figures (``remoterl.status``) are derived from ``wall_started``.

Not done here: socket options (CURVE, sizes), signals, key files. Those live in the
loop and the CLI.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from typing import Any

from remoterl.broker import services
from remoterl.broker.base import BrokerConfig, Outbox, Refusal
from remoterl.broker.majordomo import Majordomo
from remoterl.broker.peers import Peers
from remoterl.broker.placement import Placement
from remoterl.broker.registry import Registry
from remoterl.broker.sessions import Sessions
from remoterl.broker.tenants import Tenants
from remoterl.errors import MessageTooLargeError, ProtocolError
from remoterl.wire import protocol as p
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

__all__ = ["BrokerConfig", "BrokerCore"]

log = logging.getLogger(__name__)

_C_CALL = p.client_frame(C.CALL)
_W_REPLY = p.worker_frame(W.REPLY)


class BrokerCore:
    """The broker's state machine. Feed it frames and time; send what it returns.

    Args:
        config: heartbeat, liveness, size limits.
        now: the current monotonic time in seconds.
        instance: a name for this broker run (reported in WELCOME and status).
        wall_started: the wall-clock time (Unix seconds) that ``now`` corresponds to, for
            ``remoterl.status``; the loop gives it. None: status reports no wall-clock times.

    The tables are attributes (``workers``, ``clients``, ``slots``, ``mdp_workers``, ...)
    for the loop, the status service and tests to read; the parts own and change them.
    """

    def __init__(self, config: BrokerConfig | None = None, now: float = 0.0, instance: str | None = None,
                 wall_started: float | None = None) -> None:
        config = self.config = config or BrokerConfig()
        self.instance = instance or os.urandom(6).hex()
        self.started = now
        self.wall_started = wall_started
        outbox = self.outbox = Outbox(now)
        self.counters = outbox.counters
        tenants = self.tenants = Tenants(config, outbox, now)
        peers = self.peers = Peers(outbox, tenants, is_mdp_worker=self._is_mdp_worker)
        request_ids = itertools.count(1)  # OPENs and REGISTERs sent to workers share one sequence
        placement = self.placement = Placement(config, outbox, tenants, peers, request_ids)
        registry = self.registry = Registry(config, outbox, peers, request_ids)
        sessions = self.sessions = Sessions(config, outbox, tenants, peers, placement, registry, self.instance)
        majordomo = self.majordomo = Majordomo(config, outbox, tenants, now, is_remoterl_peer=peers.has,
                                               answer=functools.partial(services.answer, self))
        # The parts' tables under the core's names (the same objects): what the loop, the
        # status service (services.BrokerView) and tests read.
        self.workers = peers.workers
        self.clients = peers.clients
        self.env_index = peers.env_index
        self.slots = placement.slots
        self.pending_opens = placement.pending
        self.registrations = registry.specs
        self.registrants = registry.registrants
        self.pending_registers = registry.pending
        self.mdp_workers = majordomo.workers
        self.mdp_services = majordomo.services
        self.mdp_queue = majordomo.queue
        self.tenant_counters = tenants.counters
        self._out = outbox.messages
        self._next_sweep = now + self._sweep_interval
        self._on_call = sessions.on_call
        self._on_reply = sessions.on_reply
        self._dispatch_client = {
            C.HELLO: sessions.on_hello,
            C.OPEN: placement.on_open,
            C.CLOSE: placement.on_close,
            C.HEARTBEAT: sessions.on_heartbeat,
            C.DISCONNECT: sessions.on_client_disconnect,
            C.REGISTER: registry.on_register,
        }
        self._dispatch_worker = {
            W.READY: sessions.on_ready,
            W.OPENED: placement.on_opened,
            W.HEARTBEAT: sessions.on_heartbeat,
            W.DISCONNECT: sessions.on_worker_disconnect,
            W.REGISTERED: registry.on_registered,
        }

    def _is_mdp_worker(self, peer: bytes) -> bool:
        # For Peers, made before Majordomo: the roles exclude each other (module docstring).
        return peer in self.majordomo.workers

    # --- the loop's interface -------------------------------------------------------------

    @property
    def _sweep_interval(self) -> float:
        # Four sweeps per heartbeat: a dead peer is noticed within expiry + heartbeat/4
        # (the shorter of the two heartbeats: MDP's may be configured below remoterl's).
        return min(self.config.heartbeat, self.config.mdp_heartbeat) / 4

    def receive(self, sender: bytes, frames: list, now: float) -> None:
        """Handle one message. Never raises on what the peer sent.

        Args:
            sender: the peer's routing id (the ROUTER's first frame).
            frames: the rest of the message: ``bytes`` or buffer objects (``zmq.Frame``).
            now: monotonic time in seconds.
        """
        counters = self.counters
        counters["messages_in"] += 1
        self.outbox.now = now
        if not frames:
            self.outbox.bad(sender, None, "empty message")
            return
        frame0 = p.as_bytes(frames[0])
        # Hot path first: remoterl CALL and REPLY are forwarded without decoding headers.
        if len(frame0) == 5:
            if frame0 == _C_CALL:
                self._on_call(sender, frames, now)
                return
            if frame0 == _W_REPLY:
                self._on_reply(sender, frames, now)
                return
        size = sum(map(len, frames))
        counters["bytes_in"] += size  # CALL's and REPLY's: counted by Sessions
        if size > self.config.max_message_size:
            self.outbox.bad(sender, frames, f"message of {size} bytes exceeds the limit of "
                            f"{self.config.max_message_size} bytes", code="too_large")
            return
        try:
            kind, command = p.signature(frame0)
            if kind == "rl-client":
                handler = self._dispatch_client.get(command)
                if handler is None:
                    raise ProtocolError(f"unknown client command 0x{command:02x}")
                handler(sender, frames, now, "client")
            elif kind == "rl-worker":
                handler = self._dispatch_worker.get(command)
                if handler is None:
                    raise ProtocolError(f"unknown worker command 0x{command:02x}")
                handler(sender, frames, now, "worker")
            elif kind == "mdp-client" or (kind == "empty" and len(frames) > 1
                                          and p.as_bytes(frames[1]) in p.MDP_CLIENT):
                self.majordomo.on_client(sender, frames, now)
            elif kind == "mdp-worker" or (kind == "empty" and len(frames) > 1
                                          and p.as_bytes(frames[1]) in p.MDP_WORKER):
                self.majordomo.on_worker(sender, frames, now)
            elif kind == "rl-version":
                msg = (f"unsupported remoterl protocol signature {frame0[:8]!r}; "
                       f"this broker speaks version {p.PROTOCOL_VERSION}")
                if frame0[:3] == p.RL_WORKER[:3]:
                    self._out.append([sender, p.worker_frame(W.ERROR), p.encode_header({"code": "protocol", "msg": msg})])
                raise ProtocolError(msg)
            else:
                raise ProtocolError(f"unknown protocol signature {frame0[:16]!r}")
        except Refusal as exc:  # a well-formed request refused: typed error, not bad input
            counters["refused"] += 1
            counters[f"refused_{exc.code}"] += 1
            self._out.append([sender, p.client_frame(C.ERROR),
                              p.encode_header({"r": exc.r, "code": exc.code, "msg": exc.msg})])
        except ProtocolError as exc:
            self.outbox.bad(sender, frames, str(exc),
                            code="too_large" if isinstance(exc, MessageTooLargeError) else "protocol")
        except Exception as exc:  # a bug, but a peer must never crash the broker
            log.exception("internal error handling a message from %s", sender.hex())
            self.outbox.bad(sender, frames, f"internal broker error: {exc!r}")

    def tick(self, now: float) -> None:
        """Run timers: purge silent peers, heartbeat MDP workers, expire requests."""
        self.outbox.now = now
        self.majordomo.heartbeat(now)
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval
        self.sessions.expire(now)
        self.majordomo.expire_workers(now)
        self.placement.expire(now)
        self.registry.expire(now)
        self.majordomo.expire_requests(now)

    def undeliverable(self, msg: list, full: bool) -> None:
        """The loop could not send ``msg`` (one that :meth:`messages_to_send` returned).

        Nothing the broker sends is lost without a word: a CALL a worker cannot take gets
        its client an ERROR (``limit`` when the worker's queue is full, ``worker_lost`` when
        the worker's connection is gone, which also purges it); a Majordomo REQUEST goes
        back to the head of its queue for another worker. A HEARTBEAT to a Majordomo worker
        whose connection is gone removes it (a request it held: ``Majordomo._orphan``); one
        that does not fit its full queue is dropped, the worker kept. A message for a client
        that is gone or does not read is counted (``undeliverable``); it has nobody to tell.

        Args:
            msg: ``[routing_id, frame, ...]`` as returned by :meth:`messages_to_send`.
            full: True when the peer's queue was full (it does not read fast enough),
                False when the peer is not connected.
        """
        self.counters["undeliverable"] += 1
        # A routing id has one role: at most one of the two acts.
        self.sessions.undeliverable(msg, full)
        self.majordomo.undeliverable(msg, full)

    def refuse_frames(self, sender: bytes, head: list, count: int, seconds: float) -> None:
        """The loop drained a message of ``count`` frames (over ``MAX_FRAMES``) in ``seconds``;
        ``head`` holds its first frames. Counted, logged, and answered where the sender's
        protocol has an error reply."""
        self.counters["too_many_frames"] += 1
        self.outbox.bad(sender, head, f"a message of {count} frames exceeds the limit of {p.MAX_FRAMES} frames "
                                      f"(drained in {seconds:.2f} s)", code="too_large")

    def excuse(self, seconds: float) -> None:
        """The loop could not read for ``seconds`` (it drained an oversized message): every
        peer's silence during that time is forgiven, so nobody expires for it, and the remoterl
        peers' heartbeat sockets are sent a pong, so they do not give the broker up either (their
        own pings wait unread meanwhile)."""
        self.sessions.excuse(seconds)
        self.majordomo.excuse(seconds)

    def next_deadline(self) -> float:
        """The monotonic time at which :meth:`tick` has work to do."""
        return min(self._next_sweep, self.majordomo.next_heartbeat)

    def messages_to_send(self) -> list[list]:
        """Take the queued messages; each is ``[routing_id, frame, ...]``."""
        return self.outbox.take()

    def shutdown(self) -> None:
        """Tell every worker the broker is leaving (DISCONNECT); queue nothing else."""
        self.sessions.shutdown()
        self.majordomo.shutdown()

    # --- keys -----------------------------------------------------------------------------------

    def set_api_keys(self, api_keys: dict[str, str] | None) -> None:
        """Switch to key mode with ``{key: tenant}`` (``None``: open mode). Sessions already
        admitted keep their tenant; new HELLO/READY messages are checked against the new keys."""
        self.tenants.set_api_keys(api_keys)

    @property
    def open_mode(self) -> bool:
        """True when no API keys are configured: every peer is in tenant ``""``."""
        return self.tenants.open_mode

    def tenant_of(self, key: Any) -> str | None:
        """The tenant an API key belongs to (``""`` in open mode), or None: hashed, compared in
        constant time, never logged."""
        return self.tenants.tenant_of(key)

    # --- introspection ----------------------------------------------------------------------------

    def wall_clock(self) -> float | None:
        """The wall-clock time of the latest ``now`` the core was given (None without
        ``wall_started``)."""
        if self.wall_started is None:
            return None
        return self.wall_started + (self.outbox.now - self.started)

    def table_sizes(self) -> dict[str, int]:
        """Sizes of every table, to check that bad input leaves no state behind."""
        return {
            "workers": len(self.workers), "clients": len(self.clients), "slots": len(self.slots),
            "pending_opens": len(self.pending_opens), "env_index": len(self.env_index),
            "registrations": len(self.registrations), "pending_registers": len(self.pending_registers),
            "tenant_slots": sum(self.tenants.slots.values()),
            "mdp_workers": len(self.mdp_workers), "mdp_services": len(self.mdp_services),
            "mdp_requests": len(self.mdp_queue),
        }
