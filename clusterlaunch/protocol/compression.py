"""Decompression of frames that a dask peer compressed.

We never compress and advertise no compression in the handshake, so peers don't
compress what they send us directly. Frames can still arrive compressed when a
scheduler forwards a payload that a client compressed for it; we decode every
codec whose module is installed here and name the missing one otherwise.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable, Sequence

from clusterlaunch.protocol.errors import DecodeError


def _lz4() -> Callable:
    block = importlib.import_module("lz4.block")
    return lambda data: block.decompress(data, return_bytearray=True)


def _snappy() -> Callable:
    return importlib.import_module("snappy").decompress


def _zstd() -> Callable:
    zstandard = importlib.import_module("zstandard")
    return lambda data: zstandard.ZstdDecompressor().decompress(data)


_DECOMPRESSORS: dict[str, Callable[[], Callable]] = {
    "zlib": lambda: zlib.decompress,
    "lz4": _lz4,
    "snappy": _snappy,
    "zstd": _zstd,
}


def decompress(codecs: Sequence[str | None], frames: Sequence) -> list:
    """``frames`` with each one decoded by the codec named at its position."""
    out = []
    for codec, frame in zip(codecs, frames):
        if codec is None or codec is False:
            out.append(frame)
            continue
        if codec not in _DECOMPRESSORS:
            raise DecodeError(f"unknown compression {codec!r}")
        try:
            decoder = _DECOMPRESSORS[codec]()
        except ImportError as e:
            raise DecodeError(
                f"frame compressed with {codec!r} but its module is not installed: {e}"
            ) from e
        out.append(decoder(frame))
    return out
