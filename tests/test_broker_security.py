"""API keys, tenants, limits and CURVE: in the core (no sockets) and through the CLIs."""

from __future__ import annotations

import signal
import subprocess

import numpy as np
import pytest

import remoterl
import remoterl.wire.codec
from conftest import T, cli, start_broker, start_worker, wait_for
from remoterl.wire import protocol as p
from remoterl.broker.core import BrokerConfig, BrokerCore
from remoterl.broker.services import answer
from remoterl.client.status import fetch_status
from remoterl.wire.protocol import ClientCommand as C
from remoterl.wire.protocol import WorkerCommand as W

KEYS = {"key-alpha": "alpha", "key-beta": "beta"}


def hdr(msg: list, index: int = 1) -> dict:
    return p.decode_header(msg[index + 1])  # msg[0] is the routing id


@pytest.fixture
def core():
    return BrokerCore(BrokerConfig(api_keys=dict(KEYS), max_slots_per_tenant=6), now=0.0)


def send(core, sender, frames, now=1.0):
    core.receive(sender, frames, now)
    return core.messages_to_send()


def hello(key=None):
    return [p.client_frame(C.HELLO), p.encode_header({"v": 1, **({"key": key} if key else {})})]


def ready(key=None, envs=("CartPole-v1",), capacity=8):
    return [p.worker_frame(W.READY), p.encode_header({"v": 1, "envs": list(envs), "capacity": capacity,
                                                     **({"key": key} if key else {})})]


def open_(r, n=1, env="CartPole-v1"):
    return [p.client_frame(C.OPEN), p.encode_header({"r": r, "env": env, "n": n})]


