"""Lookups: kademlia's crawls made eager, and RecordCrawl, which merges every holder's entries.

kademlia's crawls query `alpha` nodes per round and wait for the round's slowest answer, so a
dead contact costs a whole RPC timeout per round, and right after churn most rounds hold one.
`EagerCrawl` keeps `alpha` queries in flight instead: a query that has not answered within
`stall_s` no longer holds its slot, the next nearest node is asked at once, and a lookup whose
remaining queries have all stalled ends without them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl, ValueSpiderCrawl
from kademlia.node import Node, NodeHeap

from beed.dht.envelope import check_entry, entry_order
from beed.dht.errors import RecordError
from beed.dht.protocol import BeeProtocol
from beed.dht.records import ServerRecord
from beed.dht.replies import VerifiedEntry

log = logging.getLogger(__name__)


Reply = Callable[[Node, Any], Awaitable[None]]


class EagerCrawl(SpiderCrawl):  # type: ignore[misc]
    """A crawl that never waits on a silent node while another could be asked."""

    stall_s: float = 0.5

    def __init__(
        self, protocol: BeeProtocol, node: Node, peers: list[Node], ksize: int, alpha: int
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        # Twice k candidates stay visible: a stalled (likely dead) node no longer hides the
        # next live one behind it; results keep the k nearest that answered.
        self.nearest = NodeHeap(self.node, 2 * ksize)
        self.nearest.push(peers)

    def finished(self) -> bool:
        """True once the lookup has what it needs (a node lookup needs every node asked)."""
        return False

    async def _eager(
        self, rpcmethod: Callable[[Node, Node], Awaitable[tuple[bool, Any]]], on_reply: Reply
    ) -> set[bytes]:
        """Ask the nearest uncontacted nodes, at most `alpha` un-stalled at once; the ids of the
        nodes that answered."""
        inflight: dict[asyncio.Future[tuple[bool, Any]], tuple[Node, float]] = {}
        answered: set[bytes] = set()
        try:
            while not self.finished():
                now = time.monotonic()
                active = sum(1 for _, began in inflight.values() if now - began < self.stall_s)
                for peer in self.nearest.get_uncontacted():
                    if active >= self.alpha:
                        break
                    self.nearest.mark_contacted(peer)
                    inflight[asyncio.ensure_future(rpcmethod(peer, self.node))] = (peer, now)
                    active += 1
                if not inflight or (active == 0 and not self.nearest.get_uncontacted()):
                    break  # everyone asked; the rest have stalled
                stalls = [began + self.stall_s for _, began in inflight.values()]
                pending = [t for t in stalls if t > now]
                timeout = max(0.0, min(pending) - now) if pending else None
                done, _ = await asyncio.wait(
                    inflight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    peer, _ = inflight.pop(task)
                    ok, reply = task.result()
                    if not ok:
                        self.nearest.remove([peer.id])
                        continue
                    answered.add(peer.id)
                    await on_reply(peer, reply)
        finally:
            for task in inflight:
                task.cancel()
        return answered


class NodeCrawl(EagerCrawl, NodeSpiderCrawl):  # type: ignore[misc]
    """The k nearest nodes to a target that answered (kademlia's NodeSpiderCrawl, eager)."""

    async def find(self) -> list[Node]:
        answered = await self._eager(self.protocol.call_find_node, self._on_reply)
        return [n for n in self.nearest if n.id in answered][: self.ksize]

    async def _on_reply(self, peer: Node, reply: Any) -> None:
        self.nearest.push([Node(*triple) for triple in reply or []])


class RecordCrawl(EagerCrawl, ValueSpiderCrawl):  # type: ignore[misc]
    """Look a key up: ask the nearest nodes, merge the entries of every node that holds the key.

    Unlike kademlia's ValueSpiderCrawl it does not stop at the first value nor vote between
    values: it fetches all pages of each holder's set, merges per subkey (newest wins), and keeps
    crawling until `quorum` holders have answered with the same subkeys, or every one of the k
    nearest was asked. Holders that disagree (a STORE missed some of them) make it ask them all.
    It does not cache the value on the nearest node without it (each STORE is signed by its
    writer; holders republish). `found` holds the merged entries even if the crawl is cancelled.
    """

    protocol: BeeProtocol

    def __init__(
        self,
        protocol: BeeProtocol,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        quorum: int,
        max_pages: int,
    ) -> None:
        EagerCrawl.__init__(self, protocol, node, peers, ksize, alpha)
        self.nearest_without_value = NodeHeap(self.node, 1)  # as ValueSpiderCrawl has
        self.quorum = quorum
        self.max_pages = max_pages
        self.found: dict[str, VerifiedEntry] = {}
        self.holder_sets: list[frozenset[str]] = []  # the subkeys each holder returned
        self.read_sets: dict[tuple[int, bytes], frozenset[str]] = {}  # summary -> subkeys read

    def merge(self, entries: list[VerifiedEntry]) -> None:
        for entry, record in entries:
            current = self.found.get(entry.subkey)
            if current is None or entry_order(record, entry) > entry_order(current[1], current[0]):
                self.found[entry.subkey] = (entry, record)

    async def find(self) -> dict[str, VerifiedEntry]:
        await self._eager(self.protocol.call_find_value, self._on_reply)
        return self.found

    def finished(self) -> bool:
        return self.done()

    async def _on_reply(self, peer: Node, reply: Any) -> None:
        if isinstance(reply, dict):
            await self._read_holders([(peer, reply)])
        else:
            self.nearest.push([Node(*triple) for triple in reply])

    async def _read_holders(self, holders: list[tuple[Node | None, dict[str, Any]]]) -> None:
        """Read every page of one holder per distinct summary (count, digest of its subkeys).

        A holder whose summary was read in full already contributes its first page only.
        """
        full: dict[object, int] = {}  # summary -> index in holders of the one read in full
        for i, (_, reply) in enumerate(holders):
            summary = reply["sum"] if reply["sum"] is not None else object()
            if summary not in self.read_sets and summary not in full:
                full[summary] = i
        sets = await asyncio.gather(*(self._read_holder(*holders[i]) for i in full.values()))
        for summary, subkeys in zip(full, sets, strict=True):
            if isinstance(summary, tuple):
                self.read_sets[summary] = subkeys
        self.holder_sets.extend(sets)
        chosen = set(full.values())
        for i, (_, reply) in enumerate(holders):
            if i not in chosen:
                self.merge(reply["value"])
                self.holder_sets.append(self.read_sets[reply["sum"]])

    def done(self) -> bool:
        """Enough holders answered, and all of them with the same subkeys."""
        return len(self.holder_sets) >= self.quorum and len(set(self.holder_sets)) == 1

    async def _read_holder(self, peer: Node | None, reply: dict[str, Any]) -> frozenset[str]:
        """Merge one holder's first page, fetch its further pages; the subkeys it holds."""
        subkeys: set[str] = {entry.subkey for entry, _ in reply["value"]}
        self.merge(reply["value"])
        cursor: str | None = reply["next"]
        for _ in range(self.max_pages - 1):
            if cursor is None or peer is None:
                return frozenset(subkeys)
            ok, page = await self.protocol.call_find_value(peer, self.node, cursor)
            if not ok or not isinstance(page, dict):
                return frozenset(subkeys)
            subkeys.update(entry.subkey for entry, _ in page["value"])
            self.merge(page["value"])
            if page["next"] is not None and page["next"] <= cursor:
                return frozenset(subkeys)  # a cursor must move forward
            cursor = page["next"]
        log.warning("dht.too_many_pages peer=%s key=%s", peer, self.node.id.hex()[:12])
        return frozenset(subkeys)


def local_entries(protocol: BeeProtocol, key: bytes) -> list[VerifiedEntry]:
    """Entries this node itself stores under `key`, re-checked (they may have expired)."""
    now = time.time()
    found: list[VerifiedEntry] = []
    for entry in protocol.storage.entries(key):
        try:
            found.append((entry, check_entry(key, entry, now, protocol.config)))
        except RecordError:
            continue
    return found


def records_of(entries: dict[str, VerifiedEntry]) -> list[ServerRecord]:
    """The records of a merged crawl result, one per subkey (peer id)."""
    return [record for _entry, record in entries.values()]
