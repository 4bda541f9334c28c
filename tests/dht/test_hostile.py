"""Forged, tampered, wrong-subkey and replayed records; garbage datagrams; lying peers."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
from typing import Any

import umsgpack
from kademlia.node import Node

from beed.dht import DHTNode, Identity
from beed.dht.envelope import SignedEntry, sign_entry
from beed.dht.keys import keys_for_record
from beed.dht.records import ServerRecord, encode_record, with_signing_fields

from .conftest import FAST, RawPeer, SwarmFactory, server_record


def signed(identity: Identity, record: ServerRecord, issued_at: float) -> tuple[bytes, SignedEntry]:
    record = with_signing_fields(record, identity.public_key_bytes, issued_at, issued_at + 30)
    key = keys_for_record(record)[0]
    return key, sign_entry(identity, key, encode_record(record), record.expires_at)


def bad_entries(victim: DHTNode, mallory: Identity) -> tuple[bytes, dict[str, SignedEntry]]:
    """Entries for the victim's first key that every node must refuse."""
    now = time.time()
    key, good = signed(victim.identity, server_record(victim, 0, 8), now)
    _, other = signed(victim.identity, server_record(victim, 0, 8, port=6666), now)
    _, mallorys = signed(mallory, server_record(victim, 0, 8, peer_id=mallory.peer_id), now)
    forged_sig = mallory.sign(b"anything") + b""
    return key, {
        "forged": dataclasses.replace(good, signature=forged_sig),
        "tampered": dataclasses.replace(good, value=other.value),
        "wrong_subkey": dataclasses.replace(mallorys, subkey=victim.peer_id),
        "subkey_of_other": dataclasses.replace(good, subkey=mallory.peer_id),
        "longer_life": dataclasses.replace(good, expires_at=good.expires_at + 3600),
    }


async def test_storing_nodes_reject_bad_and_replayed_entries(
    swarm: SwarmFactory, raw_peer: RawPeer
) -> None:
    holder, victim = await swarm(2)
    assert holder.address is not None
    key, entries = bad_entries(victim, Identity.generate())
    for name, entry in entries.items():
        reply = await raw_peer.request(holder.address, "store", b"", key, entry.to_wire())
        assert reply is False, name
    assert holder.storage.entries(key) == []

    now = time.time()
    _, older = signed(victim.identity, server_record(victim, 0, 8, free_kv_tokens=1), now)
    _, newer = signed(victim.identity, server_record(victim, 0, 8, free_kv_tokens=2), now + 1)
    assert await raw_peer.request(holder.address, "store", b"", key, newer.to_wire()) is True
    assert await raw_peer.request(holder.address, "store", b"", key, older.to_wire()) is False
    assert holder.storage.entries(key) == [newer]


async def test_readers_reject_bad_and_replayed_entries(swarm: SwarmFactory) -> None:
    nodes = await swarm(6)
    victim = nodes[1]
    key, entries = bad_entries(victim, Identity.generate())
    now = time.time()
    _, older = signed(victim.identity, server_record(victim, 0, 8, free_kv_tokens=1), now)
    _, newer = signed(victim.identity, server_record(victim, 0, 8, free_kv_tokens=2), now + 1)
    # Lying holders: storage filled behind the checks, as a modified node would serve it.
    for i, node in enumerate(nodes):
        entry = list(entries.values())[i % len(entries)]
        node.storage.merge(key, entry, (now + 10, entry.expires_at))
    (client,) = await swarm(1, config=dataclasses.replace(FAST, read_quorum=100), client_mode=True)
    assert await client.get_servers("fp-test", 0, 8) == []  # every holder serves a bad entry

    nodes[5].storage.data[key][victim.peer_id] = dataclasses.replace(
        nodes[5].storage.data[key][victim.peer_id], entry=newer
    )

    for node in nodes[:3]:  # a replay of the older record on three holders
        node.storage.data[key][victim.peer_id] = dataclasses.replace(
            node.storage.data[key][victim.peer_id], entry=older
        )
    (record,) = await client.get_servers("fp-test", 0, 8)
    assert record.free_kv_tokens == 2