class TestCoreKeys:
    """Every trainer and worker presents its key first; nothing is routed otherwise."""

    @pytest.mark.parametrize("key", [None, "", "key-alph", "key-alpha ", "KEY-ALPHA"])
    def test_wrong_or_missing_key_is_refused_and_leaves_nothing(self, core, key):
        out = send(core, b"c1", hello(key))
        assert out[0][1] == p.client_frame(C.ERROR) and hdr(out[0])["code"] == "auth"
        out = send(core, b"w1", ready(key))
        assert out[0][1] == p.worker_frame(W.ERROR) and hdr(out[0])["code"] == "auth"
        assert core.clients == {} and core.workers == {} and core.env_index == {}
        # Unauthenticated requests are refused too, and create nothing.
        out = send(core, b"c1", open_(7))
        assert hdr(out[0])["code"] == "auth" and hdr(out[0])["r"] == 7 and core.clients == {}

    def test_tenants_never_see_each_others_workers(self, core):
        for worker, key in ((b"wa", "key-alpha"), (b"wb", "key-beta")):
            assert send(core, worker, ready(key))[0][1] == p.worker_frame(W.WELCOME)
        send(core, b"ca", hello("key-alpha"))
        send(core, b"cb", hello("key-beta"))
        for i in range(4):
            for client, worker in ((b"ca", b"wa"), (b"cb", b"wb")):
                out = send(core, client, open_(i, n=1))
                assert [m[0] for m in out] == [worker]  # the OPEN goes to the tenant's own worker
        # beta's view: no alpha worker, even in the status service and error messages
        snap = __import__("json").loads(answer(core, b"remoterl.status", [b"key-beta"])[0])
        assert [w["id"] for w in snap["workers"]] == [b"wb".hex()]
        assert b"wa".hex() not in str(snap)
        send(core, b"wa", ready("key-alpha", envs=("Secret-v0",)))
        out = send(core, b"cb", open_(9, env="Secret-v0"))
        served = hdr(out[0])["msg"].split("workers serve:")[1].split(".")[0]
        assert hdr(out[0])["code"] == "no_worker" and served == " CartPole-v1"

    def test_status_needs_a_key_and_majordomo_peers_are_refused(self, core):
        assert b'"error": "auth"' in answer(core, b"remoterl.status", [])[0]
        assert b'"error": "auth"' in answer(core, b"remoterl.status", [b"nope"])[0]
        assert send(core, b"m1", [b"MDPW02", b"\x01", b"echo"])[0][1:] == [b"MDPW02", b"\x06"]
        assert core.mdp_workers == {}
        send(core, b"m2", [b"MDPC02", b"\x01", b"mmi.service", b"echo"])
        assert core.counters["malformed"] >= 1 and core.mdp_services == {}

    def test_heartbeat_needs_the_peers_own_key(self, core):
        send(core, b"wa", ready("key-alpha"))
        hb = lambda key: [p.worker_frame(W.HEARTBEAT), p.encode_header({"id": b"wa", "key": key})]  # noqa: E731
        assert hdr(send(core, b"side", hb("key-beta"), now=2.0)[0])["known"] is False
        assert hdr(send(core, b"side", hb("key-alpha"), now=2.0)[0])["known"] is True
        core.tick(3.3)  # 2.0 + 3 s window not yet over for the refreshed worker
        assert b"wa" in core.workers

    def test_slot_limit_per_tenant(self, core):
        send(core, b"wa", ready("key-alpha", capacity=100))
        send(core, b"ca", hello("key-alpha"))
        out = send(core, b"ca", open_(1, n=7))
        assert hdr(out[0])["code"] == "limit" and "at most 6" in hdr(out[0])["msg"]
        assert core.slots == {}
        assert send(core, b"ca", open_(2, n=6))[0][0] == b"wa"

    def test_new_connections_are_rate_limited(self):
        core = BrokerCore(BrokerConfig(api_keys=dict(KEYS), max_new_peers_per_second=3), now=0.0)
        codes = [hdr(send(core, bytes([65 + i]), hello("key-alpha"), now=1.0)[0]).get("code") for i in range(5)]
        assert codes == [None, None, None, "limit", "limit"]
        assert hdr(send(core, b"late", hello("key-alpha"), now=2.5)[0]).get("code") is None

    def test_keys_never_appear_in_logs_or_status(self, core, caplog):
        caplog.set_level("DEBUG")
        send(core, b"wa", ready("key-alpha"))
        send(core, b"c1", hello("key-beta-wrong"))
        snap = answer(core, b"remoterl.status", [b"key-alpha"])[0]
        assert b"key-alpha" not in snap
        assert "key-alpha" not in caplog.text and "key-beta-wrong" not in caplog.text

    def test_reload_keys(self, core):
        core.set_api_keys({"fresh": "gamma"})
        assert hdr(send(core, b"c1", hello("key-alpha"))[0])["code"] == "auth"
        assert send(core, b"c2", hello("fresh"))[0][1] == p.client_frame(C.WELCOME)


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# remoterl keys\nkey-alpha alpha\nkey-beta beta\n")
    return path


def test_cli_keys_end_to_end(procs, broker_url, keys_file):
    start_broker(procs, broker_url, "--api-keys", str(keys_file))
    # A worker with a wrong key is refused and exits non-zero with a clear message.
    bad = procs([*cli("remoterl-worker"), "--broker", broker_url, "--env", "CartPole-v1", "-n", "2",
                 "--procs", "1", "--api-key", "wrong"])
    assert bad.wait() != 0
    assert "API key" in bad.output()
    alpha = start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "4", "--procs", "1",
                         "--api-key", "key-alpha", "--name", "alpha-w")
    beta = start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "4", "--procs", "1",
                        "--api-key", "key-beta", "--name", "beta-w")
    wait_for(lambda: len(status_of("key-alpha", broker_url)["workers"]) == 1
             and len(status_of("key-beta", broker_url)["workers"]) == 1, what="both tenants' workers")
    with pytest.raises(remoterl.AuthenticationError):
        remoterl.Client(broker_url, api_key="wrong").connect()
    with pytest.raises(remoterl.AuthenticationError):
        fetch_status(broker_url, timeout=T)
    ids = {name: {w["id"] for w in status_of(key, broker_url)["workers"]}
           for name, key in (("alpha", "key-alpha"), ("beta", "key-beta"))}
    for key, tenant in (("key-alpha", "alpha"), ("key-beta", "beta")):
        with remoterl.Client(broker_url, api_key=key).connect() as client:
            vec = remoterl.RemoteEnvVec("CartPole-v1", 4, client=client)
            assert {w.hex() for w in vec.workers} == ids[tenant]
            vec.reset(seed=0)
            vec.step(np.zeros(4, np.int64))
            vec.close()
    assert status_of("key-alpha", broker_url)["open_slots"] == 0
    assert alpha.proc.poll() is None and beta.proc.poll() is None


