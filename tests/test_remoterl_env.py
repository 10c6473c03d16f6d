"""``remoterl.env.RemoteEnv`` against a real broker and worker: a ``gymnasium.Env``, exactly.

One broker and one worker (serving CartPole-v1 and Pendulum-v1) serve the whole
module; every test closes the envs it opens.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gymnasium
from conftest import assert_same, closed_after, embedded_broker, free_url, status, tcp_broker, wait_for, worker_calls
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import NormalizeObservation, RecordEpisodeStatistics, TimeLimit

import remoterl
from remoterl import BrokerUnavailableError, EnvClosedError, InvalidActionError, NoWorkerError, RemoteEnv

SERVED = ["CartPole-v1", "Pendulum-v1"]


@pytest.fixture(scope="module", params=["tcp", "embedded"])
def url(request):
    """A broker and a worker for the whole module: processes on tcp, and the embedded default."""
    if request.param == "embedded":
        with embedded_broker(1, 8) as local_url:
            yield local_url
        return
    with tcp_broker(1, "--env", SERVED[0], "--env", SERVED[1], "-n", "8") as broker_url:
        yield broker_url


@pytest.fixture
def make_env(url):
    """Open RemoteEnvs on the module's broker; all are closed at teardown."""
    with closed_after(url) as track:
        yield lambda env_id="CartPole-v1", **kwargs: track(RemoteEnv(env_id, broker=url, **kwargs))


def checker_warnings(env) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    return sorted(str(w.message) for w in caught)


def test_passes_gymnasium_env_checker(make_env):
    # CartPole's infinite Box bounds draw warnings: exactly the ones a local CartPole draws.
    assert checker_warnings(make_env()) == checker_warnings(gymnasium.make("CartPole-v1").unwrapped)


@pytest.mark.parametrize("env_id", SERVED)
def test_spaces_metadata_and_spec_match_a_local_env(make_env, env_id):
    remote, local = make_env(env_id), gymnasium.make(env_id)
    assert remote.observation_space == local.observation_space
    assert remote.action_space == local.action_space
    # gymnasium 1.2's SyncVectorEnv writes "autoreset_mode" into the env class's metadata dict
    # for the rest of the process (Ray pins that version): compare without it.
    assert drop_autoreset(remote.metadata) == drop_autoreset(local.metadata)
    assert remote.render_mode == local.render_mode
    for field in ("id", "entry_point", "reward_threshold", "nondeterministic", "max_episode_steps",
                  "order_enforce", "disable_env_checker", "kwargs"):
        assert getattr(remote.spec, field) == getattr(local.spec, field), field
    assert remote.unwrapped is remote


def drop_autoreset(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k != "autoreset_mode"}


@pytest.mark.parametrize("env_id", SERVED)
def test_seeded_episodes_equal_a_local_env(make_env, env_id):
    remote, local = make_env(env_id, max_episode_steps=20), gymnasium.make(env_id, max_episode_steps=20)
    assert_same(remote.reset(seed=123), local.reset(seed=123), "reset(seed=123)")
    actions = local.action_space
    actions.seed(0)
    ends = 0
    for step in range(50):
        action = actions.sample()
        out = local.step(action)
        assert_same(remote.step(action), out, f"step {step}")
        if out[2] or out[3]:
            ends += 1
            assert_same(remote.reset(), local.reset(), f"step {step}: reset")
    assert ends >= 2


def test_under_time_limit(make_env):
    env = TimeLimit(make_env(), max_episode_steps=10)
    env.reset(seed=0)
    for step in range(1, 11):
        _, _, terminated, truncated, _ = env.step(step % 2)  # alternate: the pole stays up
        assert not terminated
        assert truncated is (step == 10)


def test_under_record_episode_statistics(make_env):
    env = RecordEpisodeStatistics(make_env())
    env.reset(seed=0)
    for length in range(1, 501):
        _, _, terminated, truncated, info = env.step(0)  # always left: the pole falls soon
        if terminated or truncated:
            break
    assert terminated
    assert info["episode"]["l"] == length and info["episode"]["r"] == float(length)


def test_under_normalize_observation(make_env):
    env = NormalizeObservation(make_env("Pendulum-v1"))
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        obs, *_ = env.step(env.action_space.sample())
    assert obs.shape == (3,) and np.all(np.isfinite(obs))
    assert env.obs_rms.count > 20


def test_render_without_a_render_mode_returns_none(make_env):
    env = make_env()
    env.reset(seed=0)
    assert env.render() is None  # as a local CartPole made without a render_mode


def test_closed_env(make_env, url):
    env = make_env()
    env.reset(seed=0)
    assert status(url)["open_slots"] == 1
    env.close()
    wait_for(lambda: status(url)["open_slots"] == 0, what="the slot released")
    env.close()  # twice: harmless
    with pytest.raises(EnvClosedError):
        env.step(0)
    with pytest.raises(EnvClosedError):
        env.reset()


@pytest.mark.parametrize("env_id, action", [
    ("CartPole-v1", 2.5),
    ("CartPole-v1", np.array([0, 1])),
    ("Pendulum-v1", np.zeros(2, np.float32)),
    ("Pendulum-v1", 0.5),
    ("CartPole-v1", np.zeros((2**25, 0), np.int64)),
    ("Pendulum-v1", np.zeros((2**25, 0), np.float32)),
    ("Pendulum-v1", np.zeros(1, np.complex64)),
    ("Pendulum-v1", ["a"]),
    ("Pendulum-v1", [[0.5], [0.5, 0.5]]),
], ids=["discrete-float", "discrete-array", "box-shape", "box-scalar", "discrete-zero-size", "box-zero-size",
        "box-complex", "box-strings", "box-ragged"])
