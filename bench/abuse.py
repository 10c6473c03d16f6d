"""Hostile peers for a remoterl broker, and the trial that measures what they cost a trainer.

Five abuses (frames, malformed, flood, zero_size, names: bench/abuse_kinds.py), each a plain
function bounded in count and time that connects, sends, cleans up and returns what it sent.
:func:`trial` runs one of them against a fresh broker and worker (subprocesses, key mode:
bench/abuse_deploy.py) while a well-behaved trainer (``RemoteEnvVec("CartPole-v1", 8)`` in a
thread of this process: bench/abuse_trainer.py) steps throughout, and reports what the
trainer saw (errors, lost steps, worst step latency), whether a healthy peer expired, and
the broker's RSS idle / peak / after. It is what ``python bench/run.py --case abuse`` runs
(bench/cases.py), once per kind, over tcp; ``python bench/abuse.py --transport ws`` runs the
same trials with the hostile peers on ws:// (the trainer and worker stay on tcp). Every
process a trial starts is killed before it returns, even on error, and dies with this
process if it is killed (``PR_SET_PDEATHSIG``).

The modules, each importable on its own once bench/ is on ``sys.path`` (this one puts it there):

================== ===================================================================================
abuse.py           the trial, its one-line summary, the command line; re-exports the names below
abuse_kinds.py     the five abuses, their sizes (full and ``--quick``), labels and whose key each holds
abuse_session.py   a keyed remoterl client spoken frame by frame (HELLO, OPEN, CALL, HEARTBEAT, DISCONNECT)
abuse_peers.py     connections (ZeroMQ DEALER or WebSocket), PLAIN detection, and :class:`Sent`
abuse_deploy.py    :class:`Deployment`: the fresh broker and worker a trial abuses
abuse_trainer.py   :class:`Trainer`, the well-behaved trainer, and the broker's RSS sampler
================== ===================================================================================

    python bench/abuse.py                       # every kind, full sizes, tcp
    python bench/abuse.py --quick --transport ws --kind frames
    python bench/abuse.py --url tcp://127.0.0.1:5555 --key KEY --kind malformed --quick   # just send
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the abuse_* modules, also when this file is loaded by its path

from abuse_deploy import Deployment  # noqa: E402  (after the path fix above)
from abuse_kinds import (KEY_OF, KINDS, LABELS, call_flood, huge_names, malformed, many_frames,  # noqa: E402
                         run_abuse, sizes, zero_size_actions)
from abuse_peers import Peer, Sent, connect, detect_auth  # noqa: E402
from abuse_trainer import RssSampler, Trainer  # noqa: E402

__all__ = ["KINDS", "LABELS", "LATENCY_LIMIT_S", "RSS_LIMIT_MB", "Deployment", "Peer", "Sent", "Trainer", "call_flood",
           "connect", "detect_auth", "huge_names", "main", "malformed", "many_frames", "sizes", "summary", "trial",
           "zero_size_actions"]


def _timing(quick: bool) -> dict[str, float]:
    # settle: at least settle_min seconds and settle_steps trainer steps after the abuse, until
    # the RSS is back (at most settle_max); grace: SIGTERM to SIGKILL at the end.
    if quick:
        return {"start": 20.0, "warm": 0.05, "idle": 0.05, "settle_min": 0.05, "settle_steps": 20, "settle_max": 1.0,
                "step_timeout": 5.0, "grace": 0.05}
    return {"start": 30.0, "warm": 1.0, "idle": 0.5, "settle_min": 1.0, "settle_steps": 200, "settle_max": 8.0,
            "step_timeout": 30.0, "grace": 1.0}


LATENCY_LIMIT_S = 1.0
RSS_LIMIT_MB = 20.0


def trial(kind: str, *, quick: bool = False, transport: str = "tcp", params: dict | None = None,
          note: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """One abuse against a fresh :class:`Deployment` while a :class:`Trainer` steps.

    Warm-up, the broker's idle RSS (trainer stepping), the abuse (in this thread), a settle
    period (until the RSS is back within ``RSS_LIMIT_MB`` of idle, at least ``settle_min``
    and at most ``settle_max`` seconds), then the trainer stops and the broker's counters
    are read. Returns the figures and ``checks`` (each True when met) and ``passed``.

    Args:
        kind: one of :data:`KINDS`.
        quick: the small sizes of :func:`sizes` and short phases.
        transport: ``"tcp"`` or ``"ws"`` for the hostile peers (the trainer and the worker
            always use tcp).
        params: overrides for the abuse's keyword arguments.
    """
    args = {**sizes(quick)[kind], **(params or {})}
    timing = _timing(quick)
    started = time.monotonic()
    result: dict[str, Any] = {"kind": kind, "label": LABELS[kind].format(**{**sizes(quick)[kind], **args}),
                              "transport": transport, "params": args}
    dep = Deployment(ws=transport == "ws")
    try:
        note(f"{kind}: start broker and worker")
        dep.start(timing["start"])
        t_started = time.monotonic()
        trainer = Trainer(dep.tcp_url, dep.key, step_timeout=timing["step_timeout"])
        sampler = None
        try:
            note(f"{kind}: trainer warm-up")
            trainer.start(timing["start"])
            time.sleep(timing["warm"])
            before = dep.status()
            workers = [w["id"] for w in before["workers"]]  # the deployment's one worker: the trainer's
            sampler = RssSampler(dep.rss)
            t_idle = time.monotonic()
            time.sleep(timing["idle"])
            idle = sorted(sampler.between(t_idle))
            idle_rss = idle[len(idle) // 2] if idle else dep.rss()
            steps_before = trainer.returned
            trainer.mark()
            url = dep.ws_url if transport == "ws" else dep.tcp_url
            key = {"trainer": dep.key, "other": dep.other_key, None: None}[KEY_OF[kind]]
            call_args = dict(args)
            if kind == "malformed":
                call_args.setdefault("worker_ids", [bytes.fromhex(w) for w in workers])
            note(f"{kind}: abuse")
            t_abuse = time.monotonic()
            try:
                sent = run_abuse(kind, url, key, **call_args)
            except Exception as exc:  # the generator should not raise; if it does, say so
                sent = Sent(kind, transport, stopped=f"error: {type(exc).__name__}: {exc}")
            t_settle = time.monotonic()
            note(f"{kind}: settle")
            steps_at_end = trainer.returned
            while True:
                elapsed = time.monotonic() - t_settle
                after_rss = dep.rss()
                if after_rss is None or elapsed >= timing["settle_max"]:
                    break
                recovered = trainer.error is not None or trainer.returned - steps_at_end >= timing["settle_steps"]
                if elapsed >= timing["settle_min"] and after_rss - idle_rss <= RSS_LIMIT_MB * 1e6 and recovered:
                    break
                time.sleep(0.05)
            t_end = time.monotonic()
            steps_during = trainer.returned - steps_before
            worst = trainer.worst
            try:
                after = dep.status(timeout=min(5.0, timing["step_timeout"]))
                status_error = None
            except Exception as exc:
                after, status_error = None, f"{type(exc).__name__}: {exc}"
            t_stop = time.monotonic()
            stopped = trainer.stop(timing["step_timeout"] + 2.0)
            worst = max(worst, trainer.worst)
            alive = dep.alive()
            peak = max(sampler.between(t_abuse), default=idle_rss)
        finally:
            trainer.stop(0.5)
            if sampler is not None:
                sampler.stop()
    finally:
        t_close = time.monotonic()
        dep.close(timing["grace"])
    counters_before = before.get("counters", {})
    counters_after = (after or {}).get("counters", {})
    expired = {name: counters_after.get(name, 0) - counters_before.get(name, 0)
               for name in ("workers_expired", "clients_expired")} if after is not None else None
    gone = []
    if after is not None:
        listed_workers = {w["id"] for w in after.get("workers", [])}
        listed_clients = {c["id"] for c in after.get("clients", [])}
        gone = [f"worker {w[:8]}" for w in workers if w not in listed_workers]
        if trainer.identity not in listed_clients:
            gone.append("trainer client")
    lost = trainer.attempted - trainer.returned
    mb = 1e6
    result.update({
        "sent": sent.to_dict(),
        "steps": {"attempted": trainer.attempted, "returned": trainer.returned, "lost": lost,
                  "during_abuse_and_settle": steps_during, "trainer_stopped": stopped},
        "error": trainer.error,
        "worst_latency_s": worst,
        "expired": expired,
        "healthy_gone": gone,
        "status_error": status_error,
        "rss_mb": {"idle": (idle_rss or 0) / mb, "peak": (peak or 0) / mb,
                   "after": after_rss / mb if after_rss is not None else None},
        "alive": alive,
        "seconds": {"start": round(t_started - started, 3), "abuse": round(t_settle - t_abuse, 3),
                    "settle": round(t_end - t_settle, 3), "stop": round(t_close - t_stop, 3),
                    "close": round(time.monotonic() - t_close, 3), "trial": round(time.monotonic() - started, 3)},
    })
    checks = {
        "no error": trainer.error is None,
        "no lost step": lost == 0 and stopped,
        "latency": worst <= LATENCY_LIMIT_S,
        # Healthy peers are the trainer's client and its worker: still listed, under the same
        # ids. The counters may also count an abuser's own sessions (the flooder's, or all
        # tenants' on a broker whose status counters are broker-wide).
        "no expiry": after is not None and not gone,
        "rss": after_rss is not None and idle_rss is not None and (after_rss - idle_rss) / mb <= RSS_LIMIT_MB,
        "alive": all(alive.values()),
        "abuse sent": not sent.stopped.startswith("error"),
    }
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def summary(result: dict[str, Any]) -> str:
    """One line: the trainer's errors, lost steps, expiries and RSS (idle/peak/after), and
    which checks failed (latency is the figure's own column)."""
    steps = result["steps"]
    rss = result["rss_mb"]
    expired = result["expired"]
    text = f"{'1 error' if result['error'] else '0 errors'}, {steps['lost']} of {steps['attempted']:,} steps lost, "
    if expired is None:
        text += "expired: ? (no status)"
    else:
        gone, counted = result["healthy_gone"], sum(expired.values())
        text += f"expired: {', '.join(gone)}" if gone else "0 expired"
        if counted > len(gone):
            text += f" (+{counted - len(gone)} other{'s' if counted - len(gone) > 1 else ''} in the counters)"
    after = "gone" if rss["after"] is None else f"{rss['after']:.0f}"
    text += f", RSS {rss['idle']:.0f}/{rss['peak']:.0f}/{after} MB"
    failed = [name for name, ok in result["checks"].items() if not ok and name != "latency"]
    return text + (f"; failed: {', '.join(failed)}" if failed else "")


# --- command line --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/abuse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", dest="kinds", action="append", choices=KINDS, help="only this kind (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the small sizes")
    parser.add_argument("--transport", choices=("tcp", "ws"), default="tcp", help="the hostile peers' transport")
    parser.add_argument("--url", help="just send the abuse(s) to this broker (tcp:// or ws://), no trial")
    parser.add_argument("--key", help="with --url: the API key the keyed abuses hold")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    args = parser.parse_args(argv)
    kinds = args.kinds or list(KINDS)
    results = []
    for kind in kinds:
        if args.url:
            sent = run_abuse(kind, args.url, args.key or "", **sizes(args.quick)[kind])
            results.append(sent.to_dict())
            print(json.dumps(sent.to_dict()), flush=True)
            continue
        result = trial(kind, quick=args.quick, transport=args.transport,
                       note=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
        results.append(result)
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"{result['label']} [{args.transport}]: worst step {result['worst_latency_s'] * 1000:,.0f} ms, "
              f"{summary(result)} — {verdict}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
