"""Real nodes on 127.0.0.1: announce, discover, expire, survive churn; client mode never stores."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import pytest
from kademlia.node import Node
from kademlia.utils import digest

from beed.dht import (
    ClientModeError,
    DHTConfig,
    DHTNode,
    ServerState,
    format_initial_peers,
    parse_initial_peers,
)
from beed.dht.keys import keys_for_record

from .conftest import FAST, RawPeer, SwarmFactory, server_record


async def test_overlapping_servers_are_all_visible(swarm: SwarmFactory) -> None:
    nodes = await swarm(10)
    servers = nodes[:5]
    spans = [(0, 12), (6, 18), (10, 30), (0, 30), (20, 30)]
    for node, (start, end) in zip(servers, spans, strict=True):
        assert await node.announce(server_record(node, start, end)) > 0
    (client,) = await swarm(1, client_mode=True)

    found = await client.get_servers("fp-test", 0, 30)
    assert {r.peer_id for r in found} == {n.peer_id for n in servers}
    assert all(r.state is ServerState.ONLINE for r in found)
    assert {r.peer_id: r.span for r in found} == {
        n.peer_id: s for n, s in zip(servers, spans, strict=True)
    }
    middle = await client.get_servers("fp-test", 12, 14)
    assert {r.span for r in middle} == {(6, 18), (10, 30), (0, 30)}
    assert await client.get_servers("other-fingerprint", 0, 30) == []
    learned = await client.get_servers("fp-test", 19)  # span_end learned from the records
    assert {r.span for r in learned} == {(10, 30), (0, 30), (20, 30)}

    (model,) = await client.list_models()
    assert (model.model_name, model.fingerprint, model.num_blocks) == ("test-model", "fp-test", 30)
    assert (model.num_servers, model.covered_blocks) == (5, 30)


async def test_newest_record_of_a_server_wins_and_offline_is_hidden(swarm: SwarmFactory) -> None:
    nodes = await swarm(6)
    server = nodes[1]
    await server.announce(server_record(server, 0, 8, free_kv_tokens=1))
    await server.announce(server_record(server, 0, 8, free_kv_tokens=2))
    (client,) = await swarm(1, client_mode=True)
    (record,) = await client.get_servers("fp-test", 0, 8)
    assert record.free_kv_tokens == 2
    await server.announce(server_record(server, 0, 8, state=ServerState.OFFLINE), ttl_s=5)
    assert await client.get_servers("fp-test", 0, 8) == []
    (offline,) = await client.get_servers("fp-test", 0, 8, include_offline=True)
    assert offline.state is ServerState.OFFLINE
    assert await client.list_models() == []


async def test_records_expire_and_reappear(swarm: SwarmFactory) -> None:
    # Holders republish every 0.2 s; that must not keep the record past its signed expiry.
    config = dataclasses.replace(FAST, table_refresh_s=0.2, republish_s=0.2)
    nodes = await swarm(6, config=config)
    server = nodes[2]
    (client,) = await swarm(1, config=config, client_mode=True)
    await server.announce(server_record(server, 0, 30), ttl_s=1.0)
    assert len(await client.get_servers("fp-test", 0, 30)) == 1
    await asyncio.sleep(1.6)
    assert await client.get_servers("fp-test", 0, 30) == []
    assert all(len(n.storage) == 0 for n in nodes)
    await server.announce(server_record(server, 0, 30), ttl_s=10.0)
    assert len(await client.get_servers("fp-test", 0, 30)) == 1


async def test_client_mode_never_stores_and_is_not_routed_to(
    swarm: SwarmFactory, raw_peer: RawPeer
) -> None:
    nodes = await swarm(5)
    (client,) = await swarm(1, client_mode=True)
    await nodes[1].announce(server_record(nodes[1], 0, 30))
    assert len(await client.get_servers("fp-test", 0, 30)) == 1
    assert client.routing_table_size() > 0
    assert all(
        client.identity.node_id
        not in {c.id for b in n.protocol.router.buckets for c in b.nodes.values()}
        for n in nodes
    )
    assert len(client.storage) == 0
    with pytest.raises(ClientModeError):
        await client.announce(server_record(client, 0, 30))
    # A STORE sent straight to the client is refused.
    record = server_record(nodes[2], 0, 8)
    entry = await _signed_entry(nodes[2], record)
    assert client.address is not None
    key = keys_for_record(entry[1])[0]
    reply = await raw_peer.request(client.address, "store", b"", key, entry[0].to_wire())
    assert reply is False and len(client.storage) == 0


async def test_third_of_thirty_nodes_killed(swarm: SwarmFactory) -> None:
    nodes = await swarm(30)
    servers = nodes[::3]  # 10 servers; kill 10 other nodes
    for i, node in enumerate(servers):
        await node.announce(server_record(node, (i * 3) % 24, (i * 3) % 24 + 6))
    doomed = [n for n in nodes if n not in servers][:10]
    await asyncio.gather(*(n.aclose() for n in doomed))
    # The next refresh: every live server announces again.
    await asyncio.gather(
        *(
            n.announce(server_record(n, (i * 3) % 24, (i * 3) % 24 + 6))
            for i, n in enumerate(servers)
        )
    )
    (client,) = await swarm(1, client_mode=True, via=servers[-1])
    found = await client.get_servers("fp-test", 0, 30)
    assert {r.peer_id for r in found} == {n.peer_id for n in servers}


async def test_announce_with_every_neighbour_dead_does_not_raise(swarm: SwarmFactory) -> None:
    nodes = await swarm(3)
    await asyncio.gather(nodes[1].aclose(), nodes[2].aclose())
    assert await nodes[0].announce(server_record(nodes[0], 0, 8)) == 0
    assert len(nodes[0].storage) == 2  # kept locally: its group key and the model list
    assert len(await nodes[0].get_servers("fp-test", 0, 8)) == 1


async def test_reads_are_not_answered_from_a_stale_local_copy(swarm: SwarmFactory) -> None:
    nodes = await swarm(8)
    reader, server = nodes[0], nodes[5]
    await server.announce(server_record(server, 0, 8, free_kv_tokens=1))
    key = keys_for_record((await reader.get_servers("fp-test", 0, 8))[0])[0]
    # Plant the old record in the reader's own storage, then update it everywhere else.
    old = reader.storage.entries(key) or [e for n in nodes for e in n.storage.entries(key)]
    await server.announce(server_record(server, 0, 8, free_kv_tokens=2))
    reader.storage.data.pop(key, None)
    reader.storage.merge(key, old[0], (0.0, old[0].expires_at))
    (record,) = await reader.get_servers("fp-test", 0, 8)
    assert record.free_kv_tokens == 2


async def test_one_missed_reply_does_not_evict(swarm: SwarmFactory) -> None:
    a, b = await swarm(2)
    contact = next(c for bucket in a.protocol.router.buckets for c in bucket.nodes.values())
    await b.aclose()
    for missed in range(1, FAST.max_missed_replies + 1):
        assert a.routing_table_size() == 1, missed
        ok, _ = await a.protocol.call_ping(contact)
        assert not ok
    assert a.routing_table_size() == 0


async def test_hand_over_uses_the_key_itself(swarm: SwarmFactory) -> None:
    """A node hands a key to a newcomer closer to that key (kademlia hashed the key twice)."""
    a, c = await swarm(2, config=dataclasses.replace(FAST, ksize=1))
    newcomer = DHTNode(FAST)
    # Pick a fingerprint whose first group key is closer to the newcomer and to `a` than to `c`.
    for i in range(10_000):
        record = server_record(a, 0, 8, fingerprint=f"fp-{i}")
        key = keys_for_record(record)[0]
        if _hand_over_wanted(key, a, c, newcomer) and not _hand_over_wanted(
            digest(key), a, c, newcomer
        ):
            break
    entry = (await _signed_entry(a, record))[0]
    a.storage.merge(key, entry, (record.issued_at, entry.expires_at))
    await newcomer.start("127.0.0.1", 0)
    try:
        assert a.address is not None
        await newcomer.bootstrap([a.address])
        for _ in range(50):
            if newcomer.storage.entries(key):
                break
            await asyncio.sleep(0.02)
        assert newcomer.storage.entries(key) == [entry]
    finally:
        await newcomer.aclose()


async def test_bootstrap_to_nobody_raises(swarm: SwarmFactory) -> None:
    from beed.dht.errors import PeerUnreachableError

    config = dataclasses.replace(FAST, bootstrap_timeout_s=0.5)
    node = DHTNode(config)
    await node.start("127.0.0.1", 0)
    try:
        with pytest.raises(PeerUnreachableError, match="no initial peer answered"):
            await node.bootstrap([("127.0.0.1", 9)])
    finally:
        await node.aclose()


async def test_close_leaves_no_tasks(swarm: SwarmFactory) -> None:
    before = asyncio.all_tasks()
    node = DHTNode(DHTConfig(table_refresh_s=0.05))
    await node.start("127.0.0.1", 0)
    await asyncio.sleep(0.1)
    await node.aclose()
    assert asyncio.all_tasks() - before == set()
    assert len(node._tasks) == 0


def _hand_over_wanted(key: bytes, holder: DHTNode, other: DHTNode, newcomer: DHTNode) -> bool:
    def distance(node: DHTNode) -> int:
        return int.from_bytes(key, "big") ^ int.from_bytes(node.identity.node_id, "big")

    return distance(newcomer) < distance(other) and distance(holder) < distance(other)


async def _signed_entry(node: DHTNode, record):  # type: ignore[no-untyped-def]
    from beed.dht.envelope import sign_entry
    from beed.dht.records import encode_record, with_signing_fields

    now = time.time()
    signed = with_signing_fields(record, node.identity.public_key_bytes, now, now + 30)
    key = keys_for_record(signed)[0]
    return sign_entry(node.identity, key, encode_record(signed), signed.expires_at), signed


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6(swarm: SwarmFactory) -> None:
    nodes = [DHTNode(FAST), DHTNode(FAST), DHTNode(FAST, client_mode=True)]
    try:
        seed = await nodes[0].start("::1", 0)
        for node in nodes[1:]:
            await node.start("::1", 0)
            await node.bootstrap(parse_initial_peers([format_initial_peers([seed])]))
        await nodes[1].announce(server_record(nodes[1], 0, 8, host="::1"))
        (record,) = await nodes[2].get_servers("fp-test", 0, 8)
        assert record.host == "::1"
    finally:
        for node in nodes:
            await node.aclose()


async def test_many_servers_per_key_page_within_the_datagram_limit(swarm: SwarmFactory) -> None:
    nodes = await swarm(40)
    for wave in range(0, 40, 10):
        await asyncio.gather(
            *(
                n.announce(server_record(n, 0, 30, model_name="m" * 100))
                for n in nodes[wave : wave + 10]
            )
        )
    (client,) = await swarm(1, client_mode=True)
    sizes: list[int] = []
    for node in nodes:
        send = node.protocol.transport.sendto

        def recording(data: bytes, addr: object, send=send) -> None:  # type: ignore[no-untyped-def]
            sizes.append(len(data))
            send(data, addr)

        node.protocol.transport.sendto = recording
    found = await client.get_servers("fp-test", 0, 30)
    assert {r.peer_id for r in found} == {n.peer_id for n in nodes}
    assert 6000 < max(sizes) <= 8192  # full pages were sent, none over the limit
    (model,) = await client.list_models()
    assert model.num_servers == 40


async def test_announce_reaches_live_nodes_past_dead_contacts(swarm: SwarmFactory) -> None:
    # Most of the swarm died without a word and is still in every routing table. A store
    # crawl that waited for each round's slowest node would spend a 5 s RPC timeout per round
    # and give up (3 s limit) having stored nowhere; readers, whose quorum of holders agrees on
    # the older set, would then never see the new server.
    slow_timeouts = dataclasses.replace(
        FAST, ksize=20, rpc_timeout_s=5.0, store_timeout_s=3.0, lookup_timeout_s=3.0, stall_s=0.2
    )
    nodes = await swarm(16, config=slow_timeouts)
    key = Node(keys_for_record(server_record(nodes[0], 0, 8))[0])
    by_distance = sorted(nodes[1:], key=lambda n: n.node.distance_to(key))
    doomed, (early, other, late) = by_distance[:12], by_distance[12:]
    await early.announce(server_record(early, 0, 8))
    await asyncio.gather(*(n.aclose() for n in doomed))
    await late.announce(server_record(late, 0, 8))
    (client,) = await swarm(1, config=slow_timeouts, client_mode=True, via=early)
    found = await client.get_servers("fp-test", 0, 8)
    assert {r.peer_id for r in found} == {early.peer_id, late.peer_id}
    assert other.peer_id not in {r.peer_id for r in found}


async def test_silent_contacts_are_pinged_and_evicted(swarm: SwarmFactory) -> None:
    config = dataclasses.replace(FAST, liveness_period_s=0.2, max_missed_replies=2)
    a, b, c = await swarm(3, config=config)
    assert a.routing_table_size() == 2
    await c.aclose()
    for _ in range(100):  # each node pings c every 0.2 s; two misses evict it
        if a.routing_table_size() == 1 and b.routing_table_size() == 1:
            break
        await asyncio.sleep(0.1)
    assert {n.id for bucket in a.protocol.router.buckets for n in bucket.get_nodes()} == {b.node.id}
