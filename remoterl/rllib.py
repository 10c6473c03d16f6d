"""``remoterl.rllib``: Ray RLlib support, new API stack (imports Ray; install ``remoterl[rllib]``).

``remote_env_runners(config)`` makes an ``AlgorithmConfig``'s env runners step remote
envs, each runner's envs as ONE ``RemoteEnvVec``; after ``remoterl.init()`` that happens
by itself in ``config.environment(...)`` and ``config.build_algo()``. ``RemoteEnvRunner``
is the ``SingleAgentEnvRunner`` subclass it installs.
"""

from remoterl import lifecycle as _lifecycle
from remoterl.integrations.rllib import RemoteEnvRunner, remote_env_runners

__all__ = ["RemoteEnvRunner", "remote_env_runners"]

# After remoterl.init(), importing this module may be what imports the framework: the patch
# waits until the integration is whole (remoterl.lifecycle._AfterImport).
_lifecycle.patch_loaded("remoterl.integrations.rllib")