def status_of(key, url):
    return fetch_status(url, timeout=T, api_key=key)


def test_sighup_rereads_the_keys(procs, broker_url, keys_file):
    broker = start_broker(procs, broker_url, "--api-keys", str(keys_file))
    with pytest.raises(remoterl.AuthenticationError):
        remoterl.Client(broker_url, api_key="key-new").connect()
    keys_file.write_text("key-new gamma\n")
    broker.signal(signal.SIGHUP)
    client = wait_for(lambda: _try_connect(broker_url, "key-new"), what="the new key accepted")
    client.close()


def _try_connect(url, key):
    try:
        return remoterl.Client(url, api_key=key, connect_timeout=T).connect()
    except remoterl.AuthenticationError:
        return None


def test_open_mode_refuses_non_loopback_bind():
    out = subprocess.run([*cli("remoterl-broker"), "--bind", "tcp://0.0.0.0:0"], capture_output=True, text=True,
                         timeout=T)
    assert out.returncode != 0 and "--api-keys" in out.stderr and "--insecure" in out.stderr


def test_curve_encrypts_tcp(procs, broker_url, tmp_path):
    out = subprocess.run([*cli("remoterl"), "keygen", str(tmp_path)], capture_output=True, text=True, timeout=T)
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "broker.key", tmp_path / "broker.key_secret"
    assert public.exists() and secret.exists() and (secret.stat().st_mode & 0o077) == 0
    procs([*cli("remoterl-broker"), "--bind", broker_url, "--heartbeat", "0.2", "--curve-secret", str(secret)])
    wait_for(lambda: _curve_status(broker_url, str(public)), what="CURVE broker answering")
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "2", "--procs", "1",
                 "--curve-serverkey", str(public))
    wait_for(lambda: len(_curve_status(broker_url, str(public))["workers"]) == 1, what="CURVE worker")
    with remoterl.Client(broker_url, curve_serverkey=str(public)).connect() as client:
        vec = remoterl.RemoteEnvVec("CartPole-v1", 2, client=client)
        vec.reset(seed=1)
        assert vec.step(np.ones(2, np.int64))[0].shape == (2, 4)
        vec.close()
    # Without the broker's public key nothing gets through: the handshake fails (mechanism
    # mismatch), which the client reports at once instead of timing out.
    with pytest.raises(remoterl.AuthenticationError, match="CURVE"):
        remoterl.Client(broker_url, connect_timeout=T).connect()
    with pytest.raises(remoterl.AuthenticationError, match="uses CURVE"):  # PLAIN, then no credentials: CURVE
        remoterl.Client(broker_url, api_key="some-key", connect_timeout=T).connect()


def _curve_status(url, public):
    try:
        return fetch_status(url, timeout=1.0, curve_serverkey=public)
    except remoterl.BrokerUnavailableError:
        return None


def test_refused_call_does_not_reveal_another_tenants_worker(core):
    send(core, b"wa", ready("key-alpha"))
    send(core, b"cb", hello("key-beta"))
    header = remoterl.wire.codec.encode({"r": 4, "op": "step"})[0]
    out = send(core, b"cb", [p.client_frame(C.CALL), b"wa", header])
    unknown = send(core, b"cb", [p.client_frame(C.CALL), b"nobody", header])
    assert hdr(out[0])["code"] == hdr(unknown[0])["code"] == "worker_lost"


