"""Messages <-> frames against the real thing: ``distributed.protocol`` both ways."""

from __future__ import annotations

import array
import importlib.util
import pickle
import subprocess
import sys
import textwrap
import threading
import types
from contextlib import contextmanager, suppress
from pathlib import Path

import distributed.protocol as dp
import msgpack
import numpy as np
import pandas as pd
import pytest
from distributed.comm.core import Comm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import (
    INT64,
    SCALARS,
    TEXT,
    Loose,
    assert_same,
    messages,
    msgpack_values,
    numpy_arrays,
    payloads,
)
from wire import distributed_read, distributed_wire, feed, our_wire

from clusterlaunch.protocol import (
    DecodeError,
    FrameReceiver,
    Pickled,
    ProtocolError,
    Serialize,
    Serialized,
    ToPickle,
    Undecodable,
    dumps,
    loads,
    serialize,
)
from clusterlaunch.protocol.handshake import local_info, negotiate

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def as_worker():
    """Decode as a worker process does: one that never imported distributed, so its
    serializer registry can't help us."""
    saved = sys.modules.pop("distributed.protocol", None)
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["distributed.protocol"] = saved


def our_loads(frames):
    with as_worker():
        return loads(frames)


def sub_headers(frames) -> list[dict]:
    """The sub-headers of every payload group in a message, as a peer sees them."""
    found = []

    def hook(obj):
        for marker in ("__Serialized__", "__Pickled__"):
            if marker in obj:
                found.append(msgpack.unpackb(frames[obj[marker]], raw=False, use_list=False))
        return obj

    msgpack.unpackb(frames[0], object_hook=hook, raw=False, strict_map_key=False)
    return found


# --------------------------------------------------------------------- ours -> distributed


@SETTINGS
@given(messages(Serialize, ToPickle))
def test_our_dumps_read_by_distributed(pair):
    msg, expected = pair
    frames = dumps(msg)
    assert_same(dp.loads(frames), expected)
    # and as distributed's TCP comm reads our bytes: writeable buffers, head block split
    received, rest = distributed_read(our_wire(frames))
    assert len(rest) == 0
    assert_same(dp.loads(received), expected)
    # and ourselves, as a worker would receive it
    [ours] = feed(FrameReceiver(), our_wire(frames))
    assert_same(our_loads(ours), expected)


@SETTINGS
@given(st.lists(st.integers(), max_size=5), st.integers(2**64, 2**200))
def test_ints_beyond_64_bits_are_pickled(ints, big):
    msg = {"ints": ints, "big": big, "neg": -big}
    frames = dumps(msg)
    expected = {"ints": tuple(ints), "big": big, "neg": -big}
    assert_same(dp.loads(frames), expected)
    assert_same(loads(frames), expected)


@settings(max_examples=20, deadline=None)
@given(payloads())
def test_pickle_protocol_4_is_in_band(value):
    frames = dumps({"s": Serialize(value), "p": ToPickle(value)}, pickle_protocol=4)
    for header in sub_headers(frames):
        if header.get("serializer") != "dask":
            assert header["num-sub-frames"] <= 1
    decoded = dp.loads(frames)
    assert_same(decoded["s"], Loose(value))
    assert_same(decoded["p"], Loose(value))


def test_forwarded_serialized_and_pickled():
    value = {"a": np.arange(5), "b": b"xyz"}
    header, frames = dp.serialize(value)
    pickled_frames: list = []
    pickled = pickle.dumps(value, protocol=5, buffer_callback=pickled_frames.append)
    msg = {
        "s": Serialized(header, frames),
        "p": Pickled({"pickled-obj": pickled}, [memoryview(b) for b in pickled_frames]),
    }
    for decoded in (dp.loads(dumps(msg)), loads(dumps(msg))):
        assert_same(decoded, {"s": value, "p": Loose(value)})


