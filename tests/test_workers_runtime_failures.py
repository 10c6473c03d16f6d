"""Tests for remoterl.workers.runtime's failures: an env that raises, foreign slots, malformed
calls, actions that do not fit, infos that cannot travel, and which slots a failed step stepped;
the host answers each with an error reply and serves on. The host is driven by decoded calls (no
sockets): a call is a codec header plus frames, exactly as the worker loop hands it over; the
reply is decoded with the codec, exactly as the client would (helpers in
workers_runtime_helpers.py)."""

from __future__ import annotations

import gc

import gymnasium
import numpy as np
import pytest

from conftest import assert_same

from remoterl.wire import codec
from remoterl.workers.runtime import SlotHost
from workers_runtime_helpers import CLIENT, OTHER, SLOTS, SEEDS, assert_error, call, make_env, opened_host, raw_call


# ----------------------------------------------------------------------------
# Failures: an env that raises, foreign slots, malformed calls, infos that cannot travel


def test_env_error_carries_the_traceback_and_the_host_keeps_serving():
    host = opened_host("RaisingEnv-v0")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0]), "m": 0})
    error = assert_error(reply, "env")
    assert reply["r"] == 2
    assert "boom from the simulator" in error["msg"]
    assert error["type"] == "ValueError"
    assert error["slot"] == 2
    assert "explode_on_purpose" in error["tb"]
    assert "Traceback" in error["tb"]
    assert host.stats["errors"] == 1
    assert sorted(host.slots) == SLOTS

    # Every slot, the one that raised included, keeps working.
    reply = call(host, {"r": 3, "op": "step", "slots": SLOTS, "a": np.array([0, 0, 0]), "m": 0})
    assert "error" not in reply, reply
    assert_same(reply["obs"], np.ones((3, 2), np.float32), "obs")
    assert_same(reply["rew"], np.ones(3), "rewards")
    assert reply["infos"] == [{"ok": True}] * 3
    reply = call(host, {"r": 4, "op": "step", "slots": [1, 3], "a": np.array([0, 0]), "m": 0})
    assert "error" not in reply and reply["obs"].shape == (2, 2)
    host.close_all()


def test_call_naming_another_clients_slot_is_closed():
    host = opened_host("RaisingEnv-v0", slots=[1, 2])
    assert "error" not in host.open(OTHER, {"r": 1, "env": "RaisingEnv-v0", "kwargs": {}, "slots": [3]})
    # OTHER names its own slot 3 and CLIENT's slot 1: refused before anything runs.
    reply = call(host, {"r": 9, "op": "step", "slots": [3, 1], "a": np.array([1, 1]), "m": 0}, client=OTHER)
    error = assert_error(reply, "closed")
    assert reply["r"] == 9 and "1" in error["msg"]
    assert_error(call(host, {"r": 10, "op": "reset", "slots": [1]}, client=OTHER), "closed")
    # A slot nobody opened.
    assert_error(call(host, {"r": 11, "op": "reset", "slots": [42]}), "closed")
    # The owners are unaffected.
    assert "error" not in call(host, {"r": 12, "op": "step", "slots": [1, 2], "a": np.array([0, 0]), "m": 0})
    assert "error" not in call(host, {"r": 13, "op": "step", "slots": [3], "a": np.array([0]), "m": 0},
                               client=OTHER)
    host.close_all()


def _encoded(request) -> bytes:
    header, frames = codec.encode(request)
    assert frames == []
    return header


