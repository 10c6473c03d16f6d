"""The raw pyzmq floor: DEALER client → pure-Python ROUTER forwarder → DEALER echo worker.

This is the least a Python broker hop can cost on this machine: the forwarder and the
echo worker are each their own process, do nothing but ``recv_multipart`` /
``send_multipart`` and swap routing frames, like a Majordomo broker with no state.
``bench/run.py`` compares ``RemoteEnv.step`` with a round trip through it carrying a
payload of the same size, and big-observation steps with a small request answered by a
reply of the same size as theirs (:meth:`Floor.round_trip_sized`).

    python bench/floor.py forwarder PARENT_PID copy|nocopy   # prints its tcp:// URL on stdout
    python bench/floor.py echo PARENT_PID URL

``nocopy``: the forwarder receives payload frames as ``zmq.Frame`` and re-sends them
untouched (cheaper for big payloads, dearer for small ones).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import zmq

__all__ = ["Floor"]

_READY = b"READY"
_SIZED = b"SIZE"


def sized_request(reply_bytes: int, request_bytes: int = 100) -> bytes:
    """A request of ``request_bytes`` asking the echo worker for a reply of ``reply_bytes``."""
    head = _SIZED + reply_bytes.to_bytes(8, "little")
    return head + bytes(max(0, request_bytes - len(head)))


class Floor:
    """The forwarder and echo processes, and a client socket to time round trips with."""

    def __init__(self, zero_copy: bool = False) -> None:
        self.zero_copy = zero_copy
        self._procs: list[subprocess.Popen] = []
        self.url: str | None = None
        self._sock: zmq.Socket | None = None

    def start(self, timeout: float = 30.0) -> Floor:
        import os

        fwd = self._spawn("forwarder", str(os.getpid()), "nocopy" if self.zero_copy else "copy",
                          stdout=subprocess.PIPE)
        assert fwd.stdout is not None
        self.url = fwd.stdout.readline().strip()  # bounded: the child exits on error
        fwd.stdout.close()
        if not self.url.startswith("tcp://"):
            self.stop()
            raise RuntimeError(f"the floor forwarder did not start (exit code {fwd.poll()})")
        self._spawn("echo", str(os.getpid()), self.url)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.url)
        self._sock = sock
        # The echo worker may not have said READY yet: the forwarder drops what it cannot
        # route, so ping until an answer comes back (bounded).
        deadline = time.monotonic() + timeout
        while True:
            sock.send(b"ping")
            if sock.poll(100):
                sock.recv()
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the floor echo worker did not answer")
        while sock.poll(50):  # drain late echoes of the extra pings
            sock.recv()
        return self

    def _spawn(self, *args: str, **popen) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.DEVNULL, text=True, **popen)
        self._procs.append(proc)
        return proc

    def round_trip(self, payload: bytes) -> None:
        """Send ``payload`` through the forwarder and back (one message each way)."""
        sock = self._sock
        assert sock is not None
        sock.send(payload)
        sock.recv()

    def round_trip_sized(self, request: bytes) -> None:
        """Send a request made by :func:`sized_request`; receive the big reply it asks for."""
        sock = self._sock
        assert sock is not None
        sock.send(request)
        sock.recv(copy=False)

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


def _forwarder(zero_copy: bool) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    sys.stdout.close()
    send = sock.send_multipart
    if zero_copy:
        recv_frame, more, RCVMORE = sock.recv, sock.getsockopt, zmq.RCVMORE

        def recv() -> list:
            # Routing frames as bytes (compared below); everything after them as zmq.Frame.
            frames = [recv_frame()]
            while more(RCVMORE):
                frames.append(recv_frame(copy=len(frames) < 2))
            return frames
    else:
        recv = sock.recv_multipart
    worker = None
    while True:
        frames = recv()
        sender = frames[0]
        if sender == worker:
            send(frames[1:])  # [client, payload...] → the client
        elif len(frames) == 2 and bytes(frames[1]) == _READY:
            worker = sender
        elif worker is not None:
            send([worker, *frames])  # [worker, client, payload...]


def _echo(url: str) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    sock.send(_READY)
    recv, send = sock.recv_multipart, sock.send_multipart
    replies: dict[int, bytes] = {}
    while True:
        frames = recv()  # [client, payload]
        payload = frames[-1]
        if payload[:4] == _SIZED and len(frames) == 2:
            size = int.from_bytes(payload[4:12], "little")
            if size not in replies:
                replies = {size: bytes(size)}  # cached: the floor pays nothing to make its reply
            send([frames[0], replies[size]], copy=False)
        else:
            send(frames)  # back as it came


def main(argv: list[str]) -> None:
    from remoterl.io.process import die_with_parent

    die_with_parent(int(argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent; SIGTERM kills at once
    if argv[0] == "forwarder":
        _forwarder(argv[2] == "nocopy")
    elif argv[0] == "echo":
        _echo(argv[2])
    else:
        raise SystemExit(f"unknown role {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
