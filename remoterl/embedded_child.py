"""Entry point of the embedded default's child processes (``python -m remoterl.embedded_child``).

Started with ``subprocess`` rather than ``multiprocessing`` so that the trainer's
``__main__`` is never re-imported (a script without an ``if __name__ == "__main__"``
guard would otherwise run again in every child).

    python -m remoterl.embedded_child broker PARENT_PID HEARTBEAT LIVENESS
    python -m remoterl.embedded_child worker PARENT_PID HEARTBEAT LIVENESS URL SLOTS NAME LINK_FD [MODULE ...]

LINK_FD is the worker's end of a local link to the broker (``remoterl.io.link``), or -1
to use zmq only.

The broker prints its URL on one line of stdout once bound.
"""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str]) -> None:
    from remoterl.io.process import die_with_parent

    role, parent_pid, heartbeat, liveness = argv[0], int(argv[1]), float(argv[2]), int(argv[3])
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the trainer; it stops us
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if role == "broker":
        from remoterl.broker.core import BrokerConfig
        from remoterl.broker.loop import Broker

        broker = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=heartbeat, liveness=liveness))
        print(broker.bind(), flush=True)
        sys.stdout.close()
        signal.signal(signal.SIGTERM, lambda *_: broker.stop(join=False))
        broker.run()
    elif role == "worker":
        from remoterl.workers.pool import WorkerSpec, run_worker

        url, slots, name, link_fd, imports = argv[4], int(argv[5]), argv[6], int(argv[7]), argv[8:]
        # A private worker of one trainer: any module the trainer registers may be imported.
        run_worker(WorkerSpec(url, None, slots, imports, None, heartbeat, liveness, name=name,
                              link_fd=link_fd if link_fd >= 0 else None))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
