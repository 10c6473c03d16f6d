"""Quickstart: a broker, two worker processes and a trainer, all on this machine.

Runs with nothing else started: it launches ``remoterl-broker`` and
``remoterl-worker --env CartPole-v1 -n 4`` (twice) as child processes on a free
local port, opens 8 CartPole slots through the broker, steps them in batches (one
message per worker per step) with random actions, and prints where the steps ran.

    python examples/quickstart.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import zmq
from tqdm import tqdm

from remoterl import Client
from remoterl.cli import fetch_status


def free_url() -> str:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    return f"tcp://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="vector steps to run")
    parser.add_argument("--envs", type=int, default=8, help="CartPole slots to open")
    args = parser.parse_args()

    url = free_url()
    children = [subprocess.Popen([sys.executable, "-m", "remoterl.broker.cli", "--bind", url])]
    per_worker = (args.envs + 1) // 2
    for _ in range(2):
        children.append(subprocess.Popen([sys.executable, "-m", "remoterl.workers.cli", "--env", "CartPole-v1",
                                          "-n", str(per_worker), "--procs", "1", "--broker", url]))
    try:
        with Client(url, connect_timeout=30).connect() as client:
            deadline = time.monotonic() + 30
            while len(fetch_status(url)["workers"]) < 2:
                if time.monotonic() > deadline:
                    sys.exit("workers did not register within 30 s")
                time.sleep(0.1)
            opened = client.open("CartPole-v1", n=args.envs)
            groups: dict[bytes, list[int]] = {}
            for slot, worker in zip(opened.slots, opened.workers):
                groups.setdefault(worker, []).append(slot)
            print(f"opened {args.envs} CartPole-v1 slots on {len(groups)} workers")
            pending = [client.send_call(w, s, {"op": "reset", "seeds": list(range(len(s)))}) for w, s in groups.items()]
            client.wait(pending)
            rng = np.random.default_rng(0)
            episodes, returns, running = 0, [], {w: np.zeros(len(s)) for w, s in groups.items()}
            start = time.perf_counter()
            for _ in tqdm(range(args.steps), desc="stepping", unit="step"):
                pending = [client.send_call(w, s, {"op": "step", "a": rng.integers(0, 2, len(s)), "m": 0})
                           for w, s in groups.items()]
                for (w, _s), reply in zip(groups.items(), client.wait(pending)):
                    running[w] += reply["rew"]
                    done = reply["term"] | reply["trunc"]
                    episodes += int(done.sum())
                    returns.extend(running[w][done].tolist())
                    running[w][done] = 0.0
            elapsed = time.perf_counter() - start
            print(f"{args.steps * args.envs} env steps in {elapsed:.2f} s "
                  f"({args.steps * args.envs / elapsed:,.0f} steps/s), {episodes} episodes, "
                  f"mean return of a random policy {np.mean(returns) if returns else 0:.1f}")
            # Workers report their step counts with each heartbeat: wait for the last one.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                workers = fetch_status(url)["workers"]
                if sum(w["stats"].get("steps", 0) + w["stats"].get("resets", 0) for w in workers) >= \
                        (args.steps + 1) * args.envs:
                    break
                time.sleep(0.2)
            for worker in workers:
                print(f"  worker {worker['name']}: {worker['calls']} batched calls, "
                      f"{worker['stats'].get('steps', 0)} env steps, "
                      f"{worker['stats'].get('resets', 0)} resets")
            client.close_slots(opened.slots)
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            child.wait(10)


if __name__ == "__main__":
    main()
