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
        super().__init__(protocol, node, peers, ksize, alpha)
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
        if not len(self.nearest):
            return self.found
        result: dict[str, VerifiedEntry] = await self._find(self.protocol.call_find_value)
        return result

    async def _nodes_found(self, responses: dict[bytes, Any]) -> dict[str, VerifiedEntry]:
        silent = []
        holders: list[tuple[Node | None, dict[str, Any]]] = []
        for peer_id, (ok, reply) in responses.items():
            if not ok:
                silent.append(peer_id)
            elif isinstance(reply, dict):
                holders.append((self.nearest.get_node(peer_id), reply))
            else:
                self.nearest.push([Node(*triple) for triple in reply])
        self.nearest.remove(silent)
        if holders:
            await self._read_holders(holders)
        if self.done() or self.nearest.have_contacted_all():
            return self.found
        return await self.find()

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
            found.append((entry, check_entry(key, entry, now)))
        except RecordError:
            continue
    return found


def records_of(entries: dict[str, VerifiedEntry]) -> list[ServerRecord]:
    """The records of a merged crawl result, one per subkey (peer id)."""
    return [record for _entry, record in entries.values()]
