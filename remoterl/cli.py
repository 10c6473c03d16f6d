"""``remoterl``: commands for users (``status``, ``top``, ``bench``, ``keygen``, ``demo``)."""

from __future__ import annotations

import json
import logging
import os

import click

from remoterl.client.status import fetch_status
from remoterl.logs import FORMATS, setup_logging

__all__ = ["main"]


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="remoterl")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Log lines as text, or one JSON object per line (time, level, logger, message, exc).")
@click.option("-v", "--verbose", count=True, help="More logging (-v: info, -vv: debug).")
def main(log_format: str, verbose: int) -> None:
    """remoterl: run RL environments on remote simulators."""
    setup_logging(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG, log_format)


def _broker_options(func):
    """The options every command that asks a broker for its status takes."""
    for option in reversed([
        click.option("--broker", default=lambda: os.environ.get("REMOTERL_BROKER", "tcp://127.0.0.1:5555"),
                     show_default="$REMOTERL_BROKER or tcp://127.0.0.1:5555", help="The broker's address."),
        click.option("--timeout", type=float, default=5.0, show_default=True,
                     help="Seconds to wait for the broker (each refresh, with --watch)."),
        click.option("--api-key", default=lambda: os.environ.get("REMOTERL_API_KEY"),
                     show_default="$REMOTERL_API_KEY",
                     help="Your key, for a broker that requires keys (you see your tenant only)."),
        click.option("--curve-serverkey", default=lambda: os.environ.get("REMOTERL_CURVE_SERVERKEY"),
                     show_default="$REMOTERL_CURVE_SERVERKEY",
                     help="The broker's CURVE public key (z85 text or its broker.key file), if it uses CURVE."),
    ]):
        func = option(func)
    return func


def _watch_options(func):
    """The options of the live view (``status --watch``, ``top``)."""
    for option in reversed([
        click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
                     help="Seconds between refreshes."),
        click.option("--count", type=click.IntRange(min=1), default=None,
                     help="Show this many frames, then exit (1 if the broker never answered)."),
        click.option("--once", is_flag=True, help="Show one frame and exit (--count 1)."),
    ]):
        func = option(func)
    return func


def _watch(broker: str, timeout: float, api_key: str | None, curve_serverkey: str | None,
           interval: float, count: int | None, once: bool) -> None:
    from remoterl.errors import AuthenticationError, BrokerUnavailableError
    from remoterl.top import watch

    fetch = lambda: fetch_status(broker, timeout, api_key=api_key, curve_serverkey=curve_serverkey)  # noqa: E731
    try:
        code = watch(fetch, broker, interval=interval, count=1 if once else count,
                     unreachable=(BrokerUnavailableError,))
    except (AuthenticationError, ValueError) as exc:  # a wrong key or URL stays wrong: no retrying
        raise click.ClickException(str(exc)) from exc
    if code:
        raise SystemExit(code)


@main.command()
@_broker_options
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--watch", is_flag=True,
              help="A live view, refreshed every --interval: workers, slots, calls/s, steps/s, latency, errors.")
