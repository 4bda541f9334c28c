"""Errors raised by the DHT layer, rooted in the project's one error tree (`protocol.errors`)."""

from __future__ import annotations

from protocol.errors import BeeError, PeerUnreachableError

__all__ = [
    "ClientModeError",
    "DHTError",
    "IdentityError",
    "PeerUnreachableError",
    "RecordError",
]


class DHTError(BeeError):
    """Base of errors raised on purpose by `beed.dht`."""


class IdentityError(DHTError):
    """The identity file is unreadable, malformed or not an Ed25519 private key."""


class RecordError(DHTError):
    """A record cannot be encoded, or bytes from a peer are not a valid record."""


class ClientModeError(DHTError):
    """A write (announce) was attempted on a node started in client mode."""
