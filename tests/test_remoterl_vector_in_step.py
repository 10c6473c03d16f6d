"""``remoterl.vector.RemoteEnvVec`` against a real broker and two real workers: never out of step
with its workers (failed steps list what stepped, timeouts need a reset, refused actions
change nothing), and gymnasium's types for gymnasium's errors.

One broker and two workers serve each module (starting processes costs about a second),
once as processes on tcp and once embedded; every test closes the vectors it opens, so
each starts with no slot open. Fixtures and helpers: remoterl_vector_helpers.py.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from conftest import worker_calls

from remoterl import InvalidActionError, RemoteEnvError, RemoteTimeoutError
from remoterl.errors import ActionNotBatchedError, ResetNeededError
from remoterl_vector_helpers import NUM_ENVS, sync_vec
from remoterl_vector_helpers import make_vec as make_vec, url as url  # the shared fixtures: the module's broker


# --- never out of step ------------------------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 2])
@pytest.mark.parametrize("actions", [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]])
def test_failed_step_lists_the_envs_that_stepped(make_vec, max_workers, actions):
    vec = make_vec("RaisingEnv-v0", max_workers=max_workers)
    assert len(vec.workers) == max_workers
    vec.reset(seed=0)
    with pytest.raises(RemoteEnvError) as info:
        vec.step(np.array(actions))
    # Each worker steps its envs in order and stops at the first that raises; a worker with no
    # raising env steps all of its envs.
    expected = []
    for _, _, start, stop in vec._groups:
        for i in range(start, stop):
            if actions[i] == 1:
                break
            expected.append(i)
    assert info.value.stepped_envs == tuple(expected)
    assert info.value.stepped_slots is not None  # what the failing worker reported


def test_step_timeout_refuses_further_steps_until_reset(make_vec):
    vec = make_vec("CountingEnv-v0", 2, delay=0.5)
    obs, _ = vec.reset(seed=0)
    assert obs.tolist() == [[0.0], [0.0]]
    with pytest.raises(RemoteTimeoutError) as info:
        vec.step_async(np.zeros(2, np.int64))
        vec.step_wait(timeout=0.05)
    # Code written for AsyncVectorEnv catches multiprocessing.TimeoutError; TimeoutError too.
    assert isinstance(info.value, multiprocessing.TimeoutError) and isinstance(info.value, TimeoutError)
    assert info.value.stepped_envs == ()  # no worker had answered
    with pytest.raises(ResetNeededError, match="RemoteTimeoutError"):
        vec.step_async(np.zeros(2, np.int64))
    with pytest.raises(ResetNeededError):
        vec.reset(options={"reset_mask": np.array([True, False])})  # a partial reset cannot fix it
    # The workers did apply the step the trainer never saw (calls to a worker run in order) ...
    assert vec.get_attr("steps") == (1, 1)
    # ... and a full reset brings the vector back in step: its late reply is never taken for another.
    obs, _ = vec.reset(seed=0)
    assert obs.tolist() == [[0.0], [0.0]]
    vec.set_attr("delay", 0.0)
    obs, rewards, *_ = vec.step(np.zeros(2, np.int64))
    assert obs.tolist() == [[1.0], [1.0]] and rewards.tolist() == [1.0, 1.0]


def test_reset_timeout_needs_another_reset(make_vec):
    vec = make_vec("CountingEnv-v0", 2, delay=0.5)
    vec.reset(seed=0)
    vec.step_async(np.zeros(2, np.int64))
    with pytest.raises(RemoteTimeoutError):
        vec.step_wait(timeout=0.05)
    with pytest.raises(RemoteTimeoutError):
        vec.reset_async(seed=1)
        vec.reset_wait(timeout=0.05)  # queued behind the slow step
    with pytest.raises(ResetNeededError, match="reset failed"):
        vec.step(np.zeros(2, np.int64))
    assert vec.reset(seed=1)[0].tolist() == [[0.0], [0.0]]
    assert vec.step(np.zeros(2, np.int64))[0].tolist() == [[1.0], [1.0]]


def test_refused_actions_leave_the_vector_in_step(make_vec):
    vec = make_vec("CountingEnv-v0", 2)
    vec.reset(seed=0)
    with pytest.raises(InvalidActionError):
        vec.step(np.zeros(3, np.int64))  # nothing was sent
    assert vec.step(np.zeros(2, np.int64))[0].tolist() == [[1.0], [1.0]]


# --- gymnasium's types for gymnasium's errors ---------------------------------------------------


@pytest.mark.parametrize("env_id, bad", [
    ("CartPole-v1", 0), ("CartPole-v1", None), ("CartPole-v1", 0.5), ("CartPole-v1", np.int64(1)),
    ("Pendulum-v1", 0.5), ("Pendulum-v1", np.array(0.5)), ("DictObsEnv-v0", 0),
], ids=["int", "none", "float", "np-int", "pendulum-float", "0-d-array", "dict-space-int"])
def test_an_action_that_is_no_batch_is_a_type_error_as_in_gymnasium(make_vec, url, env_id, bad):
    local, vec = sync_vec(env_id), make_vec(env_id)
    local.reset(seed=0)
    vec.reset(seed=0)
    with pytest.raises(TypeError):
        local.step(bad)
    before = worker_calls(url)
    with pytest.raises(ActionNotBatchedError) as info:
        vec.step(bad)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, InvalidActionError) and isinstance(info.value, ValueError)
    assert f"batch of {NUM_ENVS} actions" in str(info.value)
    assert worker_calls(url) == before, "nothing may reach the workers"
    vec.step(vec.action_space.sample())  # and the vector is still in step
