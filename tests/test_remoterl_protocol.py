"""Tests for remoterl.wire.protocol: frame-0 signatures, Majordomo (RFC 7 / RFC 18) framing,
remoterl command frames and msgpack headers. Pure functions: no sockets, no state."""

from __future__ import annotations

import random

import msgpack
import pytest

from remoterl.wire import protocol as p
from remoterl.errors import ProtocolError
from remoterl.wire.protocol import ClientCommand, MdpVersion, WorkerCommand

V01, V02 = MdpVersion.V01, MdpVersion.V02


# (version, signature, command byte, name) for every command a worker may send.
WORKER_SENDS = [
    (V01, b"MDPW01", b"\x01", "READY"),
    (V01, b"MDPW01", b"\x03", "FINAL"),       # RFC 7 REPLY
    (V01, b"MDPW01", b"\x04", "HEARTBEAT"),
    (V01, b"MDPW01", b"\x05", "DISCONNECT"),
    (V02, b"MDPW02", b"\x01", "READY"),
    (V02, b"MDPW02", b"\x03", "PARTIAL"),
    (V02, b"MDPW02", b"\x04", "FINAL"),
    (V02, b"MDPW02", b"\x05", "HEARTBEAT"),
    (V02, b"MDPW02", b"\x06", "DISCONNECT"),
]


def _worker_message(sig: bytes, cmd: bytes, name: str) -> list:
    if name == "READY":
        return [sig, cmd, b"echo"]
    if name in ("PARTIAL", "FINAL"):
        return [sig, cmd, b"client-7", b"", b"r1", b"r2"]
    return [sig, cmd]


class TestSignature:
    """Every kind of frame 0 the broker can see maps to exactly one (kind, command)."""

    @pytest.mark.parametrize("command", list(ClientCommand))
    def test_signature_rl_client_commands(self, command):
        frame0 = p.client_frame(command)
        assert frame0 == b"RLC1" + bytes([command])
        assert p.signature(frame0) == ("rl-client", int(command))

    @pytest.mark.parametrize("command", list(WorkerCommand))
    def test_signature_rl_worker_commands(self, command):
        frame0 = p.worker_frame(command)
        assert frame0 == b"RLW1" + bytes([command])
        assert p.signature(frame0) == ("rl-worker", int(command))

    def test_signature_rl_unknown_command_byte_is_still_rl(self):
        # The command byte is checked by the broker's dispatch, not by signature().
        assert p.signature(b"RLC1\xff") == ("rl-client", 0xFF)
        assert p.signature(b"RLW1\x00") == ("rl-worker", 0)

    def test_frame_helpers_examples_from_docstrings(self):
        assert p.client_frame(ClientCommand.CALL) == b"RLC1\x10"
        assert p.worker_frame(WorkerCommand.CALL) == b"RLW1\x10"
        assert p.client_frame(ClientCommand.ERROR) == b"RLC1\x09"

    @pytest.mark.parametrize("frame0", [
        b"RLC2\x01", b"RLW2\x01", b"RLC9\x03", b"RLC0\x10",
        b"RLC1",            # the right version but no command byte
        b"RLW1",
        b"RLC1\x10\x00",    # one byte too many
        b"RLC", b"RLW", b"RLCX",
    ])
    def test_signature_rl_wrong_version_or_length(self, frame0):
        assert p.signature(frame0) == ("rl-version", None)

    @pytest.mark.parametrize("frame0, kind", [
        (b"MDPC01", "mdp-client"), (b"MDPC02", "mdp-client"),
        (b"MDPW01", "mdp-worker"), (b"MDPW02", "mdp-worker"),
    ])
    def test_signature_mdp(self, frame0, kind):
        assert p.signature(frame0) == (kind, None)

    def test_signature_empty_frame_is_mdp01_framing(self):
        assert p.signature(b"") == ("empty", None)

    @pytest.mark.parametrize("frame0", [
        b"MDPC03", b"MDPW00", b"MDPC0", b"MDPC011", b"mdpc02", b"\x00", b"\xff" * 5, b"hello",
        b"RL", b"XLC1\x01", b"\x00" * 100,
    ])
    def test_signature_junk(self, frame0):
        assert p.signature(frame0) == ("unknown", None)


