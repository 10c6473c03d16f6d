"""``remoterl.broker.bridge`` and ``remoterl.io.wsgateway``: the WebSocket framing (sans I/O),
endpoint resolution, one gateway per URL, and the errors of a bridge or gateway that cannot
connect or bind.

The broker runs in this process (a thread) with an extra ``inproc://`` endpoint; a
:class:`WsBridge` serves WebSocket peers on 127.0.0.1 through it. One broker, one bridge
and one tcp:// worker process serve the module (``setup``, from broker_bridge_helpers.py);
tests that need other settings start their own bridge on the same broker, and each test
leaves no slot open.
"""

from __future__ import annotations

import threading

import pytest
import zmq
from conftest import T, free_url

import remoterl
from remoterl import BrokerUnavailableError
from remoterl.wire import wsframes as _wsframes
from remoterl.broker.bridge import WsBridge
from remoterl.errors import ProtocolError
from remoterl.io.wsgateway import gateway_endpoint, resolve_endpoint
from broker_bridge_helpers import setup as setup  # the shared fixture: the module's broker, bridge and worker


# --- framing (sans I/O) -----------------------------------------------------------------------------------

def test_framing_round_trip():
    frames = [b"RLC1\x10", b"", b"\x00" * 70_000, memoryview(b"abc"), zmq.Frame(b"xyz")]
    data = _wsframes.pack(frames)
    assert data[:9] == b"\x05\x00\x00\x00RLC1\x10"
    assert [bytes(f) for f in _wsframes.unpack(data)] == [b"RLC1\x10", b"", b"\x00" * 70_000, b"abc", b"xyz"]


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"\x05\x00\x00", "truncated frame length"),
    (b"\x01\x00\x00\x00a\x02", "truncated frame length"),
    (b"\x10\x00\x00\x00abc", "declares 16 bytes"),
])
def test_framing_rejects_malformed(data, match):
    with pytest.raises(ProtocolError, match=match):
        _wsframes.unpack(data)


def test_resolve_endpoint():
    for url in ("tcp://127.0.0.1:5555", "ipc:///tmp/x", "inproc://x"):
        assert resolve_endpoint(url) == url
    with pytest.raises(ValueError, match="unsupported broker URL 'http://x:1'"):
        resolve_endpoint("http://x:1")
    with pytest.raises(ValueError):
        resolve_endpoint("127.0.0.1:5555")


def test_gateway_is_shared_per_url(setup):
    one = gateway_endpoint(setup.ws_url)
    assert one.startswith("inproc://remoterl-ws-") and resolve_endpoint(setup.ws_url) == one
    results = []
    threads = [threading.Thread(target=lambda: results.append(gateway_endpoint(setup.ws_url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert results == [one] * 4


def test_bind_error_is_raised_by_start(setup):
    taken = int(setup.ws_url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        WsBridge("127.0.0.1", taken, setup.inproc).start()


def test_unknown_endpoint_fails_fast():
    # ws:// to a port nobody listens on: the gateway logs and the client times out cleanly.
    url = free_url().replace("tcp://", "ws://")
    with pytest.raises(BrokerUnavailableError, match="inproc://remoterl-ws-.*" + url.split("//")[1]):
        remoterl.Client(gateway_endpoint(url), connect_timeout=0.5).connect()
