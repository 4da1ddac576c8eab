"""Wrappers that tell the message encoder how to carry a value.

They mirror the conventions of dask's wire protocol: a ``Serialize`` value travels as a
``__Serialized__`` sub-frame group (serializer families: dask, pickle, msgpack, error),
a ``ToPickle`` value as a ``__Pickled__`` group. ``Serialized`` and ``Pickled`` hold an
already encoded header and frames so they can be forwarded without decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)
class Serialize:
    """Encode ``data`` with a serializer family, out of band of the msgpack frame."""

    data: Any


@dataclass(frozen=True, eq=False)
class ToPickle:
    """Encode ``data`` with pickle protocol 5, out of band of the msgpack frame."""

    data: Any


@dataclass(frozen=True, eq=False)
class Serialized:
    """A ``__Serialized__`` payload kept encoded: its sub-header and frames."""

    header: dict
    frames: list = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class Pickled:
    """A ``__Pickled__`` payload kept encoded: its sub-header and frames."""

    header: dict
    frames: list = field(default_factory=list)
