"""Ray RLlib PPO (new API stack) with every env step on remote simulators.

    pip install -e ".[rllib]"
    python examples/rllib_ppo.py                                  # embedded broker + 2 local workers
    REMOTERL_BROKER=tcp://HOST:5555 python examples/rllib_ppo.py   # a real broker and its workers

The RLlib code is unchanged: after ``remoterl.init()``, each env runner (a Ray actor)
builds its ``num_envs_per_env_runner`` envs as ONE ``remoterl.RemoteEnvVec``, stepped
with one message per worker. The broker's counters at the end show where the steps ran.
On a Ray cluster, use a broker every node can reach (the embedded one listens on
127.0.0.1 only).
"""

import argparse
import time

import ray
from ray.rllib.algorithms.ppo import PPOConfig

import remoterl
from remoterl.client.status import fetch_status

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--env", default="CartPole-v1")
parser.add_argument("--iterations", type=int, default=8)
parser.add_argument("--env-runners", type=int, default=2)
parser.add_argument("--envs-per-runner", type=int, default=4)
args = parser.parse_args()

settings = remoterl.init(num_workers=2)           # or init(broker="tcp://HOST:5555")
ray.init(num_cpus=args.env_runners + 1, include_dashboard=False)

config = (
    PPOConfig()
    .environment(args.env)
    .env_runners(num_env_runners=args.env_runners, num_envs_per_env_runner=args.envs_per_runner)
    .training(train_batch_size_per_learner=2000, minibatch_size=250, num_epochs=10, lr=3e-4)
    .rl_module(model_config={"fcnet_hiddens": [64, 64]})
)
algo = config.build_algo()
start = time.perf_counter()
for i in range(1, args.iterations + 1):
    result = algo.train()["env_runners"]
    print(f"iteration {i:3d}: {int(result['num_env_steps_sampled_lifetime']):7d} env steps, "
          f"mean return {result.get('episode_return_mean', float('nan')):6.1f}")
print(f"{time.perf_counter() - start:.1f} s")
algo.stop()

time.sleep(1.5)  # workers report their step counts with their heartbeats (every second)
for worker in fetch_status(settings.children_broker)["workers"]:
    stats = worker.get("stats", {})
    print(f"worker {worker.get('name', worker['id'][:12])}: {worker['calls']} messages, "
          f"{stats.get('steps', '?')} env steps")
ray.shutdown()
remoterl.shutdown()
