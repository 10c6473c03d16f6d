"""``remoterl-worker``: serve env slots to a broker."""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys

import click

from remoterl.logs import FORMATS, announce, setup_logging

__all__ = ["main"]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--env", "env_ids", multiple=True,
              help="Env id to serve (repeatable). Without any, every env id registered in gymnasium is served.")
@click.option("-n", "--slots", "n", type=click.IntRange(min=1), default=8,
              help="Env slots (env instances) this worker hosts in all.")
@click.option("--broker", default=lambda: os.environ.get("REMOTERL_BROKER", "tcp://127.0.0.1:5555"),
              show_default="$REMOTERL_BROKER or tcp://127.0.0.1:5555", help="The broker's address.")
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="Worker processes sharing the slots (with --ray: Ray actors). [default: min(slots, CPU count); "
                   "with --ray: min(slots, the cluster's CPUs, the cluster's CPUs / --ray-cpus)]")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import this module first so the env ids it registers are served (repeatable).")
@click.option("--allow-import", "allow_import", multiple=True, metavar="MODULE",
              help="Let trainers' gymnasium.register() name entry points in this module or package "
                   "(repeatable). Modules given to --import are allowed too; nothing else is.")
@click.option("--heartbeat", type=click.FloatRange(min=0.01), default=1.0,
              help="Seconds between heartbeats (the broker's setting wins once connected).")
@click.option("--liveness", type=click.IntRange(min=1), default=3,
              help="Heartbeats the broker may miss before the worker reconnects.")
@click.option("--name", default=None, help="A name shown by `remoterl status`. [default: HOST:PID]")
@click.option("--api-key", default=lambda: os.environ.get("REMOTERL_API_KEY"), show_default="$REMOTERL_API_KEY",
              help="The key this worker presents to a broker that requires keys.")
@click.option("--curve-serverkey", default=lambda: os.environ.get("REMOTERL_CURVE_SERVERKEY"),
              show_default="$REMOTERL_CURVE_SERVERKEY",
              help="The broker's CURVE public key (z85 text or its broker.key file): encrypts tcp traffic.")
@click.option("--ray", "ray_address", metavar="ADDRESS", default=None,
              help="Run the worker processes as Ray actors spread over a Ray cluster: 'auto' (the cluster "
                   "this node belongs to, or $RAY_ADDRESS), 'HOST:PORT', 'ray://HOST:PORT', or 'local' (a private "
                   "Ray instance in this process). --procs is then the number of actors. "
                   "Needs Ray: pip install 'remoterl[ray]'.")
@click.option("--ray-cpus", type=click.FloatRange(min=0.0), default=None,
              help="CPUs each Ray actor asks of Ray (fractions allowed). [default: 1]")
@click.option("--ray-timeout", type=click.FloatRange(min=1.0), default=None,
              help="Seconds to wait for every Ray actor's worker to register. [default: 300]")
@click.option("--metrics", default=None, metavar="[HOST:]PORT",
              help="Serve Prometheus metrics over HTTP: PORT alone listens on 127.0.0.1; give a HOST "
                   "(e.g. 0.0.0.0:9465) to let other machines scrape. With several processes, process i "
                   "serves PORT+i. Not with --ray. See docs/METRICS.md. [default: off]")
@click.option("--log-format", type=click.Choice(FORMATS), default="text",
              help="Log lines as text, or one JSON object per line (time, level, logger, message, exc).")
@click.option("-v", "--verbose", count=True, help="More logging (-v: info, -vv: debug).")
def main(env_ids: tuple[str, ...], n: int, broker: str, procs: int | None, imports: tuple[str, ...],
         allow_import: tuple[str, ...], heartbeat: float, liveness: int, name: str | None, api_key: str | None,
         curve_serverkey: str | None, ray_address: str | None, ray_cpus: float | None, ray_timeout: float | None,
         metrics: str | None, log_format: str, verbose: int) -> None:
    """Host environment slots for trainers, through a broker.

    \b
      remoterl-worker --env CartPole-v1 -n 8 --broker tcp://127.0.0.1:5555
      remoterl-worker --import mypkg.envs --env MyEnv-v0 -n 4 --procs 2
      remoterl-worker --ray auto --env CartPole-v1 -n 512 --broker tcp://HEAD:5555

    An exception inside an env is sent to the trainer with its traceback; the
    worker keeps serving its other slots. When the broker restarts, the worker
    registers again by itself. SIGTERM finishes the call in flight, says
    DISCONNECT and exits 0.

    With --ray, each worker process is a Ray actor (ray-0, ray-1, ... or NAME-0,
    NAME-1, ... in `remoterl status`) that Ray restarts if it dies. The command
    says so once every actor's worker has registered, then runs until SIGINT or
    SIGTERM, which stop the actors (exit 0). Try it on a laptop with --ray local.
    """
    import gymnasium

    from remoterl.workers.pool import REFUSED_EXIT_CODE, WorkerPool, WorkerSpec, run_worker, split_capacity
    from remoterl.workers.runtime import import_modules

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    setup_logging(level, log_format)

    def say(message: str) -> None:
        announce("remoterl.workers.cli", message, log_format)

    if metrics and ray_address is not None:
        raise click.UsageError("--metrics is not available with --ray")
    if imports and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder import
    try:
        import_modules(list(imports))
    except ImportError as exc:
        raise click.ClickException(f"--import: {exc}") from exc
    for env_id in env_ids:
        if env_id not in gymnasium.registry:
            close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise click.ClickException(
                f"unknown env id {env_id!r}.{hint} (Use --import MODULE for env ids your own code registers.)")
    served = list(env_ids) or None
    if ray_address is None and (ray_cpus is not None or ray_timeout is not None):
        raise click.UsageError("--ray-cpus and --ray-timeout need --ray ADDRESS")
    if ray_address is not None:
        def make_spec(i: int, capacity: int) -> WorkerSpec:
            return WorkerSpec(broker, served, capacity, list(imports), list(allow_import), heartbeat, liveness,
                              f"{name or 'ray'}-{i}", level, api_key or None, curve_serverkey or None)

        _serve_on_ray(ray_address, 1.0 if ray_cpus is None else ray_cpus, 300.0 if ray_timeout is None else ray_timeout,
                      n, procs, make_spec, broker, ", ".join(env_ids) if env_ids else "every registered env id")
        return
    procs = procs or min(n, os.cpu_count() or 1)
    procs = min(procs, n)
    capacities = split_capacity(n, procs)
    addresses = _metrics_addresses(metrics, procs) if metrics else [None] * procs
    specs = [WorkerSpec(broker, served, cap, list(imports), list(allow_import), heartbeat, liveness,
                        f"{name}-{i}" if name and procs > 1 else name, level, api_key or None,
                        curve_serverkey or None, metrics=addresses[i], log_format=log_format)
             for i, cap in enumerate(capacities)]
    what = ", ".join(env_ids) if env_ids else "every registered env id"
    say(f"remoterl worker: {n} slots of {what} in {procs} process(es), broker {broker}")
    if metrics:
        say(f"remoterl worker: metrics on {', '.join(f'http://{a}/metrics' for a in addresses)}")
    if procs == 1:
        try:
            run_worker(specs[0])
        except SystemExit as exc:
            if exc.code == REFUSED_EXIT_CODE:
                raise click.ClickException("the broker refused this worker (see the error above)") from exc
            raise
        return
    pool = WorkerPool(specs)

    def _stop(signum: int, _frame: object) -> None:
        pool.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    pool.start()
    code = pool.supervise()
    if code == REFUSED_EXIT_CODE:
        raise click.ClickException("the broker refused the worker processes (see the errors above)")
    sys.exit(code)


