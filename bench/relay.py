"""A WAN link in a process: a TCP forwarder on 127.0.0.1 adding delay and capping bandwidth.

    python bench/relay.py --to 127.0.0.1:5555 --delay-ms 10 --mbit 100   # prints "127.0.0.1:PORT"

The ``wan`` case puts one between a trainer and its broker: a ZeroMQ tcp connection is a
plain byte stream, so forwarding bytes is enough, whatever the frames say.

Theory of operation
-------------------
Each accepted connection gets a connection to ``--to`` and two independent directions
(:class:`_Direction`), each modelling one way of a link: a pipe of ``mbit`` Mbit/s whose
bytes arrive ``delay_ms`` after they left.

* A reader thread reads whatever the source has (at most 64 KiB), cuts it in pieces of at
  most 16 KiB when the bandwidth is capped, and stamps each with the instant it reaches the far end: the link starts
  sending a piece when the link is free (``max(now, free)``), is busy with it for
  ``size × 8 / rate`` seconds (serialization, the bandwidth cap) and the piece arrives
  ``delay`` later (propagation). Without ``--mbit`` serialization costs nothing.
* A writer thread writes the pieces in the order they were read, each not before its
  instant (it sleeps until just before it and yields the last 0.3 ms, so the delay is what
  was asked for, not that plus a sleep's overshoot). Order is kept because the instants never
  decrease.
* At most ``--buffer-kb`` per direction wait in between; a reader with no room blocks, so
  TCP's own flow control pushes back on the sender, as a full router queue would (nothing
  is dropped). An end of stream travels the same way and then shuts the far side's writing
  half; an error on either socket closes the connection.

What it does not do: loss, reordering, jitter, a shared bottleneck between connections (each
connection's directions have their own rate), or anything to TCP's windows: the kernel
buffers on both sides of the relay hold more than a real path's bandwidth-delay product
would let through before an ACK.

It stops by itself: when the parent named by ``--parent`` dies (``PR_SET_PDEATHSIG`` on
Linux, and a check every 0.2 s), after ``--time-limit`` seconds (900 by default), on
SIGTERM/SIGINT, and with ``--stdin`` when its standard input reaches end of file (the parent
closed it or died); with ``--stdin``, ``stats`` on a line answers a JSON line of byte counts
(``up``: towards ``--to``; ``down``: back). :class:`Relay` is the parent's side of all this.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["Relay", "main", "parse_args"]

_READ = 64 * 1024
_PIECE = 16 * 1024  # the pacing quantum: 1.3 ms at 100 Mbit/s
# A writer sleeps until this long before a piece's instant, then yields until it (a sleep on a
# loaded VM wakes 0.1-0.3 ms late, which the delay would otherwise grow by, twice per round trip).
_SPIN = 0.0003
_EOF = b""


class _Link:
    """One way of the emulated link: when a piece read now arrives at the far end."""

    def __init__(self, delay: float, mbit: float | None) -> None:
        self.delay = delay
        self.seconds_per_byte = 8.0 / (mbit * 1e6) if mbit else 0.0
        self._free = 0.0  # the monotonic instant the link has sent all it was given

    def arrival(self, size: int, now: float) -> float:
        start = max(now, self._free)
        self._free = start + size * self.seconds_per_byte  # serialization at the capped rate
        return self._free + self.delay  # then propagation


class _Direction:
    """Bytes from ``src`` to ``dst``, each piece written at its arrival instant."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, link: _Link,
                 buffer_bytes: int, counter: str) -> None:
        self.conn, self.src, self.dst, self.link = conn, src, dst, link
        self.buffer_bytes = max(buffer_bytes, _READ)
        self.counter = counter
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self.done = threading.Event()

    def start(self) -> None:
        for target, role in ((self._read, "read"), (self._write, "write")):
            threading.Thread(target=target, name=f"relay-{self.counter}-{role}", daemon=True).start()

    def _push(self, piece: bytes) -> None:
        with self._cond:
            while self._queued + len(piece) > self.buffer_bytes and not self.conn.closed:
                self._cond.wait(0.2)  # bounded buffer: stop reading, TCP pushes back on the sender
            due = self.link.arrival(len(piece), time.monotonic())
            self._queue.append((due, piece))
            self._queued += len(piece)
            self._cond.notify_all()

    def _read(self) -> None:
        try:
            while not self.conn.closed:
                data = self.src.recv(_READ)
                if not data:
                    break
                step = _PIECE if self.link.seconds_per_byte else len(data)  # pacing needs small pieces
                for i in range(0, len(data), step):
                    self._push(data[i:i + step])
        except OSError:
            self.conn.close()
        self._push(_EOF)

    def _write(self) -> None:
        clock, sleep = time.monotonic, time.sleep
        try:
            while True:
                with self._cond:
                    while not self._queue and not self.conn.closed:
                        self._cond.wait(0.2)
                    if not self._queue:
                        return  # closed
                    due, piece = self._queue.popleft()
                    self._queued -= len(piece)
                    self._cond.notify_all()
                wait = due - clock() - _SPIN
                if wait > 0:
                    sleep(wait)
                while clock() < due:  # the last stretch: a sleep overshoots by 0.1 ms or more
                    sleep(0)
                if piece is _EOF:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(piece)
                self.conn.relay.count(self.counter, len(piece))
        except OSError:
            self.conn.close()
        finally:
            self.done.set()
            self.conn.direction_done()