def test_sets_and_tuple_keys():
    msg = {
        ("x", 1): {1, 2, 3},
        "nested": {("y", 2, "z"): [frozenset({4}), set()]},
        frozenset({"a", "b"}): "a frozenset is hashable, a key",
    }
    expected = {
        ("x", 1): {1, 2, 3},
        "nested": {("y", 2, "z"): (frozenset({4}), set())},
        frozenset({"a", "b"}): "a frozenset is hashable, a key",
    }
    assert_same(dp.loads(dumps(msg)), expected)
    assert_same(loads(dumps(msg)), expected)
    assert_same(loads(dp.dumps(msg)), expected)


# --------------------------------------------------------------------- distributed -> ours


def distributed_dumps(msg, split: int | None, compression: str | None = None) -> list:
    return dp.dumps(msg, context={"compression": compression}, frame_split_size=split)


@SETTINGS
@given(messages(dp.to_serialize, dp.ToPickle), st.sampled_from([None, 64]))
def test_distributed_dumps_read_by_us(pair, split):
    msg, expected = pair
    # distributed itself drops the read-only flag of arrays it copies to send
    expected = Loose(expected)
    frames = distributed_dumps(msg, split)
    # straight from dumps: bytes and views of the original buffers
    ours = our_loads(frames)
    assert_same(ours, expected)
    assert_same(ours, dp.loads(frames))
    # off the wire: our reader on distributed's bytes, the oracle on its own reader
    wire = distributed_wire(frames)
    [received] = feed(FrameReceiver(), wire, [7919, 65536, 3])
    oracle, _ = distributed_read(wire)
    ours = our_loads(received)
    assert_same(ours, expected)
    assert_same(ours, dp.loads(oracle))


def test_shards_distributed_groups_into_its_head_block_are_joined_without_a_copy():
    """distributed's sender puts an array's shards in its head block; read as one
    buffer, they lie end to end and the array is a view of them (as on a stock worker)."""
    sent = np.arange(100_000, dtype="i8")
    frames = distributed_dumps({"x": dp.to_serialize(sent)}, split=64 * 1024)
    [received] = feed(FrameReceiver(), distributed_wire(frames), [65536])
    shards = [frame for frame in received if frame.nbytes == 64 * 1024]
    assert len(shards) > 2
    got = our_loads(received)["x"]
    np.testing.assert_array_equal(got, sent)
    assert got.flags.writeable
    for shard in shards:
        assert np.shares_memory(got, np.frombuffer(shard, dtype="u1"))


def test_shards_apart_or_read_only_are_copied_together():
    block = memoryview(bytearray(b"abcdefghijkl"))
    assert serialize._merge([block[0:4], block[4:8]]).obj is block.obj
    for shards in ([block[0:4], block[8:12]], [block[4:8], block[0:4]], [b"abcd", b"efgh"]):
        merged = serialize._merge(shards)
        assert bytes(merged) == b"".join(map(bytes, shards))
        assert merged.obj is not block.obj


