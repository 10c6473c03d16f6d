"""The env ops of the slot host: ``reset`` and ``step`` over a call's slots, vector autoreset included.

Theory of operation
-------------------
A batched call steps (or resets) every slot it names and answers with ONE reply:
observations stacked in the call's slot order (``gymnasium.vector.utils.concatenate``,
or one ``np.array`` for the array spaces), rewards, flags, and per-slot infos. The
request and reply fields are :mod:`remoterl.wire.calls`'.

Vector semantics (autoreset) live here, so an episode boundary costs no extra round
trip. The mode travels with each step call (``"m"``) and follows
``gymnasium.vector.SyncVectorEnv.step`` line for line:

========== ===============================================================
NEXT_STEP  a slot that ended on the previous step is reset instead of stepped;
           reward 0, flags False, the reset info is the step info.
SAME_STEP  a slot that ends is reset at once; its final obs and info travel in
           ``final`` beside the reset obs and info.
DISABLED   stepping a slot that ended without a reset is an error.
single     ``"single": true`` instead of ``"m"``: one env, step only, the values
           exactly as the env returns them (``RemoteEnv``).
========== ===============================================================

Actions are checked whole against the slot count and the action space before anything
is iterated (``remoterl.wire.actions.check_actions``), since iterating a batch that does
not fit can cost without bound. A batched step that fails after some of its slots stepped
says which in the error's ``stepped`` (slot ids), so the client knows how far its envs moved.

Each op takes the host's ``stats`` first (the slot host binds it), then the call's slots
and the decoded request, and returns the reply map (``r`` is added by the slot host).
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from remoterl.errors import ProtocolError
from remoterl.wire.actions import check_action, check_actions
from remoterl.wire.calls import (ACTIONS, AUTORESET_MODES, DISABLED, FINAL, INFO, INFOS, MODE, NEXT_STEP, OBS,
                                 OPTIONS, REWARDS, SAME_STEP, SEEDS, SINGLE, TERMINATED, TRUNCATED)
from remoterl.workers.slots import EnvFailure, Slot, env_error

__all__ = ["reset", "stack", "step"]

_ARRAY_SPACES = (gymnasium.spaces.Box, gymnasium.spaces.Discrete, gymnasium.spaces.MultiDiscrete,
                 gymnasium.spaces.MultiBinary)


def reset(stats: dict, slots: list[Slot], request: dict) -> dict:
    """``env.reset(seed=..., options=...)`` per slot; clears each slot's ended flag."""
    seeds = request.get(SEEDS)
    options = request.get(OPTIONS)
    if seeds is None:
        seeds = [None] * len(slots)
    if not isinstance(seeds, list) or len(seeds) != len(slots):
        raise ProtocolError("reset seeds must be a list with one entry per slot")
    obs_list, infos = [], []
    # Options only when given, as SB3's DummyVecEnv passes them: an env whose reset takes none
    # is reset as it would be locally.
    given = {} if options is None else {"options": options}
    for slot, seed in zip(slots, seeds):
        try:
            obs, info = slot.env.reset(seed=seed, **given)
        except Exception as exc:
            raise EnvFailure(env_error(exc, f"reset failed in slot {slot.id}", slot.id)) from exc
        slot.autoreset = False
        obs_list.append(obs)
        infos.append(info)
    stats["resets"] += len(slots)
    if request.get(SINGLE):
        return {OBS: obs_list[0], INFO: infos[0]}
    return {OBS: stack(slots, obs_list), INFOS: infos}


