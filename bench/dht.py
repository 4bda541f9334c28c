"""Benchmark DHT discovery: a client finds the servers of every block of a 30-block model.

A 50-node DHT on 127.0.0.1 (one process, one event loop), 20 of them servers announcing random
spans of a 30-block model. Each trial starts a fresh client-mode node, bootstraps it through a
random node, and times `get_servers(fingerprint, 0, 30)`. The baseline is stock kademlia 2.2.3
on the same layout: servers `set` one key per block (last writer wins, so it finds one server
per block at most) and the client `get`s the 30 keys concurrently.

    python bench/dht.py [--nodes 50] [--servers 20] [--blocks 30] [--trials 50] [--delay-ms 0]

`--delay-ms` delays every datagram of the beed nodes (not the baseline) to show how discovery
scales with round-trip time; on bare loopback the time is Python CPU in one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time
from typing import Any

from kademlia.network import Server

from beed.dht import DHTConfig, DHTNode, ServerRecord, ServerState

FINGERPRINT = "bench-fingerprint-" + "0" * 46


def spans(servers: int, blocks: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random spans of 6-15 blocks; the first ones tile the model so every block is served."""
    result = []
    start = 0
    while start < blocks:
        end = min(blocks, start + rng.randint(6, 15))
        result.append((start, end))
        start = end
    while len(result) < servers:
        length = rng.randint(6, 15)
        start = rng.randint(0, blocks - length)
        result.append((start, start + length))
    return result[:servers]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class DelayedTransport:
    """Wraps a node's UDP transport so every datagram leaves `delay_s` late (WAN emulation)."""

    def __init__(self, transport: Any, delay_s: float) -> None:
        self._transport, self._delay_s = transport, delay_s

    def sendto(self, data: bytes, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self._delay_s, self._send, data, addr)

    def _send(self, data: bytes, addr: Any) -> None:
        if not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def close(self) -> None:
        self._transport.close()


async def started(config: DHTConfig, delay_s: float, client_mode: bool = False) -> DHTNode:
    node = DHTNode(config, client_mode=client_mode)
    await node.start("127.0.0.1", 0)
    if delay_s:
        node.protocol.transport = DelayedTransport(node.protocol.transport, delay_s)
    return node


async def bench_beed(args: argparse.Namespace, layout: list[tuple[int, int]]) -> dict[str, Any]:
    config = DHTConfig(rpc_timeout_s=1.0 + 4 * args.delay_ms / 1000)
    delay_s = args.delay_ms / 1000
    nodes = [await started(config, delay_s) for _ in range(args.nodes)]
    seed = nodes[0].address
    assert seed is not None
    for node in nodes[1:]:
        await node.bootstrap([seed])
    began = time.perf_counter()
    # Servers announce in waves of 10: all nodes share one event loop here, and hundreds of
    # simultaneous announcements overflow the UDP buffers (real servers start at different times).
    records = [
        (
            node,
            ServerRecord(
                peer_id=node.peer_id,
                state=ServerState.ONLINE,
                span_start=start,
                span_end=end,
                host="127.0.0.1",
                port=40000 + i,
                model_fingerprint=FINGERPRINT,
                model_name="bench-model",
                num_blocks=args.blocks,
                dtype="bfloat16",
                compute_tokens_per_s=1000.0,
                network_bytes_per_s=1e8,
                free_kv_tokens=8192,
                codecs=("none", "lz4", "zstd"),
                software_version="bench",
            ),
        )
        for i, (node, (start, end)) in enumerate(zip(nodes, layout, strict=False))
    ]
    stores = []
    for wave in range(0, len(records), 10):
        stores += await asyncio.gather(*(n.announce(r) for n, r in records[wave : wave + 10]))
    announce_s = time.perf_counter() - began
    times, rpcs, complete, seen = [], [], 0, []
    rng = random.Random(1)
    for _ in range(args.trials):
        client = await started(config, delay_s, client_mode=True)
        entry = rng.choice(nodes).address
        assert entry is not None
        await client.bootstrap([entry])
        calls = _count_calls(client)
        t0 = time.perf_counter()
        found = await client.get_servers(FINGERPRINT, 0, args.blocks)
        times.append(time.perf_counter() - t0)
        rpcs.append(calls[0])
        complete += len(found) == len(layout)
        seen.append(len(found))
        await client.aclose()
    await asyncio.gather(*(node.aclose() for node in nodes))
    return {
        "times": times,
        "rpcs": statistics.median(rpcs),
        "complete": complete,
        "seen": min(seen),
        "announce_s": announce_s,
        "stores": sum(stores),
    }