MALFORMED = {
    "junk bytes": b"\xc1\xc1\xc1",
    "empty header": b"",
    "truncated map": _encoded({"r": 1, "op": "step"})[:-2],
    "not a map": _encoded([1, "step", SLOTS]),
    "unknown ext type": b"\xd4\x63\x00",
    "unknown op": _encoded({"r": 5, "op": "jump", "slots": SLOTS}),
    "no op": _encoded({"r": 5, "slots": SLOTS}),
    "slots not a list": _encoded({"r": 5, "op": "step", "slots": 1, "a": np.array([0]), "m": 0}),
    "slots a string": _encoded({"r": 5, "op": "reset", "slots": "123"}),
    "slots empty": _encoded({"r": 5, "op": "step", "slots": [], "a": np.array([], np.int64), "m": 0}),
    "slot unhashable": _encoded({"r": 5, "op": "reset", "slots": [[1]]}),
    "slot repeated": _encoded({"r": 5, "op": "step", "slots": [1, 2, 3, 1], "a": np.array([0, 1, 0, 1]), "m": 0}),
    "slot repeated in a reset": _encoded({"r": 5, "op": "reset", "slots": [2, 2]}),
    "too few actions": _encoded({"r": 5, "op": "step", "slots": SLOTS, "a": np.array([0, 1]), "m": 0}),
    "too many actions": _encoded({"r": 5, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0, 1]), "m": 0}),
    "no actions": _encoded({"r": 5, "op": "step", "slots": SLOTS, "m": 0}),
    "actions a string": _encoded({"r": 5, "op": "step", "slots": SLOTS, "a": "left", "m": 0}),
    "seeds too short": _encoded({"r": 5, "op": "reset", "slots": SLOTS, "seeds": [1]}),
    "seeds not a list": _encoded({"r": 5, "op": "reset", "slots": SLOTS, "seeds": 7}),
    "seeds too long": _encoded({"r": 5, "op": "reset", "slots": SLOTS, "seeds": list(range(100_000))}),
}


@pytest.mark.parametrize("header", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_call_gets_an_error_reply(header):
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS, "seeds": SEEDS})
    reply = raw_call(host, header)  # never raises
    assert set(reply) == {"r", "error"}, reply
    assert isinstance(reply["error"]["code"], str) and isinstance(reply["error"]["msg"], str)
    assert reply["r"] in (None, 5)
    # The host is intact and serves the next call.
    assert sorted(host.slots) == SLOTS
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0]), "m": 0})
    assert "error" not in reply and reply["obs"].shape == (3, 4)
    host.close_all()


@pytest.mark.parametrize("name", ["junk bytes", "empty header", "not a map", "unknown op",
                                  "slots not a list", "slot unhashable", "slot repeated",
                                  "slot repeated in a reset", "seeds too short", "seeds too long"])
def test_malformed_call_is_a_protocol_error(name):
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    assert_error(raw_call(host, MALFORMED[name]), "protocol")
    assert host.stats["steps"] == 0  # refused before any env ran
    host.close_all()


@pytest.mark.parametrize("name", ["too few actions", "too many actions", "no actions", "actions a string"])
def test_actions_that_do_not_fit_are_an_action_error(name):
    # "action" is the wire code of InvalidActionError: the client raises what its own check
    # would have raised. (tests/test_workers_hostile.py has the hostile shapes.)
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    error = assert_error(raw_call(host, MALFORMED[name]), "action")
    assert "Discrete(2)" in error["msg"]
    assert host.stats["steps"] == 0
    host.close_all()


def test_call_referring_to_a_missing_frame_is_a_protocol_error():
    host = opened_host("Pendulum-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    header, frames = codec.encode({"r": 2, "op": "step", "slots": SLOTS,
                                   "a": np.zeros((3, 1), np.float32), "m": 0}, frame_threshold=0)
    assert len(frames) == 1
    assert_error(raw_call(host, header, []), "protocol")
    reply = raw_call(host, header, frames)
    assert "error" not in reply and reply["r"] == 2
    host.close_all()


@pytest.mark.parametrize("extra", [{"m": 7}, {"m": "same_step"}, {}], ids=["m=7", "m=str", "no m"])
def test_unknown_autoreset_mode_is_a_protocol_error(extra):
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 1, 0]), **extra})
    assert_error(reply, "protocol")
    host.close_all()


def test_info_that_cannot_travel_is_a_codec_error_naming_the_key():
    host = opened_host("SetInfoEnv-v0")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    reply = call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 0, 0]), "m": 0})
    error = assert_error(reply, "codec")
    assert reply["r"] == 2
    assert "'tags'" in error["msg"] and "set" in error["msg"]
    assert sorted(host.slots) == SLOTS
    host.close_all()


