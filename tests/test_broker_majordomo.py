"""Majordomo peers against a real broker process, framed as third-party peers frame them:
zguide's mdcliapi (MDP/0.1 over REQ), mdwrkapi (MDP/0.1 over DEALER, silent while it
works), an RFC 18 asynchronous client, and majortomo 0.2.0's client dialect. The frames
are written here from those peers' sources; no third-party package is needed.

The broker runs with a short MDP heartbeat (``MDP_HEARTBEAT`` × ``MDP_LIVENESS``), so that
a request taking three MDP windows takes seconds, not the 22.5 s that three default
windows (2.5 s × 3) would.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import pytest
import zmq

from conftest import HEARTBEAT, LIVENESS, T, status, wait_for

MDP_HEARTBEAT = 0.2
MDP_LIVENESS = 3
WINDOW = MDP_HEARTBEAT * MDP_LIVENESS

# The broker of these tests: remoterl peers keep the suite's fast heartbeat, MDP workers get
# their own (BrokerConfig.mdp_heartbeat / mdp_liveness; the CLI has no option for them).
_BROKER = f"""
import signal, sys
from remoterl.broker.core import BrokerConfig
from remoterl.broker.loop import Broker
broker = Broker(sys.argv[1], BrokerConfig(heartbeat={HEARTBEAT}, liveness={LIVENESS},
                                          mdp_heartbeat={MDP_HEARTBEAT}, mdp_liveness={MDP_LIVENESS}))
signal.signal(signal.SIGTERM, lambda *_: broker.stop(join=False))
broker.bind()
broker.run()
"""


@pytest.fixture
def mdp_broker(procs, broker_url):
    proc = procs([sys.executable, "-c", _BROKER, broker_url])
    status(broker_url)  # bounded: raises if the broker does not answer within T
    yield broker_url
    assert proc.proc.poll() is None, proc.output()


def _dealer(url: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


class Mdwrk(threading.Thread):
    """A worker framed and paced like zguide's mdwrkapi (MDP/0.1): a DEALER whose messages
    start with an empty frame; HEARTBEAT every ``MDP_HEARTBEAT`` s while waiting, nothing at
    all while it works on a request (``work`` seconds), then the REPLY."""

    def __init__(self, url: str, service: bytes, work: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.url, self.service, self.work = url, service, work
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.commands: list[bytes] = []  # every command byte the broker sent
        self.served = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        sock = _dealer(self.url)
        try:
            sock.send_multipart([b"", b"MDPW01", b"\x01", self.service])
            self.ready.set()
            beat_at = time.monotonic() + MDP_HEARTBEAT
            while not self.stop.is_set():
                if sock.poll(max(beat_at - time.monotonic(), 0.0) * 1000):
                    frames = sock.recv_multipart()
                    assert frames[:2] == [b"", b"MDPW01"], frames
                    self.commands.append(frames[2])
                    if frames[2] == b"\x02":  # REQUEST: ["" MDPW01 0x02 client "" body...]
                        time.sleep(self.work)  # the job itself: no heartbeats meanwhile
                        sock.send_multipart([b"", b"MDPW01", b"\x03", frames[3], b"", *frames[5:]])
                        self.served += 1
                        beat_at = time.monotonic() + MDP_HEARTBEAT
                if time.monotonic() >= beat_at:
                    sock.send_multipart([b"", b"MDPW01", b"\x04"])
                    beat_at = time.monotonic() + MDP_HEARTBEAT
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc
        finally:
            sock.close()



@contextlib.contextmanager
def mdwrk(url: str, service: bytes, work: float = 0.0):
    """Run an :class:`Mdwrk` for the ``with`` block; fail if it raised."""
    worker = Mdwrk(url, service, work)
    worker.start()
    assert worker.ready.wait(T)
    try:
        yield worker
    finally:
        worker.stop.set()
        worker.join(T)
    assert not worker.is_alive() and worker.error is None, repr(worker.error)


def _recv(sock: zmq.Socket, what: str) -> list[bytes]:
    assert sock.poll(T * 1000), f"no {what} within {T:g} s"
    return sock.recv_multipart()


def test_busy_silent_worker_is_not_purged_and_its_reply_arrives(mdp_broker):
    """A request that keeps a silent mdwrkapi-style worker busy for three MDP windows is
    answered, and the worker is never told to leave (it used to be purged at one window)."""
    work = 3 * WINDOW
    with mdwrk(mdp_broker, b"slow", work=work) as worker:
        client = zmq.Context.instance().socket(zmq.REQ)  # zguide's mdcliapi
        client.setsockopt(zmq.LINGER, 0)
        client.connect(mdp_broker)
        try:
            start = time.monotonic()
            client.send_multipart([b"MDPC01", b"slow", b"job"])
            assert _recv(client, "reply") == [b"MDPC01", b"slow", b"job"]
            assert time.monotonic() - start >= work
        finally:
            client.close()
        # Idle again: it stays registered through two more windows of the broker's heartbeats.
        beats = worker.commands.count(b"\x04")
        wait_for(lambda: worker.commands.count(b"\x04") >= beats + 2 * MDP_LIVENESS, what="broker heartbeats")
        listed = [w for w in status(mdp_broker)["workers"] if w["kind"] == "mdp/0.1"]
        assert [(w["service"], w["calls"], w["busy"]) for w in listed] == [("slow", 1, False)]
    assert b"\x05" not in worker.commands, "the broker told the worker to leave"
    assert b"\x04" in worker.commands  # the broker heartbeats it
    assert "mdp_workers_expired" not in status(mdp_broker)["counters"]


def test_every_client_framing_is_answered_in_kind(mdp_broker):
    """RFC 7 over REQ, RFC 18 over DEALER with requests in flight together, and majortomo
    0.2.0's dialect, through one broker to one mdwrkapi-style worker."""
    with mdwrk(mdp_broker, b"echo"):
        rfc7 = zmq.Context.instance().socket(zmq.REQ)
        rfc7.setsockopt(zmq.LINGER, 0)
        rfc7.connect(mdp_broker)
        rfc18, majortomo = _dealer(mdp_broker), _dealer(mdp_broker)
        try:
            rfc7.send_multipart([b"MDPC01", b"echo", b"seven"])
            for i in range(3):  # asynchronous: all sent before any reply is read
                rfc18.send_multipart([b"MDPC02", b"\x01", b"echo", b"%d" % i])
            # majortomo's Client.send: ["" "MDPC02" 0x02 service body...]
            majortomo.send_multipart([b"", b"MDPC02", b"\x02", b"echo", b"a", b"b"])
            assert _recv(rfc7, "RFC 7 reply") == [b"MDPC01", b"echo", b"seven"]
            assert sorted(_recv(rfc18, "RFC 18 reply") for _ in range(3)) == [
                [b"MDPC02", b"\x03", b"echo", b"%d" % i] for i in range(3)]
            # majortomo's Client._parse_message: ["" "MDPC02" 0x04 (FINAL) body...], no service frame
            assert _recv(majortomo, "majortomo reply") == [b"", b"MDPC02", b"\x04", b"a", b"b"]
            majortomo.send_multipart([b"", b"MDPC02", b"\x02", b"mmi.service", b"echo"])
            assert _recv(majortomo, "mmi.service reply") == [b"", b"MDPC02", b"\x04", b"200"]
        finally:
            for sock in (rfc7, rfc18, majortomo):
                sock.close()
