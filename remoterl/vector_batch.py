"""Batched values along the env axis: how ``RemoteEnvVec`` splits, joins and checks them.

A vector's envs are numbered so that each worker's slots are a contiguous range of env
indices (``remoterl.vector``). So a batch (actions, observations: arrays, or dicts and
tuples of them for Dict and Tuple spaces) is split per worker with :func:`slice_batch`
(views for arrays, no copy), the workers' replies are joined with one :func:`concat`, and
a partial reset writes its envs' observations into the last batch with :func:`scatter`.

:func:`check_reset_mask` checks ``options["reset_mask"]`` as the installed gymnasium's
``SyncVectorEnv.reset`` does (its order, types and words); :func:`not_a_batch` and
:func:`describe_value` word the error for actions that are no batch at all.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np

__all__ = ["check_reset_mask", "concat", "describe_value", "not_a_batch", "scatter", "slice_batch"]


_ARRAY_SPACES = (gymnasium.spaces.Box, gymnasium.spaces.Discrete, gymnasium.spaces.MultiDiscrete,
                 gymnasium.spaces.MultiBinary)


def not_a_batch(space: gymnasium.spaces.Space, actions: Any) -> bool:
    """Whether ``actions`` is of a type no batch of ``space`` has (what gymnasium's ``iterate``
    refuses with a ``TypeError``), as opposed to a batch of the wrong shape or dtype."""
    if isinstance(space, gymnasium.spaces.Dict):
        return not isinstance(actions, Mapping)
    if isinstance(space, gymnasium.spaces.Tuple):
        return not isinstance(actions, (tuple, list, np.ndarray))
    if isinstance(actions, (str, bytes, Mapping)):
        return True
    try:
        return np.ndim(actions) == 0
    except Exception:  # ragged: a sequence, of the wrong shape
        return False


def describe_value(value: Any) -> str:
    """What ``value`` is, for an error message: an array's shape and dtype, else its type and repr."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _gymnasium_version() -> tuple[int, int]:
    parts = gymnasium.__version__.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 1, 0


# gymnasium 1.1 and 1.2 check reset_mask with bare asserts; the releases after raise TypeError or
# ValueError in other words. Match the installed one: code and tests written against it catch those.
_TYPED_MASK_ERRORS = _gymnasium_version() >= (1, 3)


def check_reset_mask(mask: Any, num_envs: int) -> np.ndarray:
    """The checks of the installed gymnasium's ``SyncVectorEnv.reset``, in its order, types and words."""
    if not _TYPED_MASK_ERRORS:
        # Raised, not asserted: ``python -O`` must not skip the checks.
        if not isinstance(mask, np.ndarray):
            raise AssertionError(f"`options['reset_mask': mask]` must be a numpy array, got {type(mask)}")
        if mask.shape != (num_envs,):
            raise AssertionError(f"`options['reset_mask': mask]` must have shape `({num_envs},)`, got {mask.shape}")
        if mask.dtype != np.bool_:
            raise AssertionError(f"`options['reset_mask': mask]` must have `dtype=np.bool_`, got {mask.dtype}")
        if not np.any(mask):
            raise AssertionError(f"`options['reset_mask': mask]` must contain a boolean array, got reset_mask={mask}")
        return mask
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


def slice_batch(space: gymnasium.spaces.Space, batch: Any, start: int, stop: int) -> Any:
    """Envs ``start:stop`` of a batched value (views for arrays)."""
    if isinstance(space, gymnasium.spaces.Dict):
        return {key: slice_batch(sub, batch[key], start, stop) for key, sub in space.spaces.items()}
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(slice_batch(sub, batch[k], start, stop) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        return np.asarray(batch)[start:stop]
    return batch[start:stop]


def concat(space: gymnasium.spaces.Space, parts: list) -> Any:
    """Join batched values from several workers along the env axis."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(space, gymnasium.spaces.Dict):
        return {key: concat(sub, [p[key] for p in parts]) for key, sub in space.spaces.items()}
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(concat(sub, [p[k] for p in parts]) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        return np.concatenate(parts)
    return tuple(x for part in parts for x in part)


def scatter(space: gymnasium.spaces.Space, batch: Any, idx: list[int], part: Any) -> Any:
    """Write ``part`` (a batch for envs ``idx``) into ``batch`` in place where possible."""
    if isinstance(space, gymnasium.spaces.Dict):
        for key, sub in space.spaces.items():
            batch[key] = scatter(sub, batch[key], idx, part[key])
        return batch
    if isinstance(space, gymnasium.spaces.Tuple):
        return tuple(scatter(sub, batch[k], idx, part[k]) for k, sub in enumerate(space.spaces))
    if isinstance(space, _ARRAY_SPACES):
        batch[idx] = part
        return batch
    items = list(batch)
    for i, value in zip(idx, part):
        items[i] = value
    return tuple(items)
