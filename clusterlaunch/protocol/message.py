"""Messages <-> frames, in dask's encoding.

Frame 0 is the message packed with msgpack. A value wrapped in ``Serialize`` or
``ToPickle`` (or anything msgpack can't pack, which goes as ``ToPickle``) is replaced
by ``{"__Serialized__": i}`` or ``{"__Pickled__": i}``: frame ``i`` is its msgpack'd
sub-header, whose ``num-sub-frames`` says how many frames that follow belong to it.

Decoding is done per payload: a payload that can't be decoded (unknown family, a
pickle naming a module this process lacks, an unknown codec) becomes an
``Undecodable`` in the decoded message, so the caller can fail just that value.
Only a message whose frame 0 is not valid msgpack raises ``DecodeError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from clusterlaunch.protocol import pickling
from clusterlaunch.protocol.errors import DecodeError
from clusterlaunch.protocol.markers import Pickled, Serialize, Serialized, ToPickle
from clusterlaunch.protocol.serialize import MSGPACK_LOAD_OPTIONS, deserialize, serialize


class Undecodable:
    """Stands in a decoded message for a payload that could not be decoded."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<Undecodable: {self.error}>"


def dumps(msg: Any, *, pickle_protocol: int = pickling.HIGHEST_PROTOCOL) -> list:
    """The frames encoding ``msg``."""
    frames: list = [b""]

    def add_group(marker: str, header: dict, sub_frames: list) -> dict:
        offset = len(frames)
        header = {**header, "num-sub-frames": len(sub_frames)}
        frames.append(msgpack.packb(header, use_bin_type=True))
        frames.extend(sub_frames)
        return {marker: offset}

    def pickle_group(obj: Any) -> dict:
        buffers: list = []
        pickled = pickling.dumps(
            obj, buffer_callback=lambda b: buffers.append(memoryview(b)), protocol=pickle_protocol
        )
        return add_group("__Pickled__", {"pickled-obj": pickled}, buffers)

    def encode_default(obj: Any) -> Any:
        if isinstance(obj, Serialize):
            return add_group(
                "__Serialized__", *serialize(obj.data, pickle_protocol=pickle_protocol)
            )
        if isinstance(obj, Serialized):
            return add_group("__Serialized__", obj.header, list(obj.frames))
        if isinstance(obj, ToPickle):
            return pickle_group(obj.data)
        if isinstance(obj, Pickled):
            return add_group("__Pickled__", obj.header, list(obj.frames))
        if type(obj) is set:  # a frozenset is pickled: it must stay hashable
            return {"__Set__": True, "as-list": list(obj)}
        return pickle_group(obj)

    frames[0] = msgpack.packb(msg, default=encode_default, use_bin_type=True)
    return frames


def loads(frames: Sequence) -> Any:
    """The message that ``frames`` encode."""

    def group(offset: Any) -> tuple[dict, list]:
        if type(offset) is not int or not 0 < offset < len(frames):
            raise DecodeError(f"sub-frame group at {offset!r} is not in the message")
        header = msgpack.unpackb(frames[offset], **MSGPACK_LOAD_OPTIONS)
        count = header.get("num-sub-frames", 0)
        if type(count) is not int or count < 0 or offset + count >= len(frames):
            raise DecodeError(f"sub-frame group at {offset} runs past the message")
        return header, list(frames[offset + 1 : offset + 1 + count])

    def decode_hook(obj: dict) -> Any:
        if "__Serialized__" in obj:
            return _decoded(lambda: deserialize(*group(obj["__Serialized__"])))
        if "__Pickled__" in obj:
            return _decoded(lambda: _unpickle(*group(obj["__Pickled__"])))
        if "__Set__" in obj:
            return set(obj["as-list"])
        return obj

    try:
        return msgpack.unpackb(frames[0], object_hook=decode_hook, **MSGPACK_LOAD_OPTIONS)
    except Exception as e:
        raise DecodeError(f"message is not valid msgpack: {e}") from e


def _unpickle(header: dict, frames: list) -> Any:
    if "compression" in header:
        from clusterlaunch.protocol.compression import decompress

        frames = decompress(header["compression"], frames)
    return pickling.loads(header["pickled-obj"], buffers=frames)


def _decoded(decode: Any) -> Any:
    try:
        return decode()
    except DecodeError as e:
        return Undecodable(e)
    except Exception as e:
        return Undecodable(DecodeError(f"could not decode a payload: {e!r}"))
