"""The dask wire protocol, sans-io: frames <-> bytes, messages <-> frames."""

from clusterlaunch.protocol.errors import DecodeError, ProtocolError
from clusterlaunch.protocol.frames import FrameReceiver, frames_header
from clusterlaunch.protocol.markers import Pickled, Serialize, Serialized, ToPickle
from clusterlaunch.protocol.message import Undecodable, dumps, loads

__all__ = [
    "DecodeError",
    "FrameReceiver",
    "Pickled",
    "ProtocolError",
    "Serialize",
    "Serialized",
    "ToPickle",
    "Undecodable",
    "dumps",
    "frames_header",
    "loads",
]
