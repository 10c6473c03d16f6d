"""Prometheus metrics: fixed-bucket histograms, the broker's collector, and the HTTP endpoint.

Theory of operation
-------------------
The broker's loop thread never touches Prometheus. The core keeps plain integers and
:class:`Histogram` objects on the tables it already has (``RLWorker.calls``,
``RLWorker.env_calls``, ``RLWorker.call_time``, ``BrokerCore.counters``, the tenants'
counters); :class:`BrokerCollector` reads them when a scrape comes, in the HTTP server's
thread, and turns them into metric families. So the per-call path pays an increment, a
deque append and, per REPLY, one ``bisect``; scraping pays the rest.

*Reading while the loop writes.* The collector copies each table in one C-level step
(``list(d.values())``, ``dict(counter)``, a list slice), which the GIL makes atomic
with respect to the loop thread, and reads plain attributes of the objects it got. A
scrape may so see a histogram's ``_sum`` one observation ahead of its buckets, never a
torn table. No lock is taken, so the loop never waits for a scrape.

*Series come and go with peers.* A worker's series (``worker`` label) exist while the
worker is connected; when it leaves they vanish, as a restarted process's would.
Prometheus' ``rate()`` and ``increase()`` handle both.

*Tenants.* By default nothing is labelled with a tenant: the endpoint is the operator's,
bound to loopback unless told otherwise. ``tenant_labels`` adds a ``tenant`` label to
every series that belongs to one (for trusted scrapers). A request carrying
``Authorization: Bearer KEY`` gets only the series of that key's tenant, with no tenant
label and nothing broker-wide (bytes, Majordomo, refusals before a tenant was known); a
key the broker does not know gets 401. Keys are checked as everywhere else (hashed,
constant time) and never logged.

The metric names and labels are listed in ``docs/METRICS.md``.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, ThreadingWSGIServer
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "BrokerCollector", "Histogram", "MetricsServer", "add_histogram", "broker_metrics_server",
           "metrics_app", "parse_address", "worker_label"]

# Upper bounds (seconds) of the histogram buckets: 50 µs to 10 s, about three per decade.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)
_LE = [repr(b) for b in BUCKETS] + ["+Inf"]


class Histogram:
    """Counts of durations in the fixed :data:`BUCKETS`, and their sum: what an observation costs
    is one ``bisect`` and two additions. Not thread-safe to write; read it with :meth:`snapshot`."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: above 10 s
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a duration equal to a bound counts in that bucket (Prometheus' "le").
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def observe_many(self, seconds: float, n: int) -> None:
        """Count ``n`` observations of ``seconds`` each."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += n
        self.sum += seconds * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> tuple[list[int], float]:
        """The bucket counts (not cumulative) and the sum, copied."""
        return self.counts[:], self.sum

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile in seconds, interpolated within its bucket as Prometheus'
        ``histogram_quantile`` does; None when nothing was observed. Past the last bound:
        that bound (10 s)."""
        counts = self.counts[:]
        total = sum(counts)
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(counts):
            if n and seen + n >= rank:
                if i == len(BUCKETS):
                    return BUCKETS[-1]
                lower = BUCKETS[i - 1] if i else 0.0
                return lower + (BUCKETS[i] - lower) * (rank - seen) / n
            seen += n
        return BUCKETS[-1]


def add_histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    """Add ``hist``'s snapshot to ``family`` as one series, buckets made cumulative."""
    counts, total = hist.snapshot()
    cumulative, buckets = 0, []
    for le, n in zip(_LE, counts):
        cumulative += n
        buckets.append((le, cumulative))
    family.add_metric(labels, buckets, sum_value=total)


def worker_label(worker: Any) -> str:
    """A worker as ``remoterl status`` names it: its name, else the start of its routing id."""
    return worker.info.get("name") or worker.id.hex()[:12]


# refused_total{reason}: the broker-wide counters behind each reason (Refusal codes are counted
# as "refused_<code>" by the core).
_REFUSED_COUNTERS = {"calls_refused": "call_no_slot", "calls_limited": "call_limit", "handshakes_refused": "handshake"}
_REFUSED_PER_TENANT = ("calls_refused", "calls_limited")


class BrokerCollector(Collector):
    """The broker's metrics, read from ``core`` at each scrape (module docstring).

    Args:
        core: a :class:`~remoterl.broker.core.BrokerCore` (read, never changed).
        tenant: only this tenant's series, without tenant labels (a tenant-scoped scrape);
            None: every tenant.
        tenant_labels: label series with their ``tenant`` (ignored with ``tenant``).
    """

    def __init__(self, core: Any, tenant: str | None = None, tenant_labels: bool = False) -> None:
        self.core = core
        self.tenant = tenant
        self.tenant_labels = tenant_labels and tenant is None

    def collect(self) -> Iterator[Any]:
        core, scope = self.core, self.tenant
        # Each table copied once, in one C-level step (module docstring).
        workers = [w for w in list(core.workers.values()) if scope is None or w.tenant == scope]
        clients = [c for c in list(core.clients.values()) if scope is None or c.tenant == scope]
        counters = dict(core.counters)
        per_tenant = {k: dict(v) for k, v in list(core.tenant_counters.items()) if scope is None or k == scope}
        yield from self._calls(workers)
        yield self._slots({w.id: w.tenant for w in workers})
        yield self._by_tenant("remoterl_broker_workers", "Connected remoterl workers.", workers)
        yield self._by_tenant("remoterl_broker_clients", "Connected remoterl clients (trainer sessions).", clients)
        yield from self._liveness(counters, per_tenant)
        yield self._refusals(counters, per_tenant)
        if scope is None:  # the rest is broker-wide: nothing a tenant may see
            yield from self._broker_wide(counters)

    @property
    def _t(self) -> list[str]:
        """The extra label names: ``["tenant"]`` with tenant labels, else none."""
        return ["tenant"] if self.tenant_labels else []

    def _labels(self, tenant: str, *values: str) -> list[str]:
        return [*values, tenant] if self.tenant_labels else list(values)

    def _calls(self, workers: list) -> Iterator[Any]:
        calls = CounterMetricFamily("remoterl_broker_calls", "CALLs forwarded to workers.",
                                    labels=["env_id", "worker", *self._t])
        durations = HistogramMetricFamily("remoterl_broker_call_duration_seconds",
                                          "Time from a CALL forwarded to its REPLY, as the broker sees it.",
                                          labels=["worker", *self._t])
        for w in workers:
            name = worker_label(w)
            for env, cell in dict(w.env_calls).items():
                calls.add_metric(self._labels(w.tenant, env, name), cell[0])
            add_histogram(durations, self._labels(w.tenant, name), w.call_time)
        yield calls
        yield durations

    def _slots(self, tenant_of_worker: dict[bytes, str]) -> GaugeMetricFamily:
        open_slots: dict[tuple[str, str], int] = {}
        for slot in list(self.core.slots.values()):
            tenant = tenant_of_worker.get(slot.worker)  # None: another tenant's
            if slot.open and tenant is not None:
                key = (slot.env, tenant if self.tenant_labels else "")
                open_slots[key] = open_slots.get(key, 0) + 1
        family = GaugeMetricFamily("remoterl_broker_slots", "Open env slots.", labels=["env_id", *self._t])
        for (env, tenant), n in sorted(open_slots.items()):
            family.add_metric(self._labels(tenant, env), n)
        return family

    def _liveness(self, counters: dict, per_tenant: dict) -> Iterator[Any]:
        scope = self.tenant
        misses = CounterMetricFamily("remoterl_broker_heartbeat_misses", "Heartbeat intervals peers stayed silent "
                                     "past the first.", labels=["peer", *self._t])
        expired = CounterMetricFamily("remoterl_broker_expired", "Peers purged for missing their heartbeats.",
                                      labels=["peer", *self._t])
        missed = dict(self.core.sessions.heartbeat_misses)  # (peer kind, tenant) -> intervals
        for peer in ("worker", "client"):
            mine = {tenant: n for (kind, tenant), n in missed.items() if kind == peer and scope in (None, tenant)}
            if self.tenant_labels:
                for tenant, n in sorted(mine.items()):
                    misses.add_metric([peer, tenant], n)
            else:
                misses.add_metric([peer], sum(mine.values()))
            for tenant, n in self._split(counters, per_tenant, f"{peer}s_expired"):
                expired.add_metric(self._labels(tenant, peer), n)
        if scope is None:
            expired.add_metric(self._labels("", "mdp_worker"), counters.get("mdp_workers_expired", 0))
        yield misses
        yield expired

    def _refusals(self, counters: dict, per_tenant: dict) -> CounterMetricFamily:
        scope = self.tenant
        refused = CounterMetricFamily("remoterl_broker_refused", "Requests refused, by reason.",
                                      labels=["reason", *self._t])
        for name, reason in _REFUSED_COUNTERS.items():
            if name in _REFUSED_PER_TENANT and (scope is not None or self.tenant_labels):
                for tenant, n in self._split(counters, per_tenant, name):
                    refused.add_metric(self._labels(tenant, reason), n)
            elif scope is None:
                refused.add_metric(self._labels("", reason), counters.get(name, 0))
        if scope is None:  # a refusal's error code: no tenant known (the core counts "refused_<code>")
            for name, n in sorted(counters.items()):
                if name.startswith("refused_"):
                    refused.add_metric(self._labels("", name[len("refused_"):]), n)
        return refused

    def _broker_wide(self, counters: dict) -> Iterator[Any]:
        core = self.core
        yield CounterMetricFamily("remoterl_broker_received_bytes", "Bytes of the messages received.",
                                  value=counters.get("bytes_in", 0))
        yield CounterMetricFamily("remoterl_broker_sent_bytes", "Bytes of the messages sent.",
                                  value=counters.get("bytes_out", 0))
        yield CounterMetricFamily("remoterl_broker_messages_received", "Messages received.",
                                  value=counters.get("messages_in", 0))
        yield CounterMetricFamily("remoterl_broker_malformed", "Messages dropped as bad input.",
                                  value=counters.get("malformed", 0))
        yield GaugeMetricFamily("remoterl_broker_mdp_queued_requests", "Majordomo requests waiting for a worker.",
                                value=len(core.mdp_queue))
        yield CounterMetricFamily("remoterl_broker_mdp_dropped", "Majordomo requests refused because the queue "
                                  "was full.", value=counters.get("mdp_requests_dropped", 0))
        yield GaugeMetricFamily("remoterl_broker_mdp_workers", "Connected Majordomo workers.",
                                value=len(core.mdp_workers))

    def _split(self, counters: dict, per_tenant: dict, name: str) -> Iterable[tuple[str, int]]:
        """``name``'s count: one figure (broker-wide, or the scoped tenant's), or one per tenant
        when series carry tenant labels."""
        if self.tenant is not None:
            return [("", per_tenant.get(self.tenant, {}).get(name, 0))]
        if self.tenant_labels:
            return sorted((tenant, c[name]) for tenant, c in per_tenant.items() if name in c)
        return [("", counters.get(name, 0))]

    def _by_tenant(self, name: str, doc: str, peers: list) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=self._t)
        if not self.tenant_labels:
            family.add_metric([], len(peers))
            return family
        counts: dict[str, int] = {}
        for peer in peers:
            counts[peer.tenant] = counts.get(peer.tenant, 0) + 1
        for tenant, n in sorted(counts.items()):
            family.add_metric([tenant], n)
        return family


