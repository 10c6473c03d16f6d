"""Opt-in compression of array frames (``compression="lz4"`` or ``"zstd"``), sans-I/O.

Theory of operation
-------------------
Image observations are where a remote hop costs most: across a WAN, bandwidth, not CPU,
bounds them (8 × 84×84×3 is 169 KB per vector step, 13.5 ms at 100 Mbit/s). Rendered
frames compress well (flat colours), random noise does not. So compression is a
per-session choice, negotiated when slots open (:mod:`remoterl.wire.envdesc`'s OPEN
option ``z``), and applied per array:

* the worker encodes its replies with a :class:`Compressor` as the codec's frame *sink*
  (:func:`remoterl.wire.codec.encode`'s ``sink``): an array frame bigger than
  :data:`MIN_COMPRESS` bytes is compressed, and sent compressed only when that saves at
  least an eighth; otherwise it travels raw as before;
* a compressed array is the codec's ext 5 (``u16 L | meta | u32 frame index | u8
  algorithm``), its frame the compressed bytes; :func:`decompress` rebuilds it.

Any array dtype compresses (integer and float alike: the codec hands over raw bytes).
Decoding trusts nothing: the decompressed size must be exactly the size the array's meta
declares, and one message may decompress to at most :data:`MAX_DECOMPRESSED` bytes in all,
so a small hostile frame cannot make its receiver allocate without bound.

lz4 (block format, level 0) costs ~13 µs to compress 169 KB of rendered CartPole frames
on one core; zstd (level 1) compresses 1.5–2× better at ~3× the CPU. Both libraries are
dependencies of remoterl, so every worker and trainer can speak both.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from remoterl.errors import ProtocolError
from remoterl.wire.arrays import EXT_COMPRESSED

__all__ = ["ALGORITHMS", "MAX_DECOMPRESSED", "MIN_COMPRESS", "Compressor", "check_algorithm", "decompress"]

# name -> the u8 code in an ext 5 payload. Order matters: codes are the wire's.
ALGORITHMS = {"lz4": 1, "zstd": 2}
_NAMES = {code: name for name, code in ALGORITHMS.items()}

# Frames at most this big travel raw: compressing them saves too little to pay for itself.
MIN_COMPRESS = 4096

# The most bytes one message's compressed arrays may decompress to, all together.
MAX_DECOMPRESSED = 1 << 30


def check_algorithm(name: Any) -> str | None:
    """``name`` if it is a known algorithm (or None: no compression).

    Raises:
        ValueError: anything else, naming the choices.
    """
    if name is None or name in ALGORITHMS:
        return name
    raise ValueError(f"compression must be one of {sorted(ALGORITHMS)} or None, got {name!r}")


class Compressor:
    """The worker's frame sink for one session's replies: compresses big array frames.

    Called by the codec with a C-contiguous array, its meta prefix and the frame list; returns
    the array's ext 5 (the compressed bytes appended to ``frames``), or None to send it raw.
    """

    __slots__ = ("code", "_compress", "sent", "saved")

    def __init__(self, algorithm: str) -> None:
        check_algorithm(algorithm)
        self.code = ALGORITHMS[algorithm]
        if algorithm == "lz4":
            import lz4.block

            def compress(data: Any) -> bytes:
                return lz4.block.compress(data, store_size=False)
        else:
            import zstandard

            compress = zstandard.ZstdCompressor(level=1, write_content_size=True).compress
        self._compress = compress
        self.sent = 0   # compressed bytes sent
        self.saved = 0  # bytes compression saved

    def __call__(self, frame: np.ndarray, prefix: bytes, frames: list) -> msgpack.ExtType | None:
        nbytes = frame.nbytes
        if nbytes <= MIN_COMPRESS:
            return None
        packed = self._compress(memoryview(frame).cast("B"))
        if len(packed) > nbytes - (nbytes >> 3):
            return None  # noise does not compress: raw costs the receiver nothing
        index = len(frames)
        frames.append(packed)
        self.sent += len(packed)
        self.saved += nbytes - len(packed)
        return msgpack.ExtType(EXT_COMPRESSED, prefix + index.to_bytes(4, "little") + bytes((self.code,)))


def decompress(code: int, data: Any, nbytes: int) -> bytearray:
    """The ``nbytes`` raw bytes of a compressed array frame (a fresh, writeable buffer).

    Raises:
        ProtocolError: unknown algorithm, corrupt data, or not exactly ``nbytes`` bytes.
    """
    name = _NAMES.get(code)
    try:
        if name == "lz4":
            import lz4.block

            out = lz4.block.decompress(data, uncompressed_size=nbytes, return_bytearray=True)
        elif name == "zstd":
            import zstandard

            declared = zstandard.frame_content_size(data)
            if declared != nbytes:  # checked before anything is allocated
                raise ProtocolError(f"a zstd frame declares {declared} bytes, the array needs {nbytes}")
            out = bytearray(zstandard.ZstdDecompressor().decompress(data, max_output_size=nbytes))
        else:
            raise ProtocolError(f"unknown compression code {code}")
    except ProtocolError:
        raise
    except Exception as exc:  # corrupt input: each library has its own error types
        raise ProtocolError(f"a {name} frame does not decompress: {exc}") from exc
    if len(out) != nbytes:
        raise ProtocolError(f"a {name} frame decompresses to {len(out)} bytes, the array needs {nbytes}")
    return out
