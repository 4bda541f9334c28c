"""The beed DHT: signed server records in a Kademlia network, built on the `kademlia` package."""

from __future__ import annotations

from beed.dht.config import DHTConfig
from beed.dht.errors import ClientModeError, DHTError, IdentityError, RecordError
from beed.dht.identity import Identity, PeerId, verify
from beed.dht.node import DHTNode
from beed.dht.peers import (
    InitialPeersError,
    format_initial_peers,
    initial_peers_callback,
    parse_initial_peers,
)
from beed.dht.records import ModelEntry, ServerRecord, ServerState

__all__ = [
    "ClientModeError",
    "DHTConfig",
    "DHTError",
    "DHTNode",
    "Identity",
    "IdentityError",
    "InitialPeersError",
    "ModelEntry",
    "PeerId",
    "RecordError",
    "ServerRecord",
    "ServerState",
    "format_initial_peers",
    "initial_peers_callback",
    "parse_initial_peers",
    "verify",
]