class TestMdpClient:
    """parse_mdp_client / mdp_client_reply: RFC 18 (MDP/0.2), RFC 7 (MDP/0.1), lenient forms."""

    def test_parse_mdp_client_rfc18(self):
        body = [b"part1", b"part2"]
        req = p.parse_mdp_client([b"MDPC02", b"\x01", b"echo", *body])
        assert req == p.MdpClientRequest(V02, b"echo", body, empty_prefix=False)
        assert req.body[0] is body[0]  # body frames pass through

    def test_parse_mdp_client_rfc18_without_body(self):
        req = p.parse_mdp_client([b"MDPC02", b"\x01", b"echo"])
        assert (req.version, req.service, req.body, req.empty_prefix) == (V02, b"echo", [], False)

    def test_parse_mdp_client_rfc18_lenient_empty_prefix(self):
        req = p.parse_mdp_client([b"", b"MDPC02", b"\x01", b"echo", b"x"])
        assert (req.version, req.service, req.body, req.empty_prefix) == (V02, b"echo", [b"x"], True)

    def test_parse_mdp_client_rfc7(self):
        req = p.parse_mdp_client([b"", b"MDPC01", b"echo", b"a", b"b"])
        assert (req.version, req.service, req.body, req.empty_prefix) == (V01, b"echo", [b"a", b"b"], True)

    def test_parse_mdp_client_rfc7_from_dealer_without_empty_frame(self):
        # Accepted; the reply still gets RFC 7's empty frame.
        req = p.parse_mdp_client([b"MDPC01", b"echo", b"a"])
        assert (req.version, req.service, req.body, req.empty_prefix) == (V01, b"echo", [b"a"], True)

    def test_parse_mdp_client_majortomo_dialect(self):
        # majortomo 0.2.0's Client: leading empty frame, REQUEST numbered 0x02 (as RFC 18's
        # worker REQUEST), then service and body.
        body = [b"a", b"b"]
        req = p.parse_mdp_client([b"", b"MDPC02", b"\x02", b"echo", *body])
        assert req == p.MdpClientRequest(V02, b"echo", body, empty_prefix=True, majortomo=True)
        assert req.body[0] is body[0]
        assert p.parse_mdp_client([b"", b"MDPC02", b"\x02", b"echo"]).body == []
        # An RFC 18 request is not mistaken for it, with or without the empty frame.
        assert not p.parse_mdp_client([b"", b"MDPC02", b"\x01", b"echo"]).majortomo
        assert not p.parse_mdp_client([b"MDPC02", b"\x01", b"echo"]).majortomo

    def test_mdp_client_reply_majortomo(self):
        # What majortomo's Client._parse_message reads: "", header, 0x03 PARTIAL / 0x04 FINAL,
        # then the body (no service frame).
        body = [b"x", b"y"]
        final = p.mdp_client_reply(V02, b"echo", body, empty_prefix=True, majortomo=True)
        assert final == [b"", b"MDPC02", b"\x04", b"x", b"y"] and final[3] is body[0]
        partial = p.mdp_client_reply(V02, b"echo", body, final=False, empty_prefix=True, majortomo=True)
        assert partial == [b"", b"MDPC02", b"\x03", b"x", b"y"]

    def test_parse_mdp_client_accepts_buffers(self):
        req = p.parse_mdp_client([memoryview(b"MDPC02"), bytearray(b"\x01"), memoryview(b"echo"), b"x"])
        assert req.service == b"echo" and type(req.service) is bytes
        assert req.version is V02

    @pytest.mark.parametrize("frames", [
        [],
        [b""],
        [b"", b""],
        [b"MDPC02"],
        [b"MDPC02", b"\x01"],                        # no service frame
        [b"", b"MDPC02", b"\x01"],
        [b"MDPC02", b"\x02", b"echo"],               # PARTIAL is broker → client only (majortomo's
                                                     # 0x02 REQUEST comes with an empty frame)
        [b"", b"MDPC02", b"\x02"],                   # majortomo dialect without a service frame
        [b"", b"MDPC02", b"\x03", b"echo", b"x"],    # 0x03/0x04 are replies in either numbering
        [b"", b"MDPC02", b"\x04", b"echo", b"x"],
        [b"MDPC02", b"\x03", b"echo", b"x"],         # FINAL too
        [b"MDPC02", b"", b"echo"],
        [b"MDPC02", b"\x01\x00", b"echo"],
        [b"MDPC01"],                                 # RFC 7: no service frame
        [b"", b"MDPC01"],
        [b"MDPC03", b"\x01", b"echo"],
        [b"MDPW02", b"\x01", b"echo"],               # a worker signature
        [b"RLC1\x03", b"x", b"y"],
        [b"junk"],
        [b"", b"", b"MDPC02", b"\x01", b"echo"],     # only one empty frame is tolerated
    ])
    def test_parse_mdp_client_malformed(self, frames):
        with pytest.raises(ProtocolError):
            p.parse_mdp_client(frames)

    def test_mdp_client_reply_rfc18_final_and_partial(self):
        body = [b"a", b"b"]
        final = p.mdp_client_reply(V02, b"echo", body)
        assert final == [b"MDPC02", b"\x03", b"echo", b"a", b"b"]
        assert final[3] is body[0]
        assert p.mdp_client_reply(V02, b"echo", body, final=False) == [b"MDPC02", b"\x02", b"echo", b"a", b"b"]

    def test_mdp_client_reply_rfc18_with_empty_prefix(self):
        assert p.mdp_client_reply(V02, b"echo", [b"x"], empty_prefix=True) == [b"", b"MDPC02", b"\x03", b"echo", b"x"]
        assert p.mdp_client_reply(V02, b"echo", [b"x"], final=False, empty_prefix=True) == [
            b"", b"MDPC02", b"\x02", b"echo", b"x"]

    @pytest.mark.parametrize("empty_prefix", [False, True])
    def test_mdp_client_reply_rfc7_always_has_empty_frame(self, empty_prefix):
        # RFC 7: [empty] "MDPC01" service body; there is no command frame.
        assert p.mdp_client_reply(V01, b"echo", [b"x"], empty_prefix=empty_prefix) == [b"", b"MDPC01", b"echo", b"x"]

    @pytest.mark.parametrize("frames", [
        [b"MDPC02", b"\x01", b"svc", b"body"],
        [b"", b"MDPC02", b"\x01", b"svc", b"body"],
        [b"", b"MDPC01", b"svc", b"body"],
    ])
    def test_mdp_client_reply_mirrors_request_framing(self, frames):
        req = p.parse_mdp_client(frames)
        reply = p.mdp_client_reply(req.version, req.service, req.body, empty_prefix=req.empty_prefix)
        assert (reply[0] == b"") == (frames[0] == b"")
        assert reply[-2:] == [b"svc", b"body"]


