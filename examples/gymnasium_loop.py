"""A plain gymnasium loop, unchanged, on a remote simulator.

With no broker configured, remoterl.init() starts an embedded broker and a local
worker, so this runs as is. Against a real broker:

    REMOTERL_BROKER=tcp://HOST:5555 python examples/gymnasium_loop.py
"""

import gymnasium

import remoterl

remoterl.init()

env = gymnasium.make("CartPole-v1")          # a RemoteEnv under gymnasium's usual wrappers
obs, info = env.reset(seed=42)
episode_return, episodes = 0.0, 0
for _ in range(1_000):
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    episode_return += reward
    if terminated or truncated:
        episodes += 1
        print(f"episode {episodes}: return {episode_return:.0f}")
        episode_return = 0.0
        obs, info = env.reset()
env.close()
remoterl.shutdown()
