"""Tests for remoterl.top (the live view behind ``remoterl status --watch`` / ``remoterl top``)
and for the Grafana dashboard in examples/grafana, which must query only the metric names
remoterl exports."""

from __future__ import annotations

import io
import json
import logging
import re
import selectors
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

import remoterl
from conftest import T, cli, free_url, status, tcp_broker
from remoterl.cli import main
from remoterl.errors import AuthenticationError, BrokerUnavailableError
from remoterl.logs import JsonFormatter
from remoterl.top import Rates, Sample, counter_rates, elapsed, render, total_rates, watch, worker_rates

WIDE = {"COLUMNS": "200"}  # rich would otherwise fit the tables into 80 columns


@pytest.fixture(autouse=True)
def _root_logging():
    """The ``remoterl`` group sets up the root logger (``--log-format``): put it back after each
    test, so no later test logs into a CliRunner's closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _worker(wid: str, calls: int, steps: int, errors: int, **extra) -> dict:
    return {"id": wid, "kind": "remoterl", "name": f"n-{wid}", "envs": ["CartPole-v1"], "capacity": 4, "slots": 2,
            "calls": calls, "stats": {"steps": steps, "resets": 0, "calls": calls, "errors": errors}, **extra}


def _snap(t: float, workers: list[dict], **counters: int) -> dict:
    return {"broker": "b1", "started": 1000.0, "time": t, "workers": workers, "clients": [], "services": [],
            "open_slots": 2 * len(workers), "counters": counters}


def _text(renderable, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


# ----------------------------------------------------------------------------
# Rates from two snapshots (no broker)

def test_rates_are_differences_over_the_brokers_clock():
    before = _snap(1000.0, [_worker("a", 100, 800, 1), _worker("b", 50, 100, 0), _worker("gone", 9, 9, 9)],
                   messages_in=1000, refused=2)
    after = _snap(1002.0, [_worker("a", 300, 1600, 3), _worker("b", 40, 100, 0), _worker("new", 10, 10, 0)],
                  messages_in=1400, refused=2, opens=1)
    # The local arrival times disagree with the broker's clock: the broker's wins.
    seconds = elapsed(Sample(5.0, before), Sample(10.0, after))
    assert seconds == 2.0

    rates = worker_rates(before, after, seconds)
    assert rates["a"] == Rates(calls=100.0, steps=400.0, errors=1.0)
    assert rates["b"] == Rates(calls=None, steps=0.0, errors=0.0)  # calls went down: restarted, unknown
    assert rates["new"] == Rates()  # not in the previous snapshot
    assert "gone" not in rates
    assert total_rates(rates) == Rates(calls=100.0, steps=400.0, errors=1.0)
    assert counter_rates(before, after, seconds) == {"messages_in": 200.0, "refused": 0.0, "opens": None}


def test_rates_without_a_previous_snapshot_or_broker_clock():
    snap = _snap(1000.0, [_worker("a", 1, 1, 0)])
    assert worker_rates(None, snap, None) == {"a": Rates()}
    assert total_rates({"a": Rates()}) == Rates()
    assert counter_rates(None, snap, None) == {}
    untimed = [{**snap, "time": None}, {**snap, "time": None}]
    assert elapsed(Sample(3.0, untimed[0]), Sample(3.5, untimed[1])) == 0.5  # local arrival times
    assert elapsed(Sample(3.0, snap), Sample(4.0, snap)) is None  # no time passed on the broker


def test_render_shows_latency_when_present_and_a_dash_when_absent():
    before = _snap(1000.0, [_worker("aaaa1111", 10, 10, 0), _worker("bbbb2222", 10, 10, 0)])
    after = _snap(1001.0, [_worker("aaaa1111", 30, 50, 0, p50_ms=1.25, p99_ms=7.5),
                           _worker("bbbb2222", 20, 10, 2)])
    rates = worker_rates(before, after, 1.0)
    text = _text(render("tcp://h:1", Sample(1.0, after), Sample(1.0, after), rates, counter_rates(before, after, 1.0)))
    row_a = next(line for line in text.splitlines() if "n-aaaa1111" in line)
    row_b = next(line for line in text.splitlines() if "n-bbbb2222" in line)
    assert "1.2" in row_a and "7.5" in row_a and "20.0" in row_a and "40.0" in row_a
    assert row_b.count("–") == 2 and "2.0" in row_b  # no latency fields; 2 errors in 1 s
    assert "calls/s 30.0" in text and "steps/s 40.0" in text and "up 0:00:01" in text


def test_render_of_an_unreachable_broker_keeps_the_last_answer():
    good = Sample(1.0, _snap(1000.0, [_worker("a", 1, 1, 0)]))
    text = _text(render("tcp://h:1", Sample(4.0, error="no answer"), good, {}, {}))
    assert "broker unreachable at tcp://h:1: no answer" in text and "last answer 3 s ago" in text
    assert "n-a" in text
    assert "no answer" in _text(render("tcp://h:1", Sample(4.0, error="no answer"), None, {}, {}))


# ----------------------------------------------------------------------------
# The loop, fed snapshots (no broker)

def test_watch_draws_live_frames_and_retries_an_unreachable_broker():
    replies = [BrokerUnavailableError("down"), _snap(1000.0, [_worker("a", 10, 10, 0)]),
               _snap(1001.0, [_worker("a", 20, 30, 0)])]

    def fetch():
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    naps: list[float] = []
    console = Console(record=True, width=200, force_terminal=True, file=io.StringIO())
    assert watch(fetch, "tcp://h:1", interval=0.5, count=3, console=console, sleep=naps.append) == 0
    text = console.export_text()
    assert "broker unreachable at tcp://h:1: down" in text and "steps/s 20.0" in text
    assert replies == [] and len(naps) == 2 and all(0 <= n <= 0.5 for n in naps)


def test_watch_exit_status():
    def down():
        raise BrokerUnavailableError("down")

    def interrupted():
        raise KeyboardInterrupt

    def refused():
        raise AuthenticationError("bad key")

    console = Console(file=io.StringIO())
    assert watch(down, "tcp://h:1", count=2, console=console, sleep=lambda s: None) == 1  # never answered
    assert watch(interrupted, "tcp://h:1", console=console) == 0  # Ctrl-C is a clean exit
    with pytest.raises(AuthenticationError):  # not retried: a wrong key stays wrong
        watch(refused, "tcp://h:1", count=2, console=console, sleep=lambda s: None)


# ----------------------------------------------------------------------------
# The CLI against a real broker and workers

@pytest.fixture(scope="module")
def broker_with_workers():
    with tcp_broker(2, "--env", "CartPole-v1", "-n", "3") as url:
        yield url


@pytest.mark.parametrize("command", [["status", "--watch", "--count", "2"], ["top", "--count", "2"]])
def test_watch_shows_what_status_json_reports(broker_with_workers, command):
    url = broker_with_workers
    runner = CliRunner()
    raw = runner.invoke(main, ["status", "--json", "--broker", url, "--timeout", str(T)])
    assert raw.exit_code == 0, raw.output
    workers = json.loads(raw.output)["workers"]
    assert sorted(w["name"] for w in workers) == ["w0", "w1"]

    shown = runner.invoke(main, [*command, "--interval", "0.05", "--broker", url, "--timeout", str(T)], env=WIDE)
    assert shown.exit_code == 0, shown.output
    frames = re.split("─{40,}", shown.output)  # the rule between frames
    assert len(frames) == 2
    for frame in frames:
        for w in workers:
            row = next(line for line in frame.splitlines() if w["id"][:8] in line)
            assert w["name"] in row and f"{w['slots']}/{w['capacity']}" in row and "CartPole-v1" in row


def test_watch_shows_the_latency_the_broker_measured(broker_with_workers):
    url = broker_with_workers
    with remoterl.Client(url).connect() as client:
        opened = client.open("CartPole-v1", n=1)
        worker, slots = opened.workers[0], list(opened.slots)
        client.call(worker, slots, {"op": "reset", "seeds": [0]})
        for _ in range(3):
            client.call(worker, slots, {"op": "step", "a": np.zeros(1, np.int64), "m": 0})
        row = next(w for w in status(url)["workers"] if w["id"] == worker.hex())
        assert row["calls"] >= 4 and row["p50_ms"] is not None and row["p99_ms"] is not None
        shown = CliRunner().invoke(main, ["top", "--once", "--broker", url], env=WIDE)
        client.close_slots(slots)
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.output.splitlines() if worker.hex()[:8] in line)
    assert f"{row['p50_ms']:,.1f}" in line and f"{row['p99_ms']:,.1f}" in line and "1/3" in line
    assert line.count("–") == 3  # only the rates, unknown on a first frame: the latency is shown


def test_watch_of_an_unreachable_broker_fails_with_count():
    url = free_url()
    shown = CliRunner().invoke(main, ["top", "--count", "2", "--interval", "0.05", "--broker", url,
                                      "--timeout", "0.3"], env=WIDE)
    assert shown.exit_code == 1
    assert shown.output.count(f"broker unreachable at {url}") == 2 and "remoterl-broker --bind" in shown.output
    once = CliRunner().invoke(main, ["status", "--once", "--broker", url, "--timeout", "0.3"], env=WIDE)
    assert once.exit_code == 1 and "unreachable" in once.output
    both = CliRunner().invoke(main, ["status", "--watch", "--json", "--broker", url])
    assert both.exit_code == 2 and "--json" in both.output
    bad = CliRunner().invoke(main, ["top", "--count", "2", "--broker", "nonsense:1"])
    assert bad.exit_code == 1 and "unsupported broker URL 'nonsense:1'" in bad.output


def test_log_format_json_is_set_up_for_every_command(broker_with_workers):
    root = logging.getLogger()
    shown = CliRunner().invoke(main, ["--log-format", "json", "-v", "top", "--once", "--broker", broker_with_workers])
    assert shown.exit_code == 0, shown.output
    (handler,) = root.handlers
    assert root.level == logging.INFO and isinstance(handler.formatter, JsonFormatter)
    record = logging.LogRecord("remoterl.x", logging.WARNING, __file__, 1, "worker %s lost", ("w0",), None)
    assert json.loads(handler.format(record))["message"] == "worker w0 lost"
    bad = CliRunner().invoke(main, ["--log-format", "xml", "top"])
    assert bad.exit_code == 2 and "'xml' is not one of 'text', 'json'" in bad.output


def test_ctrl_c_ends_the_live_view_with_status_0(broker_with_workers, procs):
    proc = procs([*cli("remoterl"), "top", "--broker", broker_with_workers, "--interval", "0.1"], WIDE)
    seen = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + T
        while "w1" not in seen or "w0" not in seen:
            assert time.monotonic() < deadline and proc.proc.poll() is None, f"no frame drawn:\n{seen}"
            if sel.select(timeout=0.1):
                seen += proc.proc.stdout.readline()
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0


# ----------------------------------------------------------------------------
# examples/grafana: the dashboard queries only metrics remoterl exports

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "remoterl-dashboard.json"
HISTOGRAMS = {"remoterl_broker_call_duration_seconds", "remoterl_worker_env_step_duration_seconds",
              "remoterl_worker_call_duration_seconds"}
# What the dashboard charts, exactly (docs/METRICS.md lists every metric; env steps are counted
# on the workers only, since the broker forwards calls without decoding them).
METRICS = HISTOGRAMS | {
    "remoterl_broker_calls_total", "remoterl_broker_slots", "remoterl_broker_workers", "remoterl_broker_clients",
    "remoterl_broker_heartbeat_misses_total", "remoterl_broker_expired_total", "remoterl_broker_refused_total",
    "remoterl_broker_malformed_total", "remoterl_broker_received_bytes_total", "remoterl_broker_sent_bytes_total",
    "remoterl_broker_mdp_queued_requests", "remoterl_broker_mdp_dropped_total", "remoterl_broker_mdp_workers",
    "remoterl_worker_env_steps_total", "remoterl_worker_resets_total", "remoterl_worker_calls_total",
    "remoterl_worker_slots", "remoterl_worker_capacity", "remoterl_worker_errors_total",
    "remoterl_worker_connected", "remoterl_worker_info",
}


def _queries(dashboard: dict) -> list[str]:
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def _metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38  # Grafana 10+
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"] for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    used: set[str] = set()
    for expr in _queries(dashboard):
        names = re.findall(r"\bremoterl_[a-z0-9_]+", expr)
        assert names, f"a query that reads no remoterl metric: {expr}"
        for name in names:
            assert _metric(name) in METRICS, f"{name!r} is not a metric remoterl exports (in {expr})"
            if _metric(name) in HISTOGRAMS:
                assert name != _metric(name), f"a histogram is read through _bucket/_sum/_count: {expr}"
            used.add(_metric(name))
    assert used == METRICS, f"metrics no panel shows: {sorted(METRICS - used)}"


def test_dashboard_metrics_are_the_ones_the_exporters_define_and_document():
    """The names above against the collectors' own (a family named in broker/metrics.py or
    workers/metrics.py; a counter family ``x`` is exposed as ``x_total``) and docs/METRICS.md."""
    source = (ROOT / "broker" / "metrics.py").read_text() + (ROOT / "workers" / "metrics.py").read_text()
    families = set(re.findall(r"[\"'](remoterl_(?:broker|worker)_[a-z0-9_]+)[\"']", source))
    undefined = {m for m in METRICS if m not in families and not (m.endswith("_total") and m[:-6] in families)}
    assert not undefined, f"the dashboard reads metrics no collector defines: {sorted(undefined)}"
    documented = set(re.findall(r"`(remoterl_[a-z0-9_]+)`", (ROOT / "docs" / "METRICS.md").read_text()))
    assert METRICS <= documented, f"undocumented: {sorted(METRICS - documented)}"
