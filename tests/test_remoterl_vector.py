"""``remoterl.vector.RemoteEnvVec`` against a real broker and two real workers.

The conformance scenario runs ``SyncVectorEnv`` and ``RemoteEnvVec`` in lock-step
with the same seeds and actions and asserts, with gymnasium's own
``data_equivalence`` (exact), that every reset and step returns the same data,
for each autoreset mode ("gymnasium, exactly").

One broker and two workers serve the whole module (starting processes costs about
a second); every test closes the vectors it opens, so each starts with no slot open.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import gymnasium
import remoterl_test_envs  # noqa: F401  (registers DictObsEnv-v0, RaisingEnv-v0, CountingEnv-v0 here too)
from conftest import assert_same, closed_after, embedded_broker, status, T, tcp_broker, wait_for, worker_calls
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from remoterl import CodecError, InvalidActionError, RemoteEnvError, RemoteEnvVec, RemoteTimeoutError
from remoterl.errors import ActionNotBatchedError, RemoteAttributeError, ResetNeededError

SERVED = ["CartPole-v1", "Pendulum-v1", "DictObsEnv-v0", "RaisingEnv-v0", "CountingEnv-v0"]
NUM_ENVS = 4
STEPS = 200
# Pendulum only truncates (at 200 steps by default): make its episodes end during the run.
ENV_KWARGS = {"Pendulum-v1": {"max_episode_steps": 50}}


@pytest.fixture(scope="module", params=["tcp", "embedded"])
def url(request):
    """A broker and two workers (16 slots each) serving SERVED, for the whole module: once as
    processes on tcp, once as the embedded default (broker thread, workers on local links)."""
    if request.param == "embedded":
        with embedded_broker(2, 16, ("remoterl_test_envs",)) as local_url:
            yield local_url
        return
    env_args = [arg for env_id in SERVED for arg in ("--env", env_id)]
    with tcp_broker(2, "--import", "remoterl_test_envs", *env_args, "-n", "16") as broker_url:
        yield broker_url


@pytest.fixture
def make_vec(url):
    """Build RemoteEnvVecs on the module's broker; all are closed at teardown."""
    with closed_after(url) as track:
        yield lambda env_id, num_envs=NUM_ENVS, **kwargs: track(RemoteEnvVec(env_id, num_envs, broker=url, **kwargs))


def assert_same_step(remote, local, step: int) -> None:
    for name, r, l in zip(("obs", "rewards", "terminations", "truncations", "infos"), remote, local):
        assert_same(r, l, f"step {step}: {name}")


def sync_vec(env_id: str, mode: AutoresetMode = AutoresetMode.NEXT_STEP, num_envs: int = NUM_ENVS,
             **kwargs) -> SyncVectorEnv:
    return SyncVectorEnv([lambda: gymnasium.make(env_id, **kwargs)] * num_envs, autoreset_mode=mode)


# --- conformance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED],
                         ids=lambda m: m.value)
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "DictObsEnv-v0"])
def test_conforms_to_sync_vector_env(make_vec, env_id, mode):
    kwargs = ENV_KWARGS.get(env_id, {})
    local = sync_vec(env_id, mode, **kwargs)
    remote = make_vec(env_id, autoreset_mode=mode, **kwargs)
    try:
        assert len(set(remote.workers)) == 2, "the slots should be spread over both workers"
        assert remote.num_envs == local.num_envs
        assert remote.single_observation_space == local.single_observation_space
        assert remote.single_action_space == local.single_action_space
        assert remote.observation_space == local.observation_space
        assert remote.action_space == local.action_space
        assert remote.metadata["autoreset_mode"] is local.metadata["autoreset_mode"] is mode
        assert remote.metadata == local.metadata
        assert remote.render_mode == local.render_mode
        assert remote.metadata is not type(remote).metadata  # an instance dict, not the class-level one

        assert_same(remote.reset(seed=42), local.reset(seed=42), "reset(seed=42)")
        actions = local.action_space
        actions.seed(7)
        ends = 0
        for step in range(STEPS):
            action = actions.sample()
            local_out = local.step(action)
            assert_same_step(remote.step(action), local_out, step)
            ended = local_out[2] | local_out[3]
            ends += int(ended.sum())
            if mode is AutoresetMode.DISABLED and ended.any():
                opts = {"reset_mask": ended}
                assert_same(remote.reset(options=opts), local.reset(options=opts), f"step {step}: masked reset")
        assert ends >= NUM_ENVS, f"only {ends} episodes ended in {STEPS} steps: the autoreset path went untested"
    finally:
        local.close()