class _Connection:
    """One accepted client and its connection upstream."""

    def __init__(self, relay: _Server, client: socket.socket, upstream: socket.socket) -> None:
        self.relay, self.client, self.upstream = relay, client, upstream
        self.closed = False
        a = relay.args
        self.directions = (
            _Direction(self, client, upstream, _Link(a.delay_ms / 1e3, a.mbit), a.buffer_kb * 1024, "up"),
            _Direction(self, upstream, client, _Link(a.delay_ms / 1e3, a.mbit), a.buffer_kb * 1024, "down"))

    def start(self) -> None:
        for d in self.directions:
            d.start()

    def direction_done(self) -> None:
        if all(d.done.is_set() for d in self.directions):
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
            sock.close()
        self.relay.forget(self)


class _Server:
    """The listening socket, the accept loop, the connections and the byte counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._bytes = {"up": 0, "down": 0}
        self._connections: set[_Connection] = set()
        self.accepted = 0
        host, port = _address(args.listen)
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)

    def count(self, counter: str, n: int) -> None:
        with self._lock:
            self._bytes[counter] += n

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._bytes, "connections": len(self._connections), "accepted": self.accepted}

    def serve(self) -> None:
        deadline = time.monotonic() + self.args.time_limit
        while not self.stop.is_set():
            if time.monotonic() > deadline or (self.args.parent and os.getppid() != self.args.parent):
                break
            try:
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            with self._lock:
                full = len(self._connections) >= self.args.max_connections
            if full:
                client.close()
                continue
            try:
                upstream = socket.create_connection(_address(self.args.to), timeout=5.0)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours to add
            conn = _Connection(self, client, upstream)
            with self._lock:
                self._connections.add(conn)
                self.accepted += 1
            conn.start()
        self.sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()

    def commands(self) -> None:
        """Answer ``stats`` lines on stdin; end of file stops the relay."""
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(self.stats()), flush=True)
        self.stop.set()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/relay.py", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: %(default)s)")
    parser.add_argument("--to", required=True, help="HOST:PORT (or tcp://HOST:PORT) to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    parser.add_argument("--mbit", type=float, default=None, help="bandwidth cap per direction, Mbit/s (none)")
    parser.add_argument("--buffer-kb", type=int, default=4096, help="bytes waiting per direction (KiB)")
    parser.add_argument("--max-connections", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds before it stops by itself")
    parser.add_argument("--parent", type=int, default=0, help="stop when this process dies")
    parser.add_argument("--stdin", action="store_true",
                        help="answer 'stats' lines on stdin, and stop at its end of file")
    args = parser.parse_args(argv)
    _address(args.listen), _address(args.to)  # fail early on a bad address
    if args.delay_ms < 0 or (args.mbit is not None and args.mbit <= 0) or args.time_limit <= 0:
        parser.error("--delay-ms must be >= 0, --mbit and --time-limit positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.parent:
        from remoterl.io.process import die_with_parent

        die_with_parent(args.parent)
    server = _Server(args)
    signal.signal(signal.SIGTERM, lambda *_: server.stop.set())
    signal.signal(signal.SIGINT, lambda *_: server.stop.set())
    host, port = server.sock.getsockname()[:2]
    print(f"{host}:{port}", flush=True)
    if args.stdin:
        threading.Thread(target=server.commands, name="relay-stdin", daemon=True).start()
    server.serve()


class Relay:
    """The parent's side: a relay process to ``to``, its URL and its byte counters.

    Args:
        to: ``tcp://HOST:PORT`` or ``HOST:PORT`` to forward to.
        delay: one-way delay in seconds, each direction.
        mbit: bandwidth cap per direction in Mbit/s (``None``: none).
        time_limit: seconds before the relay stops by itself.
    """

    def __init__(self, to: str, delay: float = 0.0, mbit: float | None = None, time_limit: float = 900.0,
                 buffer_kb: int = 4096) -> None:
        self.to, self.delay, self.mbit = to, delay, mbit
        self.time_limit, self.buffer_kb = time_limit, buffer_kb
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 30.0) -> Relay:
        cmd = [sys.executable, os.path.abspath(__file__), "--to", self.to, "--delay-ms", repr(self.delay * 1e3),
               "--time-limit", repr(self.time_limit), "--buffer-kb", str(self.buffer_kb),
               "--parent", str(os.getpid()), "--stdin"]
        if self.mbit:
            cmd += ["--mbit", repr(self.mbit)]
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))  # the remoterl this process uses
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": path})
        line = self._readline(timeout)
        if not line:
            self.stop()
            raise RuntimeError("the relay did not start")
        self.url = f"tcp://{line}"
        return self

    def _readline(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)  # bounded: a stuck relay is stopped by the caller
        return result[0].strip() if result else ""

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """Bytes the relay has written each way so far (``up``, ``down``), and its connections."""
        with self._lock:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write("stats\n")
            self._proc.stdin.flush()
            line = self._readline(timeout)
        if not line:
            raise RuntimeError("the relay did not answer 'stats'")
        return json.loads(line)

    def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it stops by itself), SIGTERM, then SIGKILL whatever is left."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        for action in (lambda: None, proc.terminate, proc.kill):
            action()
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    main()
