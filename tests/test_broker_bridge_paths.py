"""``remoterl.broker.bridge`` and ``remoterl.io.wsgateway``: the paths through the bridge, each
giving what tcp:// gives: a trainer over ws://, wss:// with a self-signed certificate, a
worker over ws://, and ``remoterl-broker --ws`` through the CLIs.

The broker runs in this process (a thread) with an extra ``inproc://`` endpoint; a
:class:`WsBridge` serves WebSocket peers on 127.0.0.1 through it. One broker, one bridge
and one tcp:// worker process serve the module (``setup``, from broker_bridge_helpers.py);
tests that need other settings start their own bridge on the same broker, and each test
leaves no slot open.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading

import numpy as np
import pytest
from conftest import assert_same, HEARTBEAT, T, status, wait_for

import remoterl
from remoterl import BrokerUnavailableError
from remoterl.workers.loop import WorkerLoop
from remoterl.workers.runtime import SlotHost
from remoterl.io.wsgateway import gateway_endpoint
from broker_bridge_helpers import NUM_ENVS, Setup, run_cartpole, ws_ids
from broker_bridge_helpers import clients as clients, setup as setup  # the shared fixtures: the module's broker


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
