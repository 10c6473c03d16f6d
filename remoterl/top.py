"""``remoterl status --watch`` / ``remoterl top``: a live view of a broker.

Theory of operation
-------------------
The view is a loop around two pure parts.

*Samples.* Each tick fetches one status snapshot (the reply of the broker's
``remoterl.status`` service, exactly what ``remoterl status --json`` prints) and wraps it in
a :class:`Sample` with the local monotonic time it arrived, or, when the broker did not
answer, the error text instead of a snapshot.

*Rates.* The status reply holds running totals only: a worker's ``calls`` (batched calls the
broker routed to it), its ``stats.steps`` and ``stats.errors`` (reported by the worker with its
heartbeats) and the broker's ``counters``. A rate is the difference between two successive
snapshots divided by the time between them (:func:`worker_rates`, :func:`counter_rates`). The
time is the broker's own clock (the snapshots' ``time`` field) when both carry it, otherwise
the local arrival times (:func:`elapsed`). A rate is ``None``, shown as "–", when it cannot be
known: on the first snapshot, for a worker absent from the previous one, or for a total that went
down (a worker that restarted under the same id). The last good snapshot is kept across
failed fetches, so the first rate after an outage spans the outage.

*Rendering.* :func:`render` turns the latest sample, its rates and the last good snapshot into
rich renderables: a summary line, a workers table, a services table and the broker counters
that moved. Fields a broker does not send (per-worker ``p50_ms``/``p99_ms`` latency, a
Majordomo worker's slots) show as "–". None of this touches a terminal: tests render into a
``rich.console.Console(record=True)``.

*The loop* (:func:`watch`) fetches, renders and sleeps until the next tick. On a terminal it
redraws one :class:`rich.live.Live` region; elsewhere (a pipe, a test runner) it prints each
frame in turn, like ``top -b``. An unreachable broker is a frame that says so, and the loop
keeps trying. Ctrl-C ends it with status 0; with ``count`` it ends after that many frames,
with status 1 if the broker never answered.

It does not keep history beyond the previous snapshot, and it does not aggregate across
brokers: for that, scrape ``--metrics`` with Prometheus (``examples/grafana``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["Rates", "Sample", "counter_rates", "elapsed", "render", "total_rates", "watch", "worker_rates"]

_NONE = "–"  # shown for a value the broker did not report or that cannot be computed yet


@dataclass(frozen=True)
class Sample:
    """One tick: the snapshot (None when the broker did not answer) and when it arrived."""

    at: float  # local monotonic seconds
    snap: dict | None = None
    error: str | None = None


@dataclass(frozen=True)
class Rates:
    """Per-second rates of one worker (or of all); None where not known yet."""

    calls: float | None = None
    steps: float | None = None
    errors: float | None = None


def elapsed(before: Sample, after: Sample) -> float | None:
    """Seconds between two answered samples: the broker's clock when both snapshots carry
    it (no network jitter), else the local arrival times; None if not positive."""
    assert before.snap is not None and after.snap is not None
    t0, t1 = before.snap.get("time"), after.snap.get("time")
    seconds = t1 - t0 if isinstance(t0, (int, float)) and isinstance(t1, (int, float)) else after.at - before.at
    return seconds if seconds > 0 else None


def _rate(old: object, new: object, seconds: float | None) -> float | None:
    if seconds is None or not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or new < old:
        return None  # unknown, or a total that went down: the worker restarted
    return (new - old) / seconds


def _totals(worker: Mapping) -> tuple[object, object, object]:
    stats = worker.get("stats") or {}
    return worker.get("calls"), stats.get("steps"), stats.get("errors")


def worker_rates(before: Mapping | None, after: Mapping, seconds: float | None) -> dict[str, Rates]:
    """Calls/s, steps/s and errors/s of each worker in ``after``, by worker id.

    Args:
        before: the previous snapshot, or None (every rate is then None).
        after: the current snapshot.
        seconds: time between the two (see :func:`elapsed`).
    """
    old = {w["id"]: _totals(w) for w in (before or {}).get("workers", ())}
    out = {}
    for worker in after.get("workers", ()):
        prev = old.get(worker["id"], (None, None, None))
        out[worker["id"]] = Rates(*(_rate(a, b, seconds) for a, b in zip(prev, _totals(worker))))
    return out


def total_rates(rates: Mapping[str, Rates]) -> Rates:
    """The sum over workers of each known rate (None when no worker's is known)."""
    def add(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    rs = list(rates.values())
    return Rates(add([r.calls for r in rs]), add([r.steps for r in rs]), add([r.errors for r in rs]))


def counter_rates(before: Mapping | None, after: Mapping, seconds: float | None) -> dict[str, float | None]:
    """Per-second rate of each broker counter in ``after`` (None where not known)."""
    old = (before or {}).get("counters") or {}
    return {name: _rate(old.get(name), value, seconds) for name, value in (after.get("counters") or {}).items()}


def _num(value: float | None, digits: int = 1) -> str:
    return _NONE if value is None else f"{value:,.{digits}f}"


def _ms(worker: Mapping, key: str) -> str:
    value = worker.get(key)
    return f"{value:,.1f}" if isinstance(value, (int, float)) else _NONE


def _uptime(snap: Mapping) -> str:
    started, now = snap.get("started"), snap.get("time")
    if not isinstance(started, (int, float)) or not isinstance(now, (int, float)):
        return _NONE
    return str(datetime.timedelta(seconds=int(max(0.0, now - started))))


def _workers_table(snap: Mapping, rates: Mapping[str, Rates]) -> Table:
    table = Table(title="workers", title_justify="left", expand=False, pad_edge=False, show_edge=False)
    for name, justify in [("WORKER", "left"), ("NAME", "left"), ("SERVES", "left"), ("SLOTS", "right"),
                          ("CALLS", "right"), ("CALLS/S", "right"), ("STEPS/S", "right"), ("P50 MS", "right"),
                          ("P99 MS", "right"), ("ERRORS", "right"), ("ERR/S", "right")]:
        table.add_column(name, justify=justify, no_wrap=name in ("NAME", "SLOTS"))
    for w in snap.get("workers", ()):
        r = rates.get(w["id"], Rates())
        served = ", ".join(w.get("envs", [])) or w.get("service", "")
        slots = f"{w['slots']}/{w['capacity']}" if "capacity" in w and "slots" in w else _NONE
        errors = (w.get("stats") or {}).get("errors")
        err_style = "bold red" if r.errors else ("red" if errors else "")
        table.add_row(w["id"][:8], w.get("name", ""), served, slots, str(w.get("calls", _NONE)),
                      _num(r.calls), _num(r.steps), _ms(w, "p50_ms"), _ms(w, "p99_ms"),
                      Text(str(_NONE if errors is None else errors), style=err_style),
                      Text(_num(r.errors), style=err_style))
    return table


def _services_table(snap: Mapping) -> Table:
    table = Table(title="services", title_justify="left", pad_edge=False, show_edge=False)
    for name in ("SERVICE", "KIND", "WORKERS", "FREE SLOTS / QUEUED"):
        table.add_column(name, justify="left" if name in ("SERVICE", "KIND") else "right")
    for s in snap.get("services", ()):
        table.add_row(s["name"], s["kind"], str(s["workers"]), str(s.get("free_slots", s.get("queued", ""))))
    return table


def render(url: str, latest: Sample, good: Sample | None, rates: Mapping[str, Rates],
           counters: Mapping[str, float | None]) -> RenderableType:
    """The frame for ``latest``: an error line when the broker did not answer (above the last
    good snapshot ``good``, if any), then the summary, workers, services and counters.

    Args:
        rates: :func:`worker_rates` of ``good`` against the good snapshot before it.
        counters: :func:`counter_rates` likewise.
    """
    parts: list[RenderableType] = []
    if latest.snap is None:
        parts.append(Text(f"broker unreachable at {url}: {latest.error} (retrying)", style="bold red"))
        if good is None:
            return Group(*parts)
        parts.append(Text(f"last answer {latest.at - good.at:.0f} s ago:", style="dim"))
    assert good is not None and good.snap is not None
    snap = good.snap
    total = total_rates(rates)
    parts.append(Text.assemble(
        ("broker ", "bold"), (str(snap.get("broker", "?")), "bold cyan"), f" at {url}  up {_uptime(snap)}  ",
        f"{len(snap.get('workers', ()))} worker(s)  {len(snap.get('clients', ()))} client(s)  "
        f"{snap.get('open_slots', _NONE)} open slot(s)"))
    parts.append(Text.assemble(
        ("calls/s ", "bold"), _num(total.calls), ("  steps/s ", "bold"), _num(total.steps),
        ("  errors/s ", "bold"), (_num(total.errors), "bold red" if total.errors else "")))
    parts.append(_workers_table(snap, rates) if snap.get("workers") else Text("no workers", style="yellow"))
    if snap.get("services"):
        parts.append(_services_table(snap))
    moved = [f"{name} {value:,.1f}/s" for name, value in sorted(counters.items()) if value]
    totals = snap.get("counters") or {}
    if totals:
        parts.append(Text("counters: " + "  ".join(f"{k}={v}" for k, v in sorted(totals.items())), style="dim"))
    if moved:
        parts.append(Text("counters/s: " + "  ".join(moved), style="yellow"))
    return Group(*parts)


def watch(fetch: Callable[[], dict], url: str, *, interval: float = 1.0, count: int | None = None,
          console: Console | None = None, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep,
          unreachable: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)) -> int:
    """Fetch a snapshot every ``interval`` seconds and show it, until Ctrl-C or ``count`` frames.

    Args:
        fetch: returns one status snapshot; an exception of a type in ``unreachable`` is shown
            as "broker unreachable" and retried, any other propagates (e.g. a refused key).
        count: stop after this many frames (None: until Ctrl-C).
        console: where to draw (default: a new console on stdout). A terminal gets one
            redrawn :class:`~rich.live.Live` region; anything else gets each frame in turn.

    Returns:
        The exit status: 0, or 1 when ``count`` frames were shown and none had an answer.
    """
    console = console or Console()
    live = Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else None
    good: Sample | None = None
    rates: dict[str, Rates] = {}
    counters: dict[str, float | None] = {}
    frames = 0
    try:
        if live is not None:
            live.start()
        while count is None or frames < count:
            started = clock()
            try:
                snap = fetch()
                latest = Sample(clock(), snap)
            except unreachable as exc:
                latest = Sample(clock(), error=str(exc) or type(exc).__name__)
            if latest.snap is not None:
                seconds = elapsed(good, latest) if good is not None else None
                rates = worker_rates(good.snap if good else None, latest.snap, seconds)
                counters = counter_rates(good.snap if good else None, latest.snap, seconds)
                good = latest
            frame = render(url, latest, good, rates, counters)
            if live is not None:
                live.update(frame, refresh=True)
            else:
                if frames:
                    console.rule(style="dim")
                console.print(frame)
            frames += 1
            if count is None or frames < count:
                sleep(max(0.0, started + interval - clock()))
    except KeyboardInterrupt:
        return 0
    finally:
        if live is not None:
            live.stop()
    return 0 if good is not None else 1
