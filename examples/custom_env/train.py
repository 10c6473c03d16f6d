"""A custom env registered by the trainer and served remotely.

Only the entry-point string travels: each worker imports ``grid_env`` itself, and
only if its ``--import`` / ``--allow-import`` list allows it. Three terminals:

    remoterl-broker
    cd examples/custom_env && remoterl-worker --import grid_env -n 4
    cd examples/custom_env && REMOTERL_BROKER=tcp://127.0.0.1:5555 python train.py

Or just ``cd examples/custom_env && python train.py`` for the embedded default.
"""

import gymnasium

import remoterl

remoterl.init()
gymnasium.register(id="GridWalk-v0", entry_point="grid_env:GridWalk", kwargs={"size": 6},
                   max_episode_steps=50)

envs = gymnasium.make_vec("GridWalk-v0", num_envs=4)
obs, _ = envs.reset(seed=0)
wins = 0
for _ in range(200):
    obs, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
    wins += int(rewards.sum())
print(f"random walkers reached the goal {wins} times in 200 steps of 4 envs")
envs.close()
remoterl.shutdown()
