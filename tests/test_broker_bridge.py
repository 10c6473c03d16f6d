"""``remoterl.broker.bridge`` (the WebSocket bridge) and ``remoterl.io.wsgateway`` (its client side).

The broker runs in this process (a thread) with an extra ``inproc://`` endpoint; a
:class:`WsBridge` serves WebSocket peers on 127.0.0.1 through it. Trainers and
workers reach a ws:// URL through :func:`gateway_endpoint`, or are raw ``websockets``
clients when a test needs to misbehave. One broker, one bridge and one tcp:// worker
process serve the module; tests that need other settings start their own bridge on
the same broker (several bridges may share an inproc endpoint), and each test leaves
no slot open.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

import msgpack
import numpy as np
import pytest
import zmq
from conftest import assert_same, HEARTBEAT, Proc, T, cli, free_url, status, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

import remoterl
from remoterl import BrokerUnavailableError, RemoteEnvVec
from remoterl.wire import wsframes as _wsframes
from remoterl.broker.bridge import WsBridge
from remoterl.broker.core import BrokerConfig
from remoterl.broker.loop import Broker
from remoterl.errors import ProtocolError
from remoterl.workers.loop import WorkerLoop
from remoterl.workers.runtime import SlotHost
from remoterl.io.wsgateway import close_gateways, gateway_endpoint, resolve_endpoint

# The broker's heartbeat window is long (5 s) so that "freed at once" is told apart from "expired".
BROKER_HEARTBEAT, BROKER_LIVENESS = 1.0, 5
WINDOW = BROKER_HEARTBEAT * BROKER_LIVENESS
NUM_ENVS = 4
STEPS = 150


class Setup:
    """The module's broker (tcp + inproc), bridge and tcp worker."""

    def __init__(self, heartbeat: float = BROKER_HEARTBEAT, liveness: int = BROKER_LIVENESS) -> None:
        self.inproc = f"inproc://remoterl-bridge-{uuid.uuid4().hex}"
        self.broker = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=heartbeat, liveness=liveness),
                             also=(self.inproc,))
        self.tcp_url = self.broker.start()
        self.bridges: list[WsBridge] = []
        self.bridge = self.add_bridge()
        self.ws_url = self.bridge.url

    def add_bridge(self, **kwargs) -> WsBridge:
        bridge = WsBridge("127.0.0.1", 0, self.inproc, context=zmq.Context.instance(), **kwargs)
        bridge.start()
        self.bridges.append(bridge)
        return bridge

    def stop(self) -> None:
        close_gateways()
        for bridge in self.bridges:
            bridge.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def setup():
    s = Setup()
    worker = Proc([*cli("remoterl-worker"), "--broker", s.tcp_url, "--env", "CartPole-v1", "-n", "16",
                   "--procs", "1", "--heartbeat", str(HEARTBEAT), "--name", "tcp-worker"])
    try:
        wait_for(lambda: len(status(s.tcp_url)["workers"]) == 1 or worker.proc.poll() is not None,
                 what="the tcp worker registered")
        assert worker.proc.poll() is None, worker.output()
        yield s
    finally:
        worker.stop()
        s.stop()


@pytest.fixture
def clients(setup):
    """Make remoterl Clients; all are closed at teardown and no slot may stay open."""
    made: list[remoterl.Client] = []

    def make(url: str, **kwargs) -> remoterl.Client:
        client = remoterl.Client(url, **kwargs).connect()
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, what="every slot closed after the test")


def run_cartpole(client, steps: int = STEPS, num_envs: int = NUM_ENVS) -> list:
    """Reset and step a RemoteEnvVec with fixed seeds and actions; return every result (copied)."""
    vec = RemoteEnvVec("CartPole-v1", num_envs, client=client)
    try:
        record = [vec.reset(seed=list(range(num_envs)))]
        rng = np.random.default_rng(7)
        for _ in range(steps):
            obs, rew, term, trunc, infos = vec.step(rng.integers(0, 2, num_envs))
            record.append((np.array(obs), np.array(rew), np.array(term), np.array(trunc), infos))
        return record
    finally:
        vec.close()