class TestMdpWorker:
    """parse_mdp_worker and the broker → worker frames, with each RFC's command numbers."""

    @pytest.mark.parametrize("prefix", [False, True], ids=["plain", "empty-prefixed"])
    @pytest.mark.parametrize("version, sig, cmd, name", WORKER_SENDS, ids=[f"{s.decode()}-{n}" for _, s, _, n in WORKER_SENDS])
    def test_parse_mdp_worker_every_command(self, version, sig, cmd, name, prefix):
        frames = _worker_message(sig, cmd, name)
        if prefix:
            frames = [b"", *frames]
        msg = p.parse_mdp_worker(frames)
        assert (msg.version, msg.command, msg.empty_prefix) == (version, name, prefix)
        if name == "READY":
            assert (msg.service, msg.client, msg.body) == (b"echo", b"", [])
        elif name in ("PARTIAL", "FINAL"):
            assert (msg.service, msg.client, msg.body) == (b"", b"client-7", [b"r1", b"r2"])
            assert msg.body[0] is frames[-2]
        else:
            assert (msg.service, msg.client, msg.body) == (b"", b"", [])

    def test_parse_mdp_worker_final_without_body(self):
        msg = p.parse_mdp_worker([b"MDPW02", b"\x04", b"c", b""])
        assert (msg.command, msg.client, msg.body) == ("FINAL", b"c", [])

    @pytest.mark.parametrize("frames", [
        [],
        [b""],
        [b"MDPW02"],
        [b"", b"MDPW01"],
        [b"MDPW02", b"\x02", b"c", b"", b"x"],       # REQUEST: broker → worker only
        [b"", b"MDPW01", b"\x02", b"c", b"", b"x"],
        [b"MDPW02", b"\x07"],                        # no such command
        [b"MDPW02", b"\x00"],
        [b"MDPW02", b""],
        [b"MDPW02", b"\x01\x00", b"echo"],
        [b"MDPW01", b"\x06"],                        # DISCONNECT is 0x05 in RFC 7
        [b"MDPW02", b"\x01"],                        # READY without a service
        [b"MDPW02", b"\x01", b""],                   # READY with an empty service
        [b"", b"MDPW01", b"\x01"],
        [b"MDPW02", b"\x04", b"c"],                  # FINAL without the empty delimiter
        [b"MDPW02", b"\x04", b"c", b"x", b"body"],   # FINAL with a non-empty delimiter
        [b"MDPW02", b"\x03", b"c"],
        [b"MDPW01", b"\x03", b"c", b"nonempty"],
        [b"MDPC02", b"\x01", b"echo"],               # a client signature
        [b"MDPW03", b"\x01", b"echo"],
        [b"RLW1\x01", b"x"],
        [b"", b"", b"MDPW02", b"\x05"],
    ])
    def test_parse_mdp_worker_malformed(self, frames):
        with pytest.raises(ProtocolError):
            p.parse_mdp_worker(frames)

    def test_mdp_worker_request_rfc18(self):
        body = [b"hello", b"world"]
        frames = p.mdp_worker_request(V02, b"client-1", body)
        assert frames == [b"MDPW02", b"\x02", b"client-1", b"", b"hello", b"world"]
        assert frames[4] is body[0]

    def test_mdp_worker_request_rfc18_empty_prefixed(self):
        assert p.mdp_worker_request(V02, b"c", [b"x"], empty_prefix=True) == [b"", b"MDPW02", b"\x02", b"c", b"", b"x"]

    def test_mdp_worker_request_rfc7(self):
        # RFC 7: empty, "MDPW01", 0x02, client address, empty, body.
        assert p.mdp_worker_request(V01, b"c", [b"x"]) == [b"", b"MDPW01", b"\x02", b"c", b"", b"x"]

    def test_mdp_worker_heartbeat_and_disconnect(self):
        assert p.mdp_worker_heartbeat(V02) == [b"MDPW02", b"\x05"]
        assert p.mdp_worker_disconnect(V02) == [b"MDPW02", b"\x06"]
        assert p.mdp_worker_heartbeat(V02, empty_prefix=True) == [b"", b"MDPW02", b"\x05"]
        assert p.mdp_worker_heartbeat(V01) == [b"", b"MDPW01", b"\x04"]
        assert p.mdp_worker_disconnect(V01) == [b"", b"MDPW01", b"\x05"]

    @pytest.mark.parametrize("version", [V01, V02])
    def test_broker_to_worker_frames_are_not_parsed_as_worker_sends(self, version):
        # What the broker sends a worker is never something a worker may send back.
        with pytest.raises(ProtocolError):
            p.parse_mdp_worker(p.mdp_worker_request(version, b"c", [b"x"]))
        heartbeat = p.parse_mdp_worker(p.mdp_worker_heartbeat(version))
        assert heartbeat.command == "HEARTBEAT" and heartbeat.version is version
        disconnect = p.parse_mdp_worker(p.mdp_worker_disconnect(version))
        assert disconnect.command == "DISCONNECT" and disconnect.version is version