@pytest.mark.parametrize("split", [None, 64, 1000])
@pytest.mark.parametrize(
    "value",
    [
        (1, "a", b"b", np.arange(3)),
        [np.ones((2, 3), order="F"), np.float32(2.5), None],
        {"a": np.zeros(4, dtype="M8[s]"), ("x", 1): b"", "c": [b"q", (1.5,)]},
        {1, 2, "three"},
        (),
        [[np.arange(2), [b"deep"]], {"k": np.ones(1)}],
    ],
    ids=["tuple", "list", "dict", "set", "empty", "nested"],
)
def test_distributed_collections(value, split):
    """distributed serializes a tuple/list/dict/set element by element: an
    ``is-collection`` header, each element with its own family."""
    frames = distributed_dumps({"v": dp.to_serialize(value)}, split)
    [header] = sub_headers(frames)
    assert header["is-collection"] is True
    decoded = our_loads(frames)["v"]
    assert_same(decoded, value)
    assert_same(decoded, dp.loads(frames)["v"])


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"some bytes" * 3,
        bytearray(b"mutable"),
        memoryview(b"abcdefgh").cast("i", (2,)),
        memoryview(bytearray(12)).cast("B", (3, 4)),
        array.array("d", [1.5, -2.0]),
        np.ma.masked_array([1, 2, 3], mask=[0, 1, 0], fill_value=7),
        np.ma.masked_array(np.arange(4.0).reshape(2, 2)),
        np.ma.masked,
    ],
    ids=lambda v: type(v).__name__,
)
@pytest.mark.parametrize("split", [None, 8])
def test_distributed_dask_family_builtins(value, split):
    """Types distributed sends in its ``dask`` family that a worker must read
    without distributed's registry."""
    if split and isinstance(value, memoryview) and value.ndim > 1:
        pytest.skip("distributed can't merge the shards of a 2-D memoryview itself")
    frames = distributed_dumps({"v": dp.to_serialize(value), "in": [dp.to_serialize(value)]}, split)
    assert any(h.get("serializer") == "dask" for h in sub_headers(frames))
    decoded = our_loads(frames)
    oracle = dp.loads(frames)
    for got, want in ((decoded["v"], oracle["v"]), (decoded["in"][0], oracle["in"][0])):
        assert type(got) is type(want)
        if want is np.ma.masked:
            assert got is np.ma.masked
        elif isinstance(want, np.ma.MaskedArray):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(want))
            assert got.fill_value == want.fill_value
        elif isinstance(want, memoryview):
            assert_same(got, want)
        else:
            assert got == want


@pytest.mark.parametrize("split", [None, 16_384])
@pytest.mark.parametrize(
    "value",
    [
        np.zeros(20_000),
        np.tile(np.arange(100, dtype="i2"), (50, 4)).T,
        pd.DataFrame({"a": np.repeat(np.arange(10), 2_000), "b": ["spam"] * 20_000}),
        b"abc" * 10_000,
        ["text " * 3_000, np.ones(5_000, dtype="f4")],
    ],
    ids=["zeros", "ints-F", "frame", "bytes", "list"],
)
def test_distributed_zlib_compression(value, split):
    msg = {"s": dp.to_serialize(value), "p": dp.ToPickle(value), "small": dp.to_serialize(1)}
    frames = distributed_dumps(msg, split, compression="zlib")
    codecs = [c for h in sub_headers(frames) for c in h.get("compression", ())]
    assert "zlib" in codecs, "nothing was compressed: the test proves nothing"
    expected = {"s": Loose(value), "p": Loose(value), "small": 1}
    assert_same(our_loads(frames), expected)
    [received] = feed(FrameReceiver(), distributed_wire(frames), [4096])
    assert_same(our_loads(received), expected)
    if split is None:
        # Not when sharded: distributed can't read some of its own sharded messages (a
        # pandas block is 2-D, the shards past its end are empty 2-D views it can't merge).
        assert_same(our_loads(frames), dp.loads(frames))


@SETTINGS
@given(numpy_arrays())
def test_distributed_numpy_arrays_keep_layout(x):
    """Straight into a marker: distributed's ``dask`` family for numpy. Our decoding
    keeps exactly what distributed's own does (dtype, order, zero strides, flags)."""
    frames = distributed_dumps({"x": dp.to_serialize(x)}, None)
    [received] = feed(FrameReceiver(), distributed_wire(frames))
    oracle, _ = distributed_read(distributed_wire(frames))
    assert_same(our_loads(received)["x"], dp.loads(oracle)["x"])
    assert_same(our_loads(frames)["x"], dp.loads(frames)["x"])


@SETTINGS
@given(numpy_arrays())
def test_our_numpy_arrays_keep_layout(x):
    """Our ``dask`` family for numpy read by distributed and by us: the array as it was
    sent, down to order, zero strides and the writeable flag."""
    frames = dumps({"x": Serialize(x)})
    received, _ = distributed_read(our_wire(frames))
    assert_same(dp.loads(received)["x"], x)
    [received] = feed(FrameReceiver(), our_wire(frames))
    assert_same(our_loads(received)["x"], x)