def test_rate_limited_worker_retries_instead_of_stopping(procs, broker_url, keys_file):
    start_broker(procs, broker_url, "--api-keys", str(keys_file), "--max-new-connections", "1")
    # Two workers at once: one is refused with `limit` and must register on a later try.
    for name in ("w1", "w2"):
        start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "1", "--procs", "1",
                     "--api-key", "key-alpha", "--name", name)
    wait_for(lambda: len(status_of("key-alpha", broker_url)["workers"]) == 2, timeout=3 * T,
             what="both workers registered despite the rate limit")


# --- keys at the ZeroMQ handshake (PLAIN + ZAP, key mode) ----------------------------------------------

WRONG = "sekrit-wrong-4711"  # must never show up in an error message or a log


@pytest.fixture
def key_broker():
    """A key-mode broker in a thread of this process, with its own zmq context (its ZAP handler
    lives there), so its counters can be read directly."""
    import zmq

    from conftest import HEARTBEAT, LIVENESS
    from remoterl.broker.loop import Broker

    ctx = zmq.Context()
    broker = Broker("tcp://127.0.0.1:*", BrokerConfig(heartbeat=HEARTBEAT, liveness=LIVENESS, api_keys=dict(KEYS)),
                    context=ctx)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        ctx.destroy(linger=0)


def _first_failure(monitor, timeout: float = T) -> int | None:
    """The first handshake failure a socket monitor reports within ``timeout`` (None: none)."""
    import time

    import zmq
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and monitor.poll(left * 1000):
        event = recv_monitor_message(monitor)["event"]
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return event
    return None


def test_peer_without_a_valid_key_delivers_nothing(procs, key_broker):
    """A frame-count bomb (MAX_FRAMES * 10 frames, then a HELLO) from a peer without a key, and
    one from a peer with a wrong key, never reach the broker's loop: the handshake stops them.
    A keyed trainer keeps stepping meanwhile."""
    import threading
    import time

    import zmq

    url = key_broker.url
    worker = start_worker(procs, url, "--env", "CartPole-v1", "-n", "4", "--procs", "1", "--api-key", "key-alpha")
    wait_for(lambda: status_of("key-alpha", url)["workers"] or worker.proc.poll() is not None, what="keyed worker")
    assert worker.proc.poll() is None, worker.output()
    latencies, errors, stop = [], [], threading.Event()
    with remoterl.Client(url, api_key="key-alpha").connect() as client:
        vec = remoterl.RemoteEnvVec("CartPole-v1", 4, client=client)
        vec.reset(seed=0)

        def trainer():
            try:
                while not stop.is_set():
                    started = time.perf_counter()
                    vec.step(np.zeros(4, np.int64))
                    latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=trainer)
        thread.start()
        ctx = zmq.Context()
        try:
            failed = []
            for key in (None, WRONG):
                bomb = ctx.socket(zmq.DEALER)
                bomb.setsockopt(zmq.LINGER, 0)
                if key:
                    bomb.plain_username, bomb.plain_password = b"remoterl", key.encode()
                events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
                monitor = bomb.get_monitor_socket(events)  # before connect: see every handshake
                bomb.connect(url)
                bomb.send(p.client_frame(C.CALL), zmq.SNDMORE)
                for _ in range(p.MAX_FRAMES * 10):
                    bomb.send(b"", zmq.SNDMORE)
                bomb.send(b"")
                try:  # after a refused handshake libzmq drops the connection's queue: nowhere to send
                    bomb.send_multipart(hello(), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                failed.append(_first_failure(monitor))
                bomb.disable_monitor()
                monitor.close(0)
                bomb.close(0)
            steps = len(latencies)
            wait_for(lambda: len(latencies) >= steps + 50 or errors, what="the trainer stepping after the bombs")
        finally:
            stop.set()
            thread.join(T)
            ctx.destroy(linger=0)
        clients = len(key_broker.core.clients)
        vec.close()
    assert not errors, errors
    # No key: a mechanism mismatch (or the broker closing the connection first); a wrong key: ZAP said 400.
    assert failed[0] in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL), failed
    assert failed[1] == zmq.EVENT_HANDSHAKE_FAILED_AUTH, failed
    counters = key_broker.core.counters
    assert counters["too_many_frames"] == 0 and counters["auth_refused"] == 0  # no bomb, no HELLO arrived
    assert counters["handshakes_refused"] >= 1 and counters["handshakes_accepted"] >= 2
    assert clients == 1  # just the trainer
    assert max(latencies) < 1.0, max(latencies)  # (draining MAX_FRAMES * 10 frames takes ~1 s alone)


