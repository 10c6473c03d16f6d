"""The wan case: a trainer reaching its broker across an emulated WAN link.

A broker process with two local worker processes (the simulators' side: they reach the broker
over tcp on 127.0.0.1, no delay), and the trainer (this process) reaching that broker through
a relay process (``bench/relay.py``) that delays each direction and caps its bandwidth. Each
vector measured gets a relay and a client of its own, so the relay's byte counters are that
vector's traffic (its client's heartbeats included) and the vectors never share a link; the
vectors of one figure step in interleaved turns (``measure.compare_rates``).

* **lock-step**: ``RemoteEnvVec("CartPole-v1", n, max_workers=1)`` for n = 8, 32, 64 at
  +20 ms RTT (10 ms each way, no cap), against the bound of a vector stepped in lock step:
  one step per round trip, ``n / RTT`` env-steps/s. **Target: ≥ 0.9× the bound for 8 envs.**
* **compression**: ``RemoteEnvVec(PIXELS_ID, 8, max_workers=2)`` (CartPole's own render,
  84×84×3 ``uint8``, about 0.4 ms a frame: two workers draw four frames each)
  at 100 Mbit/s each way with no added delay, then at 100 Mbit/s and +20 ms RTT: uncompressed,
  ``compression="lz4"`` and ``"zstd"``, against uncompressed on the same link; and the
  uncompressed rate against the link's bound (one round trip plus the bytes of a step at the
  capped rate). **Target: lz4 ≥ 3× uncompressed at 100 Mbit/s.** A remoterl without the
  ``compression`` keyword makes those rows n/a (skipped), not errors.

Bytes per vector step (both directions, read from the relay) are in each figure's ``extra``.
With ``--broker URL`` the relays forward to that broker (a tcp:// URL; its workers must
serve ``remoterl_bench_envs``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

from measure import Figure, Session, closing, compare_rates, median, vector_stepper

__all__ = ["case_wan"]

_BROKER = (2, 256, "process")  # a broker process and its 2 workers, over tcp (the zmq path)
_DELAY = 0.010  # one way: +20 ms RTT
_MBIT = 100.0
_SIZES = (8, 32, 64)
_COMPRESSIONS = (None, "lz4", "zstd")


class _Line:
    """One vector behind its own relay: its client, its step count, the relay's byte counts."""

    def __init__(self, stack: contextlib.ExitStack, broker_url: str, delay: float, mbit: float | None,
                 time_limit: float) -> None:
        from relay import Relay

        from remoterl.client.connection import Client

        self.relay = Relay(broker_url, delay=delay, mbit=mbit, time_limit=time_limit).start()
        stack.callback(self.relay.stop)  # after the client and the vector close (an ExitStack unwinds)
        # Workers on this host may hand big observations over in shared memory, which would
        # skip the link this case emulates: sockets only.
        extra = {"shared_memory": False} if "shared_memory" in inspect.signature(Client).parameters else {}
        self.client = Client(self.relay.url, name="bench-wan", **extra).connect()
        stack.callback(self.client.close)
        self.steps = 0
        self._start: dict[str, Any] = {}

    def stepper(self, envs: Any) -> Callable[[], Any]:
        step = vector_stepper(envs)

        def counted() -> Any:
            self.steps += 1
            return step()

        self._start = self.relay.stats()  # after the reset: the steps' bytes only (and heartbeats)
        return counted

    def bytes_per_step(self) -> dict[str, float]:
        end = self.relay.stats()
        steps = max(self.steps, 1)
        return {way: (end[way] - self._start[way]) / steps for way in ("up", "down")}


def _open(env_id: str, n: int, client: Any, compression: str | None, **kwargs: Any) -> Any:
    """A ``RemoteEnvVec``, or None when this remoterl has no ``compression`` keyword."""
    from remoterl import RemoteEnvVec
    from remoterl.errors import RemoteEnvError

    if compression is None:
        return RemoteEnvVec(env_id, n, client=client, **kwargs)
    try:
        return RemoteEnvVec(env_id, n, client=client, compression=compression, **kwargs)
    except TypeError:
        return None
    except RemoteEnvError as exc:  # an older RemoteEnvVec hands unknown keywords to the env
        if "compression" in str(exc):
            return None
        raise


def _time_limit(session: Session) -> float:
    """Seconds each relay may live: the whole case, generously; it stops by itself after."""
    return 120.0 + 20.0 * session.options.duration


