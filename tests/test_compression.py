"""``compression="lz4"`` / ``"zstd"``: big reply arrays compressed by the worker, rebuilt exactly.

The codec's ext 5 on its own (round trips of every dtype, noise sent raw, hostile frames
refused), the slot host compressing what an OPEN asked for, and real broker and worker
processes: compressed and uncompressed runs give identical observations, step by step.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import remoterl_image_envs  # noqa: F401  (registers the pattern env here too)
from conftest import start_broker, start_worker
from remoterl import Client, RemoteEnv, RemoteEnvVec
from remoterl.errors import ProtocolError
from remoterl.wire import calls, codec
from remoterl.wire.arrays import EXT_COMPRESSED, meta_prefix
from remoterl.wire.compress import ALGORITHMS, Compressor
from remoterl.workers.runtime import SlotHost

PATTERN = remoterl_image_envs.PATTERN_ID
N, STEPS = 4, 12


def _frame_like(dtype: str) -> np.ndarray:
    image = np.full((8, 84, 84, 3), 40, np.uint8)
    image[:, 20:40, 10:50, 1] = 200
    return image.astype(dtype) if dtype != "bool" else image > 100


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int64", "bool"])
def test_compressed_arrays_round_trip_exactly(algorithm, dtype):
    value = _frame_like(dtype)
    header, frames = codec.encode({"obs": value}, sink=Compressor(algorithm))
    assert sum(len(memoryview(f).cast("B")) for f in frames) < value.nbytes / 4, "a flat image compresses"
    out = codec.decode(header, frames)["obs"]
    assert out.dtype == value.dtype and out.shape == value.shape and np.array_equal(out, value)
    assert out.flags.writeable


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_noise_and_small_arrays_travel_raw(algorithm):
    noise = np.random.default_rng(0).integers(0, 256, (64, 1024), dtype=np.uint8)
    small = np.zeros(600, np.float32)  # 2,400 bytes: a frame, too small to compress
    compressor = Compressor(algorithm)
    header, frames = codec.encode({"noise": noise, "small": small}, sink=compressor)
    assert [type(f) for f in frames] == [np.ndarray, np.ndarray]
    assert compressor.sent == 0
    out = codec.decode(header, frames)
    assert np.array_equal(out["noise"], noise) and np.array_equal(out["small"], small)


def _ext5(array: np.ndarray, data: bytes, code: int = 1) -> tuple[bytes, list]:
    payload = meta_prefix(array.dtype, array.shape) + (0).to_bytes(4, "little") + bytes((code,))
    return msgpack.packb(msgpack.ExtType(EXT_COMPRESSED, payload)), [data]


def test_hostile_compressed_frames_are_refused():
    import lz4.block
    import zstandard

    array = np.zeros((1000,), np.uint8)
    good = lz4.block.compress(array.tobytes(), store_size=False)
    assert np.array_equal(codec.decode(*_ext5(array, good)), array)
    with pytest.raises(ProtocolError, match="decompress"):
        codec.decode(*_ext5(array, b"\xff" * 50))
    with pytest.raises(ProtocolError):  # declares more than the data holds
        codec.decode(*_ext5(np.zeros((2000,), np.uint8), good))
    with pytest.raises(ProtocolError, match="unknown compression"):
        codec.decode(*_ext5(array, good, code=9))
    # zstd: a frame that says it holds 1 GiB is refused before anything is allocated.
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    with pytest.raises(ProtocolError, match="declares"):
        codec.decode(*_ext5(np.zeros((1 << 30,), np.uint8), bomb, code=2))
    # All compressed arrays of one message together are bounded too.
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (1 << 31,), (0,))
    with pytest.raises(ProtocolError, match="more than"):
        codec.decode(*_ext5(huge, good))


def test_slot_host_compresses_what_the_open_asked_for():
    host = SlotHost(None, 8)
    opened = host.open(b"c", {"r": 1, "env": PATTERN, "slots": [1, 2], "opts": {calls.COMPRESSION: "lz4"}})
    assert "error" not in opened
    plain = host.open(b"c", {"r": 2, "env": PATTERN, "slots": [3, 4]})
    sizes = {}
    for slots in ([1, 2], [3, 4]):
        header, frames = host.call(b"c", codec.encode({"r": 3, "slots": slots, **calls.reset([0, 1])})[0], [])
        reply = codec.decode(header, frames)
        assert reply["obs"].shape == (2, 84, 84, 3)
        sizes[slots[0]] = sum(len(memoryview(f).cast("B")) for f in frames)
    assert sizes[1] < sizes[3] / 4, sizes
    refused = host.open(b"c", {"r": 4, "env": PATTERN, "slots": [5], "opts": {calls.COMPRESSION: "gzip"}})
    assert refused["error"]["code"] == "protocol" and "gzip" in refused["error"]["msg"]
    assert "error" not in plain


def test_bad_compression_names_are_refused_here():
    with pytest.raises(ValueError, match="lz4"):
        RemoteEnvVec(PATTERN, 2, compression="gzip", client=object())
    with pytest.raises(ValueError, match="lz4"):
        RemoteEnv(PATTERN, compression="snappy", client=object())


def _run(envs: RemoteEnvVec) -> list:
    envs.reset(seed=5)
    records = []
    actions = np.random.default_rng(1).integers(0, 3, size=(STEPS, N))
    for action in actions:
        obs, rew, term, trunc, info = envs.step(action)
        records.append((obs.copy(), rew.copy(), term.copy(), trunc.copy(), info))
    return records


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.name)
def test_compression_on_and_off_give_identical_observations(procs, broker_url, mode):
    from gymnasium.utils.env_checker import data_equivalence

    start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--import", "remoterl_image_envs", "--env", PATTERN, "-n", "16",
                 "--procs", "1", expect=1)
    # shared_memory=False: the worker shares this host, and would otherwise skip the socket.
    with Client(broker_url, shared_memory=False).connect() as client:
        runs = {}
        for algorithm in (None, "lz4", "zstd"):
            envs = RemoteEnvVec(PATTERN, N, client=client, autoreset_mode=mode, compression=algorithm)
            runs[algorithm] = _run(envs)
            envs.close()
    for algorithm in ("lz4", "zstd"):
        for step, (want, got) in enumerate(zip(runs[None], runs[algorithm])):
            assert data_equivalence(want, got), f"{algorithm}, step {step}"
    assert any(r[3].any() for r in runs[None]), "episodes should end (and autoreset) within the run"


def test_remote_env_takes_compression_and_init_checks_it(procs, broker_url):
    import remoterl

    start_broker(procs, broker_url)
    start_worker(procs, broker_url, "--import", "remoterl_image_envs", "--env", PATTERN, "-n", "4",
                 "--procs", "1", expect=1)
    try:
        remoterl.init(broker=broker_url, compression="zstd", patch=False)
        assert remoterl.client.registry.settings().compression == "zstd"
        with pytest.raises(ValueError, match="compression"):
            remoterl.init(broker=broker_url, compression="lz4")
        env = RemoteEnv(PATTERN)
        assert env._opts == {calls.COMPRESSION: "zstd"}
        obs, _ = env.reset(seed=2)
        local = remoterl_image_envs.PatternEnv()
        want, _ = local.reset(seed=2)
        assert np.array_equal(obs, want)
        assert np.array_equal(env.step(2)[0], local.step(2)[0])
        env.close()
    finally:
        remoterl.shutdown()
    with pytest.raises(ValueError, match="compression"):
        remoterl.init(broker=broker_url, compression="brotli")