def _count_calls(node: DHTNode) -> list[int]:
    counter = [0]
    original = node.protocol._call

    def counting(*a: Any) -> Any:
        counter[0] += 1
        return original(*a)

    node.protocol._call = counting  # type: ignore[method-assign,assignment]
    return counter


async def bench_stock(args: argparse.Namespace, layout: list[tuple[int, int]]) -> dict[str, Any]:
    nodes = [Server() for _ in range(args.nodes)]
    ports = []
    for node in nodes:
        await node.listen(0, "127.0.0.1")
        ports.append(node.transport.get_extra_info("sockname")[1])
    for node in nodes[1:]:
        await node.bootstrap([("127.0.0.1", ports[0])])
    for i, (start, end) in enumerate(layout):
        for block in range(start, end):
            await nodes[i].set(f"{FINGERPRINT}/{block}", f"server-{i}")
    # One client for all trials: stock kademlia has no client mode, so every stopped client
    # would stay in the routing tables as a dead contact and stall later lookups by 5 s.
    times, found_servers = [], []
    client = Server()
    await client.listen(0, "127.0.0.1")
    await client.bootstrap([("127.0.0.1", ports[1])])
    for _ in range(args.trials):
        t0 = time.perf_counter()
        values = await asyncio.gather(
            *(client.get(f"{FINGERPRINT}/{b}") for b in range(args.blocks))
        )
        times.append(time.perf_counter() - t0)
        found_servers.append(len(set(values) - {None}))
    client.stop()
    for node in nodes:
        node.stop()
    return {"times": times, "servers_seen": statistics.median(found_servers)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="one-way delay added to every beed datagram"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip stock kademlia")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    layout = spans(args.servers, args.blocks, random.Random(0))

    ours = await bench_beed(args, layout)
    ms = [t * 1000 for t in ours["times"]]
    print(
        f"nodes={args.nodes} servers={args.servers} blocks={args.blocks} trials={args.trials}"
        f" one-way delay={args.delay_ms:g} ms"
    )
    print(
        f"announce: {len(layout)} servers in {ours['announce_s']:.2f} s, "
        f"{ours['stores']} remote stores"
    )
    print(f"{'':28} {'median ms':>10} {'p95 ms':>10} {'servers found':>14}")
    seen = (
        f"{ours['complete']}/{args.trials} all"
        if ours["complete"] == args.trials
        else (f"{ours['complete']}/{args.trials} all, min {ours['seen']}")
    )
    print(
        f"{'beed get_servers(0, 30)':28} {statistics.median(ms):10.1f} {percentile(ms, 0.95):10.1f}"
        f" {seen:>14}   rpcs/lookup={ours['rpcs']:.0f}"
    )
    if not args.no_baseline:
        stock = await bench_stock(args, layout)
        sms = [t * 1000 for t in stock["times"]]
        seen = f"{stock['servers_seen']:.0f} (median)"
        print(
            f"{'stock kademlia 30 x get()':28} {statistics.median(sms):10.1f}"
            f" {percentile(sms, 0.95):10.1f} {seen:>14}"
        )
        print(f"ratio beed/stock (median): {statistics.median(ms) / statistics.median(sms):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
