"""RemoteEnvVec("CartPole-v1", 8) on one worker: over tcp:// and over ws:// through the bridge.

One broker process serves both transports (its ROUTER on tcp:// and on an inproc://
endpoint that a WsBridge in the same process uses); one worker process attaches over
tcp://; this process is the trainer, with one client per transport, stepped in
alternating rounds so both see the same machine. Prints env-steps/s for each and the
ratio ws/tcp (target >= 0.6).

    python bench/ws_vs_tcp.py [--duration 2] [--rounds 3] [--num-envs 8] [--pin]

``--pin`` runs broker, worker and trainer on CPU 0 (taskset), the DESIGN.md way to
take thread wake-ups on the other core out of the figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

# The broker process: ``python bench/ws_vs_tcp.py --serve`` prints "TCP_URL WS_URL", serves until stdin closes.
_SERVE = "--serve"
_MAX_STEPS = 2_000_000


def serve() -> None:
    import uuid

    import zmq

    from remoterl.broker.bridge import WsBridge
    from remoterl.broker.loop import Broker

    inproc = f"inproc://remoterl-bridge-{uuid.uuid4().hex}"
    broker = Broker("tcp://127.0.0.1:*", also=(inproc,))
    tcp_url = broker.start()
    bridge = WsBridge("127.0.0.1", 0, inproc, context=zmq.Context.instance())
    ws_url = bridge.start()
    print(tcp_url, ws_url, flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    bridge.stop()
    broker.stop()


def rate(vec, actions, duration: float, warmup: float = 0.3) -> float:
    """Env-steps per second, stepping back to back for ``duration`` seconds after a warm-up."""
    end = time.perf_counter() + warmup
    i = 0
    while time.perf_counter() < end:
        vec.step(actions[i & 15])
        i += 1
    calls, start = 0, time.perf_counter()
    deadline = start + duration
    while calls < _MAX_STEPS:
        vec.step(actions[calls & 15])
        calls += 1
        if calls & 15 == 0 and time.perf_counter() >= deadline:
            break
    return calls * vec.num_envs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating tcp/ws rounds (median reported)")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--pin", action="store_true", help="run every process on CPU 0")
    args = parser.parse_args()

    import numpy as np

    import remoterl
    from remoterl.wsgateway import gateway_endpoint

    pin = []
    if args.pin:
        if shutil.which("taskset") is None:
            sys.exit("--pin needs taskset")
        pin = ["taskset", "-c", "0"]
        os.sched_setaffinity(0, {0})
    broker = subprocess.Popen([*pin, sys.executable, __file__, _SERVE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        tcp_url, ws_url = broker.stdout.readline().split()
        worker = subprocess.Popen([*pin, sys.executable, "-m", "remoterl.workers.cli", "--broker", tcp_url,
                                   "--env", "CartPole-v1", "-n", str(2 * args.num_envs), "--procs", "1"])
        clients = {"tcp": remoterl.Client(tcp_url, name="bench-tcp").connect(),
                   "ws": remoterl.Client(gateway_endpoint(ws_url), name="bench-ws").connect()}
        vecs = {}
        deadline = time.monotonic() + 30
        for name, client in clients.items():
            while True:  # the worker may still be starting
                try:
                    vecs[name] = remoterl.RemoteEnvVec("CartPole-v1", args.num_envs, client=client)
                    break
                except remoterl.NoWorkerError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            vecs[name].reset(seed=0)
        rng = np.random.default_rng(0)
        actions = [rng.integers(0, 2, args.num_envs) for _ in range(16)]
        results: dict[str, list[float]] = {"tcp": [], "ws": []}
        for _ in range(args.rounds):
            for name in ("tcp", "ws"):
                results[name].append(rate(vecs[name], actions, args.duration))
        for vec in vecs.values():
            vec.close()
        for client in clients.values():
            client.close()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(10)
        broker.stdin.close()
        broker.wait(10)

    tcp, ws = statistics.median(results["tcp"]), statistics.median(results["ws"])
    print(f"RemoteEnvVec(CartPole-v1, {args.num_envs}), 1 worker, {'pinned to CPU 0' if args.pin else 'unpinned'}, "
          f"median of {args.rounds} x {args.duration:g} s")
    print(f"  tcp://  {tcp:10,.0f} env-steps/s   rounds: {', '.join(f'{r:,.0f}' for r in results['tcp'])}")
    print(f"  ws://   {ws:10,.0f} env-steps/s   rounds: {', '.join(f'{r:,.0f}' for r in results['ws'])}")
    print(f"  ws/tcp  {ws / tcp:10.2f}   (target >= 0.6)")


if __name__ == "__main__":
    if sys.argv[1:] == [_SERVE]:
        serve()
    else:
        main()
