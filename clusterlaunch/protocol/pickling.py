"""Pickle protocol 5 with out-of-band buffers, falling back to cloudpickle.

Plain pickle is fast and keeps large buffers (numpy, pandas) out of band so they travel
as frames of their own without a copy. What plain pickle can't carry by reference —
lambdas, closures, anything defined in ``__main__`` — goes by value with cloudpickle.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

from clusterlaunch.protocol.errors import DecodeError

HIGHEST_PROTOCOL = 5

#: Top-level packages that ``loads`` must not import in this process (see
#: ``refuse_packages``).
_refused_packages: frozenset[str] = frozenset()


class RefusedImport(DecodeError):
    """A pickle names something from a package this process refuses to import."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name
        package = module.partition(".")[0]
        super().__init__(f"{module}.{name} needs {package}, which this process does not import")


def refuse_packages(*packages: str) -> None:
    """From now on, in this process, unpickling anything that names a module of one of
    ``packages`` raises ``RefusedImport`` instead of importing that module."""
    global _refused_packages
    _refused_packages = frozenset(packages)


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
    if not _refused_packages:
        return pickle.loads(payload, buffers=buffers)
    return _GuardedUnpickler(io.BytesIO(payload), buffers=buffers).load()


class _GuardedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.partition(".")[0] in _refused_packages:
            raise RefusedImport(module, name)
        return super().find_class(module, name)
