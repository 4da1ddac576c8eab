"""Exceptions as dask sends them between processes, traceback included.

The exception and its traceback travel pickled (tblib makes tracebacks picklable) so
that the receiver re-raises the original type with the remote frames; their text
goes along for peers that can't unpickle them.
"""

from __future__ import annotations

import traceback
from types import TracebackType
from typing import Any

import tblib.pickling_support

from clusterlaunch.protocol import pickling
from clusterlaunch.protocol.markers import Serialize

#: Larger pickled tracebacks are dropped; their text still goes.
MAX_TRACEBACK_BYTES = 10_000


def _causes(exc: BaseException) -> list[BaseException]:
    chain = []
    seen = {id(exc)}
    link = exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        chain.append(link)
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return chain


def _pickle_or(value: Any, fallback: Any) -> bytes:
    try:
        payload = pickling.dumps(value)
        pickling.loads(payload)
        return payload
    except Exception:
        return pickling.dumps(fallback)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """``exc`` as dask carries it: exception and traceback pickled (the traceback
    ``None`` when too large), and both as text."""
    tblib.pickling_support.install(exc, *_causes(exc))
    tb = exc.__traceback__
    tb_text = "".join(traceback.format_tb(tb))
    tb_bytes = _pickle_or(tb, tb_text)
    return {
        "exception": _pickle_or(exc, Exception(repr(exc))),
        "traceback": tb_bytes if len(tb_bytes) <= MAX_TRACEBACK_BYTES else None,
        "exception_text": repr(exc),
        "traceback_text": tb_text,
    }


def error_message(exc: BaseException, status: str = "error") -> dict[str, Any]:
    """The message fields that carry ``exc`` to a dask peer: ``error_fields`` with the
    pickles wrapped so that they travel as frames of their own."""
    fields = error_fields(exc)
    traceback = fields["traceback"]
    return {
        "status": status,
        **fields,
        "exception": Serialize(fields["exception"]),
        "traceback": None if traceback is None else Serialize(traceback),
    }


def rebuild_exception(
    exception: Any, traceback: Any = None, **_: Any
) -> tuple[BaseException, TracebackType | None]:
    """The exception and traceback that ``error_message`` fields describe."""
    if isinstance(exception, (bytes, bytearray, memoryview)):
        try:
            exception = pickling.loads(exception)
        except Exception:
            exception = Exception(bytes(exception))
    if not isinstance(exception, BaseException):
        exception = Exception(str(exception))
    if isinstance(traceback, (bytes, bytearray, memoryview)):
        try:
            traceback = pickling.loads(traceback)
        except Exception:
            traceback = None
    if not isinstance(traceback, TracebackType):
        traceback = None
    return exception, traceback