def test_numpy_layouts_explicitly():
    base = np.arange(24, dtype=">f8").reshape(2, 3, 4)
    readonly = base.copy()
    readonly.flags.writeable = False
    cases = {
        "C": base,
        "F": np.asfortranarray(base),
        "slice": base[:, ::2, 1:],
        "transpose": base.transpose(2, 0, 1),
        "0-d": np.array(3.5),
        "empty": np.empty((0, 3)),
        "broadcast": np.broadcast_to(np.arange(3), (4, 3)),
        "broadcast-of-slice": np.broadcast_to(base[:, :1, ::2], (2, 5, 2)),
        "readonly": readonly,
        "readonly-slice": readonly[::-1, 1],
        "structured": np.zeros(3, dtype=[("a", "<i4"), ("b", ">f8", (2,))]),
        "datetime": np.array(["2020-01-01", "NaT"], dtype="M8[ns]"),
        "timedelta": np.array([1, -2], dtype="m8[h]"),
        "fixed-bytes": np.array([b"ab", b""]),
        "fixed-unicode": np.array(["ab", "\N{SNOWMAN}"]),
        "float16": np.array([1.5, np.inf, np.nan], dtype="f2"),
        "complex": np.array([1 + 2j, np.nan], dtype="c8"),
        "bool": np.array([[True], [False]]),
        "object": np.array([1, "x", None, (2, 3)], dtype=object),
    }
    for name, x in cases.items():
        theirs = dp.loads(dumps({"x": Serialize(x)}))["x"]
        assert_same(theirs, x, path=name)
        assert_same(our_loads(dumps([Serialize(x)]))[0], x, path=name)
        theirs = our_loads(distributed_dumps([dp.to_serialize(x)], None))[0]
        assert_same(theirs, x, flags=False, path=name)


# --------------------------------------------------------------------- what can't be decoded


def test_garbage_frame_0_raises_decode_error():
    for frame0 in (b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\x81\xa1a"):
        with pytest.raises(DecodeError):
            loads([frame0])
    with pytest.raises(DecodeError):
        loads([])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.lists(st.binary(max_size=16), max_size=3))
def test_random_frames_raise_only_decode_error(frame0, rest):
    with suppress(DecodeError):
        loads([frame0, *rest])


def _bad_pickle_frames():
    frames = dumps({"first": ToPickle([1, 2]), "bad": ToPickle("x"), "good": 1})
    header = msgpack.unpackb(frames[2])
    header["pickled-obj"] = b"\x80\x05not a pickle"
    frames[2] = msgpack.packb(header)
    return frames


