"""Pickle protocol 5 with out-of-band buffers, falling back to cloudpickle.

Plain pickle is fast and keeps large buffers (numpy, pandas) out of band so they travel
as frames of their own without a copy. What plain pickle can't carry by reference —
lambdas, closures, anything defined in ``__main__`` — goes by value with cloudpickle.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

HIGHEST_PROTOCOL = 5


def dumps(
    obj: Any,
    *,
    buffer_callback: Callable[[pickle.PickleBuffer], None] | None = None,
    protocol: int = HIGHEST_PROTOCOL,
) -> bytes:
    """Pickle ``obj``; with ``buffer_callback``, large buffers are handed out of band."""
    buffers: list[pickle.PickleBuffer] = []
    kwargs: dict[str, Any] = {"protocol": protocol}
    if buffer_callback is not None and protocol >= 5:
        kwargs["buffer_callback"] = buffers.append
    try:
        payload = pickle.dumps(obj, **kwargs)
        by_value = b"__main__" in payload
    except Exception:
        by_value = True
    if by_value:
        buffers.clear()
        payload = cloudpickle.dumps(obj, **kwargs)
    if buffer_callback is not None:
        for buffer in buffers:
            buffer_callback(buffer)
    return payload


def loads(payload: bytes | bytearray | memoryview, *, buffers: Any = ()) -> Any:
    """Unpickle ``payload`` with its out-of-band ``buffers``."""
    return pickle.loads(payload, buffers=buffers)