def test_invalid_action_is_refused_before_sending(make_env, url, env_id, action):
    env = make_env(env_id)
    env.reset(seed=0)
    before = worker_calls(url)
    with pytest.raises(InvalidActionError):
        env.step(action)
    assert worker_calls(url) == before, "nothing may reach the worker"
    env.step(env.action_space.sample())  # still usable


def test_unknown_env_id_says_what_is_served(url):
    with pytest.raises(NoWorkerError) as info:
        RemoteEnv("NoSuchEnv-v0", broker=url)
    message = str(info.value)
    if url.startswith("inproc://"):  # the embedded workers serve whatever gymnasium has registered
        assert "NoSuchEnv-v0" in message and "gymnasium.register" in message
        return
    assert "NoSuchEnv-v0" in message and "remoterl-worker" in message
    assert all(env_id in message for env_id in SERVED)


def test_no_broker_says_the_url_and_how_to_start_one():
    url = free_url()  # nothing bound there
    client = remoterl.Client(url, connect_timeout=0.5)
    with pytest.raises(BrokerUnavailableError) as info:
        client.connect()
    assert url in str(info.value) and "remoterl-broker" in str(info.value)
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(BrokerUnavailableError):  # a proxy on that client fails the same way, typed
        RemoteEnv("CartPole-v1", client=client)


# --- remote attributes: get_wrapper_attr, set_wrapper_attr, has_wrapper_attr --------------------


def test_get_wrapper_attr_reads_the_remote_env(make_env):
    remote, local = make_env("CartPole-v1"), gymnasium.make("CartPole-v1")
    for name in ("gravity", "masspole", "x_threshold", "theta_threshold_radians", "kinematics_integrator"):
        assert remote.get_wrapper_attr(name) == local.get_wrapper_attr(name), name
    # What the proxy has itself is answered here, without a round trip.
    assert remote.get_wrapper_attr("observation_space") is remote.observation_space
    assert remote.get_wrapper_attr("reset") == remote.reset
    # Through gymnasium's wrappers, as SyncVectorEnv.get_attr and SB3's DummyVecEnv.get_attr reach it.
    wrapped = RecordEpisodeStatistics(TimeLimit(remote, max_episode_steps=5))
    assert wrapped.get_wrapper_attr("gravity") == local.get_wrapper_attr("gravity")
    assert wrapped.has_wrapper_attr("gravity") and not wrapped.has_wrapper_attr("no_such_thing")


def test_set_wrapper_attr_sets_it_on_the_worker(make_env):
    env = make_env("CartPole-v1")
    assert env.set_wrapper_attr("gravity", 1.5) is True
    assert env.get_wrapper_attr("gravity") == 1.5
    assert env.set_wrapper_attr("no_such_thing", 1, force=False) is False  # only what exists
    assert not env.has_wrapper_attr("no_such_thing")
    assert env.set_wrapper_attr("no_such_thing", 1) is True  # force: created there
    assert env.get_wrapper_attr("no_such_thing") == 1
    # Through a wrapper: gymnasium asks the inner env with force=False first, so it lands remotely.
    wrapped = TimeLimit(env, max_episode_steps=5)
    wrapped.set_wrapper_attr("gravity", 2.5)
    assert env.get_wrapper_attr("gravity") == 2.5 and "gravity" not in vars(wrapped)


def test_a_remote_method_runs_on_the_worker(make_env):
    env = make_env("CartPole-v1")  # hosted as gymnasium.make builds it: TimeLimit outermost
    method = env.get_wrapper_attr("class_name")
    assert isinstance(method, remoterl.env.RemoteMethod) and "class_name" in repr(method)
    assert method() == "TimeLimit"
    # SyncVectorEnv of wrapped RemoteEnvs (make_vec's fallback with per-env wrappers): get_attr, call.
    vec = gymnasium.vector.SyncVectorEnv([lambda: TimeLimit(env, 5)])
    assert vec.get_attr("gravity") == (9.8,) and vec.call("class_name") == ("TimeLimit",)


def test_unwrapped_is_the_local_proxy_and_points_at_get_wrapper_attr(make_env):
    env = make_env("CartPole-v1")
    assert env.unwrapped is env
    with pytest.raises(AttributeError, match=r"get_wrapper_attr\('gravity'\)"):
        env.unwrapped.gravity  # noqa: B018
    assert not hasattr(env, "gravity")  # no round trip, no surprise


def test_remote_attribute_errors(make_env, url):
    from remoterl import CodecError
    from remoterl.errors import RemoteAttributeError

    env = make_env("CartPole-v1")
    with pytest.raises(RemoteAttributeError, match="no_such_thing") as info:
        env.get_wrapper_attr("no_such_thing")
    assert isinstance(info.value, AttributeError)
    with pytest.raises(AttributeError):  # through a wrapper: gymnasium's own AttributeError
        TimeLimit(env, 5).get_wrapper_attr("no_such_thing")
    with pytest.raises(CodecError, match="'np_random'"):  # the worker's generator cannot travel
        env.call_remote("np_random")
    before = worker_calls(url)
    for name in ("_secret", "__not_here__", "a.b", ""):
        assert not env.has_wrapper_attr(name)
        with pytest.raises(RemoteAttributeError):
            env.get_wrapper_attr(name)
        with pytest.raises(RemoteAttributeError):
            env.set_wrapper_attr(name, 1)
    for name in ("_np_random", "__class__", "get_wrapper_attr", "set_wrapper_attr"):
        with pytest.raises(RemoteAttributeError):
            env.call_remote(name)
    assert env.get_wrapper_attr("_np_random") is env._np_random  # the proxy's own: answered here
    assert worker_calls(url) == before, "nothing may reach the worker"
    env.close()
    with pytest.raises(EnvClosedError):
        env.get_wrapper_attr("gravity")
