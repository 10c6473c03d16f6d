"""Quickstart: a trainer stepping CartPole on remote workers, with zero infrastructure.

``remoterl.init()`` finds no broker URL, so it starts an embedded broker and two local
worker processes. ``gymnasium.make_vec`` then returns a ``RemoteEnvVec`` whose 8 envs
live on those workers; every step is one message per worker. At the end it prints
where the steps ran, from the broker's own status service.

    python examples/quickstart.py [--steps 2000] [--envs 8]
    REMOTERL_BROKER=tcp://HOST:5555 python examples/quickstart.py   # a real broker
"""

from __future__ import annotations

import argparse
import time

import gymnasium
import numpy as np
from tqdm import tqdm

import remoterl
from remoterl.client.status import fetch_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="vector steps to run")
    parser.add_argument("--envs", type=int, default=8, help="CartPole envs (remote slots)")
    args = parser.parse_args()

    settings = remoterl.init(num_workers=2)
    where = "embedded broker" if settings.embedded else f"broker {settings.broker}"
    status_url = settings.embedded.url if settings.embedded else settings.broker
    envs = gymnasium.make_vec("CartPole-v1", num_envs=args.envs)
    print(f"{args.envs} CartPole-v1 envs on {len(set(envs.workers))} worker(s) via the {where}")
    obs, _ = envs.reset(seed=0)
    rng = np.random.default_rng(0)
    returns, finished = np.zeros(args.envs), []
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="stepping", unit="step"):
        obs, rewards, terminated, truncated, _ = envs.step(rng.integers(0, 2, args.envs))
        returns += rewards
        done = terminated | truncated
        finished.extend(returns[done])
        returns[done] = 0.0
    elapsed = time.perf_counter() - start
    print(f"{args.steps * args.envs:,} env steps in {elapsed:.2f} s ({args.steps * args.envs / elapsed:,.0f} "
          f"steps/s); {len(finished)} episodes, mean return of a random policy {np.mean(finished):.1f}")
    for worker in fetch_status(status_url)["workers"]:
        print(f"  worker {worker['name']} (pid {worker.get('pid')}): {worker['slots']} slots, "
              f"{worker['calls']} batched calls")
    envs.close()
    remoterl.shutdown()


if __name__ == "__main__":
    main()
