"""The broker state machine: workers, services, slots, clients and timers, without sockets.

Theory of operation
-------------------
The broker owns one ROUTER socket; the loop (``remoterl.broker.loop``) feeds every
message it receives to :meth:`BrokerCore.receive` as ``(sender, frames, now)``, calls
:meth:`BrokerCore.tick` when :meth:`BrokerCore.next_deadline` passes, and sends what
:meth:`BrokerCore.messages_to_send` returns. Nothing here blocks, reads a clock or
raises on what a peer sent: malformed input becomes an error reply (where the sender
can be answered), a log line and a counter.

Peers, told apart by frame 0 (see ``remoterl.protocol``):

* **remoterl workers** (``RLW1``) announce the env ids they serve and how many slots
  they host (READY). A slot is one live env instance on one worker.
* **remoterl clients** (``RLC1``) say HELLO, OPEN slots of an env id, CALL the
  workers that hold their slots (reset/step/close batches, opaque to the broker),
  and CLOSE slots.
* **Majordomo workers and clients** (MDP/0.1, MDP/0.2) get plain request/reply
  routing per service, the ``mmi.service`` management service (RFC 8) and the
  ``remoterl.status`` service.

Rules
-----
* *Sticky slots.* OPEN places the slots on the least-loaded workers serving the env
  id and returns, per slot, the worker's routing id. Every CALL names that worker;
  the broker forwards it only if the client holds a slot there. A slot is never
  moved: when its worker goes, the client hears WORKER_LOST for it.
* *Calls pass through.* The broker reads frame 0 and the worker/client routing frame
  of a CALL or REPLY, never the msgpack header, and re-sends the payload frames
  untouched. Per-worker call counters are the only work on that path.
* *Liveness.* Any message from a peer, or a HEARTBEAT naming it (sent from the
  peer's side socket, so a trainer busy in a gradient update stays alive), refreshes
  it. A remoterl peer silent for ``heartbeat × liveness`` seconds is purged: a
  worker's clients get WORKER_LOST for its slots; a client's slots are closed on
  their workers. Majordomo workers keep their own, RFC-sized clock
  (``mdp_heartbeat × mdp_liveness``, 2.5 s × 3): they are sent HEARTBEATs every
  ``mdp_heartbeat`` seconds, and one serving a request may stay silent for up to
  ``mdp_request_timeout`` (see :meth:`BrokerCore._mdp_expired`).
* *Bounded state.* Every table entry belongs to a live peer or an open request with
  a deadline; bad input never creates entries. Queued MDP requests are capped and
  expire.

* *Keys and tenants.* With API keys configured (``set_api_keys``), HELLO and READY
  must present one; each peer gets the key's tenant, and placement, registrations,
  the status service and error messages only ever involve the caller's own tenant.

Not done here: socket options (CURVE, sizes), signals, key files. Those live in the
loop and the CLI.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from remoterl import protocol as p
from remoterl.broker.mdpqueue import MdpQueue, MdpRequest
from remoterl.errors import MessageTooLargeError, ProtocolError
from remoterl.protocol import ClientCommand as C
from remoterl.protocol import WorkerCommand as W

__all__ = ["BrokerConfig", "BrokerCore"]

log = logging.getLogger(__name__)

_C_REPLY = p.client_frame(C.REPLY)
_W_CALL = p.worker_frame(W.CALL)


@dataclass
class BrokerConfig:
    """Tunable broker settings (seconds and bytes)."""

    heartbeat: float = 1.0
    liveness: int = 3
    max_message_size: int = 64 * 1024 * 1024
    open_timeout: float = 120.0
    # Calls one client may have in flight to one worker; more get a ``limit`` error at once.
    # A vector env has one in flight per worker; the bound is what keeps a flooding client
    # from queueing thousands of calls ahead of everyone else's at a shared worker.
    max_calls_in_flight: int = 64
    # Majordomo requests waiting for a worker, across all services: a count, a byte budget, and
    # each client's share of the bytes (clients are served round robin within a service).
    max_queued_requests: int = 200_000
    max_queued_bytes: int = 256 * 1024 * 1024
    max_queued_bytes_per_client: int = 64 * 1024 * 1024
    request_ttl: float = 30.0
    # Majordomo workers' own liveness. RFC 7/18 ask broker and worker to heartbeat "at regular
    # and agreed-upon intervals" and list mismatched rates as a known weakness ("false
    # disconnections will occur"); zguide's mdwrkapi and majortomo's Worker heartbeat every
    # 2.5 s and give the broker 3 (zguide) or 4 (majortomo) intervals, so remoterl's 1 s × 3
    # would purge healthy idle ones. The broker heartbeats them every mdp_heartbeat seconds.
    mdp_heartbeat: float = 2.5
    mdp_liveness: int = 3
    # How long an MDP worker serving a request may stay silent. A single-threaded worker
    # (zguide's mdwrkapi, majortomo's Worker) sends nothing while it works, and zguide's
    # broker never expires a busy worker; majortomo's waits 900 s. A worker whose process
    # dies is noticed sooner anyway: its connection closes and the next HEARTBEAT to it is
    # undeliverable (ROUTER_MANDATORY). So this bounds only a worker that hangs with its
    # connection open: 5 minutes lets long single-threaded jobs finish, and is 10 times
    # request_ttl, far past any client's wait for the answer.
    mdp_request_timeout: float = 300.0
    # API keys: key -> tenant. None: open mode (no keys; one tenant, "").
    api_keys: dict[str, str] | None = None
    max_slots_per_tenant: int | None = None
    max_new_peers_per_second: float = 200.0

    @property
    def expiry(self) -> float:
        """Seconds of silence after which a remoterl peer is declared dead."""
        return self.heartbeat * self.liveness

    @property
    def mdp_expiry(self) -> float:
        """Seconds of silence after which an idle Majordomo worker is declared dead."""
        return self.mdp_heartbeat * self.mdp_liveness


@dataclass(eq=False)
class RLWorker:
    """A remoterl worker: the env ids it serves and the slots it hosts."""

    id: bytes
    envs: set
    capacity: int
    last_seen: float
    tenant: str = ""
    info: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)  # env id -> why the worker refused its registration
    slots: set = field(default_factory=set)
    clients: collections.Counter = field(default_factory=collections.Counter)
    calls: int = 0
    stats: dict = field(default_factory=dict)
    hb_from: bytes | None = None  # the socket its heartbeats come from (a side socket)

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots)


@dataclass(eq=False)
class RLClient:
    """A remoterl client (trainer) session."""

    id: bytes
    last_seen: float
    tenant: str = ""
    info: dict = field(default_factory=dict)
    slots: set = field(default_factory=set)
    workers: collections.Counter = field(default_factory=collections.Counter)
    inflight: dict = field(default_factory=dict)  # worker id -> calls forwarded, not yet answered
    hb_from: bytes | None = None  # the socket its heartbeats come from (a side socket)


@dataclass(eq=False)
class Slot:
    id: int
    client: bytes
    worker: bytes
    env: str
    open: bool = False


@dataclass(eq=False)
class PendingOpen:
    """An OPEN waiting for the workers that were asked to create its slots."""

    client: bytes
    client_r: Any
    env: str
    order: list            # slot ids in the order the client will see them
    waiting: set           # worker ids that have not answered yet
    deadline: float
    env_desc: Any = None
    error: dict | None = None


@dataclass(eq=False)
class PendingRegister:
    """A REGISTER waiting for the workers' answers."""

    client: bytes
    client_r: Any
    env: str
    waiting: set
    deadline: float
    accepted: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)


