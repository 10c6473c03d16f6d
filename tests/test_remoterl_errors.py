"""``remoterl.errors``: the tree's builtin bases, and what crosses the wire.

Code written for gymnasium's vector envs catches gymnasium's exception types; the
remoterl errors raised in the same situations must be caught by the same handlers
(and still by ``except RemoteRLError`` and by the remoterl class itself).
"""

from __future__ import annotations

import multiprocessing
import pickle

import pytest

from remoterl import errors
from remoterl.errors import (ActionNotBatchedError, CodecError, InvalidActionError, RemoteAttributeError,
                             RemoteEnvError, RemoteRLError, RemoteTimeoutError, ResetNeededError, error_from_wire,
                             error_to_wire)


def test_a_timeout_is_caught_as_asyncvectorenv_and_builtin_timeouts():
    exc = RemoteTimeoutError("no reply within 1 s")
    for base in (RemoteRLError, TimeoutError, OSError, multiprocessing.TimeoutError):
        assert isinstance(exc, base), base
    with pytest.raises(multiprocessing.TimeoutError):  # what AsyncVectorEnv.step_wait raises
        raise exc
    assert str(exc) == "no reply within 1 s" and exc.args == ("no reply within 1 s",)
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)
    assert type(error_from_wire({"code": "timeout", "msg": "late"})) is RemoteTimeoutError


def test_an_action_that_is_no_batch_is_a_type_error_and_still_an_invalid_action():
    exc = ActionNotBatchedError("step() takes a batch")
    for base in (InvalidActionError, ValueError, TypeError, RemoteRLError):
        assert isinstance(exc, base), base
    assert not issubclass(InvalidActionError, TypeError), "`except TypeError` must not catch every bad action"
    assert error_to_wire(exc)["code"] == "action"


def test_attribute_errors_are_attribute_errors_and_travel():
    exc = RemoteAttributeError("the env has no attribute 'x'")
    assert isinstance(exc, AttributeError) and isinstance(exc, RemoteRLError)
    desc = error_to_wire(exc)
    assert desc == {"code": "attr", "msg": "the env has no attribute 'x'"}
    back = error_from_wire(desc)
    assert type(back) is RemoteAttributeError and str(back) == str(exc)


def test_reset_needed_is_a_remoterl_error_of_its_own():
    assert issubclass(ResetNeededError, RemoteRLError)
    assert not issubclass(ResetNeededError, (ValueError, TypeError, AttributeError, TimeoutError))


def test_the_slots_a_failed_step_moved_travel_with_any_error_code():
    exc = error_from_wire({"code": "env", "msg": "boom", "type": "ValueError", "tb": "tb", "slot": 9,
                           "stepped": [4, 7]})
    assert type(exc) is RemoteEnvError and exc.slot == 9 and exc.stepped_slots == (4, 7)
    assert exc.stepped_envs is None  # set by RemoteEnvVec, which knows the env indices
    assert error_from_wire({"code": "codec", "msg": "set", "stepped": [1, 2, 3]}).stepped_slots == (1, 2, 3)
    assert error_from_wire({"code": "env", "msg": "m", "stepped": []}).stepped_slots == ()
    for junk in ("4,7", [4, "7"], [True], None, {"a": 1}):
        exc = error_from_wire({"code": "env", "msg": "m", "stepped": junk})
        assert exc.stepped_slots is None, junk
    assert RemoteRLError("x").stepped_slots is None and RemoteRLError("x").stepped_envs is None
    assert isinstance(error_from_wire({"code": "codec", "msg": "m"}), CodecError)


def test_every_public_error_is_rooted_at_remoterl_error():
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type):
            assert issubclass(value, RemoteRLError), name
