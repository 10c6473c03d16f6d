"""``remoterl-broker``: run a broker on this machine."""

from __future__ import annotations

import logging
import signal
import sys

import click

__all__ = ["main"]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--bind", "bind", default="tcp://127.0.0.1:5555",
              help="ZeroMQ endpoint to listen on. Use tcp://0.0.0.0:5555 to accept other hosts.")
@click.option("--heartbeat", type=click.FloatRange(min=0.01), default=1.0,
              help="Seconds between heartbeats.")
@click.option("--liveness", type=click.IntRange(min=1), default=3,
              help="Heartbeats a peer may miss before it is declared dead.")
@click.option("--max-message-size", type=click.IntRange(min=1024), default=64 * 1024 * 1024,
              help="Largest message accepted, in bytes. A frame over it makes libzmq drop the "
                   "connection (ZMQ_MAXMSGSIZE); a client message whose frames add up to more gets an "
                   "error reply.")
@click.option("-v", "--verbose", count=True, help="More logging (-v: info, -vv: debug).")
def main(bind: str, heartbeat: float, liveness: int, max_message_size: int, verbose: int) -> None:
    """Route trainers' environment calls to simulator workers.

    Start it, then start workers and trainers against its address:

    \b
      remoterl-broker --bind tcp://127.0.0.1:5555
      remoterl-worker --env CartPole-v1 -n 8 --broker tcp://127.0.0.1:5555
      remoterl status --broker tcp://127.0.0.1:5555

    SIGINT or SIGTERM stops it cleanly: workers are told, sockets closed, exit 0.
    """
    from remoterl.broker.core import BrokerConfig
    from remoterl.broker.loop import Broker

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = BrokerConfig(heartbeat=heartbeat, liveness=liveness, max_message_size=max_message_size)
    broker = Broker(bind, config)
    try:
        url = broker.bind()
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint...
        raise click.ClickException(f"cannot bind {bind}: {exc}") from exc

    def _stop(signum: int, _frame: object) -> None:
        broker.stop(join=False)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    click.echo(f"remoterl broker listening on {url} (heartbeat {heartbeat:g} s, liveness {liveness})", err=True)
    sys.stderr.flush()
    broker.run()
    click.echo("remoterl broker stopped", err=True)


if __name__ == "__main__":
    main()
