"""The benchmark cases. Each yields :class:`~measure.Figure` rows: a remote figure beside its
local baseline measured in the same run (interleaved with it, see ``measure.py``), their
ratio, the target from issue 5 and whether it was met.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from measure import (IMAGE_ID, SLOW_ID, BridgedBroker, Figure, Session, closing, compare_latencies, compare_rates,
                     env_step_timer, local_vector, median, plural, vector_stepper)
from failover import case_failover
from metrics_case import case_metrics
from scale import case_scale
from wan import case_wan

__all__ = ["CASES", "run_case"]

# Case names, in the order they run.
CASES = ("latency", "throughput", "slow", "bigobs", "ws", "wan", "sb3", "scale", "embedded", "failover", "abuse",
         "metrics")

# A broker in its own process with one worker: for the latency case (the floor's topology),
# kept for the embedded case (which releases it; Session.close does otherwise).
_PROCESS_BROKER = (1, 256, "process")


def run_case(name: str, session: Session, note: Callable[[str], None] = lambda _: None) -> Iterator[Figure]:
    """Run one case; yield its figures as they are measured. ``note`` hears what runs now."""
    import remoterl_bench_envs  # noqa: F401  (registers SLOW_ID and IMAGE_ID here as well)

    yield from _CASES[name](session, note)


# --- 1. latency ----------------------------------------------------------------------------------------

def _step_message_size(action: Any, step: tuple) -> int:
    """Bytes of one ``RemoteEnv`` step on the wire, the larger of request and reply."""
    from remoterl.wire import codec
    from remoterl.wire import protocol as p

    obs, reward, terminated, truncated, info = step
    request, frames = codec.encode({"op": "step", "a": action, "single": True, "r": 123456, "slots": [123]})
    reply, reply_frames = codec.encode({"obs": obs, "rew": reward, "term": terminated, "trunc": truncated,
                                        "info": info, "r": 123456})
    signature = len(p.client_frame(p.ClientCommand.CALL))
    payload = max(len(request) + sum(f.nbytes for f in frames), len(reply) + sum(f.nbytes for f in reply_frames))
    return signature + 16 + payload  # + a routing id


def case_latency(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from floor import Floor

    from remoterl import RemoteEnv

    opts = session.options
    # The default (broker thread driven by the trainer, worker on a local link) and, unless
    # --broker, the floor's own topology: the broker in its own process, tcp on both hops.
    setups = {"--broker": opts.workers} if session.external else {
        "embedded: broker thread, local link": (opts.workers, 256, "thread"), "broker process, tcp": _PROCESS_BROKER}
    with contextlib.ExitStack() as stack:
        timers: dict[str, Callable[[], float]] = {}
        size = 0
        for where, key in setups.items():
            note(f"start: {where}")
            url = session.broker(*key) if isinstance(key, tuple) else session.broker(key)
            env = closing(stack, RemoteEnv(opts.env_id, client=session.client(url)))
            action = env.action_space.sample()
            env.reset(seed=0)
            size = max(size, _step_message_size(action, env.step(action)))
            timers[where] = env_step_timer(env)
        note("start: raw pyzmq floor")
        floor = Floor().start()
        stack.callback(floor.stop)
        payload = os.urandom(size)
        clock = time.perf_counter

        def floor_timer() -> float:
            t = clock()
            floor.round_trip(payload)
            return clock() - t

        note(f"RemoteEnv({opts.env_id}).step and the floor, interleaved")
        floor_name = f"DEALER→ROUTER→DEALER echo, {size} B"
        lat = compare_latencies({**timers, floor_name: floor_timer}, opts.duration, opts.warmup, opts.rounds)
    floor_p = np.percentile(lat[floor_name], [50, 99]) * 1e6
    for where in timers:
        p = np.percentile(lat[where], [50, 99]) * 1e6
        extra = {"samples": len(lat[where]), "floor_samples": len(lat[floor_name]), "payload_bytes": size}
        yield Figure("latency", f"RemoteEnv step p50 ({where})", p[0], "µs", f"{floor_name}, p50", floor_p[0],
                     "<= 2.0", extra=extra)
        yield Figure("latency", f"RemoteEnv step p99 ({where})", p[1], "µs", f"{floor_name}, p99", floor_p[1],
                     extra=extra)


# --- 2. throughput -------------------------------------------------------------------------------------

def case_throughput(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import RemoteEnvVec

    opts = session.options
    env_id = opts.env_id
    client = session.client(session.broker(opts.workers))
    targets = {("Async", 8): ">= 1.5", ("Sync", 64): ">= 0.6"} if env_id == "CartPole-v1" else {}
    for n in opts.num_envs:
        with contextlib.ExitStack() as stack:
            note(f"start: Sync/AsyncVectorEnv({n}), RemoteEnvVec({n})")
            calls = {
                "Sync": vector_stepper(closing(stack, local_vector("sync", env_id, n))),
                "Async": vector_stepper(closing(stack, local_vector("async", env_id, n))),
            }
            remotes = {}
            if n in (8, 64) and opts.workers > 1:
                # Opened first: the broker places it on the least-loaded workers, all idle now.
                remotes[opts.workers] = closing(stack, RemoteEnvVec(env_id, n, client=client,
                                                                     max_workers=opts.workers))
            remotes[1] = closing(stack, RemoteEnvVec(env_id, n, client=client, max_workers=1))
            for workers, envs in remotes.items():
                calls[f"remote-{workers}"] = vector_stepper(envs)
            note(f"{n} envs: Sync, Async, RemoteEnvVec, interleaved")
            rates = compare_rates(calls, opts.duration, opts.warmup, opts.rounds)
            used = {workers: len(envs.workers) for workers, envs in remotes.items()}
        for workers in sorted(remotes):
            rate = median(rates[f"remote-{workers}"]) * n
            for kind in ("Sync", "Async"):
                target = targets.get((kind, n)) if workers == 1 else None
                yield Figure("throughput", f"RemoteEnvVec({n}), {plural(used[workers], 'worker')}", rate,
                             "env-steps/s", f"{kind}VectorEnv({n})", median(rates[kind]) * n, target,
                             extra={"env": env_id, "num_envs": n, "workers": used[workers],
                                    "turns": {"remote": rates[f"remote-{workers}"], "local": rates[kind]}})


# --- 3. slow simulator ------------------------------------------------------------------------------------

def case_slow(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import RemoteEnvVec

    opts = session.options
    n, delay = 8, 0.001
    ideal = n / delay
    note("start: AsyncVectorEnv(8) of SlowEnv, 8 workers")
    try:
        with contextlib.ExitStack() as stack:
            local = closing(stack, local_vector("async", SLOW_ID, n, delay=delay))
            url = session.broker(n, 1)  # 8 worker processes, one slot each
            remote = closing(stack, RemoteEnvVec(SLOW_ID, n, client=session.client(url), delay=delay))
            used = len(remote.workers)
            note("AsyncVectorEnv(8) and RemoteEnvVec(8) of SlowEnv, interleaved")
            rates = compare_rates({"remote": vector_stepper(remote), "local": vector_stepper(local)},
                                  opts.duration, opts.warmup, opts.rounds)
    finally:
        if not session.external:
            session.release(n, 1)
    rate = median(rates["remote"]) * n
    name = f"RemoteEnvVec(8) of 1 ms steps, {plural(used, 'worker process', 'worker processes')}"
    extra = {"delay_s": delay, "workers": used, "turns": rates}
    yield Figure("slow", name, rate, "env-steps/s", "ideal: 8 × 1,000 steps/s", ideal, ">= 0.8", extra=extra)
    yield Figure("slow", name, rate, "env-steps/s", "AsyncVectorEnv(8)", median(rates["local"]) * n, extra=extra)


# --- 4. big observations ------------------------------------------------------------------------------------

def case_bigobs(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from floor import Floor, sized_request

    from remoterl import RemoteEnvVec

    opts = session.options
    n = 8
    client = session.client(session.broker(opts.workers))
    with contextlib.ExitStack() as outer:
        note("start: raw pyzmq floor (zero-copy forwarder)")
        floor = Floor(zero_copy=True).start()
        outer.callback(floor.stop)
        for shape in ((84, 84, 3), (210, 160, 3)):
            label = "×".join(map(str, shape))
            obs_bytes = int(np.prod(shape))
            reply_kb = n * obs_bytes // 1000
            with contextlib.ExitStack() as stack:
                note(f"start: SyncVectorEnv(8), AsyncVectorEnv(8), RemoteEnvVec(8) of {label} uint8")
                local = closing(stack, local_vector("sync", IMAGE_ID, n, shape=shape))
                async_ = closing(stack, local_vector("async", IMAGE_ID, n, vector_kwargs={"shared_memory": True},
                                                     shape=shape))
                remote = closing(stack, RemoteEnvVec(IMAGE_ID, n, client=client, max_workers=1, shape=list(shape)))
                request = sized_request(n * obs_bytes)
                note(f"{label}: Sync, Async, RemoteEnvVec, floor, interleaved")
                rates = compare_rates({"remote": vector_stepper(remote), "local": vector_stepper(local),
                                       "async": vector_stepper(async_),
                                       "floor": lambda: floor.round_trip_sized(request)},
                                      opts.duration, opts.warmup, opts.rounds)
            rate, local_rate, async_rate, floor_rate = (median(rates[k]) * n
                                                        for k in ("remote", "local", "async", "floor"))
            mb = obs_bytes / 1e6  # per env-step
            target = ">= 0.5" if shape == (84, 84, 3) else None
            name = f"RemoteEnvVec(8) {label} uint8, 1 worker"
            extra = {"shape": list(shape), "bytes_per_obs": obs_bytes, "num_envs": n, "turns": rates}
            yield Figure("bigobs", name, rate, "env-steps/s", "SyncVectorEnv(8)", local_rate, target, extra=extra)
            yield Figure("bigobs", name, rate * mb, "MB/s", "SyncVectorEnv(8)", local_rate * mb, extra=extra)
            yield Figure("bigobs", name, rate, "env-steps/s", f"raw pyzmq floor, {reply_kb} KB replies", floor_rate,
                         extra=extra)
            yield Figure("bigobs", f"{name} (the embedded default)", rate, "env-steps/s",
                         "AsyncVectorEnv(8, shared_memory=True)", async_rate, extra=extra)


# --- 5. WebSocket vs tcp ---------------------------------------------------------------------------------

def case_ws(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import Client, RemoteEnvVec
    from remoterl.io.wsgateway import close_gateways

    opts = session.options
    n, env_id = 8, "CartPole-v1"
    name = f"RemoteEnvVec({n}) over ws:// (bridge), 1 worker"
    if session.external:
        yield Figure("ws", name, target=">= 0.6",
                     na="n/a: --broker given (this case starts its own broker with a WebSocket bridge)")
        return
    # One broker process serving both transports, one worker: the tcp and ws proxies share
    # the broker and the worker, so only the trainer's hop differs.
    note("start: broker process with a WebSocket bridge, 1 worker")
    bridged = BridgedBroker(slots=2 * n)
    try:
        bridged.start()
        with contextlib.ExitStack() as stack:
            stack.callback(close_gateways)  # the trainer side's ws gateway thread (after the clients)
            calls = {}
            for transport, url in (("tcp", bridged.tcp_url), ("ws", bridged.ws_url)):
                client = Client(url, name=f"bench-{transport}").connect()
                stack.callback(client.close)
                envs = closing(stack, RemoteEnvVec(env_id, n, client=client, max_workers=1))
                calls[transport] = vector_stepper(envs)
            note(f"RemoteEnvVec({n}) over tcp:// and ws://, interleaved")
            rates = compare_rates(calls, opts.duration, opts.warmup, opts.rounds)
    finally:
        session.stop_later(bridged.stop)
    yield Figure("ws", name, median(rates["ws"]) * n, "env-steps/s",
                 f"RemoteEnvVec({n}) over tcp://, same broker and worker", median(rates["tcp"]) * n, ">= 0.6",
                 extra={"env": env_id, "num_envs": n, "turns": {"remote": rates["ws"], "local": rates["tcp"]}})


# --- 6. SB3 PPO training ------------------------------------------------------------------------------------

def _local_make() -> Callable[..., Any]:
    """gymnasium's own ``make``, even where ``remoterl.init()`` has patched it (the bench never calls it)."""
    import gymnasium

    from remoterl.integrations import gymnasium as patches

    return patches._originals.get("gym_make", gymnasium.make)