def _lockstep(session: Session, url: str, note: Callable[[str], None]) -> Iterator[Figure]:
    opts = session.options
    rtt = 2 * _DELAY
    with contextlib.ExitStack() as stack:
        lines, calls = {}, {}
        for n in _SIZES:
            note(f"start: relay (+{rtt * 1e3:g} ms RTT), RemoteEnvVec({n})")
            line = lines[n] = _Line(stack, url, _DELAY, None, _time_limit(session))
            envs = closing(stack, _open("CartPole-v1", n, line.client, None, max_workers=1))
            calls[n] = line.stepper(envs)
        note(f"RemoteEnvVec({', '.join(map(str, _SIZES))}) at +{rtt * 1e3:g} ms RTT, interleaved")
        rates = compare_rates(calls, opts.duration, opts.warmup, opts.rounds)
        sent = {n: line.bytes_per_step() for n, line in lines.items()}
    for n in _SIZES:
        yield Figure("wan", f"RemoteEnvVec({n}) CartPole-v1, +{rtt * 1e3:g} ms RTT", median(rates[n]) * n,
                     "env-steps/s", f"lock-step bound: {n} envs / {rtt * 1e3:g} ms", n / rtt,
                     ">= 0.9" if n == 8 else None,
                     extra={"num_envs": n, "rtt_s": rtt, "bytes_per_step": sent[n], "turns": rates[n]})


def _compression(session: Session, url: str, delay: float, note: Callable[[str], None]) -> Iterator[Figure]:
    from remoterl_bench_envs import PIXELS_ID

    opts = session.options
    n, rtt = 8, 2 * delay
    link = f"{_MBIT:g} Mbit/s" + (f", +{rtt * 1e3:g} ms RTT" if delay else "")
    with contextlib.ExitStack() as stack:
        lines, calls, skipped = {}, {}, []
        for algo in _COMPRESSIONS:
            label = algo or "uncompressed"
            note(f"start: relay ({link}), RemoteEnvVec({n}) of 84×84×3 frames, {label}")
            line = _Line(stack, url, delay, _MBIT, _time_limit(session))
            envs = _open(PIXELS_ID, n, line.client, algo, max_workers=2)
            if envs is None:
                skipped.append(label)
                continue
            lines[label] = line
            calls[label] = line.stepper(closing(stack, envs))
        note(f"84×84×3 frames, {link}: {', '.join(calls)}, interleaved")
        rates = compare_rates(calls, opts.duration, opts.warmup, opts.rounds)
        sent = {label: line.bytes_per_step() for label, line in lines.items()}
    name = f"RemoteEnvVec({n}) CartPole frames 84×84×3, {link}"
    raw = median(rates["uncompressed"]) * n
    per_step = sent["uncompressed"]["up"] + sent["uncompressed"]["down"]
    bound = n / (rtt + per_step * 8 / (_MBIT * 1e6))
    yield Figure("wan", f"{name}, uncompressed", raw, "env-steps/s",
                 f"link bound: {per_step / 1e3:,.0f} KB per step at {_MBIT:g} Mbit/s + RTT", bound,
                 extra={"delay_s": delay, "mbit": _MBIT, "bytes_per_step": sent["uncompressed"],
                        "turns": rates["uncompressed"]})
    for algo in _COMPRESSIONS[1:]:
        target = ">= 3.0" if algo == "lz4" and not delay else None
        if algo in skipped:
            yield Figure("wan", f"{name}, {algo}", target=target,
                         na=f"n/a: skipped, RemoteEnvVec has no compression={algo!r} keyword")
            continue
        yield Figure("wan", f"{name}, {algo}", median(rates[algo]) * n, "env-steps/s", "uncompressed, same link",
                     raw, target, extra={"delay_s": delay, "mbit": _MBIT, "bytes_per_step": sent[algo],
                                         "turns": {"remote": rates[algo], "local": rates["uncompressed"]}})


def case_wan(session: Session, note: Callable[[str], None]) -> Iterator[Figure]:
    opts = session.options
    if session.external and not (opts.broker or "").startswith("tcp://"):
        yield Figure("wan", "RemoteEnvVec across an emulated WAN", target=">= 0.9",
                     na="n/a: --broker is not a tcp:// URL (the relay forwards tcp)")
        return
    if session.external:
        url = opts.broker
    else:
        note("start: broker process, 2 workers")
        url = session.embedded(*_BROKER).url
    try:
        yield from _lockstep(session, url, note)
        for delay in (0.0, _DELAY):
            yield from _compression(session, url, delay, note)
    finally:
        if not session.external:
            session.release(*_BROKER)