BAD_PAYLOADS = {
    "offset past the end": lambda: [msgpack.packb({"good": 1, "bad": {"__Serialized__": 99}})],
    "offset zero": lambda: [msgpack.packb({"good": 1, "bad": {"__Pickled__": 0}})],
    "offset negative": lambda: [msgpack.packb({"good": 1, "bad": {"__Serialized__": -1}}), b""],
    "offset not an int": lambda: [msgpack.packb({"good": 1, "bad": {"__Serialized__": "1"}}), b""],
    "sub-frames past the end": lambda: [
        msgpack.packb({"good": 1, "bad": {"__Pickled__": 1}}),
        msgpack.packb({"pickled-obj": pickle.dumps(1), "num-sub-frames": 5}),
    ],
    "sub-header not msgpack": lambda: [
        msgpack.packb({"good": 1, "bad": {"__Serialized__": 1}}),
        b"\xc1",
    ],
    "bad pickle": _bad_pickle_frames,
    "pickle of a missing module": lambda: dumps(
        {
            "good": 1,
            "bad": Pickled({"pickled-obj": b"\x80\x04cno_such_module_here\nThing\n."}),
        }
    ),
    "unknown family": lambda: dumps({"good": 1, "bad": Serialized({"serializer": "cuda"}, [b"x"])}),
    "error family (ours)": lambda: dumps({"good": 1, "bad": Serialize(threading.Lock())}),
    "error family (distributed)": lambda: dp.dumps(
        {"good": 1, "bad": dp.to_serialize(threading.Lock())}
    ),
    "unknown compression": lambda: dumps(
        {
            "good": 1,
            "bad": Serialized(
                {"serializer": "pickle", "writeable": (), "compression": ["brotli"]},
                [pickle.dumps(1)],
            ),
        }
    ),
    "unknown pickled compression": lambda: dumps(
        {"good": 1, "bad": Pickled({"pickled-obj": pickle.dumps(1), "compression": ["xz"]}, [b""])}
    ),
    "dask type without a decoder": lambda: dumps(
        {
            "good": 1,
            "bad": Serialized(
                {"serializer": "dask", "type-serialized": pickle.dumps(complex), "sub-header": {}},
                [b""],
            ),
        }
    ),
    "collection of an unknown type": lambda: dumps(
        {
            "good": 1,
            "bad": Serialized(
                {
                    "is-collection": True,
                    "type-serialized": "deque",
                    "sub-headers": [],
                    "frame-lengths": [],
                },
                [],
            ),
        }
    ),
}


@pytest.mark.parametrize("make_frames", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_bad_payload_is_undecodable_alone(make_frames):
    decoded = our_loads(make_frames())
    assert decoded["good"] == 1
    if "first" in decoded:
        assert decoded["first"] == [1, 2]
    bad = decoded["bad"]
    assert isinstance(bad, Undecodable), bad
    assert isinstance(bad.error, DecodeError)
    assert str(bad.error)


def test_error_family_carries_the_reason():
    decoded = our_loads(dumps({"bad": Serialize(threading.Lock())}))["bad"]
    assert isinstance(decoded, Undecodable)
    assert "lock" in str(decoded.error)


@pytest.mark.skipif(importlib.util.find_spec("lz4") is not None, reason="lz4 is installed")
def test_compression_whose_module_is_missing():
    frames = dumps({"bad": Serialized({"serializer": "pickle", "compression": ["lz4"]}, [b"\x00"])})
    bad = our_loads(frames)["bad"]
    assert isinstance(bad, Undecodable)
    assert "lz4" in str(bad.error)


SUB_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "serializer": st.sampled_from(["pickle", "dask", "msgpack", "error", "nope", None]),
        "num-sub-frames": st.integers(-2, 4),
        "writeable": st.lists(st.booleans(), max_size=3),
        "compression": st.lists(
            st.sampled_from([None, "zlib", "lz4", "snappy", "bad"]), max_size=3
        ),
        "split-num-sub-frames": st.lists(st.integers(-1, 3), max_size=3),
        "split-offsets": st.lists(st.integers(-1, 4), max_size=3),
        "pickled-obj": st.sampled_from([pickle.dumps(1), b"\x80\x05", b"", b"\xff\x00"]),
        "type-serialized": st.sampled_from(
            [pickle.dumps(t) for t in (np.ndarray, bytes, memoryview, np.ma.MaskedArray, int)]
            + ["tuple", "dict", "set", "x"]
        ),
        "sub-header": st.dictionaries(
            st.sampled_from(["dtype", "shape", "strides", "writeable", "pickle", "format"]),
            st.one_of(SCALARS, st.lists(st.integers(-1, 9), max_size=3)),
        ),
        "is-collection": st.booleans(),
        "sub-headers": st.lists(
            st.dictionaries(st.sampled_from(["serializer", "key", "x"]), SCALARS, max_size=2),
            max_size=3,
        ),
        "frame-lengths": st.lists(st.integers(-1, 3), max_size=3),
    },
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["__Serialized__", "__Pickled__"]), st.integers(-1, 6)),
        max_size=3,
    ),
    st.lists(st.one_of(SUB_HEADERS.map(msgpack.packb), st.binary(max_size=24)), max_size=6),
)
def test_random_payload_groups_are_undecodable_not_crashes(markers, rest):
    frames = [msgpack.packb({"good": 1, "groups": [{m: i} for m, i in markers]}), *rest]
    decoded = our_loads(frames)
    assert decoded["good"] == 1
    assert len(decoded["groups"]) == len(markers)


