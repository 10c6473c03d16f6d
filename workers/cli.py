"""``remoterl-worker``: serve env slots to a broker."""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys

import click

__all__ = ["main"]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--env", "env_ids", multiple=True,
              help="Env id to serve (repeatable). Without any, every env id registered in gymnasium is served.")
@click.option("-n", "--slots", "n", type=click.IntRange(min=1), default=8,
              help="Env slots (env instances) this worker hosts in all.")
@click.option("--broker", default=lambda: os.environ.get("REMOTERL_BROKER", "tcp://127.0.0.1:5555"),
              show_default="$REMOTERL_BROKER or tcp://127.0.0.1:5555", help="The broker's address.")
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="Worker processes sharing the slots. [default: min(slots, CPU count)]")
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
@click.option("-v", "--verbose", count=True, help="More logging (-v: info, -vv: debug).")
def main(env_ids: tuple[str, ...], n: int, broker: str, procs: int | None, imports: tuple[str, ...],
         allow_import: tuple[str, ...], heartbeat: float, liveness: int, name: str | None, api_key: str | None,
         curve_serverkey: str | None, verbose: int) -> None:
    """Host environment slots for trainers, through a broker.

    \b
      remoterl-worker --env CartPole-v1 -n 8 --broker tcp://127.0.0.1:5555
      remoterl-worker --import mypkg.envs --env MyEnv-v0 -n 4 --procs 2

    An exception inside an env is sent to the trainer with its traceback; the
    worker keeps serving its other slots. When the broker restarts, the worker
    registers again by itself. SIGTERM finishes the call in flight, says
    DISCONNECT and exits 0.
    """
    import gymnasium

    from remoterl.workers.pool import REFUSED_EXIT_CODE, WorkerPool, WorkerSpec, run_worker, split_capacity
    from remoterl.workers.runtime import import_modules

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    procs = procs or min(n, os.cpu_count() or 1)
    procs = min(procs, n)
    capacities = split_capacity(n, procs)
    specs = [WorkerSpec(broker, served, cap, list(imports), list(allow_import), heartbeat, liveness,
                        f"{name}-{i}" if name and procs > 1 else name, level, api_key or None,
                        curve_serverkey or None)
             for i, cap in enumerate(capacities)]
    what = ", ".join(env_ids) if env_ids else "every registered env id"
    click.echo(f"remoterl worker: {n} slots of {what} in {procs} process(es), broker {broker}", err=True)
    sys.stderr.flush()
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


if __name__ == "__main__":
    main()
