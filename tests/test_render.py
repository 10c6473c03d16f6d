"""Rendering remote envs (``remoterl.render``): frames streamed from real worker processes.

One broker and two worker processes (serving CartPole-v1) serve the whole module. Frames
are compared with a local env's for the same seeds and actions; videos are written by
gymnasium's ``RecordVideo`` and SB3's ``VecVideoRecorder`` and read back; human mode
draws into a pygame window with ``SDL_VIDEODRIVER=dummy`` (no screen needed).
"""

from __future__ import annotations

import copy
import glob
import os
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

import gymnasium
from conftest import closed_after, status, tcp_broker
from gymnasium.vector import SyncVectorEnv
from gymnasium.wrappers import RecordEpisodeStatistics, RecordVideo, RenderCollection

import remoterl
from remoterl import RemoteEnv, RemoteEnvVec, RemoteRLError
from remoterl.render import FrameWindow, RenderUnavailableError, tile_frames

ENV_ID = "CartPole-v1"
FRAME_SHAPE = (400, 600, 3)  # CartPole's rgb_array frame
STEPS = 60  # random CartPole episodes end within ~10-40 steps: several ends per run


@pytest.fixture(scope="module")
def headless():
    """pygame in this process and in the workers draws without a screen or a sound card."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDL_VIDEODRIVER", "dummy")
        patch.setenv("SDL_AUDIODRIVER", "dummy")
        yield


@pytest.fixture(scope="module")
def url(headless):
    with tcp_broker(2, "--env", ENV_ID, "-n", "8") as broker_url:
        yield broker_url


@pytest.fixture
def track(url):
    """Close what a test opens; then the broker must have no slot open."""
    with closed_after(url) as tracker:
        yield tracker


@pytest.fixture
def trainer(url):
    """This process initialised against the module's broker: gymnasium.make goes remote."""
    remoterl.init(broker=url)
    yield url
    remoterl.shutdown()


def actions_for(space: gymnasium.spaces.Space, seed: int = 0) -> list:
    space = copy.deepcopy(space)
    space.seed(seed)
    return [space.sample() for _ in range(STEPS)]


def assert_same_frames(remote, local, what: str) -> None:
    assert isinstance(remote, np.ndarray), f"{what}: {type(remote).__name__}"
    assert remote.dtype == local.dtype and remote.shape == local.shape, f"{what}: {remote.dtype} {remote.shape}"
    assert np.array_equal(remote, local), f"{what}: frames differ"


# --- rgb_array: the local env's frames, exactly ------------------------------------------------

def test_env_frames_equal_a_local_env(track, url):
    remote = track(RemoteEnv(ENV_ID, broker=url, render_mode="rgb_array"))
    local = gymnasium.make(ENV_ID, render_mode="rgb_array")
    assert remote.render_mode == local.render_mode == "rgb_array"
    remote.reset(seed=7), local.reset(seed=7)
    assert_same_frames(remote.render(), local.render(), "after reset")
    ends = 0
    for step, action in enumerate(actions_for(local.action_space)):
        *_, r_term, r_trunc, _ = remote.step(action)
        *_, l_term, l_trunc, _ = local.step(action)
        assert (r_term, r_trunc) == (l_term, l_trunc)
        frame = remote.render()
        assert_same_frames(frame, local.render(), f"step {step}")
        assert frame.flags.writeable  # a fresh array, as a local env's
        if l_term or l_trunc:
            ends += 1
            remote.reset(seed=step), local.reset(seed=step)
            assert_same_frames(remote.render(), local.render(), f"reset after step {step}")
    assert ends >= 2


def test_vector_frames_equal_sync_vector_env(track, url):
    remote = track(RemoteEnvVec(ENV_ID, 3, broker=url, render_mode="rgb_array"))
    local = SyncVectorEnv([lambda: gymnasium.make(ENV_ID, render_mode="rgb_array")] * 3)
    assert remote.render_mode == local.render_mode == "rgb_array"
    remote.reset(seed=3), local.reset(seed=3)
    ends = 0
    for step, action in enumerate(actions_for(local.action_space)):
        *_, r_term, r_trunc, _ = remote.step(action)
        *_, l_term, l_trunc, _ = local.step(action)
        frames, expected = remote.render(), local.render()
        assert isinstance(frames, tuple) and len(frames) == 3
        for i, (frame, local_frame) in enumerate(zip(frames, expected)):
            assert_same_frames(frame, local_frame, f"step {step} env {i}")
        assert np.array_equal(r_term | r_trunc, l_term | l_trunc)
        ends += int(np.sum(l_term | l_trunc))
    assert ends >= 3  # next-step autoreset frames included
    local.close()


