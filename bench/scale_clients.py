"""Trainer clients for the broker-scale case: ``CLIENTS`` clients in one process, one thread each.

Each client opens a ``RemoteEnvVec`` of ``ENVS`` envs and steps it from its own thread.
The parent (``bench/run.py``) drives the phases over stdin/stdout, one line each, so
that every client of every process starts stepping at the same moment:

    python bench/scale_clients.py PARENT_PID URL ENV_ID CLIENTS ENVS DURATION
    -> "ready"            all clients connected, slots opened, envs reset
    <- "go"               step for DURATION seconds (bounded in steps as well)
    -> {json}             {"calls": vector steps, "env_steps": ..., "seconds": ..., "lat_us": [...]}
    <- "close"            close every slot and client
    -> "closed"           then exit 0

Any failure is printed as one line ``error: ...`` and the process exits 1.
"""

from __future__ import annotations

import json
import sys
import threading
import time

# Bounds: a thread never steps more than this many times, whatever DURATION says.
_MAX_CALLS_PER_CLIENT = 1_000_000


def _expect(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise RuntimeError(f"expected {word!r} from the parent, got {line!r}")


def main(argv: list[str]) -> None:
    from remoterl._process import die_with_parent

    die_with_parent(int(argv[0]))
    url, env_id, n_clients, n_envs, duration = argv[1], argv[2], int(argv[3]), int(argv[4]), float(argv[5])

    from remoterl import Client, RemoteEnvVec

    clients, vecs = [], []
    try:
        for i in range(n_clients):
            client = Client(url, name=f"bench-scale-{i}").connect()
            clients.append(client)
            vec = RemoteEnvVec(env_id, n_envs, client=client)
            vecs.append(vec)
            vec.reset(seed=i * n_envs)
        print("ready", flush=True)
        _expect("go")

        results: list = [None] * n_clients
        start = threading.Barrier(n_clients)

        def stepper(k: int) -> None:
            vec = vecs[k]
            vec.action_space.seed(k)
            actions = [vec.action_space.sample() for _ in range(16)]
            lat = []
            clock = time.perf_counter
            start.wait(30.0)
            t0 = clock()
            deadline = t0 + duration
            calls = 0
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

        threads = [threading.Thread(target=stepper, args=(k,), daemon=True) for k in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 60.0)
        errors = [r[3] for r in results if r is None or r[3]]
        if errors or any(r is None for r in results):
            raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0] if errors else 'timed out'}")
        calls = sum(r[0] for r in results)
        seconds = max(r[1] for r in results)
        lat_us = [round(x * 1e6, 1) for r in results for x in r[2]]
        print(json.dumps({"calls": calls, "env_steps": calls * n_envs, "seconds": seconds, "lat_us": lat_us}),
              flush=True)
        _expect("close")
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        raise SystemExit(1) from None
    finally:
        for vec in vecs:
            try:
                vec.close()
            except Exception:
                pass
        for client in clients:
            client.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
