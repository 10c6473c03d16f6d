"""Tests for remoterl.client.session: the client core's bookkeeping, fed broker messages (no sockets)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence

from remoterl.wire import codec
from remoterl.wire import protocol as p
from remoterl.client.session import ClientCore, Pending
from remoterl.errors import (
    AuthenticationError,
    BrokerUnavailableError,
    CapacityError,
    CodecError,
    EnvClosedError,
    NoWorkerError,
    ProtocolError,
    RemoteEnvError,
    RemoteRLError,
    RemoteTimeoutError,
    WorkerLostError,
)
from remoterl.wire.protocol import ClientCommand as C

W1 = b"worker-1"
W2 = b"worker-2"


# ----------------------------------------------------------------------------
# Helpers: build what the broker sends


def reply_frames(value, **encode_kwargs) -> list:
    """A REPLY as the client receives it: command frame, codec header, array frames."""
    header, frames = codec.encode(value, **encode_kwargs)
    return [p.client_frame(C.REPLY), header, *frames]


def control(command: C, header: dict) -> list:
    """A broker control message (OPENED, CLOSED, ERROR, WORKER_LOST, WELCOME)."""
    return [p.client_frame(command), p.encode_header(header)]


def core_with_slots() -> ClientCore:
    """Slots 1, 2 on worker 1 and slot 3 on worker 2."""
    core = ClientCore()
    core.add_slots([1, 2, 3], [W1, W1, W2])
    return core


def assert_failed(entry: Pending, cls: type[BaseException]) -> BaseException:
    assert entry.done
    assert entry.result is None
    assert type(entry.error) is cls, entry.error
    return entry.error


def assert_pending(entry: Pending) -> None:
    assert not entry.done and entry.error is None and entry.result is None


# ----------------------------------------------------------------------------
# Request ids


def test_new_request_ids_are_unique_and_increasing():
    core = ClientCore()
    entries = [core.new_request(W1), core.new_request(), core.new_request(W2)]
    assert [e.r for e in entries] == [1, 2, 3]
    assert [e.worker for e in entries] == [W1, None, W2]
    assert core.pending == {1: entries[0], 2: entries[1], 3: entries[2]}
    assert all(not e.done for e in entries)

    # Ids are never reused, not even after an answer or a forget.
    core.receive(reply_frames({"r": 1}))
    core.forget(entries[1])
    assert core.new_request(W1).r == 4
    assert sorted(core.pending) == [3, 4]
    # A second ClientCore counts on its own.
    assert ClientCore().new_request().r == 1


# ----------------------------------------------------------------------------
# REPLY


def test_reply_completes_the_matching_entry_with_the_decoded_dict():
    core = ClientCore()
    first, second = core.new_request(W1), core.new_request(W1)
    obs = np.arange(3000, dtype=np.float32).reshape(1000, 3)  # travels in a frame
    value = {"r": second.r, "obs": obs, "rew": np.ones(2), "infos": [{"a": (1, 2)}, {}]}
    frames = reply_frames(value)
    assert len(frames) == 3  # REPLY, header, one array frame
    core.receive(frames)

    assert second.done and second.error is None
    assert data_equivalence(second.result, value, exact=True)
    assert_pending(first)
    assert list(core.pending) == [first.r]


def test_reply_frames_may_be_buffers():
    core = ClientCore()
    entry = core.new_request(W1)
    frames = reply_frames({"r": entry.r, "obs": np.zeros(4096, np.uint8)})
    core.receive([memoryview(f) for f in frames[:2]] + frames[2:])
    assert entry.done and entry.result["obs"].shape == (4096,)


def test_reply_with_an_env_error_carries_the_remote_traceback():
    core = ClientCore()
    entry = core.new_request(W1)
    tb = 'Traceback (most recent call last):\n  File "sim.py", line 3, in step\nValueError: boom\n'
    core.receive(reply_frames({"r": entry.r, "error": {
        "code": "env", "msg": "x", "tb": tb, "type": "ValueError", "slot": 2}}))
    error = assert_failed(entry, RemoteEnvError)
    assert error.remote_traceback == tb
    assert error.remote_type == "ValueError"
    assert error.slot == 2
    assert "x" in str(error) and "boom" in str(error)
    assert core.pending == {}


def test_reply_with_a_minimal_env_error():
    core = ClientCore()
    entry = core.new_request(W1)
    core.receive(reply_frames({"r": entry.r, "error": {"code": "env", "msg": "x", "tb": "Traceback..."}}))
    error = assert_failed(entry, RemoteEnvError)
    assert error.remote_traceback == "Traceback..."
    assert error.slot is None


@pytest.mark.parametrize(("code", "cls"), [
    ("closed", EnvClosedError),
    ("codec", CodecError),
    ("protocol", ProtocolError),
    ("timeout", RemoteTimeoutError),
    ("something-new", ProtocolError),  # an unknown code is still an error, never a result
])
def test_reply_with_other_error_codes(code, cls):
    core = ClientCore()
    entry = core.new_request(W1)
    core.receive(reply_frames({"r": entry.r, "error": {"code": code, "msg": "why"}}))
    error = assert_failed(entry, cls)
    assert "why" in str(error)


def test_reply_for_an_unknown_r_is_dropped():
    core = ClientCore()
    entry = core.new_request(W1)
    core.receive(reply_frames({"r": 999, "obs": 1}))
    core.receive(reply_frames({"obs": 1}))  # no r at all
    core.receive(reply_frames({"r": 999, "error": {"code": "env", "msg": "late"}}))
    assert_pending(entry)
    assert list(core.pending) == [entry.r]


def test_late_reply_after_forget_is_dropped():
    core = ClientCore()
    entry = core.new_request(W1)
    core.forget(entry)
    core.forget(entry)  # twice is harmless
    core.receive(reply_frames({"r": entry.r, "obs": 1}))
    assert_pending(entry)
    assert core.pending == {}


def test_a_second_reply_for_the_same_r_is_dropped():
    core = ClientCore()
    entry = core.new_request(W1)
    core.receive(reply_frames({"r": entry.r, "n": 1}))
    core.receive(reply_frames({"r": entry.r, "n": 2}))
    assert entry.result == {"r": entry.r, "n": 1}


# ----------------------------------------------------------------------------
# Broker answers: OPENED, CLOSED, ERROR


def test_opened_and_closed_complete_broker_requests():
    core = ClientCore()
    open_entry, close_entry = core.new_request(), core.new_request()
    opened = {"r": open_entry.r, "slots": [[1, W1], [2, W2]], "env": b"\x80"}
    core.receive(control(C.OPENED, opened))
    assert open_entry.done and open_entry.error is None
    assert open_entry.result == opened
    assert_pending(close_entry)

    core.receive(control(C.CLOSED, {"r": close_entry.r}))
    assert close_entry.done and close_entry.result == {"r": close_entry.r}
    assert core.pending == {}


@pytest.mark.parametrize(("code", "cls"), [
    ("no_worker", NoWorkerError),
    ("capacity", CapacityError),
    ("worker_lost", WorkerLostError),
    ("closed", EnvClosedError),
    ("protocol", ProtocolError),
    ("auth", AuthenticationError),
])
def test_error_maps_codes_to_classes(code, cls):
    core = ClientCore()
    other = core.new_request()
    entry = core.new_request()
    core.receive(control(C.ERROR, {"r": entry.r, "code": code, "msg": f"because {code}"}))
    error = assert_failed(entry, cls)
    assert str(error) == f"because {code}"
    assert isinstance(error, RemoteRLError)
    assert_pending(other)


def test_error_classes_keep_their_families():
    # Generic handlers keep working: a capacity problem is a no-worker problem,
    # a lost worker is a ConnectionError.
    core = ClientCore()
    a, b = core.new_request(), core.new_request()
    core.receive(control(C.ERROR, {"r": a.r, "code": "capacity", "msg": "full"}))
    core.receive(control(C.ERROR, {"r": b.r, "code": "worker_lost", "msg": "gone"}))
    assert isinstance(a.error, NoWorkerError)
    assert isinstance(b.error, ConnectionError)


def test_broker_answers_for_unknown_r_are_dropped():
    core = ClientCore()
    entry = core.new_request()
    core.receive(control(C.OPENED, {"r": 77, "slots": []}))
    core.receive(control(C.CLOSED, {"r": 77}))
    core.receive(control(C.ERROR, {"r": 77, "code": "no_worker", "msg": "nobody"}))
    core.receive(control(C.ERROR, {"code": "protocol", "msg": "a broker complaint with no r"}))
    assert_pending(entry)


def test_welcome_is_ignored():
    core = ClientCore()
    entry = core.new_request()
    core.receive(control(C.WELCOME, {"v": 1, "broker": "b", "heartbeat": 1.0}))
    assert_pending(entry)


# ----------------------------------------------------------------------------
# Lost workers, closed slots, a lost session


def test_worker_lost_fails_calls_to_that_worker_only():
    core = core_with_slots()
    call_w1a, call_w1b = core.new_request(W1), core.new_request(W1)
    call_w2 = core.new_request(W2)
    broker_request = core.new_request(None)

    core.receive(control(C.WORKER_LOST, {"worker": W1, "slots": [1, 2], "msg": "worker-1 died"}))

    for entry in (call_w1a, call_w1b):
        error = assert_failed(entry, WorkerLostError)
        assert str(error) == "worker-1 died"
    assert_pending(call_w2)
    assert_pending(broker_request)
    assert sorted(core.pending) == [call_w2.r, broker_request.r]

    # Later calls on the lost slots fail before anything is sent; the others go on.
    for slot in (1, 2):
        with pytest.raises(WorkerLostError, match="worker-1 died"):
            core.check_slots([slot])
    with pytest.raises(WorkerLostError):
        core.check_slots([3, 1])
    core.check_slots([3])

    # A late reply from the lost worker finds nobody waiting.
    core.receive(reply_frames({"r": call_w1a.r, "obs": 1}))
    assert type(call_w1a.error) is WorkerLostError


def test_worker_lost_without_msg_still_says_why():
    core = core_with_slots()
    entry = core.new_request(W2)
    core.receive(control(C.WORKER_LOST, {"worker": W2, "slots": [3]}))
    assert str(assert_failed(entry, WorkerLostError))
    with pytest.raises(WorkerLostError):
        core.check_slots([3])
    core.check_slots([1, 2])


def test_worker_lost_keeps_the_first_reason():
    core = core_with_slots()
    core.receive(control(C.WORKER_LOST, {"worker": W1, "slots": [1], "msg": "first"}))
    core.receive(control(C.WORKER_LOST, {"worker": W1, "slots": [1], "msg": "second"}))
    with pytest.raises(WorkerLostError, match="first"):
        core.check_slots([1])


def test_worker_lost_for_unknown_slots_and_workers_is_harmless():
    core = core_with_slots()
    entry = core.new_request(W1)
    core.receive(control(C.WORKER_LOST, {"worker": b"worker-9", "slots": [7, 8], "msg": "?"}))
    assert_pending(entry)
    core.check_slots([1, 2, 3])
    assert 7 not in core.slots


def test_check_slots_of_open_slots_passes():
    core = core_with_slots()
    core.check_slots([1, 2, 3])
    core.check_slots([])


def test_mark_closed_makes_check_slots_raise_env_closed():
    core = core_with_slots()
    core.mark_closed([1, 99])  # an unknown slot is ignored
    with pytest.raises(EnvClosedError):
        core.check_slots([1])
    with pytest.raises(EnvClosedError):
        core.check_slots([2, 1])
    core.check_slots([2, 3])
    # A slot that was never opened is closed as far as the caller is concerned.
    with pytest.raises(EnvClosedError):
        core.check_slots([42])


def test_closed_beats_lost():
    # "You closed it" is reported even if its worker died afterwards.
    core = core_with_slots()
    core.mark_closed([1])
    core.receive(control(C.WORKER_LOST, {"worker": W1, "slots": [1, 2], "msg": "gone"}))
    with pytest.raises(EnvClosedError):
        core.check_slots([1])
    with pytest.raises(WorkerLostError):
        core.check_slots([2])


def test_lose_all_fails_everything():
    core = core_with_slots()
    entries = [core.new_request(W1), core.new_request(W2), core.new_request(None)]
    core.lose_all("broker restarted")
    for entry in entries:
        assert str(assert_failed(entry, WorkerLostError)) == "broker restarted"
    assert core.pending == {}
    for slot in (1, 2, 3):
        with pytest.raises(WorkerLostError, match="broker restarted"):
            core.check_slots([slot])
    # Replies that arrive afterwards are dropped.
    core.receive(reply_frames({"r": entries[0].r, "obs": 1}))
    assert entries[0].result is None


def test_lose_all_with_another_error_class():
    core = core_with_slots()
    entry = core.new_request(W1)
    core.lose_all("no broker at tcp://x", BrokerUnavailableError)
    assert_failed(entry, BrokerUnavailableError)
    with pytest.raises(WorkerLostError):  # slots are lost whatever took the session down
        core.check_slots([1])


def test_lose_all_keeps_earlier_reasons_and_closed_slots():
    core = core_with_slots()
    core.receive(control(C.WORKER_LOST, {"worker": W1, "slots": [1], "msg": "worker-1 died"}))
    core.mark_closed([2])
    core.lose_all("broker gone")
    with pytest.raises(WorkerLostError, match="worker-1 died"):
        core.check_slots([1])
    with pytest.raises(EnvClosedError):
        core.check_slots([2])
    with pytest.raises(WorkerLostError, match="broker gone"):
        core.check_slots([3])


# ----------------------------------------------------------------------------
# Malformed messages


MALFORMED = {
    "reply without header": [p.client_frame(C.REPLY)],
    "reply junk header": [p.client_frame(C.REPLY), b"\xc1\xc1"],
    "reply empty header": [p.client_frame(C.REPLY), b""],
    "reply header not a map": reply_frames([1, 2, 3]),
    "reply missing its frame": reply_frames({"r": 1, "obs": np.zeros(4096)})[:2],
    "reply bad ext": [p.client_frame(C.REPLY), b"\x81\xa1r\xd4\x63\x00"],
    "unknown signature": [b"HELLO", b"\x80"],
    "mdp client": [b"MDPC02", b"\x03", b"svc"],
    "worker command": [p.worker_frame(p.WorkerCommand.REPLY), b"\x80"],
    "wrong version": [b"RLC2\x04", p.encode_header({"r": 1})],
    "empty frame": [b"", b"\x80"],
    "control without header": [p.client_frame(C.OPENED)],
    "control junk header": [p.client_frame(C.OPENED), b"\xc1"],
    "control header not a map": [p.client_frame(C.ERROR), msgpack.packb([1, 2])],
    "unknown command": [p.RL_CLIENT + b"\x7f", p.encode_header({"r": 1})],
    "client-only command": control(C.CALL, {"r": 1}),
}


@pytest.mark.parametrize("frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_message_raises_protocol_error(frames):
    core = core_with_slots()
    entry = core.new_request(W1)
    with pytest.raises(ProtocolError):
        core.receive(frames)
    # Nothing changed: the request still waits, the slots are still open.
    assert_pending(entry)
    assert list(core.pending) == [entry.r]
    core.check_slots([1, 2, 3])


UNHASHABLE = {
    "reply r is a list": reply_frames({"r": [1], "obs": 1}),
    "reply r is a map": reply_frames({"r": {"a": 1}}),
    "opened r is a list": control(C.OPENED, {"r": [1]}),
    "error r is a map": control(C.ERROR, {"r": {"x": 1}, "code": "no_worker", "msg": "m"}),
    "worker_lost slots is an int": control(C.WORKER_LOST, {"worker": W1, "slots": 5, "msg": "m"}),
    "worker_lost slot is a list": control(C.WORKER_LOST, {"worker": W1, "slots": [[1]], "msg": "m"}),
}


@pytest.mark.parametrize("frames", list(UNHASHABLE.values()), ids=list(UNHASHABLE))
def test_malformed_values_raise_protocol_error(frames):
    core = core_with_slots()
    core.new_request(W1)  # CPython's dict.pop skips hashing when the dict is empty
    with pytest.raises(ProtocolError):
        core.receive(frames)


def test_empty_message_raises_protocol_error():
    with pytest.raises(ProtocolError):
        ClientCore().receive([])


def test_reply_error_that_is_not_a_map_still_fails_the_entry():
    core = ClientCore()
    entry = core.new_request(W1)
    core.receive(reply_frames({"r": entry.r, "error": "boom"}))
    assert isinstance(entry.error, ProtocolError)
    assert "boom" in str(entry.error)
