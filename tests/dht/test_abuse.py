"""Floods, amplification, absurd records and moved node ids against real nodes on UDP sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
from typing import Any

import pytest
import umsgpack
from kademlia.node import Node

from beed.dht import DHTNode, Identity, ServerRecord
from beed.dht import envelope as envelope_module
from beed.dht.envelope import SignedEntry, sign_entry
from beed.dht.keys import dht_key, keys_for_record
from beed.dht.records import encode_record, with_signing_fields

from .conftest import FAST, RawPeer, SwarmFactory, raw_peers, server_record
from .test_sybil import sybil_entries

FLOOD = dataclasses.replace(
    FAST,
    rpc_timeout_s=1.0,
    request_rate_per_address_hz=100.0,
    request_burst_per_address=100,
    store_rate_per_ip_hz=20.0,
    store_burst_per_ip=50,
    rate_table_size=16,
)


def _entry(
    identity: Identity,
    record: ServerRecord,
    expires_in_s: float = 30.0,
    issued_in_s: float = 0.0,
    key: bytes | None = None,
) -> tuple[bytes, SignedEntry]:
    now = time.time()
    record = with_signing_fields(
        record, identity.public_key_bytes, now + issued_in_s, now + expires_in_s
    )
    key = key or keys_for_record(record)[0]
    return key, sign_entry(identity, key, encode_record(record), record.expires_at)


def _replies(peer: RawPeer) -> int:
    return sum(1 for d in peer.protocol.received if d[:1] == b"\x01")


async def test_flood_from_one_source_is_rate_limited(swarm: SwarmFactory) -> None:
    nodes = await swarm(4, config=FLOOD)
    target = nodes[1]
    assert target.address is not None
    await nodes[2].announce(server_record(nodes[2], 0, 8))
    key, entries = sybil_entries(300, 0, 8)
    (client,) = await swarm(1, config=FLOOD, client_mode=True)
    async with raw_peers(1) as (attacker,):
        began = time.monotonic()

        async def flood() -> None:
            for i in range(3000):
                if i % 2:
                    body = ["store", [b"", key, entries[i % len(entries)].to_wire()]]
                else:
                    body = ["find_value", [b"", key]]
                attacker.send(b"\x00" + os.urandom(20) + umsgpack.packb(body), target.address)
                if i % 50 == 0:  # ~10,000 datagrams/s
                    await asyncio.sleep(0.005)

        async def honest() -> None:
            for _ in range(3):
                found = await asyncio.wait_for(
                    client.get_servers("fp-test", 0, 8), FLOOD.lookup_timeout_s
                )
                assert [r.peer_id for r in found if r.peer_id == nodes[2].peer_id]
                assert target.address is not None
                pong = await client.protocol.ping_address(target.address)
                assert pong == target.identity.node_id

        await asyncio.gather(flood(), honest())
        await asyncio.sleep(0.1)
        elapsed = time.monotonic() - began
    stats = target.protocol.stats
    handled = _replies(attacker)
    assert stats["rate_limited"] > 0
    assert handled <= FLOOD.request_burst_per_address + FLOOD.request_rate_per_address_hz * elapsed
    verified = FLOOD.store_burst_per_ip + FLOOD.store_rate_per_ip_hz * elapsed
    assert stats["store_verified"] <= verified


async def test_bucket_table_is_bounded(swarm: SwarmFactory) -> None:
    (node,) = await swarm(1, config=FLOOD)
    assert node.address is not None
    async with raw_peers(40) as peers:
        for peer in peers:
            assert await peer.request(node.address, "ping", b"") == node.identity.node_id
    limiter = node.protocol.limiter
    assert len(limiter.per_address) <= FLOOD.rate_table_size
    assert len(limiter.per_ip) <= FLOOD.rate_table_size


async def test_replies_to_unproven_sources_are_small(
    swarm: SwarmFactory, raw_peer: RawPeer
) -> None:
    (holder,) = await swarm(1)
    assert holder.address is not None
    key, entries = sybil_entries(60, 0, 8)
    for entry in entries:
        holder.protocol.rpc_store(("10.9.0.1", 1), b"", key, entry.to_wire())
    assert len(holder.storage.entries(key)) == 60

    async def find_value(*args: Any, pad: int = 0) -> tuple[int, int, Any]:
        before = len(raw_peer.protocol.received)
        reply = await raw_peer.request(holder.address, "find_value", b"", key, *args, pad=pad)
        request = 21 + len(umsgpack.packb(["find_value", [b"", key, *args]])) + pad
        return request, len(raw_peer.protocol.received[before]), reply

    request, size, reply = await find_value()
    assert size <= FAST.max_amplification * request
    assert reply["value"] == [] and reply["next"] is not None  # not even one entry fits
    request, size, reply = await find_value(pad=250)
    subkeys = [item[0] for item in reply["value"]]
    while reply["next"] is not None:  # small pages, but the cursor walks them all
        assert size <= FAST.max_amplification * request
        request, size, reply = await find_value(reply["next"], pad=250)
        subkeys += [item[0] for item in reply["value"]]
    assert subkeys == [e.subkey for e in entries]

    pad = holder.protocol.pad_find_value
    request, size, reply = await find_value(pad=pad)  # a padded request gets a full page
    assert FAST.max_page_bytes - 600 < size <= FAST.max_amplification * request
    before = len(raw_peer.protocol.received)
    request = 21 + len(umsgpack.packb(["find_node", [b"", dht_key("x")]]))
    await raw_peer.request(holder.address, "find_node", b"", dht_key("x"))
    assert len(raw_peer.protocol.received[before]) <= FAST.max_amplification * request


async def test_absurd_records_are_refused_before_the_signature_check(
    swarm: SwarmFactory, raw_peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, writer = await swarm(2)
    assert holder.address is not None
    calls: list[bytes] = []

    def counting_verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
        calls.append(public_key)
        return real_verify(public_key, signature, data)

    real_verify = envelope_module.verify
    monkeypatch.setattr(envelope_module, "verify", counting_verify)
    ident = writer.identity
    bogus = os.urandom(64)
    _, good = _entry(ident, server_record(writer, 0, 8))
    key = keys_for_record(server_record(writer, 0, 8))[0]
    absurd = {
        "lifetime": _entry(ident, server_record(writer, 0, 8), expires_in_s=10 * 365 * 86400)[1],
        "future": _entry(ident, server_record(writer, 0, 8), issued_in_s=7200)[1],
        "span": _entry(ident, server_record(writer, 0, 1000, num_blocks=1000), key=key)[1],
        "key": _entry(ident, server_record(writer, 8, 16), key=key)[1],
        "subkey": dataclasses.replace(good, subkey=Identity.generate().peer_id),
        "expired": _entry(ident, server_record(writer, 0, 8), expires_in_s=-1)[1],
    }
    for name, entry in absurd.items():
        forged = dataclasses.replace(entry, signature=bogus)
        reply = await raw_peer.request(holder.address, "store", b"", key, forged.to_wire())
        assert reply is False, name
    oversized = [good.subkey, b"x" * 5000, good.expires_at, bogus]
    assert await raw_peer.request(holder.address, "store", b"", key, oversized) is False
    assert calls == []  # none of them cost a signature check
    forged = dataclasses.replace(good, signature=bogus)
    assert await raw_peer.request(holder.address, "store", b"", key, forged.to_wire()) is False
    assert len(calls) == 1  # a sane record with a bad signature is checked, and refused
    assert await raw_peer.request(holder.address, "store", b"", key, good.to_wire()) is True
    assert await raw_peer.request(holder.address, "store", b"", key, good.to_wire()) is False
    assert len(calls) == 2  # the replay was refused without a second check


class _Claimant(asyncio.DatagramProtocol):
    """Answers pings with a node id that is not its own."""

    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x00":
            self.transport.sendto(b"\x01" + data[1:21] + umsgpack.packb(self.node_id), addr)


def _address_of(node: DHTNode, node_id: bytes) -> tuple[str, int] | None:
    contact = node.protocol.router.contact(node_id)
    return None if contact is None else (contact.ip, contact.port)


async def test_a_known_node_id_is_not_moved_by_a_claim(swarm: SwarmFactory) -> None:
    a, b = await swarm(2)
    victim_id = b.identity.node_id
    assert _address_of(a, victim_id) == b.address
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        functools.partial(_Claimant, victim_id), local_addr=("127.0.0.1", 0)
    )
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        assert a.address is not None
        # The claimant pings `a` with b's id, and is learned with b's id by a lookup.
        transport.sendto(
            b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [victim_id]]), a.address
        )
        await a.protocol.call_ping(Node(victim_id, host, port))
        await asyncio.sleep(3 * FAST.rpc_timeout_s)
        assert _address_of(a, victim_id) == b.address  # b still answers there
        assert a.routing_table_size() == 1

        await b.aclose()  # b is gone: now the claimant may take the id over
        await a.protocol.call_ping(Node(victim_id, host, port))
        for _ in range(50):
            if _address_of(a, victim_id) == (host, port):
                break
            await asyncio.sleep(0.05)
        assert _address_of(a, victim_id) == (host, port)
    finally:
        transport.close()


async def test_a_spoofed_sender_joins_no_routing_table(
    swarm: SwarmFactory, raw_peer: RawPeer
) -> None:
    (node,) = await swarm(1)
    assert node.address is not None
    fresh = os.urandom(20)
    assert await raw_peer.request(node.address, "ping", fresh) == node.identity.node_id
    await asyncio.sleep(2 * FAST.rpc_timeout_s)  # our check ping goes unanswered
    assert node.routing_table_size() == 0
    requests = [d for d in raw_peer.protocol.received if d[:1] == b"\x00"]
    assert len(requests) == 1  # one check ping, no hand-over
