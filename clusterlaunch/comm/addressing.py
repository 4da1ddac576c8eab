"""Addresses of the form ``tcp://host:port`` and ``tls://host:port`` as dask writes them."""

from __future__ import annotations

import ipaddress
import socket

SCHEME = "tcp"
SCHEMES = ("tcp", "tls")


def parse_address(address: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``(host, port)`` of a ``tcp://`` or ``tls://`` address; bare ``host:port`` is accepted.

    Raises ``ValueError`` with a one-line reason for anything else.
    """
    return _parse(address, default_port)[1:]


def address_scheme(address: str) -> str:
    """``"tcp"`` or ``"tls"``: the scheme of ``address`` (``tcp`` when it names none)."""
    return _parse(address, 0)[0]


def _parse(address: str, default_port: int | None) -> tuple[str, str, int]:
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"invalid address {address!r}: expected 'tcp://host:port'")
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = SCHEME, text
    if scheme not in SCHEMES:
        raise ValueError(f"invalid address {address!r}: only tcp:// and tls:// are supported")
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
        return scheme, host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {address!r}: port must be 0-65535")
    return scheme, host, int(port_text)


def format_address(host: str, port: int, scheme: str = SCHEME) -> str:
    """The ``scheme://`` address of ``host`` and ``port``."""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def normalize_address(address: str) -> str:
    """``address`` in canonical ``scheme://host:port`` form."""
    scheme, host, port = _parse(address, None)
    return format_address(host, port, scheme)


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