def test_wrong_or_missing_key_fails_at_the_handshake_promptly(procs, key_broker):
    import time

    url = key_broker.url
    for attempt in (lambda: remoterl.Client(url, api_key=WRONG, connect_timeout=T).connect(),
                    lambda: fetch_status(url, timeout=T, api_key=WRONG)):
        started = time.monotonic()
        with pytest.raises(remoterl.AuthenticationError, match="refused this API key") as info:
            attempt()
        assert time.monotonic() - started < T / 4 and WRONG not in str(info.value)
    for attempt in (lambda: remoterl.Client(url, connect_timeout=T).connect(),
                    lambda: fetch_status(url, timeout=T)):
        started = time.monotonic()
        with pytest.raises(remoterl.AuthenticationError, match="requires an API key"):
            attempt()
        assert time.monotonic() - started < T / 4
    started = time.monotonic()
    bad = procs([*cli("remoterl-worker"), "--broker", url, "--env", "CartPole-v1", "-n", "1", "--procs", "1",
                 "--api-key", WRONG])
    assert bad.wait() != 0 and time.monotonic() - started < T
    output = bad.output()
    assert "refused this API key" in output and WRONG not in output
    assert key_broker.core.counters["handshakes_refused"] >= 3
    # The right key still works, trainer and status alike.
    with remoterl.Client(url, api_key="key-beta", connect_timeout=T).connect() as client:
        assert client.broker_instance == key_broker.core.instance
    assert fetch_status(url, timeout=T, api_key="key-beta")["workers"] == []


def test_keyed_peers_still_reach_an_open_broker(procs, broker_url):
    """PLAIN meets a broker without API keys (it speaks NULL): the client connects again without
    credentials, so a key in $REMOTERL_API_KEY keeps working against open brokers."""
    import time

    start_broker(procs, broker_url)
    started = time.monotonic()
    with remoterl.Client(broker_url, api_key="any-key", connect_timeout=T).connect():
        assert time.monotonic() - started < T / 4
    assert fetch_status(broker_url, timeout=T, api_key="any-key")["workers"] == []
    start_worker(procs, broker_url, "--env", "CartPole-v1", "-n", "1", "--procs", "1", "--api-key", "any-key",
                 expect=1)
    with remoterl.Client(broker_url, api_key="any-key").connect() as client:
        vec = remoterl.RemoteEnvVec("CartPole-v1", 1, client=client)
        vec.reset(seed=0)
        vec.step(np.zeros(1, np.int64))
        vec.close()


def test_embedded_default_with_an_api_key(monkeypatch):
    """The embedded broker (open mode) with $REMOTERL_API_KEY set: this process reaches it over
    inproc (no handshake), subprocess children over its tcp address (PLAIN falls back)."""
    from remoterl.embedded import Embedded
    from remoterl.client.connection import connect_client

    monkeypatch.setenv("REMOTERL_API_KEY", "key-of-a-remote-broker")
    embedded = Embedded(1, 2)
    try:
        tcp = embedded.start()
        for url in (embedded.local_url, tcp):
            client = connect_client(url, api_key="key-of-a-remote-broker", connect_timeout=T)
            try:
                vec = remoterl.RemoteEnvVec("CartPole-v1", 2, client=client)
                vec.reset(seed=0)
                vec.step(np.zeros(2, np.int64))
                vec.close()
            finally:
                client.close()
    finally:
        remoterl.shutdown()
        embedded.stop()


