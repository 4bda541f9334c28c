"""The reachability check: DHT peers dial a sender's TCP port back (real nodes on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket

from beed.dht import DHTConfig, DHTNode

CONFIG = DHTConfig(rpc_timeout_s=1.0, dial_back_timeout_s=1.0, liveness_period_s=0)


async def test_peers_dial_back_an_open_port_and_not_a_closed_one():
    peers = [DHTNode(CONFIG) for _ in range(3)]
    for node in peers:
        await node.start("127.0.0.1", 0)
    server = DHTNode(CONFIG)
    await server.start("127.0.0.1", 0)
    assert await server.check_reachability(1) == ""  # nobody to ask: the first node
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        server.set_reachable(False)
        await server.bootstrap([p.address for p in peers if p.address])
        assert await server.check_reachability(listening.getsockname()[1]) == "public"
        assert await server.check_reachability(closed.getsockname()[1]) == "unreachable"
        assert sum(p.protocol.stats["reach_open"] for p in peers) == 3
        assert sum(p.protocol.stats["reach_closed"] for p in peers) == 3
        # While unreachable it names no node id: no peer keeps it as a contact.
        await asyncio.sleep(0.2)
        assert all(p.protocol.router.contact(server.node.id) is None for p in peers)
        server.set_reachable(True)
        assert server.reachable
    finally:
        listening.close()
        closed.close()
        for node in (*peers, server):
            await node.aclose()


async def test_a_malformed_reach_is_dropped_and_the_node_keeps_answering():
    a, b = DHTNode(CONFIG), DHTNode(CONFIG)
    await a.start("127.0.0.1", 0)
    await b.start("127.0.0.1", 0)
    try:
        assert a.address is not None and b.address is not None
        for args in ([b"", 0], [b"", "80"], [b"", 70000], [b""]):
            ok, _ = await b.protocol._call(a.address, "reach", *args, timeout_s=0.5)
            assert not ok  # dropped unanswered
        assert a.protocol.stats["bad_datagram"] == 4
        assert await b.protocol.call_reach(a.address, 1) is False  # port 1: nobody there
    finally:
        await a.aclose()
        await b.aclose()