def ws_ids(url: str) -> tuple[list[str], list[str]]:
    """Client and worker ids that the bridge assigned (they start with 0x01)."""
    st = status(url)
    return ([c["id"] for c in st["clients"] if c["id"].startswith("01")],
            [w["id"] for w in st["workers"] if w["id"].startswith("01")])


def hello() -> bytes:
    return _wsframes.pack([b"RLC1\x01", msgpack.packb({"v": 1, "name": "raw"})])


def recv_until_closed(ws, timeout: float = T):
    """Read (and drop) messages until the server closes; return the close frame it sent."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd
    except TimeoutError:
        pass
    pytest.fail(f"the bridge did not close the connection within {timeout:g} s")


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


# --- (a) a trainer over ws://, workers over tcp:// ------------------------------------------------------

def test_ws_trainer_matches_tcp_trainer(setup, clients):
    tcp = run_cartpole(clients(setup.tcp_url))
    ws_client = clients(gateway_endpoint(setup.ws_url))
    assert ws_client.identity[:1] == b"\x01"  # WELCOME's "you": the bridge's id for it
    assert ws_ids(setup.tcp_url)[0] == [ws_client.identity.hex()]
    ws = run_cartpole(ws_client)
    assert_same(ws, tcp, "ws:// vs tcp://")
    ends = sum(int((step[2] | step[3]).sum()) for step in ws[1:])
    assert ends >= 2, "no episode ended: the autoreset path went untested"


# --- (b) wss:// with a self-signed certificate --------------------------------------------------------------

def make_certificate(folder) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("cannot make a self-signed certificate: neither the 'cryptography' package "
                        "nor the 'openssl' command is available")
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=T)
        return cert, key
    import ipaddress

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    with open(cert, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return cert, key


def test_wss_with_self_signed_certificate(setup, clients, tmp_path, monkeypatch):
    monkeypatch.delenv("REMOTERL_TLS_CA", raising=False)
    cert, key = make_certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    bridge = setup.add_bridge(ssl_context=server_tls)
    assert bridge.url.startswith("wss://127.0.0.1:")

    # Not trusted without the CA file: the TLS handshake fails and the broker is unreachable.
    untrusted = gateway_endpoint(bridge.url)
    with pytest.raises(BrokerUnavailableError):
        remoterl.Client(untrusted, connect_timeout=1.0).connect()
    assert not ws_ids(setup.tcp_url)[0]

    tcp = run_cartpole(clients(setup.tcp_url), steps=40)
    wss = run_cartpole(clients(gateway_endpoint(bridge.url, ca_file=cert)), steps=40)
    assert_same(wss, tcp, "wss:// vs tcp://")


# --- (c) a worker over ws:// ----------------------------------------------------------------------------

def test_worker_over_ws():
    s = Setup(heartbeat=HEARTBEAT, liveness=3)  # a broker of its own: the only worker is the one over ws://
    worker = WorkerLoop(gateway_endpoint(s.ws_url), SlotHost(["CartPole-v1"], 4), heartbeat=HEARTBEAT,
                        name="ws-worker")
    thread = threading.Thread(target=worker.run, name="ws-worker", daemon=True)
    thread.start()
    try:
        assert worker.registered.wait(T), "the ws worker did not register"
        assert ws_ids(s.tcp_url)[1] == [worker.identity.hex()]
        # A trainer over tcp:// (mixed the other way round) and one over ws:// (all WebSocket).
        with remoterl.Client(s.tcp_url).connect() as tcp_client, \
                remoterl.Client(gateway_endpoint(s.ws_url)).connect() as ws_client:
            tcp = run_cartpole(tcp_client, steps=60)
            ws = run_cartpole(ws_client, steps=60)
        assert_same(ws, tcp, "ws worker: ws trainer vs tcp trainer")
        # Compared with gymnasium itself, to be sure the ws worker really stepped the envs.
        import gymnasium

        local = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * NUM_ENVS)
        expected = [local.reset(seed=list(range(NUM_ENVS)))]
        rng = np.random.default_rng(7)
        for _ in range(60):
            expected.append(local.step(rng.integers(0, 2, NUM_ENVS)))
        local.close()
        assert_same(ws, expected, "ws worker vs SyncVectorEnv")
    finally:
        # WorkerLoop.stop() raises _Stop into the caller when called from the main thread
        # while the loop thread polls; stop it from another thread.
        threading.Thread(target=worker.stop).start()
        thread.join(T)
        assert not thread.is_alive()
        wait_for(lambda: not status(s.tcp_url)["workers"], timeout=HEARTBEAT * 3 / 2,
                 what="the ws worker's DISCONNECT reaching the broker")
        s.stop()


# --- (d) a peer that does not read -------------------------------------------------------------------------

def test_peer_that_stops_reading_does_not_stall_others(setup, clients):
    bridge = setup.add_bridge(send_timeout=1.0)
    trainer = clients(gateway_endpoint(bridge.url))
    vec = RemoteEnvVec("CartPole-v1", NUM_ENVS, client=trainer)
    vec.reset(seed=0)

    # The slow peer: heartbeats naming a 60 KB id (control headers are capped at 64 KiB), which
    # the broker echoes in each pong (docs/PROTOCOL.md §3.2), so ~24 MB come back, far more than
    # the socket buffers hold; it reads nothing (max_queue=1 stops its reader after one message).
    ping = _wsframes.pack([b"RLC1\x07", msgpack.packb({"id": b"\xff" * 60_000})])
    with ws_connect(bridge.url, max_queue=1, compression=None, max_size=None) as slow:
        flood = threading.Thread(target=lambda: [slow.send(ping) for _ in range(400)], daemon=True)
        flood.start()

        slowest, steps = 0.0, 0
        deadline = time.monotonic() + T
        while bridge.counters["closed_slow"] == 0:
            assert time.monotonic() < deadline, "the bridge never closed the peer that does not read"
            start = time.monotonic()
            vec.step(np.zeros(NUM_ENVS, np.int64))
            slowest = max(slowest, time.monotonic() - start)
            steps += 1
        assert steps >= 10, "the other trainer should keep stepping while the slow peer is stuck"
        assert slowest < T / 20, f"a step of the other trainer took {slowest:.2f} s while a peer did not read"

        close = recv_until_closed(slow)  # reading again drains the backlog and reaches the close frame
        assert close is not None and close.code == 1013, close
        assert close.reason == "remoterl: peer too slow (send queue full)"
        flood.join(T)
    # The bridge, the broker and the other trainer carry on.
    for _ in range(20):
        vec.step(np.ones(NUM_ENVS, np.int64))
    vec.close()


# --- (e) a WebSocket trainer killed ---------------------------------------------------------------------------

KILLED_TRAINER = """
import sys, time
import remoterl
from remoterl.io.wsgateway import gateway_endpoint
client = remoterl.Client(gateway_endpoint(sys.argv[1])).connect()
vec = remoterl.RemoteEnvVec("CartPole-v1", 3, client=client)
vec.reset(seed=0)
print("ready", flush=True)
time.sleep(60)
"""


def test_killed_ws_trainer_frees_its_slots_at_once(setup):
    trainer = Proc([sys.executable, "-c", KILLED_TRAINER, setup.ws_url])
    try:
        assert select.select([trainer.proc.stdout], [], [], T)[0], "the trainer did not start"
        line = trainer.proc.stdout.readline()
        assert line.strip() == "ready", line + trainer.output()
        assert status(setup.tcp_url)["open_slots"] == 3
        assert len(ws_ids(setup.tcp_url)[0]) == 1
        trainer.proc.kill()
        trainer.proc.wait(T)
        killed = time.monotonic()
        wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, timeout=WINDOW / 2,
                 what="the killed trainer's slots freed")
        freed = time.monotonic() - killed
        assert freed < WINDOW / 5, f"slots freed after {freed:.2f} s: that is expiry, not DISCONNECT"
        assert not ws_ids(setup.tcp_url)[0]
    finally:
        trainer.stop()


def test_raw_ws_client_dropped_mid_session_frees_its_slots(setup):
    with ws_connect(setup.ws_url, compression=None) as ws:
        ws.send(hello())
        assert _wsframes.unpack(ws.recv(timeout=T))[0] == b"RLC1\x02"  # WELCOME
        ws.send(_wsframes.pack([b"RLC1\x03", msgpack.packb({"r": 1, "env": "CartPole-v1", "n": 2})]))
        opened = _wsframes.unpack(ws.recv(timeout=T))
        assert bytes(opened[0]) == b"RLC1\x04" and len(msgpack.unpackb(opened[1])["slots"]) == 2
        assert status(setup.tcp_url)["open_slots"] == 2
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close handshake: the TCP connection just ends
    wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, timeout=WINDOW / 5,
             what="the dropped client's slots freed")


# --- (f) malformed messages ---------------------------------------------------------------------------------

MALFORMED = [
    ("a text message", 1003),
    (b"\x05\x00\x00", 1007),  # a truncated length prefix
    (b"\x10\x00\x00\x00RLC1\x01", 1007),  # a frame running past the end
    (b"", 1007),  # no frame at all
]


def test_malformed_messages_close_that_connection_only(setup, clients):
    with ws_connect(setup.ws_url, compression=None) as bystander:
        bystander.send(hello())
        assert _wsframes.unpack(bystander.recv(timeout=T))[0] == b"RLC1\x02"
        for message, code in MALFORMED:
            with ws_connect(setup.ws_url, compression=None) as bad:
                bad.send(hello())
                bad.recv(timeout=T)
                bad.send(message)
                close = recv_until_closed(bad)
                assert close is not None and close.code == code, (message, close)
                assert close.reason.startswith("remoterl: ")
            # The other connection and the bridge keep serving.
            bystander.send(_wsframes.pack([b"RLC1\x07", msgpack.packb({})]))
            assert _wsframes.unpack(bystander.recv(timeout=T))[0] == b"RLC1\x07"
    assert setup.bridge.counters["closed_malformed"] >= len(MALFORMED)
    run_cartpole(clients(gateway_endpoint(setup.ws_url)), steps=5)


def test_oversized_message_is_refused_with_1009(setup):
    bridge = setup.add_bridge(max_message_size=1024)
    with ws_connect(bridge.url, compression=None, max_size=None) as ws:
        ws.send(_wsframes.pack([b"RLC1\x01", b"\x00" * (2 * 1024 * 1024)]))
        close = recv_until_closed(ws)
    assert close is not None and close.code == 1009


def test_stop_closes_connections_and_frees_slots(setup):
    bridge = setup.add_bridge()
    client = remoterl.Client(gateway_endpoint(bridge.url)).connect()
    vec = RemoteEnvVec("CartPole-v1", 2, client=client)
    vec.reset(seed=0)
    assert status(setup.tcp_url)["open_slots"] == 2
    start = time.monotonic()
    bridge.stop()
    assert time.monotonic() - start < 5.0
    wait_for(lambda: status(setup.tcp_url)["open_slots"] == 0, timeout=WINDOW / 5,
             what="slots freed when the bridge stopped")
    client.close()


def test_gateway_closes_connections_of_closed_sockets(setup, monkeypatch):
    import remoterl.io.wsgateway as wsgateway

    monkeypatch.setattr(wsgateway, "_HEARTBEAT_IDLE", 0.4)
    bridge = setup.add_bridge()
    client = remoterl.Client(gateway_endpoint(bridge.url)).connect()
    wait_for(lambda: bridge.open_connections == 2, what="the main and heartbeat connections")
    client.close()
    # The main connection closes after its DISCONNECT; the heartbeat one once idle.
    wait_for(lambda: bridge.open_connections == 0, timeout=T / 5, what="both connections closed")


def test_bind_error_is_raised_by_start(setup):
    taken = int(setup.ws_url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        WsBridge("127.0.0.1", taken, setup.inproc).start()


def test_unknown_endpoint_fails_fast():
    # ws:// to a port nobody listens on: the gateway logs and the client times out cleanly.
    url = free_url().replace("tcp://", "ws://")
    with pytest.raises(BrokerUnavailableError, match="inproc://remoterl-ws-.*" + url.split("//")[1]):
        remoterl.Client(gateway_endpoint(url), connect_timeout=0.5).connect()


def test_cli_ws_trainer_with_tcp_worker(procs, broker_url):
    """`remoterl-broker --ws`: a trainer on ws:// and a worker on tcp://, through the CLIs."""
    from conftest import start_broker, start_worker

    from remoterl.client.status import fetch_status

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    ws_port = probe.getsockname()[1]
    probe.close()
    start_broker(procs, broker_url, "--ws", f"127.0.0.1:{ws_port}")
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1", expect=1)
    ws_url = f"ws://127.0.0.1:{ws_port}"
    with remoterl.Client(ws_url, connect_timeout=T).connect() as client:
        vec = remoterl.RemoteEnvVec("CartPole-v1", 2, client=client)
        vec.reset(seed=3)
        obs, *_ = vec.step(np.ones(2, np.int64))
        assert obs.shape == (2, 4)
        vec.close()
    assert fetch_status(ws_url, timeout=T)["open_slots"] == 0  # remoterl status works over ws too


