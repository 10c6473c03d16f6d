"""Trainer clients for the broker-scale case: ``CLIENTS`` clients in one process, one thread each.

Each client opens a ``RemoteEnvVec`` of ``ENVS`` envs and steps it from its own thread.
The parent (``bench/run.py``) drives the phases over stdin/stdout, one line each, so
that the clients of every process start stepping at the same moment, and so that one
process serves several open/step/close cycles:

    python bench/scale_clients.py PARENT_PID URL ENV_ID CLIENTS ENVS
    -> "connected"            every client said HELLO
    <- "open"                 open the vectors, reset them
    -> "ready"
    <- "go SECONDS"           step for SECONDS (bounded in steps as well)
    -> {json}                 {"calls": vector steps, "env_steps", "seconds", "lat_us": [...]}
    <- "close"                close every vector (its slots)
    -> "closed"
    <- "open" ... or "exit"   disconnect every client and exit 0

Any failure is printed as one line ``error: ...`` and the process exits 1.
"""

from __future__ import annotations

import json
import sys
import threading
import time

# Bounds: a thread never steps more than this many times in one "go", whatever it says.
_MAX_CALLS_PER_CLIENT = 1_000_000
_JOIN_SLACK = 60.0


def _say(line: str) -> None:
    print(line, flush=True)


def _step_all(vecs: list, duration: float) -> dict:
    """Step every vector from its own thread for ``duration`` seconds; gather the latencies."""
    n = len(vecs)
    results: list = [None] * n
    start = threading.Barrier(n)

    def stepper(k: int) -> None:
        vec = vecs[k]
        vec.action_space.seed(k)
        actions = [vec.action_space.sample() for _ in range(16)]
        lat: list[float] = []
        clock = time.perf_counter
        calls = 0
        start.wait(30.0)
        t0 = now = clock()
        deadline = t0 + duration
        try:
            while calls < _MAX_CALLS_PER_CLIENT:
                t = clock()
                vec.step(actions[calls & 15])
                now = clock()
                lat.append(now - t)
                calls += 1
                if now >= deadline:
                    break
            results[k] = (calls, now - t0, lat, None)
        except Exception as exc:  # reported to the parent, not swallowed
            results[k] = (calls, clock() - t0, lat, f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=stepper, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + _JOIN_SLACK)
    errors = ["timed out" if r is None else r[3] for r in results if r is None or r[3]]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    calls = sum(r[0] for r in results)
    return {"calls": calls, "env_steps": calls * vecs[0].num_envs, "seconds": max(r[1] for r in results),
            "lat_us": [round(x * 1e6, 1) for r in results for x in r[2]]}


def main(argv: list[str]) -> None:
    from remoterl.io.process import die_with_parent

    die_with_parent(int(argv[0]))
    url, env_id, n_clients, n_envs = argv[1], argv[2], int(argv[3]), int(argv[4])

    from remoterl import Client, RemoteEnvVec

    clients: list = []
    vecs: list = []
    try:
        clients = [Client(url, name=f"bench-scale-{i}").connect() for i in range(n_clients)]
        _say("connected")
        for _ in range(1000):  # bounded: the parent sends a handful of commands
            command, _, arg = sys.stdin.readline().strip().partition(" ")
            if command == "open":
                vecs = [RemoteEnvVec(env_id, n_envs, client=client) for client in clients]
                for i, vec in enumerate(vecs):
                    vec.reset(seed=i * n_envs)
                _say("ready")
            elif command == "go":
                _say(json.dumps(_step_all(vecs, float(arg))))
            elif command == "close":
                for vec in vecs:
                    vec.close()
                vecs = []
                _say("closed")
            elif command == "exit":
                break
            else:
                raise RuntimeError(f"unknown command {command!r} from the parent")
    except Exception as exc:
        _say(f"error: {type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    finally:
        for vec in vecs:
            try:
                vec.close()
            except Exception:  # leaving anyway: the broker closes a departed client's slots
                pass
        for client in clients:
            client.close()


if __name__ == "__main__":
    main(sys.argv[1:])
