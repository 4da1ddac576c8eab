"""Errors raised by the protocol layer."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection can't be trusted any more."""


class DecodeError(Exception):
    """One payload could not be decoded; the rest of the message and stream are fine."""
