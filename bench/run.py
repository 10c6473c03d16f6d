"""remoterl benchmark suite: every remote figure beside its local baseline, measured in the same run.

    python bench/run.py                       # everything, embedded broker and workers
    python bench/run.py --quick               # the whole suite in about 25 s (smoke test)
    python bench/run.py --pin 0               # this process and every child on CPU 0
    python bench/run.py --case latency --case throughput --duration 5
    python bench/run.py --broker tcp://127.0.0.1:5555   # workers must already be attached

Prints a table (remote, baseline, ratio, target, PASS/FAIL) and writes it as JSON with the
machine it ran on (``--json``, default ``bench/results/latest.json``). Exit status: 0 when
every figure was produced (targets missed included, unless ``--strict``), 1 otherwise.
See bench/README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the bench modules, also for `remoterl bench` and for embedded workers

from cases import CASES, run_case  # noqa: E402  (after the path fix above)
from measure import Figure, Options, Session  # noqa: E402

__all__ = ["main", "machine_info", "parse_args"]

DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")


def parse_args(argv: list[str] | None = None, prog: str = "bench/run.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="remoterl throughput and latency, each beside its local baseline.")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measurement (default: 2.0; 0.15 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved turns per measurement (remote, local, remote, ...); "
                             "the median turn is reported (default: 3; 1 with --quick)")
    parser.add_argument("--case", dest="cases", action="append", choices=CASES, metavar="CASE",
                        help=f"run only this case (repeatable): {', '.join(CASES)}")
    parser.add_argument("--env", dest="env_id", default="CartPole-v1",
                        help="env id for latency and throughput (default: %(default)s)")
    parser.add_argument("--num-envs", type=_sizes, default=None,
                        help="vector sizes for the throughput case, comma-separated "
                             "(default: 1,8,64; 1,8 with --quick)")
    parser.add_argument("--workers", type=int, default=2,
                        help="embedded workers; the throughput case also spreads 8 and 64 envs over this many "
                             "(default: %(default)s)")
    parser.add_argument("--broker", default=None, metavar="URL",
                        help="use this broker (its workers already attached) instead of an embedded one")
    parser.add_argument("--pin", default=None, metavar="CPUS",
                        help="pin this process, and so every child (workers, broker, baselines), "
                             "to CPUS: 0, 0,1 or 0-1")
    parser.add_argument("--quick", action="store_true", help="short measurements, fewer sizes, a smaller scale case")
    parser.add_argument("--json", dest="json_path", default=DEFAULT_JSON, metavar="PATH",
                        help="write results here (default: bench/results/latest.json)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 0.15 if args.quick else 2.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.num_envs is None:
        args.num_envs = (1, 8) if args.quick else (1, 8, 64)
    if args.duration <= 0 or args.workers < 1 or args.rounds < 1:
        parser.error("--duration must be positive, --workers and --rounds at least 1")
    return args


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,8,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


# --- machine info ------------------------------------------------------------------------------------

def machine_info(pin: str | None) -> dict[str, Any]:
    """What the figures were measured on."""
    import gymnasium
    import numpy
    import zmq

    import remoterl

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "pinning": f"CPUs {pin} (this process and every child)" if pin else "none",
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "gymnasium": gymnasium.__version__,
        "numpy": numpy.__version__,
        "remoterl": remoterl.__version__,
        "git_commit": _git_commit(),
    }
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


# --- the table ---------------------------------------------------------------------------------------

def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if float(x).is_integer() and abs(x) < 100:
        return f"{x:.0f} {unit}".rstrip()
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}" if abs(x) >= 10 else f"{x:,.2f}"
    return f"{text} {unit}".rstrip()


def _target(target: str | None) -> str:
    if target is None:
        return ""
    op, limit = target.split()
    return f"{'≥' if op == '>=' else '≤'} {limit}×"


def _ratio(f: Figure) -> str:
    if f.ratio is None:
        return ""
    text = f"{f.ratio:.2f}"
    if f.passed is not None and Figure(f.case, f.name, float(text), baseline=1.0, target=f.target).passed != f.passed:
        text = f"{f.ratio:.4f}"  # two decimals would round across the target (0.5996 shown as 0.60 FAIL)
    return text + "×"


def table(figures: list[Figure]) -> str:
    """The figures as a fixed-width text table (also valid Markdown)."""
    headers = ["case", "figure", "remote", "baseline (local, same run)", "ratio", "target", "result"]
    rows = []
    for f in figures:
        if f.na is not None:
            rows.append([f.case, f.name, f.na, "", "", _target(f.target), "n/a"])
            continue
        base = f"{f.baseline_name}: {_num(f.baseline, f.unit)}" if f.baseline_name else "—"
        ratio = _ratio(f)
        result = "" if f.passed is None else "PASS" if f.passed else "FAIL"
        rows.append([f.case, f.name, _num(f.value, f.unit), base, ratio, _target(f.target), result])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cpu_count']} × {info['cpu_model']}, pinning: {info['pinning']}, load {info['load_average']}; "
            f"Python {info['python']}, pyzmq {info['pyzmq']} (libzmq {info['libzmq']}), gymnasium "
            f"{info['gymnasium']}, numpy {info['numpy']}; remoterl {info['remoterl']} @ {info['git_commit']}; "
            f"{info['date']}")


# --- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, prog: str = "bench/run.py") -> int:
    """Run the suite; return the exit status (0: every figure produced).

    Args:
        argv: the options (default: ``sys.argv[1:]``).
        prog: the command's name in ``--help`` (``remoterl bench`` passes its own).
    """
    args = parse_args(argv, prog)
    if args.pin:
        os.sched_setaffinity(0, _cpus(args.pin))  # before any child or thread starts: all inherit it
    info = machine_info(args.pin)
    options = Options(duration=args.duration, warmup=min(0.3, args.duration / 2), rounds=args.rounds,
                      quick=args.quick, env_id=args.env_id, num_envs=args.num_envs, workers=args.workers,
                      broker=args.broker)
    selected = [c for c in CASES if not args.cases or c in args.cases]
    figures: list[Figure] = []
    errors: list[str] = []
    case_seconds: dict[str, float] = {}
    started = time.perf_counter()
    session = Session(options)
    bar = _progress(len(selected), args.no_progress)
    try:
        for name in selected:
            bar.set_description(name)
            case_started = time.perf_counter()
            try:
                for figure in run_case(name, session, lambda what: bar.set_postfix_str(what, refresh=True)):
                    figures.append(figure)
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                figures.append(Figure(name, f"case {name!r} failed", na=f"error: {type(exc).__name__}: {exc}"))
                traceback.print_exc()
            finally:
                session.end_case()
                case_seconds[name] = round(time.perf_counter() - case_started, 2)
            bar.update(1)
    finally:
        bar.close()
        session.close()
    elapsed = time.perf_counter() - started
    print(f"\nremoterl bench — {machine_line(info)}; {elapsed:.1f} s\n")
    print(table(figures))
    missed = [f for f in figures if f.passed is False]
    passed = [f for f in figures if f.passed]
    print(f"\ntargets: {len(passed)} passed, {len(missed)} missed"
          + (f"; {len(errors)} case(s) failed" if errors else ""))
    result = {"machine": info, "options": {**vars(args), "cases": selected}, "seconds": elapsed,
              "case_seconds": case_seconds, "figures": [f.to_json() for f in figures], "errors": errors}
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2, default=_jsonable)
        print(f"results: {args.json_path}")
    if errors:
        return 1
    return 1 if args.strict and missed else 0


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


class _NoBar:
    def set_description(self, *_: Any) -> None: ...
    def set_postfix_str(self, *_: Any, **__: Any) -> None: ...
    def update(self, *_: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, disabled: bool) -> Any:
    if disabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