def test_a_failed_step_says_which_slots_stepped():
    host = opened_host("RaisingEnv-v0", slots=[4, 7, 9, 2])
    call(host, {"r": 1, "op": "reset", "slots": [4, 7, 9, 2]})
    reply = call(host, {"r": 2, "op": "step", "slots": [4, 7, 9, 2], "a": np.array([0, 0, 1, 0]), "m": 0})
    error = assert_error(reply, "env")
    assert error["slot"] == 9 and error["stepped"] == [4, 7]  # slot ids, in the call's order
    reply = call(host, {"r": 3, "op": "step", "slots": [4, 7, 9, 2], "a": np.array([1, 0, 0, 0]), "m": 0})
    assert assert_error(reply, "env")["stepped"] == []
    host.close_all()


def test_a_step_that_fails_after_the_env_stepped_counts_it():
    # SAME_STEP: the env stepped and ended, then its reset raised: it did step.
    host = opened_host("SameStepResetRaisesEnv-v0", slots=[1, 2])
    call(host, {"r": 1, "op": "reset", "slots": [1, 2]})
    error = assert_error(call(host, {"r": 2, "op": "step", "slots": [1, 2], "a": np.array([0, 0]), "m": 1}), "env")
    assert error["slot"] == 1 and error["stepped"] == [1] and "reset refused" in error["msg"]
    host.close_all()


@pytest.mark.parametrize("env_id, code", [("SetInfoEnv-v0", "codec"), ("RaggedObsEnv-v0", "env")])
def test_a_step_whose_results_cannot_travel_stepped_every_slot(env_id, code):
    host = opened_host(env_id)
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    error = assert_error(call(host, {"r": 2, "op": "step", "slots": SLOTS, "a": np.array([0, 0, 0]), "m": 0}), code)
    assert error["stepped"] == SLOTS
    host.close_all()


def test_refused_steps_say_nothing_about_stepping():
    # Refused before any env ran: no "stepped" (the client knows nothing moved there).
    host = opened_host("CartPole-v1")
    call(host, {"r": 1, "op": "reset", "slots": SLOTS})
    for name in ("too few actions", "unknown op"):
        assert "stepped" not in raw_call(host, MALFORMED[name])["error"]
    host.close_all()


def test_batched_action_space_is_never_taken_from_a_freed_env():
    # The batched action space was cached by id(action_space): once an env was closed and its space
    # freed, a new space could get the same id, and a step of an env opened with other kwargs was
    # checked against the old structure. 200 open/step/close rounds made that happen about 60 times.
    host = SlotHost(None, 8, make=make_env)
    for i in range(200):
        keys = ["a", "b"] if i % 2 == 0 else ["x", "y", "z"]
        opened = host.open(CLIENT, {"r": 1, "env": "KeyedActionEnv-v0", "kwargs": {"keys": keys}, "slots": [i]})
        assert "error" not in opened, opened
        call(host, {"r": 2, "op": "reset", "slots": [i]})
        reply = call(host, {"r": 3, "op": "step", "slots": [i], "a": {k: np.zeros(1, np.int64) for k in keys}, "m": 0})
        assert "error" not in reply, (i, reply)
        host.close(CLIENT, [i])
        del opened, reply
        gc.collect()


def test_batched_action_space_follows_a_space_the_env_replaced():
    host = opened_host("KeyedActionEnv-v0", slots=[1, 2], keys=["a"])
    call(host, {"r": 1, "op": "reset", "slots": [1, 2]})
    assert "error" not in call(host, {"r": 2, "op": "step", "slots": [1, 2], "a": {"a": np.zeros(2, np.int64)}, "m": 0})
    for slot in host.slots.values():
        slot.env.action_space = gymnasium.spaces.Dict({"b": gymnasium.spaces.Discrete(2)})
    assert "error" not in call(host, {"r": 3, "op": "step", "slots": [1, 2], "a": {"b": np.zeros(2, np.int64)}, "m": 0})
    host.close_all()
