"""``remoterl.sb3``: Stable-Baselines3 support (imports SB3 and torch; install ``remoterl[sb3]``).

``RemoteVecEnv`` is an SB3 ``VecEnv`` of remote slots stepped with one message per
worker; ``RemoteEnvFn`` a picklable env function for ``SubprocVecEnv``/``DummyVecEnv``;
``MetricsCallback`` logs remoterl's round trips, calls and errors of each rollout.
"""

from remoterl import lifecycle as _lifecycle
from remoterl.integrations.sb3 import RemoteEnvFn, RemoteVecEnv, remote_make_vec_env
from remoterl.integrations.sb3_metrics import MetricsCallback

__all__ = ["MetricsCallback", "RemoteEnvFn", "RemoteVecEnv", "remote_make_vec_env"]

# After remoterl.init(), importing this module may be what imports the framework: the patch
# waits until the integration is whole (remoterl.lifecycle._AfterImport).
_lifecycle.patch_loaded("remoterl.integrations.sb3")
