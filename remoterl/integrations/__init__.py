"""Integrations with RL frameworks; each module imports its framework inside itself.

This package imports nothing on purpose: ``import remoterl`` must not pull in
gymnasium patches, Stable-Baselines3 or Ray.
"""

__all__: list[str] = []
