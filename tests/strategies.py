"""Hypothesis strategies and comparisons for the protocol tests.

A strategy here draws a pair ``(value, expected)``: the value to send and what the
receiving side should rebuild. They differ only where the wire format changes a value
on purpose (msgpack turns lists into tuples), so ``assert_same`` can be strict about
types, dtypes, layouts and flags everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

INT64 = st.integers(-(2**63), 2**63 - 1)
#: What msgpack packs natively: signed and unsigned 64-bit.
MSGPACK_INTS = st.integers(-(2**63), 2**64 - 1)
TEXT = st.text(max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    MSGPACK_INTS,
    st.floats(),
    TEXT,
    st.binary(max_size=24),
)
TUPLE_KEYS = st.tuples(st.text(max_size=4), st.integers(-5, 5))


# --------------------------------------------------------------------- plain values


def msgpack_values(max_leaves: int = 12) -> st.SearchStrategy:
    """Nested plain values that msgpack carries: dicts (also with tuple keys like
    ``("x", 1)``), lists, tuples, bytes, str, int, float, None."""
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(st.one_of(TEXT, TUPLE_KEYS), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def as_msgpack_reads(value: Any) -> Any:
    """``value`` as msgpack decodes it: every list and tuple becomes a tuple."""
    if type(value) in (list, tuple):
        return tuple(as_msgpack_reads(v) for v in value)
    if type(value) is dict:
        return {as_msgpack_reads(k): as_msgpack_reads(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------- numpy

_SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(sizes=(16, 32, 64), endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(min_len=1, max_len=6),
    hnp.unicode_string_dtypes(min_len=1, max_len=6, endianness="?"),
)
NUMPY_DTYPES = st.one_of(
    _SCALAR_DTYPES,
    hnp.array_dtypes(_SCALAR_DTYPES, min_size=1, max_size=3, allow_subarrays=True),
)
LAYOUTS = ("C", "F", "step", "reverse", "transpose", "broadcast", "readonly")


def _relayout(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "step":
        return x[..., ::2] if x.ndim else x
    if layout == "reverse":
        return x[::-1] if x.ndim else x
    if layout == "transpose":
        return x.T
    if layout == "broadcast":
        # a new leading axis and every length-1 axis stretched: zero strides
        shape = (3, *(2 if n == 1 else n for n in x.shape))
        return np.broadcast_to(x, shape)
    if layout == "readonly":
        x = x.view()
        x.flags.writeable = False
        return x
    return np.ascontiguousarray(x)


@st.composite
def numpy_arrays(draw: st.DrawFn, dtypes: st.SearchStrategy = NUMPY_DTYPES) -> np.ndarray:
    """Arrays of many dtypes and layouts: C, F, strided, reversed, transposed, 0-d,
    empty, broadcast with zero strides, read-only, and combinations of those."""
    dtype = draw(dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    x = draw(hnp.arrays(dtype, shape))
    for layout in draw(st.lists(st.sampled_from(LAYOUTS), max_size=2)):
        x = _relayout(x, layout)
    return x


@st.composite
def object_arrays(draw: st.DrawFn) -> np.ndarray:
    items = draw(st.lists(st.one_of(SCALARS, st.tuples(INT64, TEXT)), max_size=6))
    x = np.empty(len(items), dtype=object)
    x[:] = items
    if draw(st.booleans()) and len(items) >= 2:
        x = x.reshape(2, -1) if len(items) % 2 == 0 else x[::2]
    return x


# --------------------------------------------------------------------- pandas


@st.composite
def pandas_objects(draw: st.DrawFn) -> pd.DataFrame | pd.Series:
    n = draw(st.integers(0, 5))
    column = st.lists
    df = pd.DataFrame(
        {
            "i": np.array(draw(column(INT64, min_size=n, max_size=n)), dtype="int64"),
            "f": np.array(draw(column(st.floats(), min_size=n, max_size=n)), dtype="float64"),
            "s": draw(column(TEXT, min_size=n, max_size=n)),
            "b": draw(column(st.booleans(), min_size=n, max_size=n)),
            "c": pd.Categorical(draw(column(st.sampled_from("xyz"), min_size=n, max_size=n))),
            "t": pd.date_range("2024-01-01", periods=n, freq="h"),
        }
    )
    kind = draw(st.sampled_from(["frame", "series", "indexed", "float-series"]))
    if kind == "series":
        return df["s"]
    if kind == "float-series":
        return df["f"].rename("values")
    if kind == "indexed":
        return df.set_index("t")
    return df


# --------------------------------------------------------------------- functions, errors


def square(x: int) -> int:
    """A module-level function: pickled by reference."""
    return x * x


triple_plus_one = lambda x: 3 * x + 1  # noqa: E731 - a lambda is the point


def make_adder(n: int):
    """A closure: pickled by value."""

    def add(x: int) -> int:
        return x + n

    return add


class CustomError(Exception):
    pass


FUNCTIONS = st.one_of(
    st.just(square),
    st.just(triple_plus_one),
    INT64.map(make_adder),
)
EXCEPTIONS = st.builds(
    lambda cls, args: cls(*args),
    st.sampled_from([ValueError, KeyError, RuntimeError, ZeroDivisionError, CustomError]),
    st.lists(st.one_of(TEXT, INT64, st.none()), max_size=3),
)


# --------------------------------------------------------------------- payloads


def payloads(*, arrays: bool = True) -> st.SearchStrategy:
    """Values that go in ``Serialize`` / ``ToPickle`` markers, or bare in a message."""
    leaves = st.one_of(
        SCALARS,
        numpy_arrays(),
        object_arrays(),
        pandas_objects(),
        FUNCTIONS,
        EXCEPTIONS,
    )
    if not arrays:
        leaves = st.one_of(SCALARS, FUNCTIONS, EXCEPTIONS)
    return st.one_of(
        leaves,
        st.lists(leaves, max_size=3),
        st.lists(leaves, max_size=3).map(tuple),
        st.dictionaries(st.one_of(TEXT, TUPLE_KEYS), leaves, max_size=3),
        st.sets(st.one_of(INT64, TEXT), max_size=4),
    )


@st.composite
def messages(draw: st.DrawFn, serialize: type, to_pickle: type) -> tuple[dict, dict]:
    """A message mixing plain values with payloads wrapped in ``serialize`` or
    ``to_pickle`` markers (ours or distributed's) or bare, and what it decodes to."""
    plain = draw(msgpack_values())
    msg: dict[Any, Any] = {"op": "test", "plain": plain}
    expected: dict[Any, Any] = {"op": "test", "plain": as_msgpack_reads(plain)}
    items, expected_items = [], []
    wrappings = st.sampled_from(["serialize", "pickle", "bare"])
    for value, wrapping in draw(st.lists(st.tuples(payloads(), wrappings), max_size=4)):
        if wrapping == "serialize":
            items.append(serialize(value))
            # an array on its own keeps its layout and flags; pickle keeps only values
            expected_items.append(value if isinstance(value, np.ndarray) else Loose(value))
        elif wrapping == "pickle":
            items.append(to_pickle(value))
            expected_items.append(Loose(value))
        else:
            items.append(value)
            expected_items.append(Loose(as_msgpack_reads(value)))
    msg["items"] = items
    expected["items"] = tuple(expected_items)
    if draw(st.booleans()):
        value = draw(numpy_arrays())
        msg[("x", 1)] = serialize(value)
        expected[("x", 1)] = value
    return msg, expected


# --------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Loose:
    """Expect ``value`` without checking array layouts and flags (pickle rebuilds
    arrays C-contiguous and writeable)."""

    value: Any


def assert_same(actual: Any, expected: Any, *, flags: bool = True, path: str = "msg") -> None:
    """Assert ``actual`` is what ``expected`` describes: same types all the way down,
    numpy arrays with the same dtype, shape, values bit for bit, and (with ``flags``)
    the same order (C/F), zero strides and writeable flag; pandas objects equal by
    ``pandas.testing``; functions behaving the same; exceptions of the same type and
    args."""
    if isinstance(expected, Loose):
        assert_same(actual, expected.value, flags=False, path=path)
    elif isinstance(expected, np.ndarray):
        assert_same_array(actual, expected, flags=flags, path=path)
    elif isinstance(expected, pd.DataFrame):
        assert isinstance(actual, pd.DataFrame), path
        pd.testing.assert_frame_equal(actual, expected)
    elif isinstance(expected, pd.Series):
        assert isinstance(actual, pd.Series), path
        pd.testing.assert_series_equal(actual, expected)
    elif isinstance(expected, BaseException):
        assert type(actual) is type(expected), path
        assert_same(actual.args, expected.args, flags=flags, path=f"{path}.args")
    elif callable(expected) and not isinstance(expected, type):
        assert callable(actual), path
        assert actual.__name__ == expected.__name__, path
        for x in (0, 7, -3):
            assert actual(x) == expected(x), path
    elif type(expected) is dict:
        assert type(actual) is dict, f"{path}: {type(actual)}"
        assert set(actual) == set(expected), path
        for key, value in expected.items():
            assert_same(actual[key], value, flags=flags, path=f"{path}[{key!r}]")
    elif type(expected) in (list, tuple):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, flags=flags, path=f"{path}[{i}]")
    elif type(expected) is float:
        assert type(actual) is float, path
        if math.isnan(expected):
            assert math.isnan(actual), path
        else:
            assert actual == expected, path
            assert math.copysign(1, actual) == math.copysign(1, expected), path
    elif type(expected) is memoryview:
        assert type(actual) is memoryview, path
        assert (actual.format, actual.shape) == (expected.format, expected.shape), path
        assert actual.tobytes() == expected.tobytes(), path
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_same_array(
    actual: Any, expected: np.ndarray, *, flags: bool = True, path: str = "array"
) -> None:
    assert type(actual) is type(expected), f"{path}: {type(actual)}"
    # numpy's own pickling turns big-endian datetimes and strings native
    if (
        not flags
        and actual.dtype != expected.dtype
        and native(actual.dtype) == native(expected.dtype)
    ):
        actual = actual.astype(expected.dtype)
    assert actual.dtype == expected.dtype, f"{path}: {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, path
    if expected.dtype.hasobject:
        assert_same(actual.tolist(), expected.tolist(), path=path)
    else:
        assert actual.tobytes() == expected.tobytes(), path
        if expected.dtype.names is None:
            np.testing.assert_array_equal(actual, expected, strict=True)
    if not flags:
        return
    assert actual.flags.writeable == expected.flags.writeable, f"{path}: writeable"
    if expected.flags.c_contiguous:
        assert actual.flags.c_contiguous, f"{path}: not C-contiguous"
    elif expected.flags.f_contiguous:
        assert actual.flags.f_contiguous, f"{path}: not F-contiguous"
    if expected.size:
        assert zero_strided_axes(actual) == zero_strided_axes(expected), f"{path}: strides"


def zero_strided_axes(x: np.ndarray) -> list[bool]:
    """Which axes of ``x`` repeat one element (a broadcast), ignoring length-1 axes."""
    return [stride == 0 and n > 1 for stride, n in zip(x.strides, x.shape)]


def native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in this machine's byte order, fields and all."""
    if dtype.names is not None:
        return np.dtype([(name, native(dtype.fields[name][0])) for name in dtype.names])
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((native(base), shape))
    return dtype.newbyteorder("=")
