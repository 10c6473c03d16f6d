"""``remoterl.vector.RemoteEnvVec`` against a real broker and two real workers: get_attr,
set_attr and call as ``SyncVectorEnv`` has them, the names refused on either side, and the
reset/call async pairs of ``AsyncVectorEnv``.

One broker and two workers serve each module (starting processes costs about a second),
once as processes on tcp and once embedded; every test closes the vectors it opens, so
each starts with no slot open. Fixtures and helpers: remoterl_vector_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import gymnasium
from conftest import assert_same, status, T, wait_for, worker_calls
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import SyncVectorEnv

from remoterl import CodecError, RemoteEnvError
from remoterl.errors import RemoteAttributeError
from remoterl_vector_helpers import NUM_ENVS, sync_vec
from remoterl_vector_helpers import make_vec as make_vec, url as url  # the shared fixtures: the module's broker


# --- attributes: get_attr, set_attr, call -------------------------------------------------------


def sync_counting(num_envs: int = NUM_ENVS, **kwargs) -> SyncVectorEnv:
    return SyncVectorEnv([lambda: gymnasium.make("CountingEnv-v0", **kwargs)] * num_envs)


def test_get_attr_set_attr_call_match_sync(make_vec):
    local, vec = sync_counting(label="x"), make_vec("CountingEnv-v0", label="x")
    local.reset(seed=0)
    vec.reset(seed=0)
    local.step(np.zeros(NUM_ENVS, np.int64))
    vec.step(np.zeros(NUM_ENVS, np.int64))
    # (Not "metadata": SyncVectorEnv writes its autoreset mode into the env class's metadata dict.)
    for name in ("steps", "label", "delay", "render_mode", "np_random_seed"):
        assert_same(vec.get_attr(name), local.get_attr(name), f"get_attr({name!r})")
    local.set_attr("label", "one for all")
    vec.set_attr("label", "one for all")
    local.set_attr("steps", [5, 6, 7, 8])
    vec.set_attr("steps", (5, 6, 7, 8))
    assert_same(vec.get_attr("label"), local.get_attr("label"), "after set_attr(one value)")
    assert vec.get_attr("steps") == local.get_attr("steps") == (5, 6, 7, 8)
    assert_same(vec.step(np.zeros(NUM_ENVS, np.int64)), local.step(np.zeros(NUM_ENVS, np.int64)),
                "a step counting on from the values set")
    x = np.arange(3, dtype=np.float32)
    assert_same(vec.call("scale", x, factor=3), local.call("scale", x, factor=3), "call('scale', x, factor=3)")
    assert_same(vec.call("scale", [1, 2]), local.call("scale", [1, 2]), "call('scale', [1, 2])")
    assert_same(vec.call("steps"), local.call("steps"), "call of an attribute that is no method")
    # Spaces and spec cannot travel as values: answered from the description the workers sent.
    for name in ("observation_space", "action_space"):
        assert vec.get_attr(name) == local.get_attr(name), name
    assert [spec.id for spec in vec.get_attr("spec")] == ["CountingEnv-v0"] * NUM_ENVS
    vec.set_attr("brand_new", 1.5)  # as SyncVectorEnv: set_wrapper_attr(force=True) creates it
    assert vec.get_attr("brand_new") == (1.5,) * NUM_ENVS
    with pytest.raises(ValueError, match="Got `3` values for 4 environments"):
        vec.set_attr("steps", [1, 2, 3])


def test_attribute_errors(make_vec, url):
    vec = make_vec("CountingEnv-v0")
    vec.reset(seed=0)
    with pytest.raises(AttributeError):  # as SyncVectorEnv: env.get_wrapper_attr raises it
        sync_counting().get_attr("no_such_thing")
    with pytest.raises(RemoteAttributeError, match="no_such_thing") as info:
        vec.get_attr("no_such_thing")
    assert isinstance(info.value, AttributeError)
    with pytest.raises(CodecError, match="'handle'"):
        vec.get_attr("handle")
    with pytest.raises(RemoteEnvError, match="fail\\(\\) on purpose") as info:
        vec.call("fail")
    assert "RuntimeError" in info.value.remote_traceback
    with pytest.raises(CodecError, match="args"):
        vec.call("scale", object())
    # Refused before anything is sent: private names, name-taking helpers, and (as AsyncVectorEnv)
    # reset/step/close through call.
    before = worker_calls(url)
    for name in ("_secret", "__class__", "__init__", "get_wrapper_attr", "set_wrapper_attr", "a.b", ""):
        with pytest.raises(RemoteAttributeError):
            vec.get_attr(name)
        with pytest.raises(RemoteAttributeError):
            vec.set_attr(name, 1)
    for name in ("reset", "step", "close"):
        with pytest.raises(ValueError, match=f"use `{name}` directly"):
            vec.call(name)
    with pytest.raises(TypeError):
        vec.get_attr(3)
    assert worker_calls(url) == before, "nothing may reach the workers"
    assert vec.step(np.zeros(NUM_ENVS, np.int64))[0].tolist() == [[1.0]] * NUM_ENVS  # still in step


@pytest.mark.parametrize("request_", [
    {"op": "get_attr", "name": "_secret"},
    {"op": "call", "name": "__init__"},
    {"op": "call", "name": "get_wrapper_attr", "args": ["_secret"]},
    {"op": "call", "name": "close"},
    {"op": "set_attr", "name": "_secret", "values": [1, 1], "force": True},
    {"op": "set_attr", "name": "set_wrapper_attr", "values": [1, 1], "force": True},
], ids=["get-private", "call-dunder", "call-helper", "call-close", "set-private", "set-helper"])
def test_the_worker_refuses_names_the_client_did_not_check(make_vec, request_):
    # The worker is the security boundary: a peer that skips the client's checks gets the same answer.
    vec = make_vec("CountingEnv-v0", 2, max_workers=1)
    vec.reset(seed=0)
    worker, slots, _, _ = vec._groups[0]
    with pytest.raises(RemoteAttributeError):
        vec._client.call(worker, slots, dict(request_), T)
    assert vec.get_attr("steps") == (0, 0)
    assert vec.step(np.zeros(2, np.int64))[0].tolist() == [[1.0], [1.0]]  # the envs were not touched


def test_reset_and_call_async_follow_async_vector_env(make_vec):
    local, vec = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    with pytest.raises(NoAsyncCallError):
        vec.reset_wait()
    with pytest.raises(NoAsyncCallError):
        vec.call_wait()
    vec.reset_async(seed=9)
    for misuse in (lambda: vec.reset_async(), lambda: vec.step_async(np.zeros(NUM_ENVS, np.int64)),
                   lambda: vec.call_async("gravity"), lambda: vec.get_attr("gravity"),
                   lambda: vec.set_attr("gravity", 1.0), lambda: vec.reset()):
        with pytest.raises(AlreadyPendingCallError):
            misuse()
    with pytest.raises(NoAsyncCallError):
        vec.step_wait()
    with pytest.raises(NoAsyncCallError):
        vec.call_wait()
    assert_same(vec.reset_wait(timeout=T), local.reset(seed=9), "reset_async(seed=9) + reset_wait")
    vec.call_async("gravity")
    with pytest.raises(AlreadyPendingCallError):
        vec.step_async(np.zeros(NUM_ENVS, np.int64))
    assert vec.call_wait(timeout=T) == local.call("gravity")
    assert_same(vec.step(np.ones(NUM_ENVS, np.int64)), local.step(np.ones(NUM_ENVS, np.int64)), "step")


def test_close_with_a_reset_or_call_pending_releases_slots(make_vec, url):
    vec = make_vec("CartPole-v1")
    vec.reset_async(seed=0)
    vec.close()
    with pytest.raises(ClosedEnvironmentError):
        vec.reset_wait()
    vec = make_vec("CartPole-v1")
    vec.call_async("gravity")
    vec.close()
    wait_for(lambda: status(url)["open_slots"] == 0, what="the slots released")