def metrics_app(registry: CollectorRegistry,
                scoped: Callable[[str], CollectorRegistry | None] | None = None) -> Callable:
    """A WSGI app serving ``registry`` at any path. With ``scoped``, a request with
    ``Authorization: Bearer KEY`` is served ``scoped(KEY)`` instead, or 401 when that is None."""

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        chosen = registry
        auth = environ.get("HTTP_AUTHORIZATION")
        if auth is not None and scoped is not None:
            kind, _, key = auth.partition(" ")
            chosen = scoped(key.strip()) if kind.lower() == "bearer" else None
            if chosen is None:
                start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                    ("WWW-Authenticate", 'Bearer realm="remoterl"')])
                return [b"unknown API key\n"]
        output = generate_latest(chosen)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(output)))])
        return [output]

    return app


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` (loopback), ``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``.

    Raises:
        ValueError: not one of those forms, or a port outside 0-65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") if host.startswith("[") else host
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not PORT or HOST:PORT (e.g. 9464, 127.0.0.1:9464, 0.0.0.0:9464)")
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # scrapes every few seconds would flood the log (and an Authorization header stays out)


class MetricsServer:
    """An HTTP endpoint for ``app`` on ``address`` (:func:`parse_address` forms), served by a
    daemon thread until :meth:`close`.

    Raises:
        OSError: the address cannot be bound (a port in use, a host not on this machine).
        ValueError: ``address`` is malformed.
    """

    def __init__(self, address: str, app: Callable) -> None:
        host, port = parse_address(address)
        server_class = ThreadingWSGIServer
        if _is_v6_name(host):
            server_class = type("ThreadingWSGIServerV6", (ThreadingWSGIServer,), {"address_family": socket.AF_INET6})
        self._httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.host, self.port = host, self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="remoterl-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def _is_v6_name(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def broker_metrics_server(address: str, core: Any, tenant_labels: bool = False) -> MetricsServer:
    """Serve ``core``'s metrics on ``address``: everything by default (one registry of this
    server's own), a tenant's series alone for a request bearing its API key (module docstring)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(core, tenant_labels=tenant_labels))

    def scoped(key: str) -> CollectorRegistry | None:
        if core.open_mode:
            return None  # no keys: a bearer of one is refused rather than shown everything
        tenant = core.tenant_of(key)
        if tenant is None:
            return None
        mine = CollectorRegistry(auto_describe=False)
        mine.register(BrokerCollector(core, tenant=tenant))
        return mine

    return MetricsServer(address, metrics_app(registry, scoped))
