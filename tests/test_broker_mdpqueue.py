"""The Majordomo request queue: budgets, turns, expiry, all without sockets."""

from __future__ import annotations

import pytest

from remoterl.broker.mdpqueue import MdpQueue, MdpRequest


def req(client: bytes, body: bytes = b"x", service: bytes = b"svc", at: float = 0.0) -> MdpRequest:
    return MdpRequest(client, service, None, False, [body], at, len(body))


@pytest.fixture
def q() -> MdpQueue:
    return MdpQueue(max_requests=1000, max_bytes=10_000, max_bytes_per_client=5_000, ttl=10.0)


def drain(q: MdpQueue, service: bytes = b"svc") -> list:
    out = []
    while (r := q.pop(service)) is not None:
        out.append((r.client, bytes(r.body[0])))
    return out


def test_clients_take_turns_in_arrival_order_each(q):
    for i in range(3):
        q.push(req(b"a", b"a%d" % i))
    q.push(req(b"b", b"b0"))
    q.push(req(b"c", b"c0"))
    q.push(req(b"b", b"b1"))
    assert drain(q) == [(b"a", b"a0"), (b"b", b"b0"), (b"c", b"c0"), (b"a", b"a1"), (b"b", b"b1"), (b"a", b"a2")]
    assert len(q) == 0 and q.bytes == 0 and q.services() == {}


def test_bounds_refuse_without_keeping_anything():
    q = MdpQueue(max_requests=2, max_bytes=100, max_bytes_per_client=60, ttl=10.0)
    assert q.push(req(b"a", b"x" * 50)) is None
    assert "its limit of 60" in q.push(req(b"a", b"x" * 20))
    assert "limit of 100" in q.push(req(b"b", b"x" * 51))
    assert q.push(req(b"b", b"x" * 10)) is None
    assert "at most 2" in q.push(req(b"c", b"x"))
    assert (len(q), q.bytes, q.services()) == (2, 60, {b"svc": 2})


def test_expiry_drops_old_requests_only(q):
    q.push(req(b"a", b"old", at=0.0))
    q.push(req(b"b", b"new", at=5.0))
    assert q.expire(9.0) == 0
    assert q.expire(10.5) == 1
    assert drain(q) == [(b"b", b"new")]
    assert q.expire(100.0) == 0


def test_a_request_given_back_goes_first(q):
    q.push(req(b"a", b"1"))
    q.push(req(b"b", b"2"))
    first = q.pop(b"svc")
    assert q.push(first, front=True) is None
    assert drain(q) == [(b"a", b"1"), (b"b", b"2")]


def test_served_requests_do_not_pile_up(q):
    # One old request stays at the head of the arrival list while many others come and go.
    q.push(req(b"idle", b"x", service=b"other", at=0.0))
    for i in range(10_000):
        q.push(req(b"a", at=1.0))
        assert q.pop(b"svc") is not None
    assert len(q._arrivals) < 200
    assert q.expire(10.5) == 1 and len(q) == 0


def test_a_request_given_back_expires_by_its_arrival_time(q):
    """A request handed to a worker that left is given back with the time it first arrived:
    the broker starts no request later than ``ttl`` after its client asked."""
    q.push(req(b"a", b"old", at=0.0))
    given = q.pop(b"svc")
    q.push(req(b"b", b"new", at=5.0))
    assert q.push(given, front=True) is None
    assert q.expire(9.0) == 0 and len(q) == 2
    assert q.expire(10.5) == 1
    assert drain(q) == [(b"b", b"new")] and q.bytes == 0