# --- (g) hostile peers over WebSocket: the broker's limits hold on this path too ---------------------------


def test_too_many_frames_close_that_connection(setup, clients):
    frames = [b"RLC1\x10"] + [b""] * remoterl.wire.protocol.MAX_FRAMES
    with ws_connect(setup.ws_url, compression=None) as bad:
        bad.send(hello())
        bad.recv(timeout=T)
        bad.send(_wsframes.pack(frames))
        close = recv_until_closed(bad)
    assert close is not None and close.code == 1007 and "frames" in close.reason
    run_cartpole(clients(gateway_endpoint(setup.ws_url)), steps=5)


def test_long_names_and_headers_are_refused(setup):
    with ws_connect(setup.ws_url, compression=None, max_size=None) as ws:
        for fields, code in [({"name": "n" * 40_000_000}, "too_large"),
                             ({"name": "n" * (remoterl.wire.protocol.MAX_NAME + 1)}, "protocol")]:
            ws.send(_wsframes.pack([b"RLC1\x01", msgpack.packb({"v": 1, "r": 3, **fields})]))
            reply = _wsframes.unpack(ws.recv(timeout=T))
            assert bytes(reply[0]) == b"RLC1\x09", reply[0]
            assert msgpack.unpackb(reply[1])["code"] == code
    assert not any(c.get("name", "").startswith("nnn") for c in status(setup.tcp_url)["clients"])


def test_call_flood_over_websocket_is_answered(setup, clients):
    """Calls beyond the in-flight limit get a typed error each; a tcp trainer carries on."""
    flooder = clients(gateway_endpoint(setup.ws_url))
    opened = flooder.open("CartPole-v1", n=1)
    worker, slots = opened.workers[0], opened.slots
    flooder.wait([flooder.send_call(worker, slots, {"op": "reset", "seeds": [0]})], T)
    flood = [flooder.send_call(worker, slots, {"op": "step", "a": np.zeros(1, np.int64), "m": 0})
             for _ in range(1000)]
    run_cartpole(clients(setup.tcp_url), steps=20)
    limited = 0
    for entry in flood:
        try:
            flooder.wait([entry], T)
        except remoterl.LimitExceededError:
            limited += 1
    assert 0 < limited < len(flood)
    flooder.close_slots(slots)
