"""``remoterl-broker``: run a broker on this machine."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import ssl
import uuid
from urllib.parse import urlsplit

import click

from remoterl.logs import FORMATS, announce, setup_logging
from remoterl.wire import protocol as p

__all__ = ["is_loopback", "main"]


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (127.0.0.0/8, ::1, localhost, ipc, inproc)."""
    if not endpoint.startswith(("tcp://", "ws://", "wss://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", a host name or an interface: reachable from elsewhere


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--bind", "bind", default="tcp://127.0.0.1:5555",
              help="ZeroMQ endpoint to listen on. Use tcp://0.0.0.0:5555 to accept other hosts "
                   "(then --api-keys, or --insecure).")
@click.option("--heartbeat", type=click.FloatRange(min=0.01), default=1.0,
              help="Seconds between heartbeats.")
@click.option("--liveness", type=click.IntRange(min=1), default=3,
              help="Heartbeats a peer may miss before it is declared dead.")
@click.option("--max-message-size", type=click.IntRange(min=1024), default=p.MAX_MESSAGE_SIZE,
              help="Largest message accepted, in bytes. A frame over it makes libzmq drop the "
                   "connection (ZMQ_MAXMSGSIZE); a client message whose frames add up to more gets an "
                   "error reply.")
@click.option("--api-keys", "api_keys", default=lambda: os.environ.get("REMOTERL_API_KEYS"),
              show_default="$REMOTERL_API_KEYS",
              help="File of 'KEY TENANT' lines (re-read on SIGHUP). Every trainer and worker must then "
                   "present a key, over tcp already at the connection handshake (ZeroMQ PLAIN, unless "
                   "--curve-secret); tenants never see each other's workers.")
@click.option("--insecure", is_flag=True,
              help="Allow binding a non-loopback address without API keys (anyone can connect).")
@click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False),
              help="Encrypt tcp with ZeroMQ CURVE using this .key_secret file (`remoterl keygen`); "
                   "trainers and workers need the matching public key.")
@click.option("--ws", default=None, metavar="HOST:PORT",
              help="Also serve WebSocket peers on HOST:PORT (ws://, or wss:// with --tls-cert/--tls-key), "
                   "e.g. 0.0.0.0:8765.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM certificate chain for wss://.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--max-slots-per-tenant", type=click.IntRange(min=1), default=None,
              help="Open slots one tenant may hold at once. [default: no limit]")
@click.option("--max-new-connections", type=click.FloatRange(min=1), default=200.0,
              help="New trainer/worker sessions accepted per second.")
@click.option("--metrics", default=None, metavar="[HOST:]PORT",
              help="Serve Prometheus metrics over HTTP: PORT alone listens on 127.0.0.1; give a HOST "
                   "(e.g. 0.0.0.0:9464) to let other machines scrape. A request with 'Authorization: Bearer "
                   "KEY' gets that key's tenant's series only. See docs/METRICS.md. [default: off]")
@click.option("--metrics-tenant-labels", is_flag=True,
              help="Label the metrics with tenant names (for trusted scrapers only: every scraper of the "
                   "endpoint sees every tenant's name).")
@click.option("--log-format", type=click.Choice(FORMATS), default="text",
              help="Log lines as text, or one JSON object per line (time, level, logger, message, exc).")
