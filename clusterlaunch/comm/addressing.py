"""Addresses of the form ``tcp://host:port`` as dask writes them."""

from __future__ import annotations

import ipaddress
import socket

SCHEME = "tcp"


def parse_address(address: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``(host, port)`` of a ``tcp://host:port`` address; bare ``host:port`` is accepted.

    Raises ``ValueError`` with a one-line reason for anything else.
    """
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"invalid address {address!r}: expected 'tcp://host:port'")
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = SCHEME, text
    if scheme != SCHEME:
        raise ValueError(f"invalid address {address!r}: only tcp:// is supported")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"invalid address {address!r}: malformed IPv6 host")
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            host, port_text = rest, ""
        if ":" in host:
            raise ValueError(f"invalid address {address!r}: put an IPv6 host in brackets")
    if not host:
        raise ValueError(f"invalid address {address!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"invalid address {address!r}: missing port")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {address!r}: port must be 0-65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The ``tcp://`` address of ``host`` and ``port``."""
    if ":" in host:
        host = f"[{host}]"
    return f"{SCHEME}://{host}:{port}"


def normalize_address(address: str) -> str:
    """``address`` in canonical ``tcp://host:port`` form."""
    return format_address(*parse_address(address))


def is_wildcard(host: str) -> bool:
    """True for hosts that mean 'every interface'."""
    return host in ("", "0.0.0.0", "::")


def routable_ip(target_host: str) -> str:
    """The local IP this machine would use to reach ``target_host``.

    Connecting a UDP socket sends nothing; it only asks the kernel for a route.
    """
    try:
        family = (
            socket.AF_INET6 if ipaddress.ip_address(target_host).version == 6 else socket.AF_INET
        )
    except ValueError:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target_host, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"