@_watch_options
def status(broker: str, as_json: bool, timeout: float, api_key: str | None, curve_serverkey: str | None,
           watch: bool, interval: float, count: int | None, once: bool) -> None:
    """Show a broker's workers, services, open slots and call counts (live with --watch)."""
    from remoterl.errors import AuthenticationError, BrokerUnavailableError

    if watch or once or count is not None:  # --count and --once only make sense live: they imply --watch
        if as_json:
            raise click.UsageError("--json prints one snapshot: it cannot be combined with --watch/--count/--once")
        _watch(broker, timeout, api_key, curve_serverkey, interval, count, once)
        return
    try:
        snap = fetch_status(broker, timeout, api_key=api_key, curve_serverkey=curve_serverkey)
    except (BrokerUnavailableError, AuthenticationError, ValueError) as exc:  # ValueError: a bad URL
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(snap, indent=2))
        return
    click.echo(f"broker {snap['broker']} at {broker}: {len(snap['workers'])} worker(s), "
               f"{len(snap['clients'])} client(s), {snap['open_slots']} open slot(s)\n")
    rows = []
    for w in snap["workers"]:
        served = ", ".join(w.get("envs", [])) or w.get("service", "")
        slots = f"{w['slots']}/{w['capacity']}" if "capacity" in w else "-"
        steps = w.get("stats", {}).get("steps", "-")
        p50, p99 = (f"{w[k]:.2f}" if w.get(k) is not None else "-" for k in ("p50_ms", "p99_ms"))
        rows.append([w["id"][:12], w.get("name", ""), w["kind"], served, slots, w["calls"], steps, p50, p99])
    click.echo(_table(rows, ["WORKER", "NAME", "KIND", "SERVES", "SLOTS", "CALLS", "STEPS", "P50 MS", "P99 MS"])
               if rows else "no workers")
    click.echo()
    srows = [[s["name"], s["kind"], s["workers"], s.get("free_slots", s.get("queued", ""))] for s in snap["services"]]
    click.echo(_table(srows, ["SERVICE", "KIND", "WORKERS", "FREE SLOTS / QUEUED"]) if srows else "no services")


@main.command()
@_broker_options
@_watch_options
def top(broker: str, timeout: float, api_key: str | None, curve_serverkey: str | None,
        interval: float, count: int | None, once: bool) -> None:
    """A live view of a broker (the same as `remoterl status --watch`); Ctrl-C quits."""
    _watch(broker, timeout, api_key, curve_serverkey, interval, count, once)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark suite (bench/run.py of a source checkout); `remoterl bench --help` lists its options."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not path.is_file():
        raise click.ClickException(
            f"the benchmark suite is not part of the installed package: it is bench/run.py in a source "
            f"checkout of remoterl (looked for {path}); install with `pip install -e .` from a checkout")
    spec = importlib.util.spec_from_file_location("remoterl_bench_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.exit(module.main(list(args), prog="remoterl bench"))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
def keygen(directory: str) -> None:
    """Write a CURVE key pair for a broker into DIRECTORY (broker.key, broker.key_secret).

    \b
      remoterl-broker --bind tcp://0.0.0.0:5555 --api-keys keys.txt --curve-secret DIR/broker.key_secret
      REMOTERL_CURVE_SERVERKEY=DIR/broker.key remoterl-worker --broker tcp://HOST:5555 ...
    """
    from remoterl.io.security import keygen as make_keys

    public, secret = make_keys(directory)
    click.echo(f"public key (give it to trainers and workers): {public}")
    click.echo(f"secret key (keep it on the broker, --curve-secret): {secret}")


@main.command()
@click.option("--broker", default=lambda: os.environ.get("REMOTERL_BROKER"),
              show_default="$REMOTERL_BROKER, else an embedded broker",
              help="A broker with workers attached; without it an embedded broker and local workers start.")
@click.option("--env", "env_id", default="CartPole-v1", show_default=True, help="Env id to train on.")
@click.option("--timesteps", type=click.IntRange(min=1), default=60_000, show_default=True,
              help="PPO training steps (60k solve CartPole-v1).")
@click.option("--n-envs", type=click.IntRange(min=1), default=8, show_default=True, help="Remote envs.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Local worker processes of the embedded broker.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(broker: str | None, env_id: str, timesteps: int, n_envs: int, workers: int, seed: int) -> None:
    """Train Stable-Baselines3 PPO on remote envs, evaluate it, and show where the steps ran."""
    from remoterl.demo import run_demo

    try:
        report = run_demo(broker=broker, env_id=env_id, timesteps=timesteps, n_envs=n_envs, seed=seed,
                          num_workers=workers, echo=click.echo)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    if env_id == "CartPole-v1" and report["mean_reward"] < 195:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