class TestZapHandler:
    """The broker's answers to ZAP requests (RFC 27), without sockets."""

    @pytest.fixture
    def broker(self):
        import zmq

        from remoterl.broker.loop import Broker

        ctx = zmq.Context()
        yield Broker("tcp://127.0.0.1:*", BrokerConfig(api_keys=dict(KEYS)), context=ctx)
        ctx.destroy(linger=0)

    @staticmethod
    def request(mechanism=b"PLAIN", credentials=(b"remoterl", b"key-alpha"), domain=b"remoterl"):
        return [b"1.0", b"7", domain, b"127.0.0.1", b"", mechanism, *credentials]

    def test_valid_key_is_accepted_as_its_tenant(self, broker):
        assert broker._zap_reply(self.request()) == [b"1.0", b"7", b"200", b"OK", b"alpha", b""]
        assert broker.core.counters["handshakes_accepted"] == 1
        assert broker.core.tenant_counters["alpha"]["handshakes_accepted"] == 1

    @pytest.mark.parametrize("request_", [
        {"credentials": (b"remoterl", WRONG.encode())},
        {"credentials": (b"remoterl", b"")},
        {"credentials": (b"remoterl", b"\xff\xfe")},
        {"credentials": (b"admin", b"key-alpha")},
        {"credentials": (b"remoterl",)},
        {"mechanism": b"CURVE", "credentials": (b"x" * 32,)},
        {"mechanism": b"NULL", "credentials": ()},
        {"domain": b"other"},
    ], ids=["wrong-key", "empty-key", "not-utf8", "username", "no-password", "curve", "null", "domain"])
    def test_anything_else_is_refused(self, broker, request_, caplog):
        caplog.set_level("DEBUG")
        reply = broker._zap_reply(self.request(**request_))
        assert reply[:3] == [b"1.0", b"7", b"400"] and reply[4:] == [b"", b""]
        assert WRONG.encode() not in reply[3] and WRONG not in caplog.text
        assert broker.core.counters["handshakes_refused"] == 1

    @pytest.mark.parametrize("request_", [[], [b"1.0"], [b"2.0", b"7", b"remoterl", b"", b"", b"PLAIN"],
                                          [b"1.0", b"7", b"remoterl"]])
    def test_malformed_requests_get_500(self, broker, request_):
        reply = broker._zap_reply(request_)
        assert reply[0] == b"1.0" and reply[2] == b"500" and len(reply) == 6

    def test_reloaded_keys_apply_to_the_next_handshake(self, broker):
        broker.core.set_api_keys({"fresh": "gamma"})
        assert broker._zap_reply(self.request())[2] == b"400"
        assert broker._zap_reply(self.request(credentials=(b"remoterl", b"fresh")))[2:5] == [b"200", b"OK", b"gamma"]


def test_two_key_mode_brokers_need_two_contexts():
    import zmq

    from remoterl.broker.loop import Broker

    config = BrokerConfig(api_keys=dict(KEYS))
    shared, own = zmq.Context(), zmq.Context()
    first = Broker("tcp://127.0.0.1:*", config, context=shared)
    try:
        first.bind()
        with pytest.raises(RuntimeError, match=r"context=zmq.Context\(\)"):
            Broker("tcp://127.0.0.1:*", config, context=shared).bind()
        second = Broker("tcp://127.0.0.1:*", config, context=own)
        second.bind()
        second._close()
        # An open broker and a CURVE broker need no ZAP handler: they share the context.
        for broker in (Broker("tcp://127.0.0.1:*", context=shared),):
            broker.bind()
            assert broker._zap is None and not broker._sock.plain_server
            broker._close()
    finally:
        first._close()
        shared.destroy(linger=0)
        own.destroy(linger=0)
