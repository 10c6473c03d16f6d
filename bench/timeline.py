"""Where one vector step's time goes on the embedded default's path, segment by segment.

    python bench/timeline.py                  # RemoteEnvVec(8) of CartPole-v1, 3,000 steps
    python bench/timeline.py --num-envs 64 --steps 2000
    python bench/timeline.py --pin-trainer 0 --pin-worker 1

Starts what ``remoterl.init()`` starts (a broker thread reached in-process by the client, one
worker process on a local link), stamps each step with ``time.perf_counter_ns()`` at
fixed points in the trainer and in the worker (CLOCK_MONOTONIC, the same clock in both
processes), and prints the median and mean of each segment over the steps whose stamps
came in the expected order:

    trainer: step() called → request written to the link  (encode, broker core, sendmsg)
    worker:  woken with the request → SlotHost.call starts → returns → reply written
    trainer: woken → reply handed to the client → step() returns  (decode, infos)

The stamps themselves add about a microsecond each. A diagnostic, not a benchmark: the
ratios that count are ``bench/run.py``'s.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

STAMPS: list[tuple[str, int]] = []
ORDER = ["step", "sent", "worker woke", "call", "call done", "reply sent", "trainer woke", "reply in", "step done"]


def _stamp(name: str) -> None:
    STAMPS.append((name, time.perf_counter_ns()))


def _worker(url: str, link_fd: int, out: str, pin: int | None) -> None:
    """The worker process: an embedded worker whose link and slot host stamp their events."""
    from remoterl.io.link import Link
    from remoterl.workers.pool import WorkerSpec, run_worker
    from remoterl.workers.runtime import SlotHost

    if pin is not None:
        os.sched_setaffinity(0, {pin})
    wait, send_all, call = Link.wait, Link.send_all, SlotHost.call

    def stamped_wait(self: Link, timeout: Any) -> Any:
        messages = wait(self, timeout)
        _stamp("worker woke")
        return messages

    def stamped_send_all(self: Link, frames: list, timeout: Any = None) -> None:
        # Stamped as the write starts: a worker descheduled right after its write (the trainer it
        # woke takes the core) would otherwise stamp after the trainer has the reply.
        _stamp("reply sent")
        send_all(self, frames, timeout)

    def stamped_call(self: SlotHost, *args: Any) -> Any:
        _stamp("call")
        result = call(self, *args)
        _stamp("call done")
        return result

    Link.wait, Link.send_all, SlotHost.call = stamped_wait, stamped_send_all, stamped_call  # type: ignore[method-assign]
    atexit.register(lambda: json.dump(STAMPS, open(out, "w")))
    run_worker(WorkerSpec(url, None, 256, [], None, 1.0, 3, name="timeline", link_fd=link_fd))


def _trainer(args: argparse.Namespace) -> None:
    from remoterl import RemoteEnvVec
    from remoterl.io.link import Link
    from remoterl.broker.core import BrokerConfig
    from remoterl.broker.loop import Broker
    from remoterl.client.status import fetch_status
    from remoterl.client.connection import connect_client

    if args.pin_trainer is not None:
        os.sched_setaffinity(0, {args.pin_trainer})
    inproc = f"inproc://timeline-{os.getpid()}"
    broker = Broker("tcp://127.0.0.1:*", BrokerConfig(), also=(inproc,))
    url = broker.start()
    ours, theirs = socket.socketpair()
    broker.add_link(ours)
    out = tempfile.mktemp(prefix="remoterl-timeline-", suffix=".json")
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker", url, str(theirs.fileno()), out,
         "" if args.pin_worker is None else str(args.pin_worker)], pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        deadline = time.monotonic() + 60
        while not fetch_status(url)["workers"]:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the worker did not start")
            time.sleep(0.05)
        client = connect_client(inproc)
        envs = RemoteEnvVec(args.env, args.num_envs, client=client, max_workers=1)
        envs.reset(seed=0)
        actions = [envs.action_space.sample() for _ in range(64)]
        for i in range(200):  # warm up
            envs.step(actions[i % 64])
        send, take, poll = Link.send, client._take, broker._poll_poll

        def stamped_send(self: Link, frames: list) -> None:
            send(self, frames)
            _stamp("sent")

        def stamped_take(frames: list) -> None:
            _stamp("reply in")
            take(frames)

        def stamped_poll(timeout: Any) -> Any:
            events = poll(timeout)
            _stamp("trainer woke")
            return events

        Link.send, client._take, broker._poll_poll = stamped_send, stamped_take, stamped_poll  # type: ignore
        STAMPS.clear()
        for i in range(args.steps):
            _stamp("step")
            envs.step(actions[i % 64])
            _stamp("step done")
        trainer_stamps = list(STAMPS)
        Link.send, client._take, broker._poll_poll = send, take, poll  # type: ignore[method-assign]
        envs.close()
        client.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        broker.stop()
    with open(out) as f:
        worker_stamps = [tuple(s) for s in json.load(f)]
    os.unlink(out)
    _report(trainer_stamps + worker_stamps, args)


def _report(stamps: list, args: argparse.Namespace) -> None:
    steps: list[list[tuple[str, int]]] = []
    for name, t in sorted(stamps, key=lambda s: s[1]):
        if name == "step":
            steps.append([])
        if steps:
            steps[-1].append((name, t))
    clean = [s for s in steps if [name for name, _ in s] == ORDER]
    print(f"RemoteEnvVec({args.env!r}, {args.num_envs}), 1 worker on a local link: "
          f"{len(clean)} of {len(steps)} steps stamped in order")
    if not clean:
        return
    times = np.array([[t for _, t in s] for s in clean], dtype=np.float64) / 1000.0
    segments = np.diff(times, axis=1)
    for i in range(len(ORDER) - 1):
        print(f"  {ORDER[i]:>13} → {ORDER[i + 1]:<13} p50 {np.median(segments[:, i]):7.1f} µs   "
              f"mean {segments[:, i].mean():7.1f} µs")
    total = times[:, -1] - times[:, 0]
    print(f"  {'whole step':>29} p50 {np.median(total):7.1f} µs   mean {total.mean():7.1f} µs")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        url, fd, out, pin = argv[1:5]
        _worker(url, int(fd), out, int(pin) if pin else None)
        return
    parser = argparse.ArgumentParser(prog="bench/timeline.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="CartPole-v1", help="env id (default: %(default)s)")
    parser.add_argument("--num-envs", type=int, default=8, help="vector size (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3000, help="steps stamped (default: %(default)s)")
    parser.add_argument("--pin-trainer", type=int, default=None, metavar="CPU", help="pin this process")
    parser.add_argument("--pin-worker", type=int, default=None, metavar="CPU", help="pin the worker")
    _trainer(parser.parse_args(argv))


if __name__ == "__main__":
    main()
