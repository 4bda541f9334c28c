"""Sybil floods: many free identities under one key must not hide an honest server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from beed.dht import DHTNode, Identity, ServerRecord, ServerState
from beed.dht.envelope import SignedEntry, sign_entry
from beed.dht.keys import keys_for_record
from beed.dht.records import encode_record, with_signing_fields

from .conftest import FAST, RawPeer, SwarmFactory, raw_peers, server_record

SYBILS = 1600


def _last_sorting_identity() -> Identity:
    """An identity whose peer id sorts after nearly every other (first character 'z')."""
    while True:
        identity = Identity.generate()
        if identity.peer_id.startswith("z"):
            return identity


def sybil_entries(count: int, start: int, end: int) -> tuple[bytes, list[SignedEntry]]:
    """`count` fresh identities, each with a valid signed record for blocks [start, end)."""
    entries = []
    now = time.time()
    key = b""
    for _ in range(count):
        identity = Identity.generate()
        record = ServerRecord(
            peer_id=identity.peer_id,
            state=ServerState.ONLINE,
            span_start=start,
            span_end=end,
            host="127.0.0.1",
            port=40001,
            model_fingerprint="fp-test",
            model_name="m" * 128,  # big records: fewer per page
            num_blocks=30,
            software_version="s" * 64,
            codecs=tuple(f"codec-{i:025d}" for i in range(8)),
        )
        record = with_signing_fields(record, identity.public_key_bytes, now, now + 30)
        key = keys_for_record(record)[0]
        entries.append(sign_entry(identity, key, encode_record(record), record.expires_at))
    return key, entries


async def flood_stores(
    peers: list[RawPeer], holder: tuple[str, int], key: bytes, entries: list[SignedEntry]
) -> int:
    """Send every entry to `holder` from the peers in turn, 64 in flight; the stores accepted."""
    accepted = 0
    for i in range(0, len(entries), 64):
        batch = entries[i : i + 64]
        replies = await asyncio.gather(
            *(
                peers[j % len(peers)].request(holder, "store", b"", key, e.to_wire(), timeout_s=0.5)
                for j, e in enumerate(batch, start=i)
            ),
            return_exceptions=True,
        )
        accepted += sum(1 for r in replies if r is True)
    return accepted


@contextlib.asynccontextmanager
async def started(node: DHTNode, seed: DHTNode) -> AsyncIterator[DHTNode]:
    await node.start("127.0.0.1", 0)
    try:
        assert seed.address is not None
        await node.bootstrap([seed.address])
        yield node
    finally:
        await node.aclose()


async def test_sybil_flood_does_not_hide_an_announced_server(swarm: SwarmFactory) -> None:
    nodes = await swarm(3)
    honest = DHTNode(FAST, identity=_last_sorting_identity())
    async with started(honest, nodes[0]), raw_peers(8) as peers:
        assert await honest.announce(server_record(honest, 0, 8)) > 0
        key, entries = sybil_entries(SYBILS, 0, 8)
        holders = [n.address for n in [*nodes, honest] if n.address is not None]
        await asyncio.gather(*(flood_stores(peers, h, key, entries) for h in holders))
        (client,) = await swarm(1, client_mode=True)
        found = await client.get_servers("fp-test", 0, 8)
        assert honest.peer_id in {r.peer_id for r in found}
        for holder in [*nodes, honest]:
            held = holder.storage.entries(key)
            assert held[0].subkey == honest.peer_id  # first seen, first served
            assert len(held) <= FAST.max_subkeys_per_prefix + 1  # the /24 gets its share only


async def test_sybil_flood_without_caps_still_pages_oldest_first(swarm: SwarmFactory) -> None:
    """Even with every Sybil entry stored (many source networks), readers see the honest one."""
    config = dataclasses.replace(
        FAST, max_subkeys_per_ip=4096, max_subkeys_per_prefix=4096, store_burst_per_ip=4096
    )
    (holder,) = await swarm(1, config=config)
    honest = DHTNode(config, identity=_last_sorting_identity())
    async with started(honest, holder), raw_peers(4) as peers:
        assert await honest.announce(server_record(honest, 0, 8)) > 0
        key, entries = sybil_entries(SYBILS, 0, 8)
        assert holder.address is not None
        await flood_stores(peers, holder.address, key, entries)
        assert len(holder.storage.entries(key)) > config.max_pages * 10  # past the page limit
        (client,) = await swarm(1, config=config, client_mode=True, via=holder)
        found = await client.get_servers("fp-test", 0, 8)
        assert honest.peer_id in {r.peer_id for r in found}