@click.option("-v", "--verbose", count=True, help="More logging (-v: info, -vv: debug).")
def main(bind: str, heartbeat: float, liveness: int, max_message_size: int, api_keys: str | None,
         insecure: bool, curve_secret: str | None, ws: str | None, tls_cert: str | None, tls_key: str | None,
         max_slots_per_tenant: int | None, max_new_connections: float, metrics: str | None,
         metrics_tenant_labels: bool, log_format: str, verbose: int) -> None:
    """Route trainers' environment calls to simulator workers.

    Start it, then start workers and trainers against its address:

    \b
      remoterl-broker --bind tcp://127.0.0.1:5555
      remoterl-worker --env CartPole-v1 -n 8 --broker tcp://127.0.0.1:5555
      remoterl status --broker tcp://127.0.0.1:5555

    SIGINT or SIGTERM stops it cleanly: workers are told, sockets closed, exit 0.
    SIGHUP re-reads the --api-keys file.
    """
    from remoterl.broker.core import BrokerConfig
    from remoterl.broker.loop import Broker
    from remoterl.io.security import load_api_keys

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    setup_logging(level, log_format)

    def say(message: str) -> None:
        announce("remoterl.broker.cli", message, log_format)

    if metrics_tenant_labels and not metrics:
        raise click.UsageError("--metrics-tenant-labels needs --metrics")
    keys = None
    if api_keys:
        try:
            keys = load_api_keys(api_keys)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"--api-keys: {exc}") from exc
    elif not is_loopback(bind) and not insecure:
        raise click.ClickException(
            f"refusing to bind {bind} without API keys: anyone who can reach it could use your workers. "
            f"Give --api-keys FILE (lines 'KEY TENANT'), or --insecure if the network is private.")
    if ws and not keys and not insecure and not is_loopback(f"ws://{ws}"):
        raise click.ClickException(f"refusing to serve WebSocket on {ws} without API keys; "
                                   f"give --api-keys FILE, or --insecure")
    if (tls_cert or tls_key) and not (ws and tls_cert and tls_key):
        raise click.ClickException("--tls-cert and --tls-key go together, with --ws")
    config = BrokerConfig(heartbeat=heartbeat, liveness=liveness, max_message_size=max_message_size,
                          api_keys=keys, max_slots_per_tenant=max_slots_per_tenant,
                          max_new_peers_per_second=max_new_connections)
    # The WebSocket bridge reaches the broker's one ROUTER socket over inproc.
    ws_inproc = f"inproc://remoterl-bridge-{uuid.uuid4().hex}" if ws else None
    broker = Broker(bind, config, curve_secret=curve_secret, also=(ws_inproc,) if ws_inproc else ())
    try:
        url = broker.bind()
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint...
        raise click.ClickException(f"cannot bind {bind}: {exc}") from exc
    bridge = None
    if ws:
        from remoterl.broker.bridge import WsBridge

        host, _, port = ws.rpartition(":")
        try:
            tls = None
            if tls_cert:
                tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                tls.load_cert_chain(tls_cert, tls_key)
            bridge = WsBridge(host.strip("[]") or "0.0.0.0", int(port), ws_inproc, ssl_context=tls,
                              max_message_size=max_message_size)
            say(f"remoterl broker WebSocket bridge on {bridge.start()}")
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise click.ClickException(f"cannot serve WebSocket on {ws}: {exc}") from exc

    def _stop(signum: int, _frame: object) -> None:
        broker.stop(join=False)

    def _reload(signum: int, _frame: object) -> None:
        if not api_keys:
            return
        try:
            fresh = load_api_keys(api_keys)
            broker.core.set_api_keys(fresh)
            logging.getLogger("remoterl.broker").warning("API keys re-read (%d keys)", len(fresh))
        except (OSError, ValueError) as exc:
            logging.getLogger("remoterl.broker").error("SIGHUP: keeping the old API keys: %s", exc)

    server = None
    if metrics:
        from remoterl.broker.metrics import broker_metrics_server

        try:
            server = broker_metrics_server(metrics, broker.core, tenant_labels=metrics_tenant_labels)
        except (OSError, ValueError) as exc:
            if bridge is not None:
                bridge.stop()
            raise click.ClickException(f"--metrics {metrics}: cannot serve metrics there: {exc}") from exc
        say(f"remoterl broker metrics on {server.url}")

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _reload)
    mode = f"{len(keys)} API keys" if keys else "open (no API keys)"
    say(f"remoterl broker listening on {url} (heartbeat {heartbeat:g} s, liveness {liveness}; {mode}"
        f"{'; CURVE' if curve_secret else ''})")
    broker.run()
    if bridge is not None:
        bridge.stop()  # after the broker, so its DISCONNECTs still reach WebSocket workers
    if server is not None:
        server.close()
    say("remoterl broker stopped")


if __name__ == "__main__":
    main()
