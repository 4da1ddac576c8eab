"""The handshake that opens every dask connection.

Right after connecting, each side writes one message describing itself and reads the
other's; the options both then use are derived from the pair. We advertise no
compression because we never compress, so peers never compress what they send us.
"""

from __future__ import annotations

import sys
from typing import Any

from clusterlaunch.protocol import pickling
from clusterlaunch.protocol.errors import ProtocolError


def local_info() -> dict[str, Any]:
    """What we tell a peer about ourselves."""
    return {
        "compression": None,
        "python": tuple(sys.version_info)[:3],
        "pickle-protocol": pickling.HIGHEST_PROTOCOL,
    }


def negotiate(local: dict[str, Any], remote: Any) -> dict[str, Any]:
    """Options for a connection from both sides' handshake messages."""
    if not isinstance(remote, dict):
        raise ProtocolError(f"expected a handshake message, got {type(remote).__name__}")
    protocol = remote.get("pickle-protocol")
    if type(protocol) is not int or protocol < 0:
        raise ProtocolError(f"handshake has no valid pickle-protocol: {protocol!r}")
    same_codec = local["compression"] == remote.get("compression")
    return {
        "pickle-protocol": min(local["pickle-protocol"], protocol),
        "compression": local["compression"] if same_codec else None,
    }