def case_sb3(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    n, env_id, seed = 8, "CartPole-v1", 0
    timesteps = 2_000 if session.options.quick else 20_000
    name = f"SB3 PPO {env_id} wall time, {timesteps:,} steps, RemoteVecEnv({n})"
    try:
        note("import: stable_baselines3, torch")
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

        from remoterl.sb3 import RemoteVecEnv
    except ImportError:
        yield Figure("sb3", name, target="<= 1.25", na="n/a: pip install remoterl[sb3]")
        return
    from remoterl.demo import PPO_KWARGS

    opts = session.options
    torch.set_num_threads(1)  # a tiny MLP: threads only add contention on a small machine (as the demo)
    make = _local_make()
    client = session.client(session.broker(opts.workers))
    clock = time.perf_counter

    def train(venv: Any, steps: int) -> tuple[float, list[float]]:
        """Seconds ``PPO.learn(steps)`` takes from a fresh model (same seed: same trajectories
        on both sides), and the returns of its last episodes."""
        model = PPO("MlpPolicy", venv, seed=seed, verbose=0, device="cpu", **PPO_KWARGS)
        start = clock()
        model.learn(total_timesteps=steps)
        seconds = clock() - start
        return seconds, [float(e["r"]) for e in model.ep_info_buffer]

    with contextlib.ExitStack() as stack:
        note(f"start: RemoteVecEnv({n}), DummyVecEnv({n})")
        remote = RemoteVecEnv(env_id, n, client=client, max_workers=1)
        envs = {"remote": closing(stack, VecMonitor(remote)),  # VecMonitor.close closes remote
                "local": closing(stack, VecMonitor(DummyVecEnv([functools.partial(make, env_id)] * n)))}
        for venv in envs.values():  # torch's first calls and the first rollout are not timed
            train(venv, PPO_KWARGS["n_steps"] * n)
        turns: dict[str, list[float]] = {side: [] for side in envs}
        returns: dict[str, list[float]] = {}
        for i in range(opts.rounds):
            for side, venv in envs.items():
                note(f"PPO, {timesteps:,} steps, {side} envs (turn {i + 1} of {opts.rounds})")
                seconds, returns[side] = train(venv, timesteps)
                turns[side].append(seconds)
        workers = len(set(remote.workers))
    extra = {"env": env_id, "num_envs": n, "timesteps": timesteps, "seed": seed, "workers": workers,
             "ppo_kwargs": PPO_KWARGS, "torch_threads": 1, "turns": turns,
             "mean_return_last_episodes": {side: float(np.mean(r)) if r else None for side, r in returns.items()}}
    yield Figure("sb3", f"{name}, {plural(workers, 'worker')}", median(turns["remote"]), "s", f"DummyVecEnv({n})",
                 median(turns["local"]), "<= 1.25", extra=extra)


# --- the embedded default: broker thread vs broker process -----------------------------------------------

def case_embedded(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl import RemoteEnv, RemoteEnvVec

    opts = session.options
    if session.external:
        yield Figure("embedded", "embedded broker: thread vs process", na="n/a: --broker given")
        return
    # The shared default (broker thread) and the latency case's broker process: one worker is
    # used of each (max_workers=1), so their worker counts do not matter.
    brokers = {"thread": (opts.workers, 256, "thread"), "process": _PROCESS_BROKER}
    try:
        with contextlib.ExitStack() as stack:
            vecs, timers = {}, {}
            for mode, key in brokers.items():
                note(f"start: embedded broker in a {mode}")
                client = session.client(session.broker(*key))
                vecs[mode] = vector_stepper(closing(stack, RemoteEnvVec(opts.env_id, 8, client=client,
                                                                        max_workers=1)))
                timers[mode] = env_step_timer(closing(stack, RemoteEnv(opts.env_id, client=client)))
            note("RemoteEnvVec(8), thread vs process, interleaved")
            rates = compare_rates(vecs, opts.duration, opts.warmup, opts.rounds)
            note("RemoteEnv step, thread vs process, interleaved")
            lat = compare_latencies(timers, opts.duration / 2, opts.warmup, opts.rounds)
    finally:
        session.release(*_PROCESS_BROKER)
    modes = tuple(brokers)
    base = "broker in a thread (default)"
    yield Figure("embedded", "RemoteEnvVec(8), broker in a process", median(rates["process"]) * 8, "env-steps/s",
                 base, median(rates["thread"]) * 8, extra={"turns": rates})
    p50 = {mode: float(np.percentile(lat[mode], 50)) * 1e6 for mode in modes}
    yield Figure("embedded", "RemoteEnv step p50, broker in a process", p50["process"], "µs", base, p50["thread"])


# --- hostile peers: what they cost a well-behaved trainer ---------------------------------------------

class AbuseFigure(Figure):
    """One abuse kind: ``value`` is the trainer's worst step latency beside the 1 s limit
    (``ratio`` = worst / 1 s, target ≤ 1.0), and ``passed`` needs every check of the trial
    (``extra["checks"]``: no error, no lost step, latency, no expiry, RSS back, alive, ...)."""

    @property
    def passed(self) -> bool | None:
        if self.na is not None:
            return None
        return all(self.extra.get("checks", {}).values())


def case_abuse(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    from abuse import KINDS, LATENCY_LIMIT_S, summary, trial

    opts = session.options
    if session.external:
        yield Figure("abuse", "hostile peers (5 kinds)", target="<= 1.0",
                     na="n/a: --broker given (each kind starts a fresh broker and worker of its own)")
        return
    try:
        import psutil  # noqa: F401  (the broker's RSS, and killing process trees)
    except ImportError:
        yield Figure("abuse", "hostile peers (5 kinds)", target="<= 1.0", na="n/a: pip install psutil")
        return
    for kind in KINDS:
        result = trial(kind, quick=opts.quick, note=note)
        yield AbuseFigure("abuse", f"{result['label']}: {summary(result)}", result["worst_latency_s"] * 1000.0, "ms",
                          "limit, worst step", LATENCY_LIMIT_S * 1000.0, "<= 1.0", extra=result)


_CASES: dict[str, Callable[[Session, Callable[[str], None]], Iterator[Figure]]] = {
    "latency": case_latency,
    "throughput": case_throughput,
    "slow": case_slow,
    "bigobs": case_bigobs,
    "ws": case_ws,
    "wan": case_wan,
    "sb3": case_sb3,
    "scale": case_scale,
    "embedded": case_embedded,
    "failover": case_failover,
    "abuse": case_abuse,
    "metrics": case_metrics,
}