def test_reset_with_seed_list_matches_sync(make_vec):
    local, remote = sync_vec("DictObsEnv-v0"), make_vec("DictObsEnv-v0")
    seeds = [3, 8, 11, 0]
    remote_obs, remote_info = remote.reset(seed=seeds)
    assert_same((remote_obs, remote_info), local.reset(seed=seeds), "reset(seed=list)")
    # A None entry leaves that env unseeded; the others repeat their seeded start.
    again = remote.reset(seed=[3, None, 11, 0])[0]["pos"]
    assert_same(again[[0, 2, 3]], remote_obs["pos"][[0, 2, 3]], "re-seeded envs")
    with pytest.raises(ValueError, match="num_envs=4"):
        remote.reset(seed=[1, 2])


def test_reset_without_seed(make_vec):
    vec = make_vec("CartPole-v1")
    obs, infos = vec.reset()
    assert obs in vec.observation_space and infos == {}
    obs2, _ = vec.reset(seed=None)
    assert obs2.shape == (NUM_ENVS, 4) and not np.array_equal(obs, obs2)


def test_masked_reset_keeps_other_envs(make_vec):
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    assert_same(remote.reset(seed=1), local.reset(seed=1), "reset")
    action = np.array([0, 1, 1, 0])
    for step in range(3):
        before = remote.step(action)[0]
        local.step(action)
    mask = np.array([True, False, False, True])
    returned = before.copy()
    obs, infos = remote.reset(seed=[100, None, None, 103], options={"reset_mask": mask})
    assert_same((obs, infos), local.reset(seed=[100, None, None, 103], options={"reset_mask": mask}), "masked reset")
    np.testing.assert_array_equal(obs[~mask], before[~mask])
    assert not np.array_equal(obs[mask], before[mask])
    np.testing.assert_array_equal(before, returned)  # what step() returned earlier is never altered
    assert_same(remote.step(action), local.step(action), "step after the masked reset")


@pytest.mark.parametrize("mask", [
    np.array([1, 0, 0, 1]),                                    # not booleans
    np.array([1.0, 0.0, 0.0, 1.0]),                            # floats
    np.array([True, False]),                                   # too short
    np.array([True, False, False, True, True]),                # too long
    np.array([[True, False, False, True]]),                    # 2-d
    np.zeros(NUM_ENVS, np.bool_),                              # nothing to reset
    [True, False, False, True],                                # not an array
], ids=["ints", "floats", "short", "long", "2d", "all-false", "list"])
def test_bad_reset_mask_raises_like_the_installed_sync(make_vec, mask):
    # The installed gymnasium's exact type and words (1.2: AssertionError; later: TypeError/ValueError).
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    local.reset(seed=0)
    remote.reset(seed=0)
    with pytest.raises(Exception) as local_error:
        local.reset(options={"reset_mask": mask})
    with pytest.raises(Exception) as remote_error:
        remote.reset(options={"reset_mask": mask})
    assert type(remote_error.value) is type(local_error.value)
    assert str(remote_error.value) == str(local_error.value)
    assert_same(remote.step(np.zeros(NUM_ENVS, np.int64)), local.step(np.zeros(NUM_ENVS, np.int64)),
                "the step after a refused mask")


def test_first_reset_may_be_a_masked_reset_of_every_env(make_vec):
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    every = np.ones(NUM_ENVS, np.bool_)
    assert_same(remote.reset(seed=3, options={"reset_mask": every}),
                local.reset(seed=3, options={"reset_mask": every}), "first reset, all envs masked in")
    action = np.array([1, 0, 1, 0])
    assert_same(remote.step(action), local.step(action), "the step after it")


def test_first_reset_masking_envs_out_is_a_value_error_like_sync(make_vec):
    # SyncVectorEnv fails on it too (the envs left out have no observation to keep): ValueError.
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    mask = np.array([True, True, False, True])
    with pytest.raises(ValueError):
        local.reset(seed=3, options={"reset_mask": mask})
    with pytest.raises(ValueError, match=r"first reset.*\[2\]"):
        remote.reset(seed=3, options={"reset_mask": mask})
    assert_same(remote.reset(seed=3), local.reset(seed=3), "the full reset after it")


def test_num_envs_must_be_positive(url):
    with pytest.raises(ValueError, match="num_envs"):
        RemoteEnvVec("CartPole-v1", 0, broker=url)


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


def test_np_random_seed_matches_sync(make_vec):
    local, vec = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    # Never seeded: every env's own draw (gymnasium's are 128-bit ints, which travel too).
    seeds = vec.np_random_seed
    assert type(seeds) is tuple and len(set(seeds)) == NUM_ENVS and all(type(s) is int for s in seeds)
    assert vec.np_random_seed == seeds  # read, not redrawn
    for seed in (42, [3, None, 11, 0]):
        local.reset(seed=seed)
        vec.reset(seed=seed)
        assert vec.np_random_seed == local.np_random_seed, seed
        local.reset(seed=None)  # unseeded resets keep the seeds
        vec.reset(seed=None)
        assert vec.np_random_seed == local.np_random_seed, seed
    assert vec.np_random_seed == (3, 43, 11, 0)


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
