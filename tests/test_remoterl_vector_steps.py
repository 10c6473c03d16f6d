"""``remoterl.vector.RemoteEnvVec`` against a real broker and two real workers: stepping
(synchronous and step_async/step_wait), closing, actions refused before they are sent or by
the worker, and env errors carrying the remote traceback.

One broker and two workers serve each module (starting processes costs about a second),
once as processes on tcp and once embedded; every test closes the vectors it opens, so
each starts with no slot open. Fixtures and helpers: remoterl_vector_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import status, T, wait_for, worker_calls
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError

from remoterl import InvalidActionError, RemoteEnvError
from remoterl.errors import ResetNeededError
from remoterl_vector_helpers import NUM_ENVS, assert_same_step, sync_vec
from remoterl_vector_helpers import make_vec as make_vec, url as url  # the shared fixtures: the module's broker


def test_step_async_then_step_wait(make_vec):
    local, remote = sync_vec("Pendulum-v1"), make_vec("Pendulum-v1")
    remote.reset(seed=5)
    local.reset(seed=5)
    action = np.full((NUM_ENVS, 1), 0.5, np.float32)
    remote.step_async(action)
    expected = local.step(action)  # the trainer's own work, while the workers step
    assert_same_step(remote.step_wait(timeout=T), expected, 0)


def test_async_misuse_raises_gymnasium_errors(make_vec):
    vec = make_vec("CartPole-v1")
    vec.reset(seed=0)
    with pytest.raises(NoAsyncCallError):
        vec.step_wait()
    actions = np.zeros(NUM_ENVS, np.int64)
    vec.step_async(actions)
    with pytest.raises(AlreadyPendingCallError):
        vec.step_async(actions)
    with pytest.raises(AlreadyPendingCallError):
        vec.reset()
    obs = vec.step_wait(timeout=T)[0]  # the first call is still the one pending
    assert obs.shape == (NUM_ENVS, 4)
    vec.step(actions)


def test_closed_vector(make_vec, url):
    before = status(url)["open_slots"]
    vec = make_vec("CartPole-v1")
    assert status(url)["open_slots"] == before + NUM_ENVS
    vec.reset(seed=0)
    vec.close()
    wait_for(lambda: status(url)["open_slots"] == before, what="the slots released")
    vec.close()  # twice: harmless
    with pytest.raises(ClosedEnvironmentError):
        vec.step(np.zeros(NUM_ENVS, np.int64))
    with pytest.raises(ClosedEnvironmentError):
        vec.reset()


def test_close_with_a_step_pending_releases_slots(make_vec, url):
    vec = make_vec("CartPole-v1")
    vec.reset(seed=0)
    vec.step_async(np.zeros(NUM_ENVS, np.int64))
    vec.close()
    wait_for(lambda: status(url)["open_slots"] == 0, what="the slots released")


@pytest.mark.parametrize("env_id, bad", [
    ("CartPole-v1", np.zeros(NUM_ENVS + 1, np.int64)),      # one action too many
    ("CartPole-v1", np.zeros(NUM_ENVS, np.float32)),         # not integers
    ("Pendulum-v1", np.zeros((NUM_ENVS, 2), np.float32)),    # wrong action shape
    ("DictObsEnv-v0", np.zeros(NUM_ENVS, np.float32)),       # Box(3,) actions given as scalars
    ("CartPole-v1", np.zeros((2**25, 0), np.int64)),         # zero-size: no bytes, 2**25 rows to iterate
    ("CartPole-v1", np.zeros((NUM_ENVS, 0), np.int64)),      # the right rows, zero-size
    ("Pendulum-v1", np.zeros((NUM_ENVS, 1, 0), np.float32)),  # one dimension too many, zero-size
    ("Pendulum-v1", np.zeros((NUM_ENVS, 1), np.complex64)),  # not real numbers
    ("Pendulum-v1", [["a"]] * NUM_ENVS),                     # strings
    ("Pendulum-v1", [[0.5], [0.5, 0.5]] * 2),                # ragged
], ids=["too-many", "float-discrete", "box-shape", "dict-obs-box-shape", "zero-size-rows", "zero-size",
        "zero-size-ndim", "complex", "strings", "ragged"])
def test_invalid_actions_are_refused_before_sending(make_vec, url, env_id, bad):
    vec = make_vec(env_id)
    vec.reset(seed=0)
    before = worker_calls(url)
    with pytest.raises(InvalidActionError):
        vec.step(bad)
    assert worker_calls(url) == before, "nothing may reach the workers"
    vec.step(vec.action_space.sample())  # and the vector is still usable


def test_actions_the_client_did_not_check_are_refused_by_the_worker(make_vec):
    # A peer that skips RemoteEnvVec's checks reaches the worker, which checks again before
    # iterating anything, and answers with the wire code of InvalidActionError.
    vec = make_vec("CartPole-v1")
    vec.reset(seed=0)
    worker, slots, start, stop = vec._groups[0]
    for bad in (np.zeros((60_000, 0), np.int64), np.zeros(stop - start, np.float32)):
        with pytest.raises(InvalidActionError, match=r"Discrete\(2\)"):
            vec._client.call(worker, slots, {"op": "step", "a": bad, "m": 0}, T)
    obs, rewards, *_ = vec.step(np.zeros(NUM_ENVS, np.int64))  # and the slots serve on
    assert rewards.tolist() == [1.0] * NUM_ENVS


def test_max_workers_one_packs_the_slots(make_vec):
    vec = make_vec("CartPole-v1", 6, max_workers=1)
    assert len(set(vec.workers)) == 1
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (6, 4)
    assert vec.step(np.ones(6, np.int64))[0].shape == (6, 4)


def test_env_error_in_a_vector_step_carries_the_remote_traceback(make_vec):
    vec = make_vec("RaisingEnv-v0")
    vec.reset(seed=0)
    with pytest.raises(RemoteEnvError) as info:
        vec.step(np.array([0, 0, 1, 0]))
    assert "boom from the simulator" in str(info.value)
    assert "explode_on_purpose" in info.value.remote_traceback
    assert info.value.remote_type == "ValueError"
    # The vector is out of step with its workers: no step until a full reset, then it serves on.
    with pytest.raises(ResetNeededError, match=r"reset\(\)"):
        vec.step(np.zeros(NUM_ENVS, np.int64))
    vec.reset(seed=0)
    obs, rewards, *_ = vec.step(np.zeros(NUM_ENVS, np.int64))
    assert rewards.tolist() == [1.0] * NUM_ENVS