def test_vector_rgb_array_list_collects_frames_as_sync_vector_env(track, url):
    remote = track(RemoteEnvVec(ENV_ID, 2, broker=url, render_mode="rgb_array_list"))
    local = SyncVectorEnv([lambda: gymnasium.make(ENV_ID, render_mode="rgb_array_list")] * 2)
    assert remote.render_mode == local.render_mode == "rgb_array_list"
    remote.reset(seed=1), local.reset(seed=1)
    for action in actions_for(local.action_space)[:4]:
        remote.step(action), local.step(action)
    frames, expected = remote.render(), local.render()
    assert [len(f) for f in frames] == [len(f) for f in expected] == [5, 5]  # reset + 4 steps
    for i in range(2):
        for j, (frame, local_frame) in enumerate(zip(frames[i], expected[i])):
            assert_same_frames(frame, local_frame, f"env {i} frame {j}")


def test_made_env_renders_as_gymnasium_make(track, trainer):
    for mode in ("rgb_array", "rgb_array_list"):
        remote = track(gymnasium.make(ENV_ID, render_mode=mode))
        local = gymnasium.make(ENV_ID, render_mode=mode)
        assert isinstance(remote.unwrapped, RemoteEnv)
        assert remote.render_mode == local.render_mode == mode
        assert isinstance(remote, RenderCollection) == isinstance(local, RenderCollection) == (mode != "rgb_array")
        assert remote.spec.kwargs == local.spec.kwargs
        remote.reset(seed=11), local.reset(seed=11)
        for action in actions_for(local.action_space)[:3]:
            remote.step(action), local.step(action)
        frames, expected = remote.render(), local.render()
        if mode == "rgb_array":
            frames, expected = [frames], [expected]
        assert len(frames) == len(expected) > 0
        for j, (frame, local_frame) in enumerate(zip(frames, expected)):
            assert_same_frames(frame, local_frame, f"{mode} frame {j}")


# --- videos ---------------------------------------------------------------------------------

def read_video(folder) -> list[np.ndarray]:
    [path] = glob.glob(os.path.join(str(folder), "*.mp4"))
    with imageio.get_reader(path) as reader:
        return [frame for frame in reader]


def test_record_video_and_episode_statistics_on_a_remote_env(track, trainer, tmp_path):
    recorder = RecordVideo(gymnasium.make(ENV_ID, render_mode="rgb_array"), str(tmp_path / "videos"),
                           episode_trigger=lambda episode: episode == 0)
    env = track(RecordEpisodeStatistics(recorder))
    env.reset(seed=0)
    env.action_space.seed(0)
    total, length, done, info = 0.0, 0, False, {}
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total, length, done = total + reward, length + 1, terminated or truncated
    assert info["episode"]["r"] == pytest.approx(total) and info["episode"]["l"] == length
    env.close()  # RecordVideo writes the episode's video
    frames = read_video(tmp_path / "videos")
    assert len(frames) > 0 and frames[0].shape == FRAME_SHAPE


def test_sb3_vec_video_recorder_on_remote_vec_env(track, url, tmp_path):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.vec_env import DummyVecEnv, VecVideoRecorder

    from remoterl.sb3 import RemoteVecEnv

    venv = track(RemoteVecEnv(ENV_ID, 2, broker=url, env_kwargs={"render_mode": "rgb_array"}))
    local = DummyVecEnv([lambda: gymnasium.make(ENV_ID, render_mode="rgb_array")] * 2)
    venv.seed(5), local.seed(5)
    venv.reset(), local.reset()
    images = venv.get_images()
    assert len(images) == 2 and all(np.array_equal(a, b) for a, b in zip(images, local.get_images()))
    tiled = venv.render()
    assert_same_frames(tiled, local.render(), "tiled frame")  # SB3's tile_images layout
    local.close()

    recorder = VecVideoRecorder(venv, str(tmp_path), record_video_trigger=lambda step: step == 0, video_length=8)
    recorder.reset()
    for _ in range(10):
        recorder.step(np.zeros(2, dtype=np.int64))
    recorder.close()
    frames = read_video(tmp_path)
    assert len(frames) > 0 and frames[0].shape == tiled.shape


# --- human mode: a window here, rgb_array on the worker ------------------------------------------

