"""A trainer, a worker or ``remoterl status`` pointed at the wrong address says what to check.

Three wrong addresses: a port where nothing listens, a port where something that is not
ZeroMQ listens (a WebSocket bridge, a web server), and a ZeroMQ peer that is not a broker.
"""

from __future__ import annotations

import selectors
import signal
import socket
import subprocess
import threading
import time

import pytest
import zmq

from conftest import T, cli, free_url

from remoterl import Client
from remoterl.errors import BrokerUnavailableError


@pytest.fixture
def plain_tcp_url():
    """A tcp:// URL whose port accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(T)
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture
def silent_zmq_url():
    """A ZeroMQ ROUTER that takes every message and answers none."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    sock.close(0)


def connect_error(url: str) -> str:
    with pytest.raises(BrokerUnavailableError) as info:
        Client(url, connect_timeout=1.0).connect()
    return str(info.value)


def test_trainer_told_nothing_listens():
    url = free_url()
    assert "nothing accepts connections at " + url[6:] + " (connection refused)" in connect_error(url)


def test_trainer_told_the_port_does_not_speak_zeromq(plain_tcp_url):
    message = connect_error(plain_tcp_url)
    assert "does not speak ZeroMQ" in message and "ws://" + plain_tcp_url[6:] in message


def test_trainer_told_the_peer_is_not_a_broker(silent_zmq_url):
    assert "did not answer as a remoterl broker" in connect_error(silent_zmq_url)


def test_status_cli_says_what_to_check():
    url = free_url()
    done = subprocess.run([*cli("remoterl"), "status", "--broker", url, "--timeout", "1"],
                          capture_output=True, text=True, timeout=T)
    assert done.returncode != 0
    assert "connection refused" in done.stdout + done.stderr, done


def first_warning(args: list[str]) -> str:
    """Run a worker until its first WARNING line; return it."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    started = time.monotonic()
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() - started < T:
                if selector.select(0.1):
                    line = proc.stdout.readline()
                    if " WARNING " in line:
                        return line
                    if not line:
                        break
        pytest.fail(f"no warning from {args!r} within {T:g} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(T)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(T)
        proc.stdout.close()


def test_worker_at_a_dead_port_says_what_to_check():
    url = free_url()
    line = first_warning([*cli("remoterl-worker"), "--broker", url, "--env", "CartPole-v1", "-n", "1",
                             "--procs", "1", "--heartbeat", "0.3"])
    assert "still trying" in line and "connection refused" in line and "--bind" in line, line


def test_worker_at_a_non_zeromq_port_says_what_to_check(plain_tcp_url):
    line = first_warning([*cli("remoterl-worker"), "--broker", plain_tcp_url, "--env", "CartPole-v1",
                             "-n", "1", "--procs", "1", "--heartbeat", "0.3"])
    assert "does not speak ZeroMQ" in line, line
