"""The ``dask`` serializer family's encoding of numpy arrays.

The header records dtype, shape and strides and the data travels as one frame, so any
layout round-trips: contiguous arrays in either order go without a copy, other layouts
are made contiguous first, arrays with zero strides (broadcasts) send only the data they
repeat. Arrays of Python objects go through pickle. numpy is imported only by callers
that already hold or receive an array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from clusterlaunch.protocol import pickling


def _wire_dtype(dtype: np.dtype) -> tuple[int, Any]:
    if dtype.kind != "V":
        return (0, dtype.str)
    try:
        pickled = pickling.dumps(dtype)
        pickling.loads(pickled)
    except Exception:
        if dtype.type is not np.void or dtype.alignment != 1:
            raise
        return (0, dtype.descr)
    return (1, pickled)


def encode(x: np.ndarray) -> tuple[dict, list]:
    """Header and frames of ``x``."""
    if x.dtype.hasobject:
        frames: list = [None]
        frames[0] = pickling.dumps(x, buffer_callback=lambda b: frames.append(memoryview(b)))
        return {"pickle": True}, frames

    # The copies made below for odd layouts are writeable; the receiver's array
    # should be as writeable as the one we were given.
    header: dict[str, Any] = {"dtype": _wire_dtype(x.dtype), "writeable": [x.flags.writeable]}
    if 0 in x.strides:
        header["broadcast_to"] = x.shape
        strides = x.strides
        x = x[tuple(slice(None) if s != 0 else slice(1) for s in strides)]
        if not (x.flags.c_contiguous or x.flags.f_contiguous):
            compact = np.ascontiguousarray(x)
            x = np.lib.stride_tricks.as_strided(
                compact, strides=[0 if s == 0 else c for s, c in zip(strides, compact.strides)]
            )
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = np.ascontiguousarray(x)
    header.update(shape=x.shape, strides=x.strides)
    # One flat byte frame whatever the dtype: the header says how to read it back.
    data = x.ravel(order="K").view(np.uint8).data
    return header, [data]


def decode(header: dict, frames: list) -> np.ndarray:
    """The array that ``encode`` turned into ``header`` and ``frames``."""
    if header.get("pickle"):
        return pickling.loads(frames[0], buffers=frames[1:])
    (frame,) = frames
    is_pickled, dtype = header["dtype"]
    dtype = pickling.loads(dtype) if is_pickled else np.dtype(_tuples_to_lists(dtype))
    shape = header.get("broadcast_to") or header["shape"]
    x = np.ndarray(shape, dtype=dtype, buffer=frame, strides=header["strides"])
    (writeable,) = header["writeable"]
    if not writeable:
        x.flags.writeable = False
    elif not x.flags.writeable:
        x = np.require(x, requirements=["W"])
    if header.get("matrix"):
        x = np.asmatrix(x)
    return x


def decode_masked(header: dict, frames: list) -> np.ma.MaskedArray:
    """A masked array as dask peers send it: data and mask encoded like arrays."""
    n = header["nframes"]
    data = decode(header["data-header"], frames[:n])
    mask = decode(header["mask-header"], frames[n:]) if "mask-header" in header else np.ma.nomask
    is_pickled, fill_value = header["fill-value"]
    if is_pickled:
        fill_value = pickling.loads(fill_value)
    return np.ma.masked_array(data, mask=mask, fill_value=fill_value)


def decoder_for(cls: type) -> Callable[[dict, list], Any] | None:
    """How to read the ``dask`` family's encoding of numpy type ``cls``, if we can."""
    if cls is np.ndarray or cls is np.matrix:
        return decode
    if cls is np.ma.MaskedArray:
        return decode_masked
    if cls is np.ma.core.MaskedConstant:
        return lambda header, frames: np.ma.masked
    return None


def _tuples_to_lists(descr: Any) -> Any:
    """msgpack turns a structured dtype's descr list into tuples; numpy needs lists."""
    if isinstance(descr, tuple) and descr and all(isinstance(f, tuple) for f in descr):
        return [tuple(_tuples_to_lists(part) for part in field) for field in descr]
    return descr
