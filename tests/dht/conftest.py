"""Fixtures for DHT tests: swarms of real nodes on 127.0.0.1 and a raw UDP peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import umsgpack

from beed.dht import DHTConfig, DHTNode, ServerRecord, ServerState

FAST = DHTConfig(
    ksize=8,
    rpc_timeout_s=0.3,
    bootstrap_timeout_s=3.0,
    lookup_timeout_s=5.0,
    store_timeout_s=5.0,
    default_ttl_s=30.0,
)

SwarmFactory = Callable[..., Awaitable[list[DHTNode]]]


def server_record(
    node: DHTNode, start: int, end: int, fingerprint: str = "fp-test", **fields: Any
) -> ServerRecord:
    values: dict[str, Any] = {
        "peer_id": node.peer_id,
        "state": ServerState.ONLINE,
        "span_start": start,
        "span_end": end,
        "host": "127.0.0.1",
        "port": 40000,
        "model_fingerprint": fingerprint,
        "model_name": "test-model",
        "num_blocks": 30,
    }
    values.update(fields)
    return ServerRecord(**values)


@pytest.fixture
async def swarm() -> AsyncIterator[SwarmFactory]:
    """`await swarm(n, config=..., client_mode=False)`: n started nodes joined through the first."""
    nodes: list[DHTNode] = []

    async def make(
        n: int,
        config: DHTConfig = FAST,
        client_mode: bool = False,
        via: DHTNode | None = None,
    ) -> list[DHTNode]:
        made = [DHTNode(config, client_mode=client_mode) for _ in range(n)]
        nodes.extend(made)
        for node in made:
            await node.start("127.0.0.1", 0)
        seed = via or (nodes[0] if nodes[0] not in made else None)
        for node in made:
            if seed is not None and node is not seed:
                assert seed.address is not None
                await node.bootstrap([seed.address])
            elif seed is None:
                seed = node
        return made

    yield make
    await asyncio.gather(*(node.aclose() for node in nodes))


class _Raw(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: dict[bytes, asyncio.Future[Any]] = {}
        self.received: list[bytes] = []  # every datagram that arrived, in order

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        future = self.replies.pop(data[1:21], None)
        if future is not None and not future.done() and data[:1] == b"\x01":
            future.set_result(umsgpack.unpackb(data[21:]))


class RawPeer:
    """A misbehaving peer: sends hand-made datagrams and RPC requests from its own socket."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _Raw) -> None:
        self.transport = transport
        self.protocol = protocol

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)

    async def request(
        self, addr: tuple[str, int], name: str, *args: Any, timeout_s: float = 1.0, pad: int = 0
    ) -> Any:
        """Send one RPC (`pad` zero bytes after it) and wait for its decoded reply."""
        msg_id = os.urandom(20)
        future = asyncio.get_running_loop().create_future()
        self.protocol.replies[msg_id] = future
        self.send(b"\x00" + msg_id + umsgpack.packb([name, list(args)]) + bytes(pad), addr)
        return await asyncio.wait_for(future, timeout_s)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)


@pytest.fixture
async def raw_peer() -> AsyncIterator[RawPeer]:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        _Raw, local_addr=("127.0.0.1", 0)
    )
    yield RawPeer(transport, protocol)
    transport.close()


@contextlib.asynccontextmanager
async def raw_peers(count: int, first_host: int = 2) -> AsyncIterator[list[RawPeer]]:
    """`count` raw peers, each on its own loopback address 127.0.0.<first_host + i>."""
    loop = asyncio.get_running_loop()
    peers = []
    try:
        for i in range(count):
            transport, protocol = await loop.create_datagram_endpoint(
                _Raw, local_addr=(f"127.0.0.{first_host + i}", 0)
            )
            peers.append(RawPeer(transport, protocol))
        yield peers
    finally:
        for peer in peers:
            peer.transport.close()
