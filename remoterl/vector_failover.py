"""``RemoteEnvVec(on_worker_lost="truncate")``: lost envs replaced, their episodes truncated.

Theory of operation
-------------------
A vector knows, per env, the worker and slot that hold it (:meth:`VectorFailover._set_slots`);
its groups, one message each per step, are the runs of consecutive envs on one worker.

When a step's replies come back and every failure among them says the env is gone
(``WorkerLostError``: its worker died; ``BrokerUnavailableError``: the broker session is
gone), :meth:`VectorFailover._recover_step` takes over instead of raising:

1. The envs of the failed groups are re-opened (``remoterl.failover.reopen``: it waits,
   bounded by the vector's timeout, for a broker, workers and capacity) with the hosting
   option ``ended``, so a replacement starts as an env whose episode just ended. If the
   client had to be replaced (the broker restarted), every env is re-opened: the old
   session's slots are gone, including those of the groups that did answer this step.
2. The step's result is assembled per env. An env that answered keeps its result. A lost
   env ends its episode here: ``truncated=True``, reward 0, its last observation (the one the
   trainer saw last, or the one it just answered before its session was lost), and
   ``info["remoterl_worker_lost"] = True``; an env whose episode ended by itself this very
   step keeps its own flags and only gets the info flag.
3. Then each autoreset mode goes on as gymnasium's would after a truncation. NEXT_STEP: the
   next step resets the replacement (that is what ``ended`` does on the worker): reward 0,
   flags False. SAME_STEP: the replacement is reset now; the lost episode's last observation
   and info travel as ``final_obs``/``final_info`` and the reset's as the step's. DISABLED:
   the trainer resets the truncated env, as after any truncation.

Envs on other workers are untouched: their trajectories are exactly those of an undisturbed
run. A reset whose worker is lost is redone on the replacements with the same seeds and
options (the info flag marks them); a lost env outside a partial reset's mask is reset too.
Any other failure (an env raised, a timeout) is raised as with ``on_worker_lost="raise"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from remoterl.client.session import Pending
from remoterl.failover import LOST_FLAG, LostClient, is_lost, reopen
from remoterl.wire import calls
from remoterl.wire.calls import ENDED, FINAL, INFOS, OBS, REWARDS, TERMINATED, TRUNCATED

__all__ = ["VectorFailover"]


class VectorFailover:
    """The failover half of :class:`~remoterl.vector.RemoteEnvVec` (a mixin)."""

    # Set by RemoteEnvVec.__init__.
    num_envs: int
    env_id: str
    autoreset_mode: AutoresetMode
    single_observation_space: Any
    observation_space: Any
    _client: Any
    _clients: LostClient
    _on_lost: str
    _kwargs: dict
    _timeout: float | None
    _observations: Any
    _groups: list[tuple[bytes, list[int], int, int]]

    # --- which worker holds which env -----------------------------------------------------------

    def _set_slots(self, workers: list[bytes], slots: list[int]) -> None:
        """Record each env's worker and slot; the groups are the runs of envs on one worker."""
        self._env_workers, self._env_slots = list(workers), list(slots)
        groups, start = [], 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or workers[i] != workers[start]:
                groups.append((workers[start], slots[start:i], start, i))
                start = i
        self._groups = groups
        self._all_slots = list(slots)
        self._env_of_slot = {slot: i for i, slot in enumerate(slots)}

    @property
    def env_workers(self) -> tuple[bytes, ...]:
        """The routing id of the worker holding each env, in env-index order (``remoterl
        status`` shows them in hex)."""
        return tuple(self._env_workers)

    # --- sending -------------------------------------------------------------------------------

    def _send_or_note_lost(self, worker: bytes, slots: list[int], request: dict, what: str) -> Pending:
        """Send one call; under ``"truncate"``, a call that cannot leave because its env is
        already known lost becomes an entry failed with that error (recovered on the wait)."""
        try:
            return self._client.send_call(worker, slots, request, what)
        except Exception as exc:
            if self._on_lost != "truncate" or not is_lost(exc):
                raise
            entry = Pending(-1, worker)
            entry.complete(error=exc)
            return entry

    def _recoverable(self, pending: list[Pending]) -> bool:
        """Every entry answered, and every failure among them is a lost env (``"truncate"``)."""
        if self._on_lost != "truncate" or not all(entry.done for entry in pending):
            return False
        errors = [entry.error for entry in pending if entry.error is not None]
        return bool(errors) and all(is_lost(error) for error in errors)

    # --- replacing envs --------------------------------------------------------------------------

    def _replace(self, lost: set[int], why: BaseException) -> set[int]:
        """Re-open the envs in ``lost`` (every env, if the client had to be replaced); return
        the envs re-opened."""
        lost = set(lost)
        old = self._clients.client
        if old.lost is not None or old.closed:
            lost.update(range(self.num_envs))
        else:
            # Forgotten before the re-open, not after: a restarted broker numbers slots afresh,
            # so a replacement may get the very id of a lost slot (and closing it would close it).
            old.close_slots([self._env_slots[i] for i in sorted(lost)])

        def on_new_client(_client: Any) -> None:
            lost.update(range(self.num_envs))  # the old session's slots are all gone

        bound = self._timeout if self._timeout is not None else old.timeout
        while True:
            wanted = len(lost)
            opened = reopen(self._clients, self.env_id, wanted, self._kwargs, {**(self._opts or {}), ENDED: True},
                            bound, why, on_new_client)
            if len(lost) == wanted:
                break
            self._clients.client.close_slots(opened.slots)  # the client changed meanwhile: all envs
        envs = sorted(lost)
        self._client = self._clients.client
        workers, slots = list(self._env_workers), list(self._env_slots)
        # Sorted by worker: each worker's replacements are consecutive envs, one group per step.
        for i, (worker, slot) in zip(envs, sorted(zip(opened.workers, opened.slots))):
            workers[i], slots[i] = worker, slot
        self._set_slots(workers, slots)
        return lost

    def _fresh_resets(self, envs: set[int], seeds: list | None = None, options: dict | None = None) -> dict:
        """Reset ``envs`` (one call per worker); ``{env: (obs, info)}``."""
        requests, picked = [], []
        for worker, slots, start, stop in self._groups:
            idx = [i for i in range(start, stop) if i in envs]
            if idx:
                requests.append((worker, [slots[i - start] for i in idx],
                                 calls.reset([seeds[i] if seeds is not None else None for i in idx], options)))
                picked.append(idx)
        pending = [self._client.send_call(worker, slots, request, "reset") for worker, slots, request in requests]
        replies = self._client.wait(pending, self._timeout)
        out = {}
        for idx, reply in zip(picked, replies):
            space = batch_space(self.single_observation_space, len(idx))
            for i, obs, info in zip(idx, iterate(space, reply[OBS]), reply[INFOS]):
                out[i] = (obs, info)
        return out

    def _last_obs(self) -> list:
        """The observation each env showed last, per env."""
        batch = self._observations
        if batch is None:
            batch = create_empty_array(self.single_observation_space, self.num_envs)
        return list(iterate(self.observation_space, batch))

    def _join(self, obs_list: list) -> Any:
        return concatenate(self.single_observation_space, obs_list,
                           create_empty_array(self.single_observation_space, self.num_envs))

    # --- recovering a step and a reset ---------------------------------------------------------------

    def _recover_step(self, pending: list[Pending], why: BaseException) -> tuple:
        """The step's result, per env, after replacing the lost envs (module docstring)."""
        groups = self._groups  # as the step was sent
        lost = {i for (_, _, start, stop), entry in zip(groups, pending) if entry.error is not None
                for i in range(start, stop)}
        n = self.num_envs
        obs_list = self._last_obs()
        rewards = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=np.bool_)
        truncated = np.zeros(n, dtype=np.bool_)
        infos: list[dict] = [{} for _ in range(n)]
        finals: dict[int, tuple] = {}
        answered: set[int] = set()
        for (_, _, start, stop), entry in zip(groups, pending):
            if entry.error is not None:
                continue
            reply = entry.result
            space = batch_space(self.single_observation_space, stop - start)
            obs_list[start:stop] = list(iterate(space, reply[OBS]))
            rewards[start:stop] = reply[REWARDS]
            terminated[start:stop] = reply[TERMINATED]
            truncated[start:stop] = reply[TRUNCATED]
            infos[start:stop] = reply[INFOS]
            for j, f_obs, f_info in reply.get(FINAL, ()):
                finals[start + j] = (f_obs, f_info)
            answered.update(range(start, stop))
        replaced = self._replace(lost, why)
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        for i in replaced:
            ended = i in answered and bool(terminated[i] or truncated[i])
            infos[i] = {**infos[i], LOST_FLAG: True}
            if not ended:
                truncated[i] = True
                if same_step:
                    finals[i] = (obs_list[i], dict(infos[i]))
        if same_step:
            for i, (obs, info) in self._fresh_resets(replaced).items():
                obs_list[i], infos[i] = obs, {**info, LOST_FLAG: True}
        obs = self._join(obs_list)
        self._observations = obs
        return obs, rewards, terminated, truncated, infos, finals

    def _recover_reset(self, pending: list[Pending], picked: list[list[int]], mask: np.ndarray | None,
                       seeds: list, options: dict | None, why: BaseException) -> tuple[Any, list]:
        """A reset's result after replacing the lost envs: they are reset again with the seeds
        and options asked for them (module docstring)."""
        got: dict[int, tuple] = {}
        lost: set[int] = set()
        for idx, entry in zip(picked, pending):
            if entry.error is not None:
                lost.update(idx)
                continue
            space = batch_space(self.single_observation_space, len(idx))
            for i, obs, info in zip(idx, iterate(space, entry.result[OBS]), entry.result[INFOS]):
                got[i] = (obs, info)
        replaced = self._replace(lost, why)
        for i, (obs, info) in self._fresh_resets(replaced, seeds, options).items():
            got[i] = (obs, {**info, LOST_FLAG: True})
        obs_list = self._last_obs() if mask is not None else [None] * self.num_envs
        for i, (obs, _) in got.items():
            obs_list[i] = obs
        obs = self._join(obs_list)
        self._observations = obs
        return obs, [(i, got[i][1]) for i in sorted(got)]