GARBAGE: list[bytes] = [
    b"",
    b"\x00",
    os.urandom(21),
    b"\x00" + os.urandom(20) + b"\xc1",  # never-used msgpack byte
    b"\x00" + os.urandom(20) + umsgpack.packb("hello"),
    b"\x00" + os.urandom(20) + umsgpack.packb(["ping"]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["ping", "notalist"]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["ping", []]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [b"short"]]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [b"x" * 20, 1, 2, 3]]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["stun", [b"x" * 20]]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["__init__", []]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["store", [b"x" * 20, b"k" * 20, [1, 2]]]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["store", [b"x" * 20, 5, None]]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["find_node", [b"x" * 20, {"a": 1}]]),
    b"\x00" + os.urandom(20) + umsgpack.packb(["find_value", [b"x" * 20, b"k" * 20, 7]]),
    b"\x00" + os.urandom(20) + umsgpack.packb([{1: 2}, [[[[[]]]]]]),
    b"\x00" + os.urandom(20) + b"\x91" * 5000,  # deeply nested arrays
    b"\x01" + os.urandom(20) + umsgpack.packb(True),  # reply nobody asked for
    b"\x02" + os.urandom(20) + umsgpack.packb(1),
    os.urandom(8000),
]


async def test_garbage_datagrams_do_not_crash_a_node(
    swarm: SwarmFactory, raw_peer: RawPeer
) -> None:
    nodes = await swarm(4)
    target = nodes[1]
    assert target.address is not None
    await target.announce(server_record(target, 0, 8))
    for datagram in GARBAGE * 3:
        raw_peer.send(datagram, target.address)
    for _ in range(200):
        raw_peer.send(os.urandom(200), target.address)
    await asyncio.sleep(0.2)
    assert await raw_peer.request(target.address, "ping", b"") == target.identity.node_id
    (client,) = await swarm(1, client_mode=True, via=target)
    assert len(await client.get_servers("fp-test", 0, 8)) == 1


class _Liar(asyncio.DatagramProtocol):
    """Answers every request with a well-formed datagram carrying a nonsense result."""

    def __init__(self, node_id: bytes, replies: list[Any]) -> None:
        self.node_id, self.replies, self.count = node_id, replies, 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        name = umsgpack.unpackb(data[21:])[0]
        reply = self.node_id if name == "ping" else self.replies[self.count % len(self.replies)]
        self.count += 1
        self.transport.sendto(b"\x01" + data[1:21] + umsgpack.packb(reply), addr)


def _same(liar: _Liar) -> _Liar:
    return liar


async def test_lying_peers_do_not_break_lookups(swarm: SwarmFactory) -> None:
    nodes = await swarm(5)
    await nodes[2].announce(server_record(nodes[2], 0, 8))
    (client,) = await swarm(1, client_mode=True)
    replies: list[Any] = [
        "nonsense",
        [[b"short", "127.0.0.1", 1]],
        [[os.urandom(20), "127.0.0.1", 0], [1, 2, 3]],
        {"value": "not a list"},
        {"value": [["a", b"b", "c", b"d"], None, 7], "next": 5},
        {"value": [], "next": ""},
        None,
    ]
    liars: list[asyncio.DatagramTransport] = []
    protocols: list[_Liar] = []
    for _ in range(4):
        liar = _Liar(os.urandom(20), replies)
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            functools.partial(_same, liar), local_addr=("127.0.0.1", 0)
        )
        liars.append(transport)
        protocols.append(protocol)
        host, port = transport.get_extra_info("sockname")[:2]
        client.protocol.welcome_if_new(Node(liar.node_id, host, port))
    try:
        for _ in range(3):
            found = await client.get_servers("fp-test", 0, 8)
            assert [r.peer_id for r in found] == [nodes[2].peer_id]
        assert sum(p.count for p in protocols) > 0
    finally:
        for transport in liars:
            transport.close()