def test_sb3_human_mode_shows_tiled_frames_and_get_images_warns(track, url):
    pytest.importorskip("stable_baselines3")
    import pygame

    from remoterl.sb3 import RemoteVecEnv

    venv = track(RemoteVecEnv(ENV_ID, 2, broker=url, env_kwargs={"render_mode": "human"}))
    window = venv.venv.render_window
    assert venv.render_mode == "human" and venv.get_attr("render_mode") == ["human", "human"]
    venv.seed(0)
    venv.reset()
    assert window.last_frame.shape == (FRAME_SHAPE[0], 2 * FRAME_SHAPE[1], 3)  # two envs side by side
    shown = window.last_frame
    venv.step(np.ones(2, dtype=np.int64))
    assert window.last_frame is not shown  # shown again after the step
    assert venv.render() is None
    with pytest.warns(UserWarning, match="rgb_array"):
        assert venv.get_images() == [None, None]  # as DummyVecEnv outside rgb_array mode
    venv.close()
    assert window.closed and not pygame.display.get_init()


def test_env_human_mode_shows_the_workers_frames(track, url):
    import pygame

    env = track(RemoteEnv(ENV_ID, broker=url, render_mode="human"))
    local = gymnasium.make(ENV_ID, render_mode="rgb_array")
    window = env.render_window
    assert isinstance(window, FrameWindow) and env.render_mode == "human"
    assert env.call_remote("render_mode") == "rgb_array"  # the worker's env draws, headless
    assert window.fps == local.metadata["render_fps"]
    env.reset(seed=2), local.reset(seed=2)
    assert_same_frames(window.last_frame, local.render(), "shown after reset")
    for step, action in enumerate(actions_for(local.action_space)[:5]):
        env.step(action), local.step(action)
        assert_same_frames(window.last_frame, local.render(), f"shown after step {step}")
    assert env.render() is None  # as a human-mode env's render
    assert pygame.display.get_surface().get_size() == (FRAME_SHAPE[1], FRAME_SHAPE[0])
    env.close()
    assert window.closed and not pygame.display.get_init()


def test_vector_human_mode_shows_tiled_frames(track, url):
    import pygame

    envs = track(RemoteEnvVec(ENV_ID, 3, broker=url, render_mode="human"))
    local = SyncVectorEnv([lambda: gymnasium.make(ENV_ID, render_mode="rgb_array")] * 3)
    window = envs.render_window
    assert isinstance(window, FrameWindow) and envs.render_mode == "human"
    envs.reset(seed=4), local.reset(seed=4)
    assert_same_frames(window.last_frame, tile_frames(local.render()), "shown after reset")
    action = np.ones(3, dtype=np.int64)
    envs.step(action), local.step(action)
    assert_same_frames(window.last_frame, tile_frames(local.render()), "shown after step")
    assert envs.render() == (None, None, None)  # as SyncVectorEnv of human-mode envs
    envs.close()
    local.close()
    assert window.closed and not pygame.display.get_init()


def test_made_env_in_human_mode_renders_on_the_trainer(track, trainer):
    env = track(gymnasium.make(ENV_ID, render_mode="human"))
    assert env.render_mode == "human" and env.unwrapped.render_window is not None
    assert env.unwrapped.call_remote("render_mode") == "rgb_array"
    env.reset(seed=0)
    assert env.unwrapped.render_window.last_frame.shape == FRAME_SHAPE
    env.close()
    assert env.unwrapped.render_window.closed


def test_human_mode_without_pygame_says_how_to_install_it(url, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)  # import pygame raises ImportError
    for make in (lambda: RemoteEnv(ENV_ID, broker=url, render_mode="human"),
                 lambda: RemoteEnvVec(ENV_ID, 2, broker=url, render_mode="human")):
        with pytest.raises(RenderUnavailableError, match=r"remoterl\[render\]") as caught:
            make()
        assert isinstance(caught.value, RemoteRLError)
    assert status(url)["open_slots"] == 0  # refused before any slot opened


def test_human_mode_without_a_display_is_a_clear_error(url, monkeypatch):
    import pygame

    pygame.display.quit()
    monkeypatch.setenv("SDL_VIDEODRIVER", "x11")  # a real display driver, and no display to open
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(RenderUnavailableError, match="DISPLAY.*rgb_array") as caught:
        RemoteEnv(ENV_ID, broker=url, render_mode="human")
    assert "SDL_VIDEODRIVER=dummy" in str(caught.value)
    assert status(url)["open_slots"] == 0


def test_tile_frames_lays_out_a_grid():
    frames = [np.full((2, 3, 3), i, dtype=np.uint8) for i in range(3)]
    tiled = tile_frames(frames)
    assert tiled.shape == (4, 6, 3)  # 2 columns, 2 rows; the last cell black
    assert (tiled[:2, :3] == 0).all() and (tiled[:2, 3:] == 1).all() and (tiled[2:, :3] == 2).all()
    assert (tiled[2:, 3:] == 0).all()
    with pytest.raises(ValueError, match="one shape"):
        tile_frames([np.zeros((2, 3, 3)), np.zeros((3, 3, 3))])