# --------------------------------------------------------------------- handshake


def distributed_handshake_info(same_host: bool) -> dict:
    return Comm.handshake_info(types.SimpleNamespace(same_host=same_host))


REMOTE_INFOS = [
    distributed_handshake_info(True),
    distributed_handshake_info(False),
    {"compression": "lz4", "python": (3, 12, 1), "pickle-protocol": 5},
    {"compression": None, "python": (3, 10, 0), "pickle-protocol": 4},
    {"compression": "zlib", "python": (3, 13, 0), "pickle-protocol": 6, "extra": [1]},
]


@pytest.mark.parametrize("remote", REMOTE_INFOS)
def test_handshake_agrees_with_distributed(remote):
    ours = local_info()
    # our info crosses the wire and distributed computes its options from it ...
    [received] = feed(FrameReceiver(), our_wire(dumps(ours)))
    ours_as_read = dp.loads(received)
    theirs_options = Comm.handshake_configuration(remote, ours_as_read)
    # ... while we compute ours from what it sent
    options = negotiate(ours, our_loads(dumps(remote)))
    assert options == theirs_options
    assert options == Comm.handshake_configuration(ours, remote)
    assert options["compression"] is None  # we never compress
    assert options["pickle-protocol"] == min(5, remote["pickle-protocol"])


@pytest.mark.parametrize(
    "remote",
    [
        None,
        [],
        "hello",
        b"\x00",
        {},
        {"compression": None},
        {"pickle-protocol": "5"},
        {"pickle-protocol": -1},
        {"pickle-protocol": True},
        {"pickle-protocol": 5.0},
        {"pickle-protocol": None},
        Undecodable(DecodeError("x")),
    ],
)
def test_garbage_handshake_raises_protocol_error(remote):
    with pytest.raises(ProtocolError):
        negotiate(local_info(), remote)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        msgpack_values(),
        st.fixed_dictionaries(
            {"pickle-protocol": st.one_of(INT64, TEXT, st.none(), st.floats())},
            optional={"compression": st.one_of(st.none(), TEXT, st.lists(INT64))},
        ),
    )
)
def test_random_handshakes_negotiate_or_raise_protocol_error(remote):
    try:
        options = negotiate(local_info(), remote)
    except ProtocolError:
        return
    assert options["compression"] is None
    assert 0 <= options["pickle-protocol"] <= 5


# --------------------------------------------------------------------- worker-side imports


def test_protocol_does_not_import_distributed_or_tornado():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import clusterlaunch.protocol as p
        from clusterlaunch.protocol.handshake import local_info, negotiate

        x = np.arange(12.0).reshape(3, 4)[:, ::2]
        frames = p.dumps({"x": p.Serialize(x), "y": p.ToPickle(x.T), "z": [b"q", 1]})
        receiver = p.FrameReceiver()
        wire = p.frames_header([memoryview(f).nbytes for f in frames]) + b"".join(frames)
        receiver.get_buffer()[: len(wire)] = wire
        receiver.buffer_updated(len(wire))
        msg = p.loads(receiver.pop_message())
        assert (msg["x"] == x).all() and (msg["y"] == x.T).all(), msg
        negotiate(local_info(), local_info())
        leaked = sorted(
            m for m in sys.modules if m.split(".")[0] in ("distributed", "tornado")
        )
        assert not leaked, leaked
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