@dataclass(eq=False)
class MdpWorker:
    id: bytes
    service: bytes
    version: p.MdpVersion
    empty_prefix: bool
    last_seen: float
    current: MdpRequest | None = None  # the request it is serving
    busy_since: float = 0.0  # when it was handed ``current``
    calls: int = 0


@dataclass(eq=False)
class MdpService:
    """A Majordomo service with workers (its queued requests live in ``BrokerCore.mdp_queue``)."""

    name: bytes
    waiting: collections.deque = field(default_factory=collections.deque)
    workers: int = 0


class BrokerCore:
    """The broker's state machine. Feed it frames and time; send what it returns.

    Args:
        config: heartbeat, liveness, size limits.
        now: the current monotonic time in seconds.
        instance: a name for this broker run (reported in WELCOME and status).
    """

    def __init__(self, config: BrokerConfig | None = None, now: float = 0.0, instance: str | None = None) -> None:
        self.config = config or BrokerConfig()
        self.instance = instance or os.urandom(6).hex()
        self.started = now
        self._wall_started = time.time()
        self.workers: dict[bytes, RLWorker] = {}
        self.env_index: dict[str, set] = {}
        self.clients: dict[bytes, RLClient] = {}
        self.slots: dict[int, Slot] = {}
        self.pending_opens: dict[int, PendingOpen] = {}
        self.registrations: dict[tuple[str, str], dict] = {}  # (tenant, env id) -> spec
        # (tenant, env id) -> the connected clients that registered it: the registration is
        # forgotten when the last of them leaves, so new workers do not get (and perhaps refuse)
        # it forever after the trainers that needed it are gone.
        self.registrants: dict[tuple[str, str], set[bytes]] = {}
        self.tenant_slots: collections.Counter = collections.Counter()
        self._key_hashes: dict[bytes, str] | None = None
        self.set_api_keys(self.config.api_keys)
        self._peer_window = (now, 0)
        self.pending_registers: dict[int, PendingRegister] = {}
        self.mdp_workers: dict[bytes, MdpWorker] = {}
        self.mdp_services: dict[bytes, MdpService] = {}
        cfg = self.config
        self.mdp_queue = MdpQueue(cfg.max_queued_requests, cfg.max_queued_bytes, cfg.max_queued_bytes_per_client,
                                  cfg.request_ttl)
        self.counters: collections.Counter = collections.Counter()
        # What each tenant may see of the counters (its own peers' events); see _count.
        self.tenant_counters: dict[str, collections.Counter] = {}
        self._out: list[list] = []
        self._next_slot = 1
        self._next_open = 1
        self._next_sweep = now + self._sweep_interval
        self._next_mdp_heartbeat = now + self.config.mdp_heartbeat
        self._mdp_now = now  # the latest time the core was given (undeliverable() gets none)
        self._warned_at = 0.0
        self._warned = 0
        self._suppressed = 0
        self._closing = False
        self._dispatch_client = {
            C.HELLO: self._on_hello,
            C.OPEN: self._on_open,
            C.CLOSE: self._on_close,
            C.HEARTBEAT: self._on_heartbeat,
            C.DISCONNECT: self._on_client_disconnect,
            C.REGISTER: self._on_register,
        }
        self._dispatch_worker = {
            W.READY: self._on_ready_checked,
            W.OPENED: self._on_opened,
            W.HEARTBEAT: self._on_heartbeat,
            W.DISCONNECT: self._on_worker_disconnect,
            W.REGISTERED: self._on_registered,
        }

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
        self.counters["messages_in"] += 1
        if not frames:
            self._bad(sender, None, "empty message")
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
        if size > self.config.max_message_size:
            self._bad(sender, frames, f"message of {size} bytes exceeds the limit of "
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
                self._on_mdp_client(sender, frames, now)
            elif kind == "mdp-worker" or (kind == "empty" and len(frames) > 1
                                          and p.as_bytes(frames[1]) in p.MDP_WORKER):
                self._on_mdp_worker(sender, frames, now)
            elif kind == "rl-version":
                msg = (f"unsupported remoterl protocol signature {frame0[:8]!r}; "
                       f"this broker speaks version {p.PROTOCOL_VERSION}")
                if frame0[:3] == p.RL_WORKER[:3]:
                    self._out.append([sender, p.worker_frame(W.ERROR), p.encode_header({"code": "protocol", "msg": msg})])
                raise ProtocolError(msg)
            else:
                raise ProtocolError(f"unknown protocol signature {frame0[:16]!r}")
        except _Reply as exc:  # a well-formed request refused: typed error, not bad input
            self.counters["refused"] += 1
            self._out.append([sender, p.client_frame(C.ERROR),
                              p.encode_header({"r": exc.r, "code": exc.code, "msg": str(exc)})])
        except ProtocolError as exc:
            self._bad(sender, frames, str(exc), code="too_large" if isinstance(exc, MessageTooLargeError) else "protocol")
        except Exception as exc:  # a bug, but a peer must never crash the broker
            log.exception("internal error handling a message from %s", sender.hex())
            self._bad(sender, frames, f"internal broker error: {exc!r}")

    def tick(self, now: float) -> None:
        """Run timers: purge silent peers, heartbeat MDP workers, expire requests."""
        self._mdp_now = now
        if now >= self._next_mdp_heartbeat:
            # Every MDP worker, busy ones too (RFC 7/18: "Both broker and worker MUST send
            # heartbeats"): a busy worker that reads none meanwhile finds them queued when it
            # is done, and a HEARTBEAT that cannot be delivered tells the broker (through
            # undeliverable()) that a busy worker's connection is gone.
            self._next_mdp_heartbeat = now + self.config.mdp_heartbeat
            for worker in self.mdp_workers.values():
                self._out.append([worker.id, *p.mdp_worker_heartbeat(worker.version, empty_prefix=worker.empty_prefix)])
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval
        limit = now - self.config.expiry
        for worker in [w for w in self.workers.values() if w.last_seen < limit]:
            log.warning("worker %s missed its heartbeats; purging it (%d slots)",
                        _name(worker.id, worker.info), len(worker.slots))
            self._count("workers_expired", worker.tenant)
            self._purge_worker(worker, "missed its heartbeats")
        for client in [c for c in self.clients.values() if c.last_seen < limit]:
            if client.slots:
                log.info("client %s went silent; closing its %d slots", _name(client.id, client.info), len(client.slots))
            self._count("clients_expired", client.tenant)
            self._drop_client(client)
        for worker in [w for w in self.mdp_workers.values() if self._mdp_expired(w, now)]:
            if worker.current is None:
                log.warning("MDP worker %s missed its heartbeats; purging it", worker.id.hex())
            else:
                log.warning("MDP worker %s said nothing for %g s while serving a request "
                            "(mdp_request_timeout); purging it and dropping the request",
                            worker.id.hex(), now - max(worker.last_seen, worker.busy_since))
            self.counters["mdp_workers_expired"] += 1
            # A silent busy worker may be hung rather than dead: its request is not run again.
            self._drop_mdp_worker(worker, now, requeue=False)
        for r, pending in list(self.pending_opens.items()):
            if now >= pending.deadline:
                pending.error = pending.error or {"code": "timeout", "msg": (
                    f"workers did not create {pending.env!r} within {self.config.open_timeout:g} s")}
                pending.waiting.clear()
                self._finish_open(r, pending)
        for r, pending_reg in list(self.pending_registers.items()):
            if now >= pending_reg.deadline:
                self._finish_register(r, pending_reg)
        expired = self.mdp_queue.expire(now)
        if expired:
            self.counters["mdp_requests_expired"] += expired

    def undeliverable(self, msg: list, full: bool) -> None:
        """The loop could not send ``msg`` (one that :meth:`messages_to_send` returned).

        Nothing the broker sends is lost without a word: a CALL a worker cannot take gets
        its client an ERROR (``limit`` when the worker's queue is full, ``worker_lost`` when
        the worker's connection is gone, which also purges it); a Majordomo REQUEST goes
        back to the head of its queue for another worker. A HEARTBEAT to a Majordomo worker
        whose connection is gone removes it (a request it held: ``_mdp_orphan``); one that
        does not fit its full queue is dropped, the worker kept. A message for a client that
        is gone or does not read is counted (``undeliverable``); it has nobody to tell.

        Args:
            msg: ``[routing_id, frame, ...]`` as returned by :meth:`messages_to_send`.
            full: True when the peer's queue was full (it does not read fast enough),
                False when the peer is not connected.
        """
        peer = msg[0]
        self.counters["undeliverable"] += 1
        worker = self.workers.get(peer)
        if worker is not None and len(msg) > 3 and msg[1] == _W_CALL:
            client_id = p.as_bytes(msg[2])
            client = self.clients.get(client_id)
            if client is not None:
                n = client.inflight.get(peer, 0)
                if n > 1:
                    client.inflight[peer] = n - 1
                else:
                    client.inflight.pop(peer, None)
            if full:
                self._count("calls_limited", worker.tenant)
                self._call_error(client_id, msg[3], "limit", (
                    f"worker {_name(peer, worker.info)} has more calls queued than it can take; "
                    f"retry when its replies come back"))
                return
            self._call_error(client_id, msg[3], "worker_lost", f"worker {_name(peer, worker.info)} is not connected")
        mdp = self.mdp_workers.get(peer)
        if mdp is not None:
            now = self._mdp_now
            request = mdp.current
            is_request = request is not None and _is_mdp_request_for(msg, request)
            if full and not is_request:
                # A HEARTBEAT that does not fit: the worker is not reading (busy with a long
                # request, or stuck), not gone. Its queue holds heartbeats enough; silence
                # decides its fate (_mdp_expired), so a request it is running is not run twice.
                return
            log.info("MDP worker %s cannot be reached (%s); dropping it", peer.hex(), "full" if full else "gone")
            if is_request:
                # This message is the REQUEST itself: the worker never saw it, so the next
                # worker runs it once, and it keeps its one re-run (_mdp_orphan).
                mdp.current = None
                self._drop_mdp_worker(mdp, now, notify=False)
                self.mdp_queue.push(request, front=True)
                svc = self.mdp_services.get(request.service)
                if svc is not None:
                    self._mdp_dispatch(svc, now)
            else:  # a HEARTBEAT to it failed: a request it held was delivered
                self._drop_mdp_worker(mdp, now, notify=False)
            return
        if worker is not None and not full:
            log.warning("worker %s cannot be reached; purging it", _name(peer, worker.info))
            self._purge_worker(worker, "is not connected")

    def refuse_frames(self, sender: bytes, head: list, count: int, seconds: float) -> None:
        """The loop drained a message of ``count`` frames (over ``MAX_FRAMES``) in ``seconds``;
        ``head`` holds its first frames. Counted, logged, and answered where the sender's
        protocol has an error reply."""
        self.counters["too_many_frames"] += 1
        self._bad(sender, head, f"a message of {count} frames exceeds the limit of {p.MAX_FRAMES} frames "
                                f"(drained in {seconds:.2f} s)", code="too_large")

    def excuse(self, seconds: float) -> None:
        """The loop could not read for ``seconds`` (it drained an oversized message): every
        peer's silence during that time is forgiven, so nobody expires for it, and the remoterl
        peers' heartbeat sockets are sent a pong, so they do not give the broker up either (their
        own pings wait unread meanwhile)."""
        for table, frame in ((self.workers, _W_HEARTBEAT), (self.clients, _C_HEARTBEAT)):
            for peer in table.values():
                peer.last_seen += seconds
                if peer.hb_from is not None:
                    self._out.append([peer.hb_from, frame, p.encode_header(
                        {"broker": self.instance, "known": True, "id": peer.id})])
        for mdp in self.mdp_workers.values():  # tick() heartbeats them as usual
            mdp.last_seen += seconds
            mdp.busy_since += seconds  # a busy worker's silence is counted from the later of the two

    def next_deadline(self) -> float:
        """The monotonic time at which :meth:`tick` has work to do."""
        return min(self._next_sweep, self._next_mdp_heartbeat)

    def messages_to_send(self) -> list[list]:
        """Take the queued messages; each is ``[routing_id, frame, ...]``."""
        out, self._out = self._out, []
        return out

    def shutdown(self) -> None:
        """Tell every worker the broker is leaving (DISCONNECT); queue nothing else."""
        self._closing = True
        for worker in self.workers.values():
            self._out.append([worker.id, p.worker_frame(W.DISCONNECT)])
        for worker in self.mdp_workers.values():
            self._out.append([worker.id, *p.mdp_worker_disconnect(worker.version, empty_prefix=worker.empty_prefix)])

    # --- remoterl hot path ----------------------------------------------------------------------

    def _on_call(self, sender: bytes, frames: list, now: float) -> None:
        # CALL: [sig, worker, header, *payload]. The header is not decoded here.
        client = self.clients.get(sender)
        if len(frames) < 3:
            self._bad(sender, frames, "CALL needs worker and header frames")
            return
        worker_id = p.as_bytes(frames[1])
        if sum(map(len, frames)) > self.config.max_message_size:
            self._bad(sender, frames, f"CALL exceeds the limit of {self.config.max_message_size} bytes",
                      code="too_large")
            return
        if client is None or not client.workers.get(worker_id):
            self._call_refused(sender, frames, worker_id, client)
            return
        client.last_seen = now
        inflight = client.inflight
        n = inflight.get(worker_id, 0)
        if n >= self.config.max_calls_in_flight:
            self._count("calls_limited", client.tenant)
            self._call_error(sender, frames[2], "limit", (
                f"{n} calls to worker {worker_id.hex()[:12]} are already in flight (at most "
                f"{self.config.max_calls_in_flight}); wait for their replies before sending more"))
            return
        inflight[worker_id] = n + 1
        self.workers[worker_id].calls += 1
        self._out.append([worker_id, _W_CALL, sender, *frames[2:]])

    def _on_reply(self, sender: bytes, frames: list, now: float) -> None:
        # REPLY: [sig, client, header, *payload] -> client gets [sig, header, *payload].
        worker = self.workers.get(sender)
        if worker is None:
            self._unknown_worker(sender, "REPLY")
            return
        if len(frames) < 3:
            self._bad(sender, frames, "REPLY needs client and header frames")
            return
        worker.last_seen = now
        client_id = p.as_bytes(frames[1])
        if client_id not in worker.clients:
            # Only clients holding slots on this worker get its replies (late replies to
            # closed slots land here too): a worker cannot message arbitrary peers.
            self.counters["replies_dropped"] += 1
            return
        client = self.clients.get(client_id)  # always there while it holds slots here
        if client is not None:
            inflight = client.inflight
            n = inflight.get(sender, 0)
            if n > 1:
                inflight[sender] = n - 1
            else:
                inflight.pop(sender, None)
        self._out.append([client_id, _C_REPLY, *frames[2:]])

    def _call_refused(self, sender: bytes, frames: list, worker_id: bytes, client: RLClient | None) -> None:
        worker = self.workers.get(worker_id)
        if client is None:
            code, msg = "worker_lost", "this client session is unknown to the broker (expired or broker restarted)"
        elif worker is not None and worker.tenant == client.tenant:
            code, msg = "protocol", "this client holds no slot on that worker"
        else:  # gone, or another tenant's: the answer must not tell which
            code, msg = "worker_lost", f"worker {worker_id.hex()} is gone"
        self._count("calls_refused", client.tenant if client is not None else None)
        self._call_error(sender, frames[2], code, msg)

    def _call_error(self, client_id: bytes, header_frame: Any, code: str, msg: str) -> None:
        """Answer a CALL the broker will not forward: an ERROR with the call's request id."""
        header = _try_header(header_frame) if len(header_frame) <= p.MAX_CONTROL_HEADER else None
        r = header.get("r") if header else None
        self._out.append([client_id, p.client_frame(C.ERROR), p.encode_header({"r": r, "code": code, "msg": msg})])

    # --- remoterl control -----------------------------------------------------------------------

    # --- API keys and tenants ---------------------------------------------------------------------

    def set_api_keys(self, api_keys: dict[str, str] | None) -> None:
        """Switch to key mode with ``{key: tenant}`` (``None``: open mode). Sessions already
        admitted keep their tenant; new HELLO/READY messages are checked against the new keys."""
        if api_keys is None:
            self._key_hashes = None
            return
        self._key_hashes = {hashlib.sha256(key.encode()).digest(): tenant for key, tenant in api_keys.items()}

    @property
    def open_mode(self) -> bool:
        """True when no API keys are configured: every peer is in tenant ``""``."""
        return self._key_hashes is None

    def _tenant_of(self, key: Any) -> str | None:
        """The tenant an API key belongs to, or None. Keys are never logged.

        The presented key is hashed and the digest compared in constant time, so the
        time taken says nothing about how much of a key was right.
        """
        if self._key_hashes is None:
            return ""
        if not isinstance(key, str) or not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, tenant in self._key_hashes.items():
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def _admit(self, header: dict, now: float, r: Any = None) -> str:
        """Check the key and the new-peer rate for a HELLO or READY; return the tenant.

        Raises:
            _Reply: ``auth`` (wrong or missing key) or ``limit`` (too many new peers).
        """
        tenant = self._tenant_of(header.get("key"))
        if tenant is None:
            self.counters["auth_refused"] += 1
            raise _Reply(r, "auth", "wrong or missing API key: the broker refused this peer")
        start, count = self._peer_window
        if now - start >= 1.0:
            start, count = now, 0
        if count >= self.config.max_new_peers_per_second:
            self.counters["rate_limited"] += 1
            raise _Reply(r, "limit", f"more than {self.config.max_new_peers_per_second:g} new connections a second; "
                                     f"try again shortly")
        self._peer_window = (start, count + 1)
        return tenant

    def _on_hello(self, sender: bytes, frames: list, now: float, role: str) -> None:
        header = _header(frames, 1)
        info = _peer_info(header)
        client = self.clients.get(sender)
        if client is None:
            if sender in self.workers or sender in self.mdp_workers:
                raise ProtocolError("this peer is registered as a worker")
            tenant = self._admit(header, now)
            client = self.clients[sender] = RLClient(sender, now, tenant)
        elif self._tenant_of(header.get("key")) != client.tenant:
            raise _Reply(None, "auth", "wrong or missing API key: the broker refused this peer")
        client.last_seen = now
        client.info = info
        self._out.append([sender, p.client_frame(C.WELCOME), p.encode_header({**self._welcome(), "you": sender})])

    def _welcome(self) -> dict:
        return {
            "v": p.PROTOCOL_VERSION,
            "broker": self.instance,
            "heartbeat": self.config.heartbeat,
            "liveness": self.config.liveness,
            "max_message_size": self.config.max_message_size,
        }

    def _client(self, client_id: bytes, now: float, r: Any = None) -> RLClient:
        client = self.clients.get(client_id)
        if client is None:
            if client_id in self.workers or client_id in self.mdp_workers:
                raise ProtocolError("this peer is registered as a worker")
            if not self.open_mode:
                raise _Reply(r, "auth", "say HELLO with your API key first")
            client = self.clients[client_id] = RLClient(client_id, now)
        client.last_seen = now
        return client

    def _on_open(self, sender: bytes, frames: list, now: float, role: str) -> None:
        header = _header(frames, 1)
        r = header.get("r")
        env = header.get("env")
        n = header.get("n", 1)
        kwargs = header.get("kwargs") or {}
        opts = header.get("opts") or {}
        max_workers = header.get("max_workers")
        _check_env_id(env, "OPEN", r)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _Reply(r, "protocol", f"OPEN needs n >= 1 slots, got {n!r}")
        if not isinstance(kwargs, dict) or not isinstance(opts, dict):
            raise _Reply(r, "protocol", "OPEN kwargs and opts must be maps")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise _Reply(r, "protocol", f"max_workers must be a positive integer, got {max_workers!r}")
        client = self._client(sender, now, r)
        # "*": a worker that serves any env id gymnasium can make there (the embedded default).
        # Only the client's own tenant's workers are candidates, or even mentioned.
        serving = [self.workers[w] for w in self.env_index.get(env, set()) | self.env_index.get("*", set())
                   if self.workers[w].tenant == client.tenant]
        if not serving:
            raise _Reply(r, "no_worker", self._no_worker_message(env, client.tenant))
        limit = self.config.max_slots_per_tenant
        if limit is not None and self.tenant_slots[client.tenant] + n > limit:
            raise _Reply(r, "limit", f"this tenant may hold at most {limit} open slots "
                                     f"({self.tenant_slots[client.tenant]} open, {n} asked for)")
        placement = _place(serving, n, max_workers)
        if placement is None:
            free = sum(max(w.free, 0) for w in serving)
            raise _Reply(r, "capacity", (
                f"{len(serving)} worker(s) serve {env!r} but only {free} of their slots are free "
                f"({n} asked for); start more with: remoterl-worker --env {env} -n {n}"))
        open_r = self._next_open
        self._next_open += 1
        order: list[int] = []
        by_worker: dict[bytes, list[int]] = {}
        for worker in placement:
            slot = Slot(self._next_slot, sender, worker.id, env)
            self._next_slot += 1
            self.slots[slot.id] = slot
            worker.slots.add(slot.id)
            worker.clients[sender] += 1
            client.slots.add(slot.id)
            client.workers[worker.id] += 1
            self.tenant_slots[client.tenant] += 1
            order.append(slot.id)
            by_worker.setdefault(worker.id, []).append(slot.id)
        self.pending_opens[open_r] = PendingOpen(
            sender, r, env, order, set(by_worker), now + self.config.open_timeout)
        for worker_id, slot_ids in by_worker.items():
            self._out.append([worker_id, p.worker_frame(W.OPEN), sender, p.encode_header(
                {"r": open_r, "env": env, "kwargs": kwargs, "opts": opts, "slots": slot_ids})])
        self.counters["opens"] += 1

    def _no_worker_message(self, env: str, tenant: str = "") -> str:
        served = sorted(e for e, ids in self.env_index.items() if any(self.workers[w].tenant == tenant for w in ids))
        listing = ", ".join(served) if served else "nothing (no worker is connected)"
        refusals = [f"worker {_name(w.id, w.info)} refused to register it: {w.refused[env]}"
                    for w in self.workers.values() if env in w.refused and w.tenant == tenant]
        why = (" " + "; ".join(refusals) + ".") if refusals else ""
        close = difflib.get_close_matches(env, served, n=3, cutoff=0.75)
        if close and not refusals:  # a typo, most likely: say so first
            return (f"no worker serves env id {env!r}: did you mean {' or '.join(map(repr, close))}? "
                    f"Workers serve: {listing}.")
        return (f"no worker serves env id {env!r}; workers serve: {listing}.{why} "
                f"Start one with: remoterl-worker --env {env} --broker URL")

    def _on_opened(self, sender: bytes, frames: list, now: float, role: str) -> None:
        worker = self._known_worker(sender, "OPENED", now)
        if worker is None:
            return
        header = _header(frames, 2, limit=None)  # carries the env's description (spaces)
        r = header.get("r")
        pending = self.pending_opens.get(r) if isinstance(r, int) else None
        if pending is None or sender not in pending.waiting:
            raise ProtocolError(f"OPENED for unknown open request {r!r}")
        pending.waiting.discard(sender)
        error = header.get("error")
        if error is not None:
            pending.error = pending.error or (error if isinstance(error, dict) else {"code": "protocol", "msg": repr(error)})
        elif pending.env_desc is None:
            pending.env_desc = header.get("env")
        if not pending.waiting:
            self._finish_open(r, pending)

    def _finish_open(self, r: int, pending: PendingOpen) -> None:
        del self.pending_opens[r]
        client = self.clients.get(pending.client)
        live = [self.slots[s] for s in pending.order if s in self.slots]
        if pending.error is None and client is not None and len(live) == len(pending.order):
            for slot in live:
                slot.open = True
            self._out.append([pending.client, p.client_frame(C.OPENED), p.encode_header({
                "r": pending.client_r,
                "slots": [[slot.id, slot.worker] for slot in live],
                "env": pending.env_desc,
            })])
            return
        # All or nothing: release what was created, then report the first error.
        self._close_slots(live)
        if client is not None:
            error = pending.error or {"code": "worker_lost", "msg": "a worker was lost while opening slots"}
            self._out.append([pending.client, p.client_frame(C.ERROR), p.encode_header({**error, "r": pending.client_r})])

    def _on_close(self, sender: bytes, frames: list, now: float, role: str) -> None:
        header = _header(frames, 1)
        r = header.get("r")
        wanted = header.get("slots")
        if not isinstance(wanted, list):
            raise _Reply(r, "protocol", "CLOSE needs a list of slots")
        client = self._client(sender, now, r)
        mine = [self.slots[s] for s in dict.fromkeys(s for s in wanted if type(s) is int and s in client.slots)]
        self._close_slots(mine)
        self._out.append([sender, p.client_frame(C.CLOSED), p.encode_header({"r": r, "closed": [s.id for s in mine]})])

    def _on_client_disconnect(self, sender: bytes, frames: list, now: float, role: str) -> None:
        client = self.clients.get(sender)
        if client is not None:
            self._drop_client(client)

    def _on_heartbeat(self, sender: bytes, frames: list, now: float, role: str) -> None:
        header = _header(frames, 1)
        peer_id = header.get("id", sender)
        if not isinstance(peer_id, bytes):
            raise ProtocolError("HEARTBEAT id must be bytes")
        if role == "client":
            peer = self.clients.get(peer_id)
            frame = p.client_frame(C.HEARTBEAT)
        else:
            peer = self.workers.get(peer_id)
            frame = p.worker_frame(W.HEARTBEAT)
        if peer is not None and not self.open_mode and self._tenant_of(header.get("key")) != peer.tenant:
            peer = None  # in key mode only the peer's own key keeps it alive
        if peer is not None and role == "worker":
            stats = header.get("stats")
            if isinstance(stats, dict):
                peer.stats = _plain_stats(stats)
        if peer is not None:
            peer.last_seen = now
            peer.hb_from = sender
        self._out.append([sender, frame, p.encode_header({"broker": self.instance, "known": peer is not None, "id": peer_id})])

    def _on_ready_checked(self, sender: bytes, frames: list, now: float, role: str) -> None:
        # A worker whose READY is refused cannot work at all: tell it why (W.ERROR ends it)
        # instead of letting it send READY again forever.
        try:
            self._on_ready(sender, frames, now)
        except ProtocolError as exc:
            self._out.append([sender, p.worker_frame(W.ERROR), p.encode_header({"code": "protocol", "msg": str(exc)})])
            raise

    def _on_ready(self, sender: bytes, frames: list, now: float) -> None:
        header = _header(frames, 1)
        envs = header.get("envs")
        capacity = header.get("capacity")
        if not isinstance(envs, list) or not all(isinstance(e, str) and 0 < len(e) <= p.MAX_NAME for e in envs):
            raise ProtocolError(f"READY needs a list of env id strings of 1 to {p.MAX_NAME} characters")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ProtocolError("READY needs a capacity >= 0")
        info = _peer_info(header)
        if sender in self.clients or sender in self.mdp_workers:
            raise ProtocolError("this peer is already registered in another role")
        try:
            tenant = self._admit(header, now)
        except _Reply as exc:
            self._out.append([sender, p.worker_frame(W.ERROR), p.encode_header({"code": exc.code, "msg": str(exc)})])
            return
        old = self.workers.get(sender)
        if old is not None:  # RFC 7: a second READY restarts the worker's session
            self._purge_worker(old, "re-registered")
        worker = self.workers[sender] = RLWorker(sender, set(envs), capacity, now, tenant, info)
        for env in worker.envs:
            self.env_index.setdefault(env, set()).add(sender)
        log.info("worker %s ready: %d slots of %s", _name(sender, info), capacity, ", ".join(sorted(envs)) or "nothing")
        self._out.append([sender, p.worker_frame(W.WELCOME), p.encode_header({**self._welcome(), "you": sender})])
        # Registrations made before this worker arrived (r=0: nobody waits for the answer).
        for (reg_tenant, _), spec in self.registrations.items():
            if reg_tenant != tenant:
                continue
            self._out.append([sender, p.worker_frame(W.REGISTER), p.encode_header({"r": 0, "spec": spec})])

    # --- registration mirroring -------------------------------------------------------------

    def _on_register(self, sender: bytes, frames: list, now: float, role: str) -> None:
        header = _header(frames, 1)
        r = header.get("r")
        spec = header.get("spec")
        if not isinstance(spec, dict):
            raise _Reply(r, "protocol", "REGISTER needs a spec with an env id")
        _check_env_id(spec.get("id"), "REGISTER", r)
        entry = spec.get("entry_point")
        if not isinstance(entry, str) or ":" not in entry:
            raise _Reply(r, "protocol", "REGISTER needs an entry point string 'package.module:Attribute' "
                                        "(callables cannot travel)")
        env = spec["id"]
        client = self._client(sender, now, r)
        key = (client.tenant, env)
        if key not in self.registrations and len(self.registrations) >= _MAX_REGISTRATIONS:
            raise _Reply(r, "protocol", f"too many registrations (at most {_MAX_REGISTRATIONS})")
        self.registrations[key] = spec
        self.registrants.setdefault(key, set()).add(sender)
        register_r = self._next_open
        self._next_open += 1
        mine = {w.id for w in self.workers.values() if w.tenant == client.tenant}
        pending = PendingRegister(sender, r, env, set(mine), now + self.config.open_timeout)
        self.pending_registers[register_r] = pending
        for worker_id in mine:
            self._out.append([worker_id, p.worker_frame(W.REGISTER), p.encode_header({"r": register_r, "spec": spec})])
        if not pending.waiting:
            self._finish_register(register_r, pending)

    def _on_registered(self, sender: bytes, frames: list, now: float, role: str) -> None:
        worker = self._known_worker(sender, "REGISTERED", now)
        if worker is None:
            return
        header = _header(frames, 1, limit=None)
        env, ok, msg, r = header.get("id"), header.get("ok"), header.get("msg"), header.get("r")
        if not isinstance(env, str):
            raise ProtocolError(f"REGISTERED for an env id that is not a string: {env!r}")
        name = _name(worker.id, worker.info)
        why = str(msg or "refused")[:p.MAX_NAME * 4]
        pending = self.pending_registers.get(r) if isinstance(r, int) else None
        if (worker.tenant, env) in self.registrations or (pending is not None and pending.env == env):
            if ok is True:
                worker.refused.pop(env, None)
                if env not in worker.envs:
                    worker.envs.add(env)
                    self.env_index.setdefault(env, set()).add(worker.id)
            elif (worker.tenant, env) in self.registrations:
                worker.refused[env] = why
            # else: forgotten while this answer was on its way (its trainers left): moot.
        elif r == 0:  # an answer to a registration sent on READY, forgotten since
            return
        else:
            raise ProtocolError(f"REGISTERED for an env id nobody registered: {env!r}")
        if pending is not None and sender in pending.waiting:
            pending.waiting.discard(sender)
            if ok is True:
                pending.accepted.append(name)
            else:
                pending.refused[name] = why
            if not pending.waiting:
                self._finish_register(r, pending)

    def _finish_register(self, r: int, pending: PendingRegister) -> None:
        del self.pending_registers[r]
        if pending.client in self.clients:
            self._out.append([pending.client, p.client_frame(C.REGISTERED), p.encode_header({
                "r": pending.client_r, "id": pending.env, "accepted": pending.accepted, "refused": pending.refused})])

    def _on_worker_disconnect(self, sender: bytes, frames: list, now: float, role: str) -> None:
        worker = self.workers.get(sender)
        if worker is not None:
            log.info("worker %s disconnected", _name(sender, worker.info))
            self._purge_worker(worker, "disconnected")

    def _known_worker(self, sender: bytes, what: str, now: float) -> RLWorker | None:
        """The registered worker that sent ``what`` (refreshed), or None after telling it to re-register."""
        worker = self.workers.get(sender)
        if worker is None:
            self._unknown_worker(sender, what)
            return None
        worker.last_seen = now
        return worker

    def _unknown_worker(self, sender: bytes, what: str) -> None:
        # RFC 7: a message from an unregistered worker gets DISCONNECT, which makes it re-register.
        self.counters["unknown_worker_messages"] += 1
        self._warn("%s from unknown worker %s; telling it to re-register", what, sender.hex())
        self._out.append([sender, p.worker_frame(W.DISCONNECT)])

    # --- removal ---------------------------------------------------------------------------

    def _close_slots(self, slots: list[Slot]) -> None:
        """Free slots in the tables and tell their workers to close the envs."""
        by_worker: dict[tuple, list[int]] = {}
        for slot in slots:
            self._forget_slot(slot)
            by_worker.setdefault((slot.worker, slot.client), []).append(slot.id)
        for (worker_id, client_id), ids in by_worker.items():
            if worker_id in self.workers:
                self._out.append([worker_id, p.worker_frame(W.CLOSE), client_id, p.encode_header({"slots": ids})])

    def _forget_slot(self, slot: Slot) -> None:
        if self.slots.pop(slot.id, None) is None:
            return  # already forgotten: the counters below must drop once per slot
        worker = self.workers.get(slot.worker)
        if worker is not None:
            worker.slots.discard(slot.id)
            _decrement(worker.clients, slot.client)
        client = self.clients.get(slot.client)
        if client is not None:
            client.slots.discard(slot.id)
            _decrement(client.workers, slot.worker)
            if slot.worker not in client.workers:
                client.inflight.pop(slot.worker, None)  # its replies are dropped from now on
            _decrement(self.tenant_slots, client.tenant)

    def _purge_worker(self, worker: RLWorker, reason: str) -> None:
        lost: dict[bytes, list[int]] = {}
        for slot_id in list(worker.slots):
            slot = self.slots[slot_id]
            if slot.open:
                lost.setdefault(slot.client, []).append(slot_id)
            self._forget_slot(slot)
        for r, pending in list(self.pending_opens.items()):
            if worker.id in pending.waiting:
                pending.waiting.discard(worker.id)
                pending.error = pending.error or {"code": "worker_lost", "msg": (
                    f"worker {_name(worker.id, worker.info)} {reason} while opening {pending.env!r}")}
                if not pending.waiting:
                    self._finish_open(r, pending)
        for r, pending_reg in list(self.pending_registers.items()):
            if worker.id in pending_reg.waiting:
                pending_reg.waiting.discard(worker.id)
                if not pending_reg.waiting:
                    self._finish_register(r, pending_reg)
        del self.workers[worker.id]
        for env in worker.envs:
            ids = self.env_index.get(env)
            if ids is not None:
                ids.discard(worker.id)
                if not ids:
                    del self.env_index[env]
        for client_id, slot_ids in lost.items():
            self._out.append([client_id, p.client_frame(C.WORKER_LOST), p.encode_header({
                "worker": worker.id, "slots": slot_ids,
                "msg": f"worker {_name(worker.id, worker.info)} {reason}; the envs in slots {slot_ids} are lost",
            })])

    def _drop_client(self, client: RLClient) -> None:
        self._close_slots([self.slots[s] for s in list(client.slots)])
        for pending in self.pending_opens.values():
            if pending.client == client.id:
                pending.error = {"code": "closed", "msg": "client left"}
        del self.clients[client.id]
        for key, owners in list(self.registrants.items()):
            owners.discard(client.id)
            if not owners:
                self._forget_registration(key)

    def _forget_registration(self, key: tuple[str, str]) -> None:
        """No connected client needs registration ``key`` any more: new workers stop getting it
        and the refusals it caused are no longer reported. Workers that accepted it keep serving
        the id (its slots stay open) until they restart."""
        tenant, env = key
        del self.registrations[key], self.registrants[key]
        for worker in self.workers.values():
            if worker.tenant == tenant:
                worker.refused.pop(env, None)
        log.info("registration of %r forgotten: the trainers that made it have left", env)

    # --- Majordomo ----------------------------------------------------------------------------

    def _on_mdp_client(self, sender: bytes, frames: list, now: float) -> None:
        self._mdp_now = now
        request = p.parse_mdp_client(frames)
        service = request.service
        if not self.open_mode and service != b"remoterl.status":
            # Key-less Majordomo peers are allowed in open mode only.
            raise ProtocolError("Majordomo clients are not allowed: this broker requires API keys")
        if service.startswith(b"mmi.") or service == b"remoterl.status":
            from remoterl.broker.services import answer  # noqa: PLC0415 (rarely used)

            body = answer(self, service, request.body)
            self._out.append([sender, *p.mdp_client_reply(
                request.version, service, body, empty_prefix=request.empty_prefix, majortomo=request.majortomo)])
            return
        if len(service) > p.MAX_NAME:
            raise ProtocolError(f"MDP service names are at most {p.MAX_NAME} bytes")
        queued = MdpRequest(sender, service, request.version, request.empty_prefix, request.body, now,
                            sum(map(len, request.body)), majortomo=request.majortomo)
        why = self.mdp_queue.push(queued)
        if why is not None:
            # Majordomo has no error reply: the client's own timeout tells it; the count shows here.
            self.counters["mdp_requests_dropped"] += 1
            self._warn("dropping an MDP request for %r from %s: %s", service[:64], sender.hex(), why)
            return
        svc = self.mdp_services.get(service)
        if svc is not None:
            self._mdp_dispatch(svc, now)

    def _on_mdp_worker(self, sender: bytes, frames: list, now: float) -> None:
        self._mdp_now = now
        msg = p.parse_mdp_worker(frames)
        worker = self.mdp_workers.get(sender)
        if msg.command == "READY" and not self.open_mode:
            self._out.append([sender, *p.mdp_worker_disconnect(msg.version, empty_prefix=msg.empty_prefix)])
            raise ProtocolError("Majordomo workers are not allowed: this broker requires API keys")
        if msg.command == "READY":
            if len(msg.service) > p.MAX_NAME:
                raise ProtocolError(f"MDP service names are at most {p.MAX_NAME} bytes")
            if worker is not None or sender in self.workers or sender in self.clients:
                if worker is not None:
                    # RFC 7/18: "The worker MUST NOT send a further READY". One that does has
                    # restarted and forgotten what it held: it is registered afresh, as remoterl
                    # workers are, and a request it held is treated as if it had left (_mdp_orphan).
                    self._drop_mdp_worker(worker, now, notify=False)
                else:
                    raise ProtocolError("this peer is already registered in another role")
            worker = self.mdp_workers[sender] = MdpWorker(sender, msg.service, msg.version, msg.empty_prefix, now)
            svc = self.mdp_services.get(msg.service)
            if svc is None:
                svc = self.mdp_services[msg.service] = MdpService(msg.service)
            svc.workers += 1
            svc.waiting.append(sender)
            self._mdp_dispatch(svc, now)
            return
        if worker is None:
            if msg.command != "DISCONNECT":
                self._out.append([sender, *p.mdp_worker_disconnect(msg.version, empty_prefix=msg.empty_prefix)])
            return
        worker.last_seen = now  # RFC 7/18: "Any received command except DISCONNECT acts as a heartbeat"
        if msg.command in ("PARTIAL", "FINAL"):
            current = worker.current
            if current is None or current.client != msg.client:
                raise ProtocolError(f"MDP {msg.command} for a request this worker was not given")
            final = msg.command == "FINAL"
            if final or current.version is p.MdpVersion.V02:  # MDP/0.1 has no PARTIAL
                self._out.append([current.client, *p.mdp_client_reply(
                    current.version, current.service, msg.body, final=final, empty_prefix=current.empty_prefix,
                    majortomo=current.majortomo)])
            if final:
                worker.current = None
                svc = self.mdp_services[worker.service]
                svc.waiting.append(sender)
                self._mdp_dispatch(svc, now)
        elif msg.command == "DISCONNECT":
            # RFC 7/18: "When the broker receives DISCONNECT from a worker it MUST send no
            # further commands to that worker": no DISCONNECT back.
            self._drop_mdp_worker(worker, now, notify=False)

    def _mdp_dispatch(self, svc: MdpService, now: float) -> None:
        queue = self.mdp_queue
        while svc.waiting:
            request = queue.pop(svc.name)
            if request is None:
                return
            worker = self.mdp_workers[svc.waiting.popleft()]
            worker.current = request
            worker.busy_since = now
            worker.calls += 1
            self._out.append([worker.id, *p.mdp_worker_request(
                worker.version, request.client, request.body, empty_prefix=worker.empty_prefix)])

    def _mdp_expired(self, worker: MdpWorker, now: float) -> bool:
        """Whether ``worker`` has been silent too long.

        Idle: ``mdp_heartbeat × mdp_liveness`` seconds (RFC 7/18: "A peer MUST consider the
        other peer 'disconnected' if no heartbeat arrives within some multiple of that
        interval"). Busy (holding a request): ``mdp_request_timeout`` seconds since its last
        message or since it was handed the request, whichever is later (never less than the
        idle bound). Single-threaded workers (zguide's mdwrkapi, majortomo's Worker) send
        nothing while they work, and zguide's broker, the RFCs' reference, expires waiting
        workers only; the bound keeps a hung worker from holding a request for ever.
        """
        cfg = self.config
        if worker.current is None:
            return now - worker.last_seen > cfg.mdp_expiry
        return now - max(worker.last_seen, worker.busy_since) > max(cfg.mdp_request_timeout, cfg.mdp_expiry)

    def _drop_mdp_worker(self, worker: MdpWorker, now: float, notify: bool = True, requeue: bool = True) -> None:
        """Forget ``worker`` (telling it DISCONNECT with ``notify``). A request it held goes
        to :meth:`_mdp_orphan` (``requeue=False``: dropped)."""
        request, worker.current = worker.current, None
        del self.mdp_workers[worker.id]
        svc = self.mdp_services.get(worker.service)
        if svc is not None:
            svc.workers -= 1
            if worker.id in svc.waiting:
                svc.waiting.remove(worker.id)
            if not svc.workers:
                del self.mdp_services[svc.name]
        if notify:
            self._out.append([worker.id, *p.mdp_worker_disconnect(worker.version, empty_prefix=worker.empty_prefix)])
        if request is not None:
            self._mdp_orphan(request, worker, now, requeue)

    def _mdp_orphan(self, request: MdpRequest, worker: MdpWorker, now: float, requeue: bool) -> None:
        """A request was handed to ``worker``, which left before its FINAL: run it once more,
        at the head of its client's queue, or drop it.

        RFC 7/18 leave this open; zguide's broker drops it. Either choice costs something:
        the worker may have done some or all of the work before it went, so running the
        request again may run it twice; dropping it leaves the client waiting for a reply
        that will never come (Majordomo has no error reply). The broker runs it again only
        when all of these hold:

        * ``requeue``: the worker is certainly gone and cannot answer any more (it sent
          DISCONNECT or a second READY, or its connection closed). Not when it was purged
          for silence past ``mdp_request_timeout``: a hung worker may still be running the
          request, and a second run would overlap the first.
        * The request was not run again before: a request that kills every worker that
          takes it is tried on two workers, not on all of them in turn.
        * Its client asked less than ``request_ttl`` ago: the broker starts no request later
          than that after it was asked (a queued one expires then), so a client that gave
          up long ago does not have its request run again.

        Otherwise it is dropped, logged and counted (``mdp_requests_lost``). A client that
        follows RFC 7/18's recommended recovery resends a request that got no reply within
        its timeout, so a Majordomo request may run more than once already; the re-run only
        spares such a client its timeout. A request that reached the worker may have run
        (in part) whether or not it runs again: Majordomo promises no exactly-once.
        """
        if requeue and not request.requeued and now - request.queued < self.config.request_ttl:
            request.requeued = True
            self.counters["mdp_requests_requeued"] += 1
            log.info("MDP worker %s left while serving a request from %s; running it again",
                     worker.id.hex(), request.client.hex())
            self.mdp_queue.push(request, front=True)
            svc = self.mdp_services.get(request.service)
            if svc is not None:
                self._mdp_dispatch(svc, now)
            return
        self.counters["mdp_requests_lost"] += 1
        why = ("it went silent past mdp_request_timeout" if not requeue
               else "the request was run again once already" if request.requeued
               else f"the request is older than request_ttl ({self.config.request_ttl:g} s)")
        self._warn("MDP worker %s left without answering a request for %r from %s; dropping it: %s",
                   worker.id.hex(), request.service[:64], request.client.hex(), why)

    # --- bad input -----------------------------------------------------------------------------

    def _bad(self, sender: bytes, frames: list | None, reason: str, code: str = "protocol") -> None:
        """Count and log bad input; answer it when the sender's protocol has an error reply."""
        self.counters["malformed"] += 1
        self._warn("bad message from %s: %s", sender.hex() if isinstance(sender, bytes) else "?", reason)
        if not frames:
            return
        frame0 = p.as_bytes(frames[0])
        if frame0[:3] == b"RLC":
            # Echo the request id when a header can be found, so the client can match the error.
            r = None
            for frame in frames[1:3]:
                header = _try_header(frame) if len(frame) < 4096 else None
                if header is not None:
                    r = header.get("r")
                    break
            self._out.append([sender, p.client_frame(C.ERROR), p.encode_header({"r": r, "code": code, "msg": reason})])

    def _count(self, name: str, tenant: str | None) -> None:
        """Count an event broker-wide and, when it belongs to a tenant, for that tenant
        (``remoterl.status`` shows a tenant only its own counters in key mode)."""
        self.counters[name] += 1
        if tenant is not None:
            counters = self.tenant_counters.get(tenant)
            if counters is None:
                counters = self.tenant_counters[tenant] = collections.Counter()
            counters[name] += 1

    def _warn(self, fmt: str, *args: Any) -> None:
        # At most 10 warnings a second: a flood of garbage must not become a flood of logs.
        now = time.monotonic()
        if now - self._warned_at >= 1.0:
            if self._suppressed:
                log.warning("%d more bad-input warnings suppressed", self._suppressed)
            self._warned_at, self._warned, self._suppressed = now, 0, 0
        if self._warned < 10:
            self._warned += 1
            log.warning(fmt, *args)
        else:
            self._suppressed += 1

    # --- introspection ----------------------------------------------------------------------------

    def table_sizes(self) -> dict[str, int]:
        """Sizes of every table, to check that bad input leaves no state behind."""
        return {
            "workers": len(self.workers), "clients": len(self.clients), "slots": len(self.slots),
            "pending_opens": len(self.pending_opens), "env_index": len(self.env_index),
            "registrations": len(self.registrations), "pending_registers": len(self.pending_registers),
            "tenant_slots": sum(self.tenant_slots.values()),
            "mdp_workers": len(self.mdp_workers), "mdp_services": len(self.mdp_services),
            "mdp_requests": len(self.mdp_queue),
        }


class _Reply(ProtocolError):
    """A client request refused with a typed error (``code``) and the request id."""

    def __init__(self, r: Any, code: str, msg: str) -> None:
        super().__init__(msg)
        self.r, self.code = r, code


_C_CALL = p.client_frame(C.CALL)
_W_REPLY = p.worker_frame(W.REPLY)
_MDP_WORKER_SIGNATURES = frozenset(p.MDP_WORKER)
_C_HEARTBEAT = p.client_frame(C.HEARTBEAT)
_W_HEARTBEAT = p.worker_frame(W.HEARTBEAT)
# Registrations are kept for workers that join later; this bounds what clients can store.
_MAX_REGISTRATIONS = 1000


def _header(frames: list, index: int, limit: int | None = p.MAX_CONTROL_HEADER) -> dict:
    """Decode the control header at ``frames[index]``, refusing one over ``limit`` bytes
    before decoding it (``None``: bounded by the message size only)."""
    if len(frames) <= index:
        raise ProtocolError("message has no header frame")
    if limit is not None and len(frames[index]) > limit:
        raise MessageTooLargeError(f"a control header of {len(frames[index])} bytes exceeds the limit of "
                                   f"{limit} bytes (names, env ids, kwargs and specs together)")
    return p.decode_header(frames[index])


def _peer_info(header: dict) -> dict:
    """The name, host and pid a HELLO or READY gives, checked (``remoterl status`` shows them)."""
    info: dict = {}
    for key in ("name", "host"):
        value = header.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > p.MAX_NAME:
            raise ProtocolError(f"{key!r} must be a string of at most {p.MAX_NAME} characters")
        info[key] = value
    pid = header.get("pid")
    if pid is not None:
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 1 << 63:
            raise ProtocolError("'pid' must be a non-negative integer")
        info["pid"] = pid
    return info


def _check_env_id(env: Any, what: str, r: Any = None) -> str:
    if not isinstance(env, str) or not env or len(env) > p.MAX_NAME:
        raise _Reply(r, "protocol", f"{what} needs an env id string of 1 to {p.MAX_NAME} characters")
    return env


def _plain_stats(stats: dict) -> dict:
    """What ``remoterl status`` shows of a worker's heartbeat statistics: a few named numbers."""
    out = {}
    for key, value in stats.items():
        if isinstance(key, str) and len(key) <= 32 and type(value) in (int, float):
            out[key] = value
            if len(out) == 16:
                break
    return out


def _try_header(frame: Any) -> dict | None:
    try:
        return p.decode_header(frame)
    except ProtocolError:
        return None


def _is_mdp_request_for(msg: list, request: MdpRequest) -> bool:
    """Whether ``msg`` (``[worker id, frames...]``, as the core queued it) is the MDP
    REQUEST that hands ``request`` to its worker."""
    frames = msg[1:]
    if frames and not len(frames[0]):
        frames = frames[1:]
    return (len(frames) > 2 and p.as_bytes(frames[0]) in _MDP_WORKER_SIGNATURES
            and p.as_bytes(frames[1]) == p.MDPW_REQUEST and p.as_bytes(frames[2]) == request.client)


def _decrement(counter: collections.Counter, key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _place(workers: list[RLWorker], n: int, max_workers: int | None) -> list[RLWorker] | None:
    """Choose a worker for each of ``n`` slots, least loaded first; None if they don't fit."""
    candidates = sorted((w for w in workers if w.free > 0), key=lambda w: (len(w.slots) / max(w.capacity, 1), w.id))
    if max_workers is not None:
        candidates = candidates[:max_workers]
    free = {w.id: w.free for w in candidates}
    if sum(free.values()) < n:
        return None
    load = {w.id: len(w.slots) for w in candidates}
    chosen: list[RLWorker] = []
    for _ in range(n):
        best = min((w for w in candidates if free[w.id] > 0), key=lambda w: (load[w.id] / max(w.capacity, 1), w.id))
        chosen.append(best)
        free[best.id] -= 1
        load[best.id] += 1
    return chosen


def _name(peer_id: bytes, info: dict) -> str:
    name = info.get("name")
    return f"{name} ({peer_id.hex()[:8]})" if name else peer_id.hex()[:12]