def step(stats: dict, slots: list[Slot], request: dict) -> dict:
    """Step every slot with its part of the batched actions, autoreset as the mode says."""
    if request.get(SINGLE):
        return _step_single(stats, slots, request)
    mode = request.get(MODE)
    if mode not in AUTORESET_MODES:
        raise ProtocolError(f"step 'm' must be an autoreset mode {sorted(AUTORESET_MODES)}, got {mode!r}")
    k = len(slots)
    # Shapes and dtypes first, whole (InvalidActionError): iterating a batch that does not fit
    # can cost without bound — a zero-size array of shape (2**25, 0) is 42 bytes on the wire
    # and 2**25 Python objects to iterate, with the GIL held and heartbeats stopped.
    batch = check_actions(slots[0].env.action_space, request.get(ACTIONS), k)
    space = _batched_space(slots[0], k)
    try:
        actions = list(iterate(space, batch))
    except Exception as exc:
        raise ProtocolError(f"actions do not match the batched action space {space}: {exc}") from exc
    if len(actions) != k:
        raise ProtocolError(f"got {len(actions)} actions for {k} slots")
    obs_list: list = [None] * k
    infos: list = [None] * k
    # Plain lists in the loop (numpy element access costs ~0.1 us a time, several times per
    # env); converted once at the end, with SyncVectorEnv's dtypes (float64, bool).
    rewards: list = [0.0] * k
    terminated: list = [False] * k
    truncated: list = [False] * k
    final: list = []
    steps = resets = 0
    try:
        for i, (slot, action) in enumerate(zip(slots, actions)):
            env = slot.env
            done = moved = False
            try:
                if slot.autoreset and mode == NEXT_STEP:
                    obs_list[i], infos[i] = env.reset()
                    resets += 1
                else:
                    if slot.autoreset and mode == DISABLED:
                        raise AssertionError(
                            f"slot {slot.id} ended and was not reset (autoreset mode DISABLED)")
                    obs, rewards[i], term, trunc, info = env.step(action)
                    steps += 1
                    moved = True  # from here on, this slot has stepped whatever follows
                    terminated[i], truncated[i] = term, trunc
                    done = bool(term) or bool(trunc)
                    if done and mode == SAME_STEP:
                        final.append([i, obs, info])
                        obs, info = env.reset()
                        resets += 1
                    obs_list[i], infos[i] = obs, info
            except Exception as exc:
                desc = env_error(exc, f"step failed in slot {slot.id}", slot.id)
                # The slots before this one stepped (or autoreset), and this one if its
                # env.step returned: the client's vector is out of step with them.
                desc["stepped"] = [s.id for s in slots[:i + 1 if moved else i]]
                raise EnvFailure(desc) from exc
            slot.autoreset = done
    finally:
        stats["steps"] += steps
        stats["resets"] += resets
    try:
        obs = stack(slots, obs_list)
    except Exception as exc:  # observations that do not fit the space (user code)
        desc = env_error(exc, "the observations of the step cannot be stacked into a batch")
        desc["stepped"] = [s.id for s in slots]
        raise EnvFailure(desc) from exc
    reply = {OBS: obs, REWARDS: np.array(rewards, dtype=np.float64),
             TERMINATED: np.array(terminated, dtype=np.bool_), TRUNCATED: np.array(truncated, dtype=np.bool_),
             INFOS: infos}
    if final:
        reply[FINAL] = final
    return reply


def _step_single(stats: dict, slots: list[Slot], request: dict) -> dict:
    # RemoteEnv: one slot, the action and the results exactly as the env gives them.
    if len(slots) != 1:
        raise ProtocolError("a single-env step names exactly one slot")
    slot = slots[0]
    action = request.get(ACTIONS)
    check_action(slot.env.action_space, action)  # as RemoteEnv.step did before sending
    try:
        obs, reward, terminated, truncated, info = slot.env.step(action)
    except Exception as exc:
        raise EnvFailure(env_error(exc, f"step failed in slot {slot.id}", slot.id)) from exc
    stats["steps"] += 1
    return {OBS: obs, REWARDS: reward, TERMINATED: terminated, TRUNCATED: truncated, INFO: info}


def stack(slots: list[Slot], obs_list: list) -> Any:
    """The slots' observations batched along a new env axis, in the slots' order."""
    space = slots[0].env.observation_space
    if type(space) in _ARRAY_SPACES:
        # What gymnasium's concatenate does for these spaces (np.stack into an array of the
        # space's dtype), without its generic dispatch; np.array builds the same array from
        # equal-shaped parts in a third of np.stack's time (7 vs 21 µs for 64 CartPole obs)
        # and refuses ragged ones just the same.
        return np.array(obs_list, dtype=space.dtype)
    out = create_empty_array(space, len(obs_list))
    return concatenate(space, obs_list, out)


def _batched_space(slot: Slot, k: int) -> Any:
    """``batch_space(slot's action space, k)``, cached on the slot for as long as its env
    keeps that very space object (identity held, so never confused with a freed one)."""
    space = slot.env.action_space
    cached = slot.batched
    if cached is not None and cached[0] is space and cached[1] == k:
        return cached[2]
    batched = batch_space(space, k)
    slot.batched = (space, k, batched)
    return batched
