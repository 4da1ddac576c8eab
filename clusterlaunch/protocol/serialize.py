"""Serializer families: a value <-> a msgpack-able header and a list of frames.

Families, named in ``header["serializer"]`` as dask names them:

- ``dask``: per-type encoders; we write numpy arrays and read them, numpy masked arrays
  and the builtins dask peers send this way (bytes, bytearray, memoryview, array.array).
  Other types written by dask peers (scipy, sparse, ...) are read through distributed's
  registry if the process has already imported distributed (the launcher and client do;
  a worker never does).
- ``pickle``: pickle protocol 5, buffers out of band, cloudpickle when needed.
- ``msgpack``: one msgpack frame.
- ``error``: the sender could not serialize the value; its frames are the reason.

Headers may also describe a collection of separately serialized values
(``is-collection``), frames split into shards (``split-num-sub-frames``) and compressed
frames (``compression``). Anything we can't decode raises ``DecodeError``.
"""

from __future__ import annotations

import array
import sys
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from clusterlaunch.protocol import compression, pickling
from clusterlaunch.protocol.errors import DecodeError
from clusterlaunch.protocol.frames import allocate

MSGPACK_LOAD_OPTIONS: dict[str, Any] = {"raw": False, "strict_map_key": False, "use_list": False}


def _is_numpy_array(x: Any) -> bool:
    cls = type(x)
    return cls.__module__ == "numpy" and cls.__name__ == "ndarray"


def serialize(x: Any, *, pickle_protocol: int = pickling.HIGHEST_PROTOCOL) -> tuple[dict, list]:
    """Header and frames for ``x``; a value that can't be pickled becomes an ``error``."""
    try:
        if _is_numpy_array(x):
            from clusterlaunch.protocol import numpy_arrays

            sub_header, array_frames = numpy_arrays.encode(x)
            header = {
                "sub-header": sub_header,
                "type": "numpy.ndarray",
                "type-serialized": pickling.dumps(type(x)),
                "serializer": "dask",
            }
            return header, array_frames
        frames: list = [None]
        writeable: list[bool] = []

        def keep_buffer(buffer: Any) -> None:
            view = memoryview(buffer)
            frames.append(view)
            writeable.append(not view.readonly)

        frames[0] = pickling.dumps(x, buffer_callback=keep_buffer, protocol=pickle_protocol)
        return {"serializer": "pickle", "writeable": tuple(writeable)}, frames
    except Exception as e:
        reason = f"Could not serialize object of type {type(x).__name__}: {e!r}"
        details = traceback.format_exc()[:100_000]
        return {"serializer": "error"}, [reason.encode(), details.encode()]


def deserialize(header: dict, frames: list) -> Any:
    """The value that ``header`` and ``frames`` describe."""
    try:
        if "compression" in header:
            frames = compression.decompress(header["compression"], frames)
        if "split-num-sub-frames" in header:
            frames = [
                _merge(frames[offset : offset + n])
                for n, offset in zip(header["split-num-sub-frames"], header["split-offsets"])
            ]
        return _deserialize_unsplit(header, frames)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"could not decode a {header.get('serializer')!r} payload: {e!r}") from e


def _deserialize_unsplit(header: dict, frames: list) -> Any:
    if "is-collection" in header:
        return _deserialize_collection(header, frames)
    family = header.get("serializer")
    if family == "pickle":
        return _pickle_loads(header, frames)
    if family == "dask":
        return _dask_loads(header, frames)
    if family == "msgpack":
        return msgpack.unpackb(b"".join(frames), **MSGPACK_LOAD_OPTIONS)
    if family == "error":
        reason = "\n".join(bytes(f).decode("utf-8", "replace") for f in frames)
        raise DecodeError(f"the sender could not serialize this value: {reason}")
    raise DecodeError(f"unsupported serializer family {family!r}")


def _deserialize_collection(header: dict, frames: list) -> Any:
    kind = header["type-serialized"]
    values = []
    keys = []
    start = 0
    for sub_header, length in zip(header["sub-headers"], header["frame-lengths"]):
        sub_header = dict(sub_header)
        keys.append(sub_header.pop("key", None))
        values.append(_deserialize_unsplit(sub_header, frames[start : start + length]))
        start += length
    if kind == "dict":
        return dict(zip(keys, values))
    constructors = {"tuple": tuple, "list": list, "set": set}
    if kind not in constructors:
        raise DecodeError(f"unsupported collection type {kind!r}")
    return constructors[kind](values)


