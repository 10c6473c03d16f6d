"""Tests for remoterl.workers.runtime's attribute calls: get_attr, set_attr and call reach each of
the caller's slots, big ints travel as strings, and the worker refuses private names, helpers
and values that cannot travel. The host is driven by decoded calls (no sockets): a call is a
codec header plus frames, exactly as the worker loop hands it over; the reply is decoded with
the codec, exactly as the client would (helpers in workers_runtime_helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_same

import remoterl.env
from remoterl.workers.runtime import SlotHost
from workers_runtime_helpers import OTHER, SLOTS, assert_error, call, opened_host


# ----------------------------------------------------------------------------
# Attributes: get_attr, set_attr, call


def counting_host(slots=SLOTS, **kwargs) -> SlotHost:
    host = opened_host("CountingEnv-v0", slots=slots, **kwargs)
    call(host, {"r": 1, "op": "reset", "slots": list(slots), "seeds": list(range(len(slots)))})
    return host


def test_get_attr_reads_each_slot_and_marks_methods():
    host = counting_host(label="L")
    for slot, steps in zip(host.slots.values(), (3, 4, 5)):
        slot.env.steps = steps
    assert call(host, {"r": 2, "op": "get_attr", "slots": SLOTS, "name": "steps"}) == {"r": 2, "values": [3, 4, 5]}
    assert call(host, {"r": 3, "op": "get_attr", "slots": SLOTS, "name": "label"})["values"] == ["L"] * 3
    reply = call(host, {"r": 4, "op": "get_attr", "slots": SLOTS, "name": "scale"})
    assert reply == {"r": 4, "values": [None] * 3, "callable": [0, 1, 2]}  # not called
    reply = call(host, {"r": 5, "op": "get_attr", "slots": SLOTS, "name": "np_random_seed"})
    assert reply["values"] == [0, 1, 2] and "big" not in reply
    probe = {"r": 6, "op": "get_attr", "slots": SLOTS, "probe": True}
    assert call(host, {**probe, "name": "steps"})["values"] == [True] * 3
    assert call(host, {**probe, "name": "nope"})["values"] == [False] * 3
    host.close_all()


def test_ints_beyond_64_bits_travel_as_decimal_strings():
    host = opened_host("CountingEnv-v0")  # never seeded: gymnasium draws 128-bit seeds
    local = [slot.env.np_random_seed for slot in host.slots.values()]
    assert max(local) >= 2**64, "gymnasium's own seeds should need more than 64 bits"
    reply = call(host, {"r": 2, "op": "get_attr", "slots": SLOTS, "name": "np_random_seed"})
    assert reply["values"] == [str(v) if v >= 2**64 else v for v in local]
    assert reply["big"] == [i for i, v in enumerate(local) if v >= 2**64]
    assert remoterl.env.values_from_wire(reply, 3) == local
    host.close_all()


def test_call_calls_methods_and_returns_plain_attributes():
    host = counting_host()
    reply = call(host, {"r": 2, "op": "call", "slots": SLOTS, "name": "scale",
                        "args": [np.arange(3, dtype=np.float32)], "kwargs": {"factor": 4}})
    assert_same(reply["values"], [np.arange(3, dtype=np.float32) * 4] * 3, "scale results")
    assert call(host, {"r": 3, "op": "call", "slots": SLOTS, "name": "steps"})["values"] == [0, 0, 0]
    error = assert_error(call(host, {"r": 4, "op": "call", "slots": SLOTS, "name": "fail"}), "env")
    assert error["slot"] == SLOTS[0] and "fail() on purpose" in error["msg"] and "RuntimeError" in error["tb"]
    host.close_all()


def test_set_attr_sets_one_value_per_slot():
    host = counting_host()
    reply = call(host, {"r": 2, "op": "set_attr", "slots": SLOTS, "name": "steps", "values": [7, 8, 9], "force": True})
    assert reply == {"r": 2, "set": [True] * 3}
    assert [slot.env.unwrapped.steps for slot in host.slots.values()] == [7, 8, 9]
    reply = call(host, {"r": 3, "op": "set_attr", "slots": SLOTS, "name": "fresh", "values": [1, 2, 3], "force": False})
    assert reply["set"] == [False] * 3  # force=False sets only what exists
    host.close_all()


@pytest.mark.parametrize("request_, code", [
    ({"op": "get_attr", "name": "_secret"}, "attr"),
    ({"op": "get_attr", "name": "__class__"}, "attr"),
    ({"op": "get_attr", "name": "no_such_attribute"}, "attr"),
    ({"op": "get_attr", "name": "a.b"}, "attr"),
    ({"op": "get_attr", "name": "x" * 257}, "attr"),
    ({"op": "call", "name": "get_wrapper_attr", "args": ["_secret"]}, "attr"),
    ({"op": "call", "name": "has_wrapper_attr", "args": ["_secret"]}, "attr"),
    ({"op": "call", "name": "close"}, "attr"),
    ({"op": "call", "name": "reset"}, "attr"),
    ({"op": "call", "name": "step", "args": [0]}, "attr"),
    ({"op": "set_attr", "name": "_secret", "values": [1, 1, 1]}, "attr"),
    ({"op": "set_attr", "name": "set_wrapper_attr", "values": [1, 1, 1]}, "attr"),
    ({"op": "get_attr"}, "protocol"),
    ({"op": "get_attr", "name": 5}, "protocol"),
    ({"op": "call", "name": "scale", "args": 5}, "protocol"),
    ({"op": "call", "name": "scale", "args": [1], "kwargs": {1: 2}}, "protocol"),
    ({"op": "set_attr", "name": "steps", "values": [1, 2]}, "protocol"),
    ({"op": "set_attr", "name": "steps", "values": 1}, "protocol"),
    ({"op": "set_attr", "name": "steps", "values": [1, 2, 3], "force": "yes"}, "protocol"),
], ids=["private", "dunder", "missing", "dotted", "too-long", "helper-get", "helper-has", "close", "reset", "step",
        "set-private", "set-helper", "no-name", "name-not-str", "args-not-list", "kwargs-int-keys",
        "values-short", "values-not-list", "force-not-bool"])
def test_attribute_calls_the_worker_refuses(request_, code):
    host = counting_host()
    before = [(slot.env.unwrapped.steps, slot.env.unwrapped._secret) for slot in host.slots.values()]
    error = assert_error(call(host, {"r": 2, "slots": SLOTS, **request_}), code)
    if request_.get("name") == "no_such_attribute":
        assert "no_such_attribute" in error["msg"]
    assert [(slot.env.unwrapped.steps, slot.env.unwrapped._secret) for slot in host.slots.values()] == before
    assert host.stats["steps"] == 0 and host.stats["resets"] == 3  # nothing ran
    host.close_all()


def test_a_value_that_cannot_travel_is_a_codec_error_naming_the_attribute():
    host = counting_host()
    error = assert_error(call(host, {"r": 2, "op": "get_attr", "slots": SLOTS, "name": "handle"}), "codec")
    assert "'handle'" in error["msg"] and f"slot {SLOTS[0]}" in error["msg"] and "object" in error["msg"]
    error = assert_error(call(host, {"r": 3, "op": "call", "slots": SLOTS, "name": "np_random"}), "codec")
    assert "'np_random'" in error["msg"] and "Generator" in error["msg"]
    assert "error" not in call(host, {"r": 4, "op": "step", "slots": SLOTS, "a": np.zeros(3, np.int64), "m": 0})
    host.close_all()


def test_attribute_calls_reach_only_the_callers_slots():
    host = counting_host(slots=[1, 2])
    assert "error" not in host.open(OTHER, {"r": 1, "env": "CountingEnv-v0", "kwargs": {}, "slots": [3]})
    reply = call(host, {"r": 2, "op": "set_attr", "slots": [3, 1], "name": "steps", "values": [5, 5]}, client=OTHER)
    assert_error(reply, "closed")
    assert host.slots[1].env.unwrapped.steps == 0
    host.close_all()
