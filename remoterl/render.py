"""Rendering remote envs: frames streamed from the workers, shown in a window on the trainer.

Theory of operation
-------------------
A remote env renders on its worker; its frame comes back through the generic ``call`` op
(``call("render")``, :mod:`remoterl.wire.calls`), as the env's ``render()`` returned it: an
RGB ``numpy`` array travels as a raw frame, like an observation, and a list of them
(``render_mode="rgb_array_list"``) as one raw frame each. Nothing else on the wire is
specific to rendering.

``render_mode="human"`` means a window, and the window belongs on the trainer's machine:
a worker is usually headless, and a window there would show nobody. So the trainer side
keeps ``render_mode="human"`` while the worker's env is made with ``"rgb_array"``
(:func:`for_worker` rewrites the kwargs for ``gymnasium.make`` there), and a
:class:`FrameWindow` here shows the frames. As gymnasium's human-mode envs render after
every ``reset`` and ``step``, ``RemoteEnv`` and ``RemoteEnvVec`` fetch and show a frame after
each (one more round trip: human mode is for watching, at the env's ``render_fps``); a
vector's frames are tiled into one picture (:func:`tile_frames`).

pygame is imported only when a window is made (``pip install "remoterl[render]"``). Its
absence, or a machine where it cannot open a display (no ``$DISPLAY``), is a
:class:`RenderUnavailableError` that says why and what to do, raised when the env is
made, before any slot opens. Tests and headless machines can set ``SDL_VIDEODRIVER=dummy``:
frames are then drawn without being shown.

What it does not do: it handles no window events beyond keeping the window responsive
(closing the window does not close the env, as with gymnasium's own envs), and it does not
record video (gymnasium's ``RecordVideo`` and SB3's ``VecVideoRecorder`` do, from
``render_mode="rgb_array"``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from remoterl.errors import RenderUnavailableError

__all__ = ["MAX_WINDOW_SIZE", "FrameWindow", "RenderUnavailableError", "for_worker", "show_frame", "show_frames",
           "tile_frames"]

# The largest picture shown unscaled; a bigger one (many tiled envs) is scaled down to fit.
MAX_WINDOW_SIZE = (1600, 1000)

_INSTALL_HINT = 'pip install "remoterl[render]"'


def for_worker(kwargs: dict[str, Any], title: str) -> tuple[dict[str, Any], FrameWindow | None]:
    """The kwargs for ``gymnasium.make`` on the worker, and the window of ``render_mode="human"``.

    With ``render_mode="human"`` the worker's env is made with ``"rgb_array"`` and a
    :class:`FrameWindow` is made here (shown from the first frame on); any other kwargs
    are returned as they are, with no window.

    Raises:
        RenderUnavailableError: human mode, and pygame is missing or finds no display.
    """
    if kwargs.get("render_mode") != "human":
        return kwargs, None
    return {**kwargs, "render_mode": "rgb_array"}, FrameWindow(title)


def show_frame(window: FrameWindow, frame: Any, what: str) -> None:
    """Show a frame a worker sent for human mode; ``what`` names the env in errors.

    Raises:
        ValueError: the worker's env rendered no image (``None``, or not an image array).
    """
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"{what}: render_mode='human' shows the env's 'rgb_array' frames, but the env on the "
                         f"worker rendered {type(frame).__name__}; does it support render_mode='rgb_array'?")
    window.show(frame)


def show_frames(window: FrameWindow, frames: Any, what: str) -> None:
    """Show a vector's frames for human mode, tiled into one picture (:func:`tile_frames`).

    Raises:
        ValueError: an env on a worker rendered no image, or frames of different shapes.
    """
    for frame in frames:
        if not isinstance(frame, np.ndarray):
            show_frame(window, frame, what)  # raises, naming what came instead
    window.show(tile_frames(frames))


def tile_frames(frames: Any) -> np.ndarray:
    """One picture of several frames of the same shape, in a near-square grid of
    ``ceil(sqrt(n))`` columns filled row by row; empty cells are black.

    Raises:
        ValueError: no frames, or frames of different shapes.
    """
    frames = [np.asarray(frame) for frame in frames]
    if not frames or any(frame.shape != frames[0].shape or frame.ndim < 2 for frame in frames):
        raise ValueError(f"tile_frames needs frames of one shape, got shapes {[f.shape for f in frames]}")
    if len(frames) == 1:
        return frames[0]
    height, width = frames[0].shape[:2]
    cols = math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / cols)
    canvas = np.zeros((rows * height, cols * width, *frames[0].shape[2:]), dtype=frames[0].dtype)
    for i, frame in enumerate(frames):
        row, col = divmod(i, cols)
        canvas[row * height:(row + 1) * height, col * width:(col + 1) * width] = frame
    return canvas


class FrameWindow:
    """A pygame window on this machine that shows frames (``(height, width, 3)`` RGB arrays).

    Made by :func:`for_worker` for ``render_mode="human"``, which only initialises pygame's
    display (so an env made without a display fails before its slots open, and one whose
    slots fail to open leaves no window behind); the window itself opens at the first
    :meth:`show`, sized to the frame (scaled down to ``MAX_WINDOW_SIZE``). Closing it
    closes pygame's display, as gymnasium's envs do in ``close()``.

    Args:
        title: the window's caption.
        fps: frames a second :meth:`show` keeps to (the env's ``metadata["render_fps"]``, set
            once the worker described the env); ``None``: as fast as frames come.

    Raises:
        RenderUnavailableError: pygame is not installed, or cannot initialise a display.
    """

    def __init__(self, title: str = "remoterl", fps: float | None = None) -> None:
        self.title = title
        self.fps = fps
        #: The last frame shown, as the worker sent it (unscaled); None before the first.
        self.last_frame: np.ndarray | None = None
        self.closed = False
        self._pygame = _import_pygame()
        self._init_display()
        self._screen: Any = None
        self._clock: Any = None

    def show(self, frame: np.ndarray) -> None:
        """Draw ``frame`` (an RGB or grayscale image array) and keep to ``fps``.

        Raises:
            ValueError: ``frame`` is not a 2-d image (``(h, w)``, ``(h, w, 3)`` or ``(h, w, 4)``).
            RenderUnavailableError: the window cannot be opened.
            RuntimeError: the window was closed.
        """
        if self.closed:
            raise RuntimeError(f"the window {self.title!r} is closed")
        rgb = _as_rgb(frame)
        pygame = self._pygame
        size = _fit(rgb.shape[1], rgb.shape[0])
        if self._screen is None or not pygame.display.get_init() or pygame.display.get_surface() is not self._screen \
                or self._screen.get_size() != size:
            self._open(size)
        surface = pygame.surfarray.make_surface(rgb.swapaxes(0, 1))  # pygame indexes (x, y)
        if surface.get_size() != size:
            surface = pygame.transform.smoothscale(surface, size)
        self._screen.blit(surface, (0, 0))
        pygame.event.pump()  # keep the window responsive
        if self.fps:
            self._clock.tick(self.fps)
        pygame.display.flip()
        self.last_frame = frame

    def close(self) -> None:
        """Close the window (pygame's display, as gymnasium's envs do). Closing twice is harmless."""
        if self.closed:
            return
        self.closed = True
        self._screen = None
        # The display only: an embedded worker in this process may render with pygame too.
        self._pygame.display.quit()

    def _open(self, size: tuple[int, int]) -> None:
        pygame = self._pygame
        try:
            if not pygame.display.get_init():
                self._init_display()
            self._screen = pygame.display.set_mode(size)
        except pygame.error as exc:
            raise RenderUnavailableError(_no_display(exc)) from exc
        pygame.display.set_caption(self.title)
        self._clock = pygame.time.Clock()

    def _init_display(self) -> None:
        try:
            self._pygame.display.init()
        except self._pygame.error as exc:
            raise RenderUnavailableError(_no_display(exc)) from exc

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._screen is not None else "not shown yet"
        return f"<FrameWindow {self.title!r} {state}>"


def _import_pygame() -> Any:
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # a library prints nothing
    try:
        import pygame
    except ImportError as exc:
        raise RenderUnavailableError(
            "render_mode='human' shows the remote env's frames in a window on this machine, and that needs "
            f"pygame, which is not installed: {_INSTALL_HINT}. Or use render_mode='rgb_array' and "
            "env.render() (gymnasium.wrappers.RecordVideo writes the frames to a video)") from exc
    return pygame


def _no_display(exc: BaseException) -> str:
    where = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    why = f"$DISPLAY is {where!r}" if where else "$DISPLAY is not set (a headless machine?)"
    return (f"render_mode='human' needs a window on this machine, but pygame cannot open a display ({exc}; "
            f"{why}). Run it where a display is available, use render_mode='rgb_array' (gymnasium.wrappers."
            f"RecordVideo writes the frames to a video), or set SDL_VIDEODRIVER=dummy to draw without showing")


def _as_rgb(frame: Any) -> np.ndarray:
    rgb = np.asarray(frame)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.shape[0] == 0 or rgb.shape[1] == 0 \
            or not np.issubdtype(rgb.dtype, np.number):
        raise ValueError(f"a frame must be an image array (height, width[, 3 or 4]), got {rgb.dtype} {rgb.shape}")
    return rgb[:, :, :3].astype(np.uint8, copy=False)


def _fit(width: int, height: int) -> tuple[int, int]:
    """The window size for a picture: its own, or scaled down to fit ``MAX_WINDOW_SIZE``."""
    scale = min(1.0, MAX_WINDOW_SIZE[0] / width, MAX_WINDOW_SIZE[1] / height)
    return max(1, int(width * scale)), max(1, int(height * scale))
