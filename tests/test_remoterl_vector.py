"""``remoterl.vector.RemoteEnvVec`` against a real broker and two real workers.

The conformance scenario runs ``SyncVectorEnv`` and ``RemoteEnvVec`` in lock-step
with the same seeds and actions and asserts, with gymnasium's own
``data_equivalence`` (exact), that every reset and step returns the same data,
for each autoreset mode (STYLE.md §7, "gymnasium, exactly").

One broker and two workers serve the whole module (starting processes costs about
a second); every test closes the vectors it opens, so each starts with no slot open.
"""

from __future__ import annotations

import numpy as np
import pytest

import gymnasium
import remoterl_test_envs  # noqa: F401  (registers DictObsEnv-v0 and RaisingEnv-v0 here too)
from conftest import assert_same, closed_after, embedded_broker, status, T, tcp_broker, wait_for, worker_calls
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from remoterl import InvalidActionError, RemoteEnvError, RemoteEnvVec

SERVED = ["CartPole-v1", "Pendulum-v1", "DictObsEnv-v0", "RaisingEnv-v0"]
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
        assert remote.metadata is not type(remote).metadata  # an instance dict (DESIGN.md)

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


@pytest.mark.parametrize("mask, error", [
    (np.array([1, 0, 0, 1]), TypeError),                       # not booleans
    (np.array([True, False]), ValueError),                     # wrong shape
    (np.zeros(NUM_ENVS, np.bool_), ValueError),                # nothing to reset
    ([True, False, False, True], TypeError),                   # not an array
], ids=["ints", "shape", "all-false", "list"])
def test_bad_reset_mask_raises_like_sync(make_vec, mask, error):
    local, remote = sync_vec("CartPole-v1"), make_vec("CartPole-v1")
    local.reset(seed=0)
    remote.reset(seed=0)
    with pytest.raises(Exception) as local_error:
        local.reset(options={"reset_mask": mask})
    with pytest.raises(error) as remote_error:
        remote.reset(options={"reset_mask": mask})
    # gymnasium < 1.3 (Ray pins one) checks with bare asserts; later versions raise typed errors
    # with these exact messages, which RemoteEnvVec matches.
    if not isinstance(local_error.value, AssertionError):
        assert type(local_error.value) is error
        assert str(remote_error.value) == str(local_error.value)


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
    # The call is over: the vector is idle again and the workers serve on.
    obs, rewards, *_ = vec.step(np.zeros(NUM_ENVS, np.int64))
    assert rewards.tolist() == [1.0] * NUM_ENVS
