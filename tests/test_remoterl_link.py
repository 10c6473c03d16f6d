"""Tests for remoterl.io.link: multipart messages over a socketpair, without zmq."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from conftest import T
from remoterl.io.link import Link, LinkClosed
from remoterl.errors import ProtocolError


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Link(a), Link(b)
    yield left, right
    left.close()
    right.close()


def _receive_all(link: Link, count: int, timeout: float = T) -> list:
    got: list = []
    while len(got) < count:
        messages = link.wait(timeout)
        assert messages, f"timed out after {len(got)} of {count} messages"
        got.extend(messages)
    return got


def test_frames_arrive_as_sent(pair):
    left, right = pair
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    left.send([b"SIG", b"", b"header", array, memoryview(b"tail"), b""])
    (frames,) = _receive_all(right, 1)
    assert frames[:3] == [b"SIG", b"", b"header"]
    assert all(type(f) is bytes for f in frames[:3])
    assert np.array_equal(np.frombuffer(frames[3], dtype=np.float32).reshape(3, 4), array)
    assert bytes(frames[4]) == b"tail" and bytes(frames[5]) == b""
    # Payload frames are writeable, as zmq frames received without a copy are.
    decoded = np.frombuffer(frames[3], dtype=np.float32)
    decoded[0] = 7.0
    assert decoded[0] == 7.0


def test_many_small_messages_in_order(pair):
    left, right = pair
    sent = 0
    while not left.wants_write and sent < 200_000:  # until the socket buffer is full
        left.send([b"m", str(sent).encode()])
        sent += 1
    assert left.wants_write, "the socket never filled up"
    for _ in range(100):  # these wait in the queue, in order
        left.send([b"m", str(sent).encode()])
        sent += 1
    got: list = []
    while len(got) < sent:
        left.flush()
        got.extend(right.wait(T))
    assert not left.wants_write
    assert [int(f[1]) for f in got] == list(range(sent))


def test_message_bigger_than_the_socket_buffer_is_queued_not_blocked(pair):
    left, right = pair
    big = np.random.default_rng(0).integers(0, 255, size=8 * 1024 * 1024, dtype=np.uint8)
    left.send([b"big", b"", b"h", big])  # returns at once: the rest waits in the queue
    assert left.wants_write
    left.send([b"after", b"", b"h"])  # behind the big one, never interleaved
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(_receive_all(right, 3)))
    reader.start()
    left.send_all([b"last", b"", b"h"], timeout=T)  # flushes everything queued before it
    assert not left.wants_write
    reader.join(T)
    assert [f[0] for f in got] == [b"big", b"after", b"last"]
    assert np.array_equal(np.frombuffer(got[0][3], dtype=np.uint8), big)


def test_partial_messages_are_reassembled(pair):
    left, right = pair
    raw_sender = left.sock
    body = struct.pack("<III", 2, 3, 2) + b"abcde"
    message = struct.pack("<I", len(body)) + body
    for i in range(len(message)):  # one byte at a time
        raw_sender.send(message[i:i + 1])
        got = right.receive()
        if i < len(message) - 1:
            assert got == []
    assert got == [[b"abc", b"de"]]


def test_eof_raises_link_closed(pair):
    left, right = pair
    left.close()
    with pytest.raises(LinkClosed):
        right.wait(T)
    with pytest.raises(LinkClosed):
        right.send_all([b"x"], timeout=T)


def test_oversized_message_is_refused_before_reading_it():
    a, b = socket.socketpair()
    left, right = Link(a), Link(b, max_message_size=1000)
    try:
        left.send([b"x" * 2000])
        with pytest.raises(ProtocolError, match="exceeds the limit of 1000 bytes"):
            right.wait(T)
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("body", [
    b"\x00\x00\x00\x00",  # no frames
    struct.pack("<I", 5),  # five frames, no lengths
    struct.pack("<II", 1, 10) + b"short",  # lengths do not add up
    b"\x01",  # not even a frame count
])
def test_malformed_messages_raise_protocol_error(pair, body):
    left, right = pair
    left.sock.sendall(struct.pack("<I", len(body)) + body)
    with pytest.raises(ProtocolError):
        right.wait(T)


def test_wait_times_out_empty(pair):
    _, right = pair
    assert right.wait(0.01) == []


def test_send_all_times_out_when_nobody_reads(pair):
    left, _ = pair
    with pytest.raises(TimeoutError):
        left.send_all([np.zeros(16 * 1024 * 1024, dtype=np.uint8)], timeout=0.05)