def _metrics_addresses(metrics: str, procs: int) -> list[str]:
    """``HOST:PORT+i`` for each worker process, each checked free now (a clear error here
    rather than a child process failing later)."""
    import socket

    from remoterl.broker.metrics import parse_address

    try:
        host, port = parse_address(metrics)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics") from exc
    if port == 0 or port + procs - 1 > 65535:
        raise click.BadParameter(f"needs a port from 1 to {65536 - procs} for {procs} process(es)",
                                 param_hint="--metrics")
    shown = f"[{host}]" if ":" in host else host
    addresses = [f"{shown}:{port + i}" for i in range(procs)]
    for address, p in zip(addresses, range(port, port + procs)):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
                probe.bind((host, p))
        except OSError as exc:
            raise click.ClickException(f"--metrics {metrics}: cannot serve metrics on {address}: {exc}") from exc
    return addresses


def _serve_on_ray(address: str, cpus: float, timeout: float, n: int, procs: int | None, make_spec, broker: str,
                  what: str) -> None:
    """``--ray``: start the actors, wait for SIGINT/SIGTERM, stop them; exit 0."""
    import threading

    from remoterl.workers.pool import split_capacity
    from remoterl.workers.raypool import RayPoolError, RayWorkerPool, cluster_cpus, connect

    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stopping.set()

    click.echo(f"remoterl worker: connecting to Ray ({address})...", err=True)
    try:
        owns_ray = connect(address)
    except RayPoolError as exc:
        raise click.ClickException(str(exc)) from exc
    # After ray.init, which installs handlers of its own.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        cpus_total = cluster_cpus()
        if procs is None:
            fit = cpus_total / cpus if cpus > 0 else cpus_total
            procs = max(1, int(min(n, cpus_total, fit)))
        procs = min(procs, n)
        specs = [make_spec(i, cap) for i, cap in enumerate(split_capacity(n, procs))]
        click.echo(f"remoterl worker: {n} slots of {what} in {procs} Ray actor(s) ({cpus:g} CPU each, the cluster "
                   f"has {cpus_total:g}), broker {broker}", err=True)
        if procs * cpus > cpus_total:
            click.echo(f"remoterl worker: warning: {procs} actors × {cpus:g} CPU > the cluster's {cpus_total:g} CPUs: "
                       f"the rest wait for Ray to find room (an autoscaling cluster adds nodes; else lower --procs "
                       f"or --ray-cpus)", err=True)
        pool = RayWorkerPool(specs, address=address, cpus_per_actor=cpus)
        bar = None
        if sys.stderr.isatty() and procs > 8:
            from tqdm import tqdm

            bar = tqdm(total=procs, desc="workers registered", unit="actor", file=sys.stderr)

        def _progress(i: int, info: dict) -> None:
            if bar is not None:
                bar.update(1)
            else:
                slots = f"{info['capacity']} slot{'' if info['capacity'] == 1 else 's'}"
                click.echo(f"  {info['name']}: {slots}, pid {info['pid']} on {info['host']}", err=True)

        try:
            pool.start(timeout=timeout, progress=_progress, cancelled=stopping.is_set)
        except RayPoolError as exc:
            if stopping.is_set():
                return
            raise click.ClickException(str(exc)) from exc
        finally:
            if bar is not None:
                bar.close()
        hosts = sorted({info["host"] for info in pool.infos if info})
        click.echo(f"remoterl worker: {procs} Ray actor(s) with {n} slots registered with {broker}, on "
                   f"{len(hosts)} node(s): {', '.join(hosts[:8])}{', ...' if len(hosts) > 8 else ''}. "
                   f"Ctrl-C (or SIGTERM) stops them.", err=True)
        try:
            while not stopping.wait(1.0):
                pass
        finally:
            click.echo("remoterl worker: stopping the Ray actors...", err=True)
            pool.stop()
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
