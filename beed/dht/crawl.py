"""RecordCrawl: kademlia's value lookup, merging every holder's entries instead of voting."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kademlia.crawling import ValueSpiderCrawl
from kademlia.node import Node

from beed.dht.envelope import check_entry, entry_order
from beed.dht.errors import RecordError
from beed.dht.protocol import BeeProtocol, VerifiedEntry
from beed.dht.records import ServerRecord

log = logging.getLogger(__name__)


class RecordCrawl(ValueSpiderCrawl):  # type: ignore[misc]
    """Look a key up: ask the nearest nodes, merge the entries of every node that holds the key.

    Unlike kademlia's ValueSpiderCrawl it does not stop at the first value nor vote between
    values: it keeps crawling until `quorum` holders have answered (or every one of the k nearest
    was asked), fetches all pages of each holder's set, and merges per subkey, newest wins.
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
        super().__init__(protocol, node, peers, ksize, alpha)
        self.quorum = quorum
        self.max_pages = max_pages
        self.found: dict[str, VerifiedEntry] = {}
        self.holders = 0

    def merge(self, entries: list[VerifiedEntry]) -> None:
        for entry, record in entries:
            current = self.found.get(entry.subkey)
            if current is None or entry_order(record, entry) > entry_order(current[1], current[0]):
                self.found[entry.subkey] = (entry, record)

    async def find(self) -> dict[str, VerifiedEntry]:
        if not len(self.nearest):
            return self.found
        result: dict[str, VerifiedEntry] = await self._find(self.protocol.call_find_value)
        return result

    async def _nodes_found(self, responses: dict[bytes, Any]) -> dict[str, VerifiedEntry]:
        silent = []
        more: list[tuple[Node, str]] = []
        for peer_id, (ok, reply) in responses.items():
            if not ok:
                silent.append(peer_id)
            elif isinstance(reply, dict):
                self.holders += 1
                self.merge(reply["value"])
                peer = self.nearest.get_node(peer_id)
                if reply["next"] is not None and peer is not None:
                    more.append((peer, reply["next"]))
            else:
                self.nearest.push([Node(*triple) for triple in reply])
        self.nearest.remove(silent)
        if more:
            await asyncio.gather(*(self._fetch_pages(peer, cursor) for peer, cursor in more))
        if self.holders >= self.quorum or self.nearest.have_contacted_all():
            return self.found
        return await self.find()

    async def _fetch_pages(self, peer: Node, cursor: str) -> None:
        """Fetch the remaining pages of one holder's set, one datagram each."""
        next_cursor: str | None = cursor
        for _ in range(self.max_pages - 1):
            if next_cursor is None:
                return
            ok, reply = await self.protocol.call_find_value(peer, self.node, next_cursor)
            if not ok or not isinstance(reply, dict):
                return
            self.merge(reply["value"])
            if reply["next"] is not None and reply["next"] <= next_cursor:
                return  # a cursor must move forward
            next_cursor = reply["next"]
        log.warning("dht.too_many_pages peer=%s key=%s", peer, self.node.id.hex()[:12])


def local_entries(protocol: BeeProtocol, key: bytes) -> list[VerifiedEntry]:
    """Entries this node itself stores under `key`, re-checked (they may have expired)."""
    now = time.time()
    found: list[VerifiedEntry] = []
    for entry in protocol.storage.entries(key):
        try:
            found.append((entry, check_entry(key, entry, now)))
        except RecordError:
            continue
    return found


def records_of(entries: dict[str, VerifiedEntry]) -> list[ServerRecord]:
    """The records of a merged crawl result, one per subkey (peer id)."""
    return [record for _entry, record in entries.values()]