def _pickle_loads(header: dict, frames: list) -> Any:
    buffers = []
    flags = header.get("writeable") or ()
    for i, frame in enumerate(frames[1:]):
        view = memoryview(frame)
        writeable = flags[i] if i < len(flags) else not view.readonly
        if writeable and view.readonly:
            view = memoryview(bytearray(view))
        elif not writeable and not view.readonly:
            view = view.toreadonly()
        buffers.append(view)
    return pickling.loads(frames[0], buffers=buffers)


def _dask_loads(header: dict, frames: list) -> Any:
    cls = pickling.loads(header["type-serialized"])
    if cls in _BUILTIN_DECODERS:
        return _BUILTIN_DECODERS[cls](header["sub-header"], frames)
    if str(getattr(cls, "__module__", "")).partition(".")[0] == "numpy":
        from clusterlaunch.protocol import numpy_arrays

        decode = numpy_arrays.decoder_for(cls)
        if decode is not None:
            return decode(header["sub-header"], frames)
    # Only a registry this process already loaded: decoding never imports distributed.
    registry = sys.modules.get("distributed.protocol.serialize")
    if registry is not None:
        return registry.dask_loads(header, frames)
    raise DecodeError(f"no decoder for dask-serialized {header.get('type', cls)!r} in this process")


def _joined(frames: list) -> memoryview:
    """``frames`` end to end as one flat byte view."""
    view = _merge(frames) if frames else memoryview(b"")
    return view.cast("B") if view.nbytes else memoryview(b"")


def _memoryview_loads(header: dict, frames: list) -> memoryview:
    view = _joined(frames)
    if not view.nbytes:
        return view.cast(header["format"])
    return view.cast(header["format"], header["shape"])


def _array_loads(header: dict, frames: list) -> array.array:
    out = array.array(header["typecode"])
    out.frombytes(_joined(frames))
    return out


# What distributed's ``dask`` family carries for builtin types, read without it.
_BUILTIN_DECODERS: dict[type, Callable[[dict, list], Any]] = {
    bytes: lambda header, frames: bytes(_joined(frames)),
    bytearray: lambda header, frames: bytearray(_joined(frames)),
    memoryview: _memoryview_loads,
    array.array: _array_loads,
}


def _merge(shards: list) -> memoryview:
    """One contiguous buffer holding ``shards`` end to end: a view spanning them if
    they already lie so in one buffer (dask's sender groups a buffer's shards into
    the head block, which the receiver reads as one), else a copy."""
    # Empty shards carry nothing, and a multi-dimensional empty one can't be cast.
    views = [view for shard in shards if (view := memoryview(shard)).nbytes] or [memoryview(b"")]
    if len(views) == 1:
        return views[0]
    views = [v.cast("B") for v in views]
    span = _adjacent_span(views)
    if span is not None:
        return span
    merged = allocate(sum(v.nbytes for v in views))
    offset = 0
    for view in views:
        merged[offset : offset + view.nbytes] = view
        offset += view.nbytes
    return merged


def _adjacent_span(views: list[memoryview]) -> memoryview | None:
    """The view of their common buffer that ``views`` (flat, non-empty) cover if they
    are writeable slices of it, each starting where the one before ends; else None."""
    base = views[0].obj
    if any(view.obj is not base or view.readonly or not view.c_contiguous for view in views):
        return None
    starts = [_address(view) for view in views]
    for view, start, next_start in zip(views, starts, starts[1:]):
        if start + view.nbytes != next_start:
            return None
    whole = memoryview(base).cast("B")
    offset = starts[0] - _address(whole)
    return whole[offset : offset + sum(view.nbytes for view in views)]


def _address(view: memoryview) -> int:
    """Where the first byte of a writeable, non-empty ``view`` lies in memory."""
    import ctypes  # only sharded payloads get here; it would add 2 ms to every import

    return ctypes.addressof(ctypes.c_char.from_buffer(view))
