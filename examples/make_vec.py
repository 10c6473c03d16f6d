"""gymnasium.make_vec on remote workers: one message per worker per step.

    python examples/make_vec.py                                  # embedded broker + local worker
    REMOTERL_BROKER=tcp://HOST:5555 python examples/make_vec.py   # a real broker and its workers
"""

import time

import gymnasium
import numpy as np

import remoterl

remoterl.init()

envs = gymnasium.make_vec("CartPole-v1", num_envs=8)   # a RemoteEnvVec, autoreset NEXT_STEP
obs, infos = envs.reset(seed=0)
returns = np.zeros(envs.num_envs)
finished: list[float] = []
start = time.perf_counter()
steps = 2_000
for _ in range(steps):
    obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
    returns += rewards
    done = terminated | truncated
    finished.extend(returns[done])
    returns[done] = 0.0
elapsed = time.perf_counter() - start
print(f"{steps * envs.num_envs / elapsed:,.0f} env steps/s; {len(finished)} episodes, "
      f"mean return {np.mean(finished):.1f}")
envs.close()
remoterl.shutdown()