class TestHeaders:
    """encode_header / decode_header: a round trip for maps, ProtocolError for anything else."""

    @pytest.mark.parametrize("header", [
        {},
        {"r": 5, "env": "CartPole-v1", "n": 8, "kwargs": {"render_mode": None}, "max_workers": None},
        {"slots": [[1, b"worker-a"], [2, b"worker-b"]], "env": {"obs": [1.5, -2]}},
        {"id": b"\x00\xff" * 3, "known": True, "stats": {"steps": 2**63 - 1}},
        {1: "int key", "nested": {"deep": [{"x": [None]}]}},
        {"s": "héllo ✓", "b": b"", "f": float("inf")},
    ])
    def test_header_round_trip(self, header):
        frame = p.encode_header(header)
        assert type(frame) is bytes
        assert p.decode_header(frame) == header

    def test_decode_header_accepts_buffers(self):
        frame = p.encode_header({"r": 1})
        assert p.decode_header(memoryview(frame)) == {"r": 1}
        assert p.decode_header(bytearray(frame)) == {"r": 1}

    def test_encode_header_keeps_bytes_and_str_apart(self):
        decoded = p.decode_header(p.encode_header({"a": b"x", "b": "x"}))
        assert type(decoded["a"]) is bytes and type(decoded["b"]) is str

    @pytest.mark.parametrize("frame", [
        b"",
        b"\xc1",                                     # never used in msgpack
        b"\xc1" + p.encode_header({"r": 1}),
        p.encode_header({"r": 1, "env": "x"})[:-1],  # truncated
        p.encode_header({"r": 1})[:1],
        p.encode_header({"r": 1}) + b"\x00",         # trailing data
        msgpack.packb([1, 2]),                       # valid msgpack, not a map
        msgpack.packb(5),
        msgpack.packb("r"),
        msgpack.packb(None),
        msgpack.packb(b"\x80"),
        b"\x81\xa1r\xa2\xff\xfe",                    # invalid UTF-8 in a str
        b"\x81\x91\x01\x02",                         # a list as a map key (unhashable)
        b"\xdf\xff\xff\xff\xff",                     # a map that claims 4 billion entries
        b"\x81\xa1r" + b"\x91" * 5000 + b"\xc0",     # nested deeper than msgpack allows
        b"junk that is not msgpack at all \xc1",
    ])
    def test_decode_header_junk_raises_protocol_error(self, frame):
        with pytest.raises(ProtocolError):
            p.decode_header(frame)

    def test_decode_header_of_non_buffer_raises_protocol_error(self):
        with pytest.raises(ProtocolError):
            p.decode_header(None)

    def test_decode_header_names_what_it_was_decoding(self):
        with pytest.raises(ProtocolError, match="OPEN header"):
            p.decode_header(b"\xc1", what="OPEN header")

    def test_decode_header_chains_the_msgpack_error(self):
        # Callers catch ProtocolError only; msgpack's own exception is kept as the cause.
        try:
            p.decode_header(b"\x92\x01")
        except ProtocolError as exc:
            assert exc.__cause__ is not None  # chained with `raise … from exc`
        else:  # pragma: no cover
            pytest.fail("no ProtocolError")

    def test_as_bytes(self):
        data = b"abc"
        assert p.as_bytes(data) is data
        assert p.as_bytes(bytearray(b"abc")) == b"abc"
        assert type(p.as_bytes(memoryview(b"abc"))) is bytes

        class FrameLike:  # zmq.Frame caches its copy in .bytes
            bytes = b"cached"

            def __bytes__(self):  # pragma: no cover - must not be called
                raise AssertionError("copied twice")

        assert p.as_bytes(FrameLike()) == b"cached"


