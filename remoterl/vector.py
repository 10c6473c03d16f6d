"""``RemoteEnvVec``: ``num_envs`` remote slots as one ``gymnasium.vector.VectorEnv``.

The broker places the slots over one or more workers. Env ``i`` of the vector is
a fixed slot; slots are numbered so that each worker's slots are a contiguous range
of env indices, which lets a step send ``actions[start:stop]`` (a view, no copy) to
each worker as ONE message and join the replies with one concatenation
(:mod:`remoterl.vector_batch`). Each message is built by :mod:`remoterl.wire.calls`, the
call schema the workers read.

Autoreset runs on the workers (no extra round trip), following
``SyncVectorEnv.step`` for the three ``AutoresetMode`` values; the ``infos`` dict is
rebuilt here with gymnasium's own ``VectorEnv._add_info`` in env-index order, so
``_key`` masks, ``final_obs`` and ``final_info`` sit where gymnasium puts them.

``step_async``/``step_wait``, ``reset_async``/``reset_wait`` and ``call_async``/
``call_wait`` split calls the way ``AsyncVectorEnv`` does (same ``AsyncState`` errors),
so a trainer can overlap its own work with remote stepping. ``get_attr``, ``set_attr``
and ``call`` reach the remote envs' public attributes as ``SyncVectorEnv`` defines them
(one message per worker; names and values travel as codec values, never pickle): they are
:mod:`remoterl.vector_attrs`', a mixin of :class:`RemoteEnvVec`. ``render()`` is
``call("render")``: one frame per env, raw arrays on the wire; with ``render_mode="human"``
the workers render ``"rgb_array"`` and the tiled frames are shown here (:mod:`remoterl.render`).

Never out of step: once a step has been sent, the workers step whether or not the
trainer sees the results. So when a step (or reset) fails after anything was sent — an
env raised, a worker died, no reply within the timeout — the vector refuses to step
again (:class:`~remoterl.errors.ResetNeededError`) until a full ``reset()``, which the
workers run after whatever they still had queued; a late reply is dropped, never taken
for a later call's. The error raised for the failed step lists in ``stepped_envs`` the
envs that did step, as their workers reported.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import batch_space

from remoterl.client.registry import default_compression, get_client
from remoterl.errors import ActionNotBatchedError, InvalidActionError, RemoteRLError, ResetNeededError
from remoterl.failover import LostClient, check_policy, hosting_opts
from remoterl.render import for_worker, show_frames
from remoterl.vector_attrs import VectorAttrs
from remoterl.vector_failover import VectorFailover
from remoterl.vector_batch import check_reset_mask, concat, describe_value, not_a_batch, scatter, slice_batch
from remoterl.wire import calls
from remoterl.wire.actions import check_actions
from remoterl.wire.calls import FINAL, INFOS, OBS, REWARDS, TERMINATED, TRUNCATED
from remoterl.wire.envdesc import EnvDescription

__all__ = ["RemoteEnvVec"]


class RemoteEnvVec(VectorFailover, VectorAttrs, VectorEnv):
    """A vector of remote envs, stepped with one message per worker.

    Args:
        env_id: a gymnasium env id the workers serve.
        num_envs: how many envs (slots).
        autoreset_mode: ``AutoresetMode`` (or its string value); NEXT_STEP by default,
            as gymnasium's vector envs.
        broker: the broker's URL (default: the one ``remoterl.init`` configured).
        client: an explicit :class:`remoterl.Client`.
        max_workers: spread the slots over at most this many workers (cheap envs run
            faster packed on one worker; slow simulators faster spread).
        timeout: seconds to wait for each step, reset and attribute call (default: the client's).
        on_worker_lost: ``"raise"`` (``WorkerLostError``, the default unless ``remoterl.init``
            says otherwise) or ``"truncate"``: the envs of a worker that died (or of a broker
            that restarted) are re-opened on the workers still serving the env id, waiting up
            to ``timeout`` for capacity, and their episodes end with ``truncated=True`` and
            ``info["remoterl_worker_lost"] = True`` (:mod:`remoterl.vector_failover`).
        compression: ``"lz4"`` or ``"zstd"``: the workers compress big observation and frame
            arrays before sending them (worth it across a WAN; default: ``remoterl.init``'s,
            else none; False: none).
        **kwargs: for ``gymnasium.make`` on the workers (``max_episode_steps``, env
            constructor arguments, ...).
    """

    def __init__(self, env_id: str, num_envs: int, *,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 broker: str | None = None, client: Any = None, max_workers: int | None = None,
                 timeout: float | None = None, on_worker_lost: str | None = None,
                 compression: str | None = None, **kwargs: Any) -> None:
        # Until the slots are open there is nothing to close (VectorEnv.__del__ checks this).
        self.closed = True
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self._mode = calls.mode_code(self.autoreset_mode)
        self._on_lost = check_policy(on_worker_lost)
        self._opts = hosting_opts(default_compression(compression))
        self._client = client if client is not None else get_client(broker)
        self._clients = LostClient(self._client, client is None, broker)
        self._timeout = timeout
        self._state = AsyncState.DEFAULT
        self._pending: list = []
        # (envs per request, mask, seeds, options) of the reset in flight
        self._resetting: tuple[list[list[int]], np.ndarray | None, list, dict | None] = ([], None, [], None)
        self._answered: tuple | None = None  # a call answered from the description, until call_wait
        # Why the vector is out of step with its workers (None: in step): see the module docstring.
        self._out_of_step: str | None = None
        # render_mode="human": the workers render "rgb_array" frames, shown in a window here.
        self._kwargs, self.render_window = for_worker(kwargs, f"remoterl: {num_envs} x {env_id}")
        opened = self._client.open(env_id, num_envs, self._kwargs, opts=self._opts, max_workers=max_workers,
                                   timeout=timeout)
        self.closed = False
        by_worker: dict[bytes, list[int]] = {}
        for slot, worker in zip(opened.slots, opened.workers):
            by_worker.setdefault(worker, []).append(slot)
        # Each worker's slots are consecutive envs: one message per worker per step.
        self._set_slots([w for w, slots in by_worker.items() for _ in slots],
                        [s for slots in by_worker.values() for s in slots])

        desc = EnvDescription.from_wire(opened.env)
        self.env_id = env_id
        self.num_envs = num_envs
        self.single_observation_space = desc.observation_space
        self.single_action_space = desc.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        # VectorEnv.metadata is a class-level dict: every instance gets its own.
        self.metadata = desc.metadata
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.render_mode = desc.render_mode if self.render_window is None else "human"
        if self.render_window is not None:
            self.render_window.fps = self.metadata.get("render_fps")
        self.spec = desc.spec
        self._observations: Any = None

    # --- gymnasium API: reset ------------------------------------------------------------------

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset the envs; ``seed`` and ``options`` (including ``reset_mask``) as SyncVectorEnv.

        A full reset (no ``reset_mask``, or one that is all True) also brings a vector that
        fell out of step with its workers back in step.

        Raises:
            AssertionError (gymnasium < 1.3; TypeError/ValueError after): a ``reset_mask`` that
                is not a bool array of shape ``(num_envs,)`` with a True, worded as the installed
                gymnasium's ``SyncVectorEnv``.
            ValueError: a partial ``reset_mask`` before the first reset (the other envs have no
                observation yet; ``SyncVectorEnv`` fails on it too).
            ResetNeededError: a partial ``reset_mask`` while the vector is out of step.
        """
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None) -> None:
        """Send the resets (one message per worker); collect them with :meth:`reset_wait`.

        Raises:
            AlreadyPendingCallError: another call has not been waited for (as AsyncVectorEnv).
            ClosedEnvironmentError: the vector was closed.
            And the argument errors of :meth:`reset`, before anything is sent.
        """
        self._ensure_idle("reset_async")
        if seed is None:
            seeds: list = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"If seeds are passed as a list the length must match num_envs={self.num_envs} "
                             f"but got length={len(seeds)}.")
        mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)
            mask = check_reset_mask(options.pop("reset_mask"), self.num_envs)
            if mask.all():
                mask = None  # every env: a full reset, as SyncVectorEnv's result is the same
            elif self._out_of_step is not None:
                raise ResetNeededError(self._out_of_step_message("a reset of every env (no partial reset_mask)"))
            elif self._observations is None:
                raise ValueError(
                    f"`options['reset_mask']` resets only some envs, but this is the first reset: envs "
                    f"{np.flatnonzero(~mask).tolist()} have no observation yet; reset every env first")
        self._send_reset(seeds, options, mask)

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Wait for the resets of :meth:`reset_async`; returns ``(obs, infos)`` as :meth:`reset`.

        Raises:
            NoAsyncCallError: no reset is pending.
            RemoteTimeoutError: no reply within ``timeout`` (a ``TimeoutError`` and a
                ``multiprocessing.TimeoutError``); the vector must then be reset again.
        """
        self._ensure_open()
        if self._state is not AsyncState.WAITING_RESET:
            raise NoAsyncCallError("Calling `reset_wait` without any prior call to `reset_async`.",
                                   AsyncState.WAITING_RESET.value)
        obs, env_infos = self._wait_reset(timeout)
        infos: dict[str, Any] = {}
        for i, info in env_infos:
            infos = self._add_info(infos, info, i)
        return obs, infos

    def reset_envs(self, seeds: list, options: dict | None = None,
                   mask: np.ndarray | None = None) -> tuple[Any, list[tuple[int, dict]]]:
        """Reset the envs in ``mask`` (all by default): one message per worker.

        Returns:
            The batched observations (unmasked envs keep their last ones) and
            ``[(env index, reset info), ...]`` for the envs reset, in index order.
        """
        self._ensure_idle("reset")
        self._send_reset(seeds, options, mask)
        return self._wait_reset(None)

    def _send_reset(self, seeds: list, options: dict | None, mask: np.ndarray | None) -> None:
        requests, picked = [], []
        for worker, slots, start, stop in self._groups:
            idx = [i for i in range(start, stop) if mask is None or mask[i]]
            if not idx:
                continue
            requests.append((worker, [slots[i - start] for i in idx],
                             calls.reset([seeds[i] for i in idx], options)))
            picked.append(idx)
        self._pending = self._send(requests, "reset")
        self._resetting = (picked, mask, seeds, options)
        self._state = AsyncState.WAITING_RESET

    def _wait_reset(self, timeout: float | None) -> tuple[Any, list[tuple[int, dict]]]:
        pending, self._pending = self._pending, []
        (picked, mask, seeds, options), self._resetting = self._resetting, ([], None, [], None)
        self._state = AsyncState.DEFAULT
        try:
            replies = self._client.wait(pending, timeout if timeout is not None else self._timeout)
        except BaseException as exc:
            if self._recoverable(pending):  # on_worker_lost="truncate" and envs were lost
                obs, env_infos = self._recover_reset(pending, picked, mask, seeds, options, exc)
                if mask is None:
                    self._out_of_step = None
                return obs, env_infos
            # Some envs may be reset, others not, and a late reply may still come: in step again
            # only after a reset that succeeds.
            self._fall_out_of_step(f"the last reset failed ({_what_failed(exc)})")
            raise
        if mask is None:
            obs = concat(self.single_observation_space, [r[OBS] for r in replies])
            self._out_of_step = None
        else:
            # SyncVectorEnv keeps the last obs of unmasked envs; never alter what we returned before.
            obs = copy.deepcopy(self._observations)
            for idx, reply in zip(picked, replies):
                obs = scatter(self.single_observation_space, obs, idx, reply[OBS])
        self._observations = obs
        if self.render_window is not None:  # human mode renders after every reset and step
            self.render()
        return obs, [(i, info) for idx, reply in zip(picked, replies) for i, info in zip(idx, reply[INFOS])]

    # --- gymnasium API: step -------------------------------------------------------------------

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every env with its action: one message per worker, autoreset on the workers."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Send the actions; collect the results with :meth:`step_wait`.

        Raises:
            AlreadyPendingCallError: a previous call has not been waited for.
            ResetNeededError: a previous step or reset failed or timed out; ``reset()`` first.
            ActionNotBatchedError: ``actions`` is no batch at all (a scalar, ``None``...): an
                ``InvalidActionError`` and a ``TypeError``, as gymnasium raises (nothing sent).
            InvalidActionError: the actions cannot fit the batched action space (nothing sent).
        """
        self._ensure_idle("step_async")
        if self._out_of_step is not None:
            raise ResetNeededError(self._out_of_step_message("reset()"))
        space = self.single_action_space
        # The same checks the workers run on arrival (remoterl.wire.actions.check_actions): a batch that
        # does not fit fails here, typed, with nothing sent.
        try:
            actions = check_actions(space, actions, self.num_envs)
        except InvalidActionError as exc:
            if not_a_batch(space, actions):
                raise ActionNotBatchedError(
                    f"step() takes a batch of {self.num_envs} actions for {space}, one per env (as "
                    f"envs.action_space.sample() gives), got {describe_value(actions)}") from exc
            raise
        mode, build = self._mode, calls.step
        self._pending = self._send([(worker, slots, build(slice_batch(space, actions, start, stop), mode))
                                    for worker, slots, start, stop in self._groups], "step")
        self._state = AsyncState.WAITING_STEP

    def step_wait(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Wait for the results of :meth:`step_async`.

        After any error here the vector is out of step with its workers: the next step raises
        :class:`~remoterl.errors.ResetNeededError` until ``reset()``. The error raised lists in
        ``stepped_envs`` the envs whose workers reported them stepped.

        Raises:
            NoAsyncCallError: no step is pending.
            RemoteTimeoutError: the workers did not answer within ``timeout`` (a ``TimeoutError``
                and a ``multiprocessing.TimeoutError``, as ``AsyncVectorEnv`` raises).
            RemoteEnvError / WorkerLostError: an env raised / a worker died.
        """
        obs, rewards, terminated, truncated, env_infos, finals = self.wait_envs(timeout)
        infos: dict[str, Any] = {}
        add_info = self._add_info
        for i, info in enumerate(env_infos):
            final = finals.get(i) if finals else None
            if final is not None:
                infos = add_info(infos, {"final_obs": final[0], "final_info": final[1]}, i)
            if info:
                infos = add_info(infos, info, i)
        return obs, rewards, terminated, truncated, infos

    def wait_envs(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, list, dict]:
        """Collect a step per env: obs, rewards, terminated, truncated, the info of each env,
        and ``{env index: (final obs, final info)}`` for envs reset in the same step (SAME_STEP).

        The per-env form behind :meth:`step_wait` (gymnasium) and SB3's ``RemoteVecEnv``; fails
        as :meth:`step_wait` does.
        """
        if self._state is not AsyncState.WAITING_STEP:
            self._ensure_open()
            raise NoAsyncCallError("Calling `step_wait` without any prior call to `step_async`.",
                                   AsyncState.WAITING_STEP.value)
        pending, self._pending = self._pending, []
        self._state = AsyncState.DEFAULT
        try:
            replies = self._client.wait(pending, timeout if timeout is not None else self._timeout)
        except BaseException as exc:
            if self._recoverable(pending):  # on_worker_lost="truncate" and envs were lost
                return self._recover_step(pending, exc)
            self._step_failed(exc, pending)
            raise
        if len(replies) == 1:
            reply = replies[0]
            obs, rewards, terminated, truncated = reply[OBS], reply[REWARDS], reply[TERMINATED], reply[TRUNCATED]
            env_infos = reply[INFOS]
        else:
            obs = concat(self.single_observation_space, [r[OBS] for r in replies])
            rewards = np.concatenate([r[REWARDS] for r in replies])
            terminated = np.concatenate([r[TERMINATED] for r in replies])
            truncated = np.concatenate([r[TRUNCATED] for r in replies])
            env_infos = [info for r in replies for info in r[INFOS]]
        finals: dict[int, tuple] = {}
        for (_, _, start, _), reply in zip(self._groups, replies):
            for j, f_obs, f_info in reply.get(FINAL, ()):
                finals[start + j] = (f_obs, f_info)
        self._observations = obs
        if self.render_window is not None:
            self.render()
        return obs, rewards, terminated, truncated, env_infos, finals

    def render(self) -> tuple[Any, ...]:
        """Every env's ``render()`` on its worker, as ``SyncVectorEnv``: a tuple, one frame per env
        (``call("render")``, so it raises as :meth:`call`). In ``"human"`` mode the workers render
        ``"rgb_array"``, the frames are shown tiled in :attr:`render_window` here, and the result
        is ``(None, ...)`` as from human-mode envs; ``reset`` and the steps call it themselves."""
        frames = self.call("render")
        if self.render_window is None:
            return frames
        show_frames(self.render_window, frames, repr(self))
        return tuple(None for _ in frames)

    def close_extras(self, **kwargs: Any) -> None:
        """Release every slot (envs are closed on their workers)."""
        if self._state is not AsyncState.DEFAULT:
            try:
                self._client.wait(self._pending, self._timeout)
            except Exception:  # closing anyway: the slots are released below
                pass
            self._state = AsyncState.DEFAULT
        if self.render_window is not None:
            self.render_window.close()
        self._client.close_slots(self._all_slots)
        if self._clients.owned is not None:  # a client made here to replace a lost one
            self._clients.owned.close()

    # --- helpers -----------------------------------------------------------------------------

    @property
    def workers(self) -> list[bytes]:
        """The routing ids of the workers holding this vector's slots, in env-index order."""
        return [worker for worker, _, _, _ in self._groups]

    def _send(self, requests: list[tuple[bytes, list[int], dict]], what: str) -> list:
        """Send one call per worker; return the pending entries.

        If a send fails after others went out (a lost worker, a message over the limit), the
        workers that got theirs run them: a step or reset leaves the vector out of step.
        """
        pending = []
        send = self._send_or_note_lost if what in ("step", "reset") else self._client.send_call
        try:
            for worker, slots, request in requests:
                pending.append(send(worker, slots, request, what))
        except BaseException as exc:
            if pending and what in ("step", "reset"):
                self._fall_out_of_step(f"the last {what} reached only some of the workers ({_what_failed(exc)})")
            raise
        return pending

    def _step_failed(self, exc: BaseException, pending: list) -> None:
        """The step's wait failed: note which envs stepped on ``exc``, and fall out of step."""
        if isinstance(exc, RemoteRLError):
            stepped: list[int] = []
            for (_, _, start, stop), entry in zip(self._groups, pending):
                if not entry.done:
                    continue  # no answer (yet): unknown
                if entry.error is None:
                    stepped.extend(range(start, stop))
                else:
                    known = getattr(entry.error, "stepped_slots", None) or ()
                    stepped.extend(self._env_of_slot[s] for s in known if s in self._env_of_slot)
            exc.stepped_envs = tuple(sorted(stepped))
        self._fall_out_of_step(f"the last step failed ({_what_failed(exc)})")

    def _fall_out_of_step(self, reason: str) -> None:
        self._out_of_step = reason
        self._observations = None

    def _out_of_step_message(self, needed: str) -> str:
        return (f"{self!r} is out of step with its workers: {self._out_of_step}; the workers may have "
                f"stepped envs whose results never arrived. Call {needed} before stepping again.")

    def _ensure_open(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")

    def _ensure_idle(self, what: str) -> None:
        self._ensure_open()
        if self._state is not AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{what}` while waiting for a pending call to `{self._state.value}` to complete",
                str(self._state.value))

    def __repr__(self) -> str:
        return f"RemoteEnvVec({self.env_id!r}, num_envs={self.num_envs}, workers={len(self._groups)})"


def _what_failed(exc: BaseException) -> str:
    """``Type: first line of the message``, for a reason shown later."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
