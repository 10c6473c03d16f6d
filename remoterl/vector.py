"""``RemoteEnvVec``: ``num_envs`` remote slots as one ``gymnasium.vector.VectorEnv``.

The broker places the slots over one or more workers. Env ``i`` of the vector is
a fixed slot; slots are numbered so that each worker's slots are a contiguous range
of env indices, which lets a step send ``actions[start:stop]`` (a view, no copy) to
each worker as ONE message and join the replies with one concatenation.

Autoreset runs on the workers (no extra round trip), following
``SyncVectorEnv.step`` for the three ``AutoresetMode`` values; the ``infos`` dict is
rebuilt here with gymnasium's own ``VectorEnv._add_info`` in env-index order, so
``_key`` masks, ``final_obs`` and ``final_info`` sit where gymnasium puts them.

``step_async``/``step_wait`` split a step the way ``AsyncVectorEnv`` does, so a
trainer can overlap its own work with remote stepping.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium
import numpy as np
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import batch_space

from remoterl.actions import check_actions
from remoterl.env import metadata_from_wire, spec_from_wire
from remoterl.spaces import space_from_wire

__all__ = ["RemoteEnvVec"]

# AutoresetMode -> the worker's wire code (remoterl.workers.runtime.AUTORESET_MODES).
_MODE_CODES = {AutoresetMode.NEXT_STEP: 0, AutoresetMode.SAME_STEP: 1, AutoresetMode.DISABLED: 2}


class RemoteEnvVec(VectorEnv):
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
        timeout: seconds to wait for each step (default: the client's).
        **kwargs: for ``gymnasium.make`` on the workers (``max_episode_steps``, env
            constructor arguments, ...).
    """

    def __init__(self, env_id: str, num_envs: int, *,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 broker: str | None = None, client: Any = None, max_workers: int | None = None,
                 timeout: float | None = None, **kwargs: Any) -> None:
        from remoterl.lifecycle import get_client

        # Until the slots are open there is nothing to close (VectorEnv.__del__ checks this).
        self.closed = True
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self._mode = _MODE_CODES[self.autoreset_mode]
        self._client = client if client is not None else get_client(broker)
        self._timeout = timeout
        self._state = AsyncState.DEFAULT
        self._pending: list = []
        opened = self._client.open(env_id, num_envs, kwargs, max_workers=max_workers, timeout=timeout)
        self.closed = False
        by_worker: dict[bytes, list[int]] = {}
        for slot, worker in zip(opened.slots, opened.workers):
            by_worker.setdefault(worker, []).append(slot)
        self._groups: list[tuple[bytes, list[int], int, int]] = []
        start = 0
        for worker, slots in by_worker.items():
            self._groups.append((worker, slots, start, start + len(slots)))
            start += len(slots)
        self._all_slots = [s for _, slots, _, _ in self._groups for s in slots]

        desc = opened.env
        self.env_id = env_id
        self.num_envs = num_envs
        self.single_observation_space = space_from_wire(desc["observation_space"])
        self.single_action_space = space_from_wire(desc["action_space"])
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        # VectorEnv.metadata is a class-level dict: every instance gets its own.
        self.metadata = metadata_from_wire(desc.get("metadata"))
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.render_mode = desc.get("render_mode")
        self.spec = spec_from_wire(desc.get("spec"))
        self._observations: Any = None

    # --- gymnasium API ---------------------------------------------------------------------

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset the envs; ``seed`` and ``options`` (including ``reset_mask``) as SyncVectorEnv."""
        self._ensure_idle("reset")
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
            mask = _check_reset_mask(options.pop("reset_mask"), self.num_envs)
            if self._observations is None:
                raise ValueError("reset_mask needs a full reset first")
        obs, env_infos = self.reset_envs(seeds, options, mask)
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
        pending, picked = [], []
        for worker, slots, start, stop in self._groups:
            idx = [i for i in range(start, stop) if mask is None or mask[i]]
            if not idx:
                continue
            pending.append(self._client.send_call(worker, [slots[i - start] for i in idx], {
                "op": "reset", "seeds": [seeds[i] for i in idx], "options": options}))
            picked.append(idx)
        replies = self._client.wait(pending, self._timeout)
        if mask is None:
            obs = _concat(self.single_observation_space, [r["obs"] for r in replies])
        else:
            # SyncVectorEnv keeps the last obs of unmasked envs; never alter what we returned before.
            obs = copy.deepcopy(self._observations)
            for idx, reply in zip(picked, replies):
                obs = _scatter(self.single_observation_space, obs, idx, reply["obs"])
        self._observations = obs
        return obs, [(i, info) for idx, reply in zip(picked, replies) for i, info in zip(idx, reply["infos"])]

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every env with its action: one message per worker, autoreset on the workers."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Send the actions; collect the results with :meth:`step_wait`.

        Raises:
            AlreadyPendingCallError: a previous call has not been waited for.
            InvalidActionError: the actions cannot fit the batched action space (nothing sent).
        """
        self._ensure_idle("step_async")
        # The same checks the workers run on arrival (remoterl.actions.check_actions): a batch that
        # does not fit fails here, typed, with nothing sent.
        actions = check_actions(self.single_action_space, actions, self.num_envs)
        mode = self._mode
        self._pending = [
            self._client.send_call(worker, slots, {
                "op": "step", "a": _slice(self.single_action_space, actions, start, stop), "m": mode})
            for worker, slots, start, stop in self._groups
        ]
        self._state = AsyncState.WAITING_STEP

    def step_wait(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Wait for the results of :meth:`step_async`.

        Raises:
            NoAsyncCallError: no step is pending.
            RemoteTimeoutError: the workers did not answer within ``timeout`` (a TimeoutError).
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

        The per-env form behind :meth:`step_wait` (gymnasium) and SB3's ``RemoteVecEnv``.
        """
        if self._state is not AsyncState.WAITING_STEP:
            raise NoAsyncCallError("Calling `step_wait` without any prior call to `step_async`.",
                                   AsyncState.WAITING_STEP.value)
        pending, self._pending = self._pending, []
        self._state = AsyncState.DEFAULT
        replies = self._client.wait(pending, timeout if timeout is not None else self._timeout)
        if len(replies) == 1:
            reply = replies[0]
            obs, rewards, terminated, truncated = reply["obs"], reply["rew"], reply["term"], reply["trunc"]
            env_infos = reply["infos"]
        else:
            obs = _concat(self.single_observation_space, [r["obs"] for r in replies])
            rewards = np.concatenate([r["rew"] for r in replies])
            terminated = np.concatenate([r["term"] for r in replies])
            truncated = np.concatenate([r["trunc"] for r in replies])
            env_infos = [info for r in replies for info in r["infos"]]
        finals: dict[int, tuple] = {}
        for (_, _, start, _), reply in zip(self._groups, replies):
            for j, f_obs, f_info in reply.get("final", ()):
                finals[start + j] = (f_obs, f_info)
        self._observations = obs
        return obs, rewards, terminated, truncated, env_infos, finals

    def render(self) -> Any:
        raise NotImplementedError("RemoteEnvVec.render(): frame streaming from remote workers is not available yet")

    def close_extras(self, **kwargs: Any) -> None:
        """Release every slot (envs are closed on their workers)."""
        if self._state is AsyncState.WAITING_STEP:
            try:
                self._client.wait(self._pending, self._timeout)
            except Exception:  # closing anyway: the slots are released below
                pass
            self._state = AsyncState.DEFAULT
        self._client.close_slots(self._all_slots)

    # --- helpers -----------------------------------------------------------------------------

    @property
    def workers(self) -> list[bytes]:
        """The routing ids of the workers holding this vector's slots, in env-index order."""
        return [worker for worker, _, _, _ in self._groups]

    def _ensure_idle(self, what: str) -> None:
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")
        if self._state is not AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{what}` while waiting for a pending call to `{self._state.value}` to complete",
                str(self._state.value))

    def __repr__(self) -> str:
        return f"RemoteEnvVec({self.env_id!r}, num_envs={self.num_envs}, workers={len(self._groups)})"


def _check_reset_mask(mask: Any, num_envs: int) -> np.ndarray:
    # The same checks, in the same order and words, as SyncVectorEnv.reset.
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
    if mask.shape != (num_envs,):
        raise ValueError(f"`options['reset_mask']` must have shape `({num_envs},)`, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
    if not np.any(mask):
        raise ValueError(f"`options['reset_mask']` must contain a boolean array with at least one True value, "
                         f"got reset_mask={mask}")
    return mask


_ARRAY_SPACES = (gymnasium.spaces.Box, gymnasium.spaces.Discrete, gymnasium.spaces.MultiDiscrete,
                 gymnasium.spaces.MultiBinary)


def _slice(space: gymnasium.spaces.Space, batch: Any, start: int, stop: int) -> Any:
    """Envs ``start:stop`` of a batched value (views for arrays)."""
    if isinstance(space, gymnasium.spaces.Dict):
        return {key: _slice(sub, batch[key], start, stop) for key, sub in space.spaces.items()}
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(_slice(sub, batch[k], start, stop) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        return np.asarray(batch)[start:stop]
    return batch[start:stop]


def _concat(space: gymnasium.spaces.Space, parts: list) -> Any:
    """Join batched values from several workers along the env axis."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(space, gymnasium.spaces.Dict):
        return {key: _concat(sub, [p[key] for p in parts]) for key, sub in space.spaces.items()}
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(_concat(sub, [p[k] for p in parts]) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        return np.concatenate(parts)
    return tuple(x for part in parts for x in part)


def _scatter(space: gymnasium.spaces.Space, batch: Any, idx: list[int], part: Any) -> Any:
    """Write ``part`` (a batch for envs ``idx``) into ``batch`` in place where possible."""
    if isinstance(space, gymnasium.spaces.Dict):
        for key, sub in space.spaces.items():
            batch[key] = _scatter(sub, batch[key], idx, part[key])
        return batch
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(_scatter(sub, batch[k], idx, part[k]) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        batch[idx] = part
        return batch
    items = list(batch)
    for i, value in zip(idx, part):
        items[i] = value
    return tuple(items)