class TestFuzz:
    """Random frames: every parser returns a value or raises ProtocolError, nothing else."""

    PIECES = [b"", b"MDPC01", b"MDPC02", b"MDPW01", b"MDPW02", b"RLC1\x03", b"RLW1\x01",
              *(bytes([i]) for i in range(8)), b"echo", b"client"]

    def _frames(self, rng: random.Random) -> list:
        frames = []
        for _ in range(rng.randrange(0, 7)):
            if rng.random() < 0.6:
                frames.append(rng.choice(self.PIECES))
            else:
                frames.append(rng.randbytes(rng.randrange(0, 12)))
        return frames

    @pytest.mark.parametrize("parse", [p.parse_mdp_client, p.parse_mdp_worker])
    def test_mdp_parsers(self, parse):
        rng = random.Random(1234)
        parsed = 0
        for _ in range(5000):
            frames = self._frames(rng)
            try:
                parse(frames)
            except ProtocolError:
                continue
            parsed += 1
        assert 0 < parsed < 5000  # the generator reaches both outcomes

    def test_signature_never_raises(self):
        rng = random.Random(1234)
        for _ in range(5000):
            if rng.random() < 0.5:  # near misses of real signatures
                frame0 = rng.choice(self.PIECES) + rng.randbytes(rng.randrange(0, 3))
            else:
                frame0 = rng.randbytes(rng.randrange(0, 8))
            kind, command = p.signature(frame0)
            assert kind in ("rl-client", "rl-worker", "rl-version", "mdp-client", "mdp-worker", "empty", "unknown")
            assert (command is None) == (kind not in ("rl-client", "rl-worker"))

    def test_decode_header(self):
        rng = random.Random(1234)
        valid = p.encode_header({"r": 3, "env": "CartPole-v1", "slots": [1, 2], "kwargs": {"a": 1.5}})
        for _ in range(5000):
            if rng.random() < 0.5:  # mutate a valid header
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                frame = bytes(data[: rng.randrange(len(data) + 1)])
            else:
                frame = rng.randbytes(rng.randrange(0, 20))
            try:
                assert isinstance(p.decode_header(frame), dict)
            except ProtocolError:
                pass
