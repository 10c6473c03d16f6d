"""Shared by the tests/test_broker_core_*.py files: frame builders, assertions on the queued
messages, and the :class:`Harness` that drives a ``BrokerCore`` with explicit times (a fake
clock, plain ``bytes`` frames; no sockets, no sleeps). The ``h`` fixture is imported by the
test modules that use it (``from broker_core_helpers import h as h``)."""

from __future__ import annotations

import pytest

from remoterl.wire import codec
from remoterl.wire import protocol as p
from remoterl.broker.core import BrokerConfig, BrokerCore
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W


ENV = "CartPole-v1"
W1, W2, W3 = b"w1", b"w2", b"w3"
C1, C2 = b"c1", b"c2"
ENV_DESC = {"observation_space": {"type": "Box"}, "action_space": {"type": "Discrete", "n": 2}}


# ----------------------------------------------------------------------------
# Frame builders and the harness (see websockets tests/test_protocol.py assertFrameSent)


def hdr(**fields) -> bytes:
    return p.encode_header(fields)


def ready(envs=(ENV,), capacity=4, **extra) -> list:
    return [p.worker_frame(W.READY), hdr(v=1, envs=list(envs), capacity=capacity, **extra)]


def hello(**extra) -> list:
    return [p.client_frame(C.HELLO), hdr(v=1, **extra)]


def open_msg(r, n, env=ENV, **extra) -> list:
    return [p.client_frame(C.OPEN), hdr(r=r, env=env, kwargs={}, n=n, **extra)]


def opened(client, r, slots, env=ENV_DESC, error=None) -> list:
    fields = {"r": r, "slots": slots}
    fields.update({"error": error} if error is not None else {"env": env})
    return [p.worker_frame(W.OPENED), client, p.encode_header(fields)]


def close_msg(r, slots) -> list:
    return [p.client_frame(C.CLOSE), hdr(r=r, slots=slots)]


def call_header(r) -> bytes:
    """A CALL header as the client codec writes it (the broker never decodes it)."""
    return codec.encode({"r": r, "op": "step", "slots": [1]})[0]


def call(worker, r=1, *payload) -> list:
    return [p.client_frame(C.CALL), worker, call_header(r), *payload]


def client_heartbeat(client_id) -> list:
    return [p.client_frame(C.HEARTBEAT), hdr(id=client_id)]


def worker_heartbeat(worker_id, **extra) -> list:
    return [p.worker_frame(W.HEARTBEAT), hdr(id=worker_id, **extra)]


def mdp_request(service, *body, version=2) -> list:
    if version == 1:
        return [b"", b"MDPC01", service, *body]
    return [b"MDPC02", b"\x01", service, *body]


def header(message, index=2) -> dict:
    return p.decode_header(message[index])


def to(messages, peer, frame0=None) -> list[list]:
    """The messages addressed to ``peer`` (with first frame ``frame0``, if given)."""
    return [m for m in messages if m[0] == peer and (frame0 is None or m[1] == frame0)]


def short(messages) -> list:
    """Messages with long frames cut, for readable assertion messages."""
    return [[bytes(f[:24]) + (b"..." if len(f) > 24 else b"") for f in m] for m in messages]


def one(messages, peer, frame0) -> list:
    """Assert exactly one message to ``peer`` starts with ``frame0``; return it."""
    found = to(messages, peer, frame0)
    assert len(found) == 1, f"expected one {frame0!r} to {peer!r}, got {short(messages)!r}"
    return found[0]


def assert_error(messages, peer, code, r=None) -> dict:
    """Assert ``peer`` got one ERROR with this code (and request id); return its header."""
    error = header(one(messages, peer, p.client_frame(C.ERROR)))
    assert error["code"] == code, error
    assert error["r"] == r, error
    assert isinstance(error["msg"], str) and error["msg"]
    return error


class Harness:
    """A BrokerCore driven with explicit times; each call returns the messages it queued."""

    def __init__(self, now: float = 0.0, **config) -> None:
        self.core = BrokerCore(BrokerConfig(**config), now=now, instance="broker-test")
        self.now = now

    def send(self, sender: bytes, frames: list, now: float | None = None) -> list[list]:
        if now is not None:
            self.now = now
        self.core.receive(sender, frames, self.now)
        return self.out()

    def tick(self, now: float) -> list[list]:
        self.now = now
        self.core.tick(now)
        return self.out()

    def out(self) -> list[list]:
        return self.core.messages_to_send()

    # --- whole steps -------------------------------------------------------------------

    def add_worker(self, worker_id, envs=(ENV,), capacity=4, **extra) -> dict:
        out = self.send(worker_id, ready(envs, capacity, **extra))
        assert len(out) == 1
        return header(one(out, worker_id, p.worker_frame(W.WELCOME)), 2)

    def add_client(self, client_id, **extra) -> dict:
        out = self.send(client_id, hello(**extra))
        assert len(out) == 1
        return header(one(out, client_id, p.client_frame(C.WELCOME)), 2)

    def open_requests(self, out) -> dict[bytes, dict]:
        """The OPEN each worker was sent, by worker id: its header."""
        requests = {}
        for message in out:
            assert message[1] == p.worker_frame(W.OPEN), message
            assert message[0] not in requests, "one OPEN per worker"
            requests[message[0]] = header(message, 3)
        return requests

    def open_ok(self, client_id, n, r=1, env=ENV, **extra) -> list:
        """OPEN n slots and let every worker asked answer OPENED; return [[slot, worker], ...]."""
        requests = self.open_requests(self.send(client_id, open_msg(r, n, env, **extra)))
        out = []
        for worker_id, request in requests.items():
            out += self.send(worker_id, opened(client_id, request["r"], request["slots"]))
        reply = header(one(out, client_id, p.client_frame(C.OPENED)))
        assert reply["r"] == r and reply["env"] == ENV_DESC
        return reply["slots"]

    def snapshot(self) -> dict:
        """Every table size plus each peer's slot bookkeeping."""
        core = self.core
        return {
            **core.table_sizes(),
            "worker_slots": {w: sorted(x.slots) for w, x in core.workers.items()},
            "worker_clients": {w: dict(x.clients) for w, x in core.workers.items()},
            "client_slots": {c: sorted(x.slots) for c, x in core.clients.items()},
            "client_workers": {c: dict(x.workers) for c, x in core.clients.items()},
        }

    def assert_empty_slots(self) -> None:
        core = self.core
        assert core.slots == {} and core.pending_opens == {}
        for worker in core.workers.values():
            assert not worker.slots and not worker.clients and worker.free == worker.capacity
        for client in core.clients.values():
            assert not client.slots and not client.workers


@pytest.fixture
def h() -> Harness:
    """Two workers serving ENV with 4 slots each, and one client that said HELLO."""
    harness = Harness()
    harness.add_worker(W1)
    harness.add_worker(W2)
    harness.add_client(C1)
    return harness
