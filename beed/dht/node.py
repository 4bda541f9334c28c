"""DHTNode: one node of the beed DHT: start, bootstrap, announce server records, read them back."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from kademlia.node import Node

from beed.dht.config import DHTConfig
from beed.dht.crawl import NodeCrawl, RecordCrawl, local_entries, records_of
from beed.dht.envelope import SignedEntry, check_entry, entry_order, sign_entry
from beed.dht.errors import ClientModeError, PeerUnreachableError, RecordError
from beed.dht.identity import Identity
from beed.dht.keys import dht_key, group_key_name, groups_for_span, keys_for_record, models_key_name
from beed.dht.peers import format_initial_peers
from beed.dht.protocol import Address, BeeProtocol
from beed.dht.records import (
    ModelEntry,
    ServerRecord,
    ServerState,
    encode_record,
    with_signing_fields,
)
from beed.dht.replies import VerifiedEntry
from beed.dht.storage import SubkeyStorage
from beed.net.tasks import TaskOwner

log = logging.getLogger(__name__)


class DHTNode:
    """A Kademlia node holding signed server records; `client_mode` nodes only read.

    The constructor does no I/O. Lifetime: `await start(host, port)`, `await bootstrap(peers)`,
    then `announce` / `get_servers` / `list_models`, and finally `await aclose()`.
    """

    def __init__(
        self,
        config: DHTConfig | None = None,
        identity: Identity | None = None,
        client_mode: bool = False,
        on_crash: Callable[[BaseException], object] | None = None,
    ) -> None:
        self.config = config or DHTConfig()
        self.identity = identity or Identity.generate()
        self.client_mode = client_mode
        self.storage = SubkeyStorage(
            self.config.max_ttl_s,
            self.config.max_subkeys_per_key,
            self.config.max_keys,
            max_subkeys_per_ip=self.config.max_subkeys_per_ip,
            max_subkeys_per_prefix=self.config.max_subkeys_per_prefix,
            max_entries_per_ip=self.config.max_entries_per_ip,
        )
        self.node = Node(self.identity.node_id)
        name = f"dht-{self.identity.peer_id[:8]}"
        self._tasks = TaskOwner(name, on_crash=on_crash)  # maintenance and liveness loops
        self._requests = TaskOwner(f"{name}-requests", isolate=True)  # per-datagram work
        self._protocol: BeeProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._last_issued_at = 0.0
        self.address: Address | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def protocol(self) -> BeeProtocol:
        if self._protocol is None:
            raise RuntimeError("DHTNode.start() was not called")
        return self._protocol

    # --- lifetime ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind the UDP socket (port 0 picks one) and start maintenance; the bound address."""
        if self._protocol is not None:
            raise RuntimeError("DHTNode already started")
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: BeeProtocol(
                self.node, self.storage, self.config, self._requests, client_mode=self.client_mode
            ),
            local_addr=(host, port),
        )
        self._transport, self._protocol = transport, protocol
        sock = transport.get_extra_info("socket")
        if sock is not None:  # bursts of reply pages must not overflow the kernel's buffer
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, self.config.socket_buffer_bytes)
                except OSError as exc:
                    log.debug("dht.sockopt_failed option=%s error=%s", option, exc)
        sockname = transport.get_extra_info("sockname")
        self.address = (str(sockname[0]), int(sockname[1]))
        self._tasks.spawn(self._maintain(), "maintain")
        if self.config.liveness_period_s > 0:
            self._tasks.spawn(self._check_contacts(), "liveness")
        key = self.config.swarm_key
        log.info(
            "dht.started addr=%s peer_id=%s client_mode=%s swarm=%s",
            format_initial_peers([self.address]),
            self.peer_id,
            self.client_mode,
            "public" if key is None else f"private:{key.key_id}",
        )
        return self.address

    async def aclose(self) -> None:
        """Stop maintenance, resolve pending requests as missed and close the socket."""
        await self._tasks.aclose()
        await self._requests.aclose()
        if self._protocol is not None:
            self._protocol.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            log.info("dht.closed peer_id=%s", self.peer_id)

    async def __aenter__(self) -> DHTNode:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def bootstrap(self, peers: Sequence[tuple[str, int]]) -> None:
        """Join through `peers`; raises PeerUnreachableError if none answers in time.

        An empty `peers` is a no-op (the first node of a swarm).
        """
        if not peers:
            return
        protocol = self.protocol
        timeout_s = self.config.bootstrap_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                addresses = [a for p in peers for a in await self._resolve(p)]
                addresses = [a for a in addresses if a != self.address]
                ids = await asyncio.gather(*(protocol.ping_address(a) for a in addresses))
        except TimeoutError:
            ids, addresses = [], []
        contacts = [Node(i, a[0], a[1]) for i, a in zip(ids, addresses, strict=True) if i]
        if not contacts:
            raise PeerUnreachableError(
                f"no initial peer answered within {timeout_s:g}s: {format_initial_peers(peers)}"
                " (the peers of a private swarm answer only those with its --swarm-key)"
            )
        for contact in contacts:
            protocol.welcome_if_new(contact)
        spider = self._node_crawl(self.node, contacts)
        try:
            async with asyncio.timeout(timeout_s):
                await spider.find()
                # As the paper says (kademlia does not): refresh every bucket after joining,
                # so this node and the nodes it meets learn the swarm's far regions too.
                await self._refresh_buckets(older_than_s=0.0)
        except TimeoutError:
            log.warning("dht.bootstrap_slow timeout_s=%g", timeout_s)
        log.info("dht.bootstrapped peers=%d contacts=%d", len(contacts), self.routing_table_size())

    async def _resolve(self, peer: tuple[str, int]) -> list[Address]:
        host, port = peer
        try:
            ipaddress.ip_address(host)
            return [(host, port)]
        except ValueError:
            pass
        family = socket.AF_INET6 if self.address and ":" in self.address[0] else socket.AF_INET
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=family, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            log.warning("dht.resolve_failed host=%s error=%s", host, exc)
            return []
        return list(dict.fromkeys((str(i[4][0]), int(i[4][1])) for i in infos))

    def routing_table_size(self) -> int:
        return sum(len(bucket) for bucket in self.protocol.router.buckets)

    # --- reachability (servers behind NAT) ----------------------------------------------------

    async def check_reachability(self, tcp_port: int, peers: int = 3) -> str:
        """Ask up to `peers` contacts to dial our TCP port back (the `reach` RPC): "public" when
        as many of those that answered connected as failed (at least one), "unreachable" when
        more failed, "" when nobody answered (no contacts: we are the first node)."""
        contacts = self.protocol.router.find_neighbors(self.node, k=peers)
        answers = await asyncio.gather(
            *(self.protocol.call_reach((c.ip, c.port), tcp_port) for c in contacts)
        )
        opened = sum(1 for a in answers if a is True)
        closed = sum(1 for a in answers if a is False)
        log.info(
            "dht.reachability port=%d asked=%d opened=%d closed=%d",
            tcp_port,
            len(contacts),
            opened,
            closed,
        )
        if opened == closed == 0:
            return ""
        return "public" if opened >= closed else "unreachable"

    def set_reachable(self, reachable: bool) -> None:
        """An unreachable node keeps announcing and reading, but names no node id on the wire
        (peers never keep it as a contact) and stores nothing for others: DHT client mode."""
        if not self.client_mode:
            self.protocol.set_client_mode(not reachable)

    @property
    def reachable(self) -> bool:
        return not self.protocol.client_mode

    # --- writing -----------------------------------------------------------------------------

    async def announce(self, record: ServerRecord, ttl_s: float | None = None) -> int:
        """Sign `record` and store it under every key it belongs to; the count of remote stores.

        Fills in public_key, issued_at (strictly increasing per node) and expires_at (now +
        `ttl_s`, default `config.default_ttl_s`). Network failures are logged, not raised: the
        caller announces again every refresh period anyway.
        """
        if self.client_mode:
            raise ClientModeError("a client-mode DHT node cannot announce")
        if record.peer_id != self.peer_id:
            raise RecordError(f"record peer_id {record.peer_id} is not this node's {self.peer_id}")
        ttl_s = self.config.default_ttl_s if ttl_s is None else ttl_s
        issued_at = max(time.time(), self._last_issued_at + 1e-3)
        self._last_issued_at = issued_at
        signed = with_signing_fields(
            record, self.identity.public_key_bytes, issued_at, issued_at + ttl_s
        )
        value = encode_record(signed)
        entries = [
            (key, sign_entry(self.identity, key, value, signed.expires_at))
            for key in keys_for_record(signed)
        ]
        stored = [0] * len(entries)
        try:
            async with asyncio.timeout(self.config.store_timeout_s):
                await asyncio.gather(
                    *(self._store(key, entry, stored, i) for i, (key, entry) in enumerate(entries))
                )
        except TimeoutError:
            log.warning("dht.announce_slow timeout_s=%g", self.config.store_timeout_s)
        log.info(
            "dht.announce peer_id=%s state=%s span=%d:%d keys=%d stores=%d",
            self.peer_id,
            record.state.value,
            record.span_start,
            record.span_end,
            len(entries),
            sum(stored),
        )
        return sum(stored)

    async def _store(self, key: bytes, entry: SignedEntry, stored: list[int], slot: int) -> None:
        """Store `entry` on the k nodes nearest to `key` (and here, if this node is one)."""
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target, self.config.ksize)
        nodes: list[Node] = []
        if nearest:
            nodes = await self._node_crawl(target, nearest).find()
        # The k nearest of the nodes found and this one: every writer picks the same set, so
        # holders agree (kademlia's set() also takes max() of an empty list when all are dead).
        nodes = sorted([*nodes, self.node], key=lambda n: n.distance_to(target))
        nodes = nodes[: self.config.ksize]
        if any(n.id == self.node.id for n in nodes):
            self._store_locally(key, entry)
            nodes = [n for n in nodes if n.id != self.node.id]
        results = await asyncio.gather(*(self.protocol.call_store(n, key, entry) for n in nodes))
        stored[slot] = sum(1 for ok, accepted in results if ok and accepted)

    def _store_locally(self, key: bytes, entry: SignedEntry) -> bool:
        try:
            record = check_entry(key, entry, time.time(), self.config)
        except RecordError:
            return False
        return self.storage.merge(key, entry, entry_order(record, entry))

    # --- reading -----------------------------------------------------------------------------

    async def get_servers(
        self,
        model_fingerprint: str,
        span_start: int = 0,
        span_end: int | None = None,
        include_offline: bool = False,
    ) -> list[ServerRecord]:
        """Valid unexpired records of servers whose span meets [span_start, span_end).

        One record per peer id (the newest), sorted by (span_start, peer_id); offline records
        are left out unless `include_offline`. Block groups are looked up concurrently. With
        `span_end=None` the first group is read first to learn the model's number of blocks.
        """
        found: dict[str, VerifiedEntry] = {}
        if span_end is None:
            first = groups_for_span(span_start, span_start + 1)
            found = await self._lookup_many([group_key_name(model_fingerprint, g) for g in first])
            counts = collections.Counter(
                r.num_blocks for _, r in found.values() if r.model_fingerprint == model_fingerprint
            )
            if not counts:
                return []
            span_end = counts.most_common(1)[0][0]
            groups = groups_for_span(span_start, span_end)[1:]
        else:
            groups = groups_for_span(span_start, span_end)
        more = await self._lookup_many([group_key_name(model_fingerprint, g) for g in groups])
        _merge_into(found, more)
        now = time.time()
        records = [
            r
            for r in records_of(found)
            if r.model_fingerprint == model_fingerprint
            and r.intersects(span_start, span_end)
            and r.expires_at > now
            and (include_offline or r.state is not ServerState.OFFLINE)
        ]
        return sorted(records, key=lambda r: (r.span_start, r.peer_id))

    async def list_models(self) -> list[ModelEntry]:
        """Models with at least one server not offline, summarised from the model list key."""
        found = await self._lookup_many([models_key_name()])
        by_model: dict[str, list[ServerRecord]] = collections.defaultdict(list)
        now = time.time()
        for record in records_of(found):
            if record.state is not ServerState.OFFLINE and record.expires_at > now:
                by_model[record.model_fingerprint].append(record)
        models = []
        for fingerprint, records in by_model.items():
            name = collections.Counter(r.model_name for r in records).most_common(1)[0][0]
            num_blocks = collections.Counter(r.num_blocks for r in records).most_common(1)[0][0]
            covered = set().union(*(range(r.span_start, r.span_end) for r in records))
            models.append(
                ModelEntry(
                    model_name=name,
                    fingerprint=fingerprint,
                    num_blocks=num_blocks,
                    num_servers=len(records),
                    covered_blocks=len({b for b in covered if b < num_blocks}),
                )
            )
        return sorted(models, key=lambda m: (m.model_name, m.fingerprint))

    async def _lookup_many(self, key_names: list[str]) -> dict[str, VerifiedEntry]:
        """Look the keys up concurrently and merge their entries (newest per peer id)."""
        crawls = [self._crawl(dht_key(name)) for name in key_names]
        try:
            async with asyncio.timeout(self.config.lookup_timeout_s):
                await asyncio.gather(*(crawl.find() for crawl in crawls))
        except TimeoutError:
            log.warning(
                "dht.lookup_slow keys=%d timeout_s=%g", len(crawls), self.config.lookup_timeout_s
            )
        merged: dict[str, VerifiedEntry] = {}
        for crawl in crawls:
            _merge_into(merged, crawl.found)
        return merged

    def _crawl(self, key: bytes) -> RecordCrawl:
        target = Node(key)
        crawl = RecordCrawl(
            self.protocol,
            target,
            self.protocol.router.find_neighbors(target, self.config.ksize),
            self.config.ksize,
            self.config.alpha,
            quorum=self.config.read_quorum,
            max_pages=self.config.max_pages,
        )
        crawl.stall_s = self.config.stall_s
        crawl.merge(local_entries(self.protocol, key))  # kademlia's get() stops here: stale
        return crawl

    def _node_crawl(self, target: Node, peers: list[Node]) -> NodeCrawl:
        crawl = NodeCrawl(self.protocol, target, peers, self.config.ksize, self.config.alpha)
        crawl.stall_s = self.config.stall_s
        return crawl

    # --- maintenance -------------------------------------------------------------------------

    async def _check_contacts(self) -> None:
        """Every liveness_period_s, ping the contacts not heard from for that long.

        Kademlia only tests a contact when its bucket is full, so in a swarm smaller than k per
        bucket a dead server would stay in every table (and in every lookup) until a bucket
        refresh; each missed ping counts towards its eviction (`max_missed_replies`)."""
        period_s = self.config.liveness_period_s
        while True:
            await asyncio.sleep(period_s * random.uniform(0.9, 1.1))
            protocol = self.protocol
            known = {n.id for bucket in protocol.router.buckets for n in bucket.get_nodes()}
            for node_id in [i for i in protocol.last_heard if i not in known]:
                del protocol.last_heard[node_id]  # callers that never became contacts
            quiet = time.monotonic() - period_s
            contacts = [
                node
                for bucket in protocol.router.buckets
                for node in bucket.get_nodes()
                if protocol.last_heard.get(node.id, 0.0) < quiet
            ]
            if contacts:
                await asyncio.gather(*(protocol.call_ping(node) for node in contacts))
                log.debug("dht.liveness pinged=%d", len(contacts))

    async def _maintain(self) -> None:
        """Every table_refresh_s: refresh quiet buckets, republish entries nobody refreshed."""
        period_s = min(self.config.table_refresh_s, self.config.republish_s)
        while True:
            await asyncio.sleep(period_s * random.uniform(0.9, 1.1))
            await self._refresh_buckets()
            if not self.client_mode:
                await self._republish()

    async def _refresh_buckets(self, older_than_s: float | None = None) -> None:
        """Look up a random id in each bucket not looked up for `older_than_s` (default: the
        refresh period)."""
        if older_than_s is None:
            older_than_s = self.config.table_refresh_s
        limit = time.monotonic() - older_than_s
        targets = [
            Node(random.randint(*b.range).to_bytes(20, "big"))
            for b in self.protocol.router.buckets
            if b.last_updated < limit
        ]
        crawls = [
            self._node_crawl(t, self.protocol.router.find_neighbors(t, self.config.alpha))
            for t in targets
        ]
        await asyncio.gather(*(c.find() for c in crawls))

    async def _republish(self) -> None:
        """Re-store entries whose writer has not refreshed them for republish_s.

        Entries keep their signed expiry, so republishing never extends a record's life
        (kademlia's hourly republish keeps a value alive for as long as any holder is up).
        """
        for key, entries in self.storage.iter_older_than(self.config.republish_s):
            self.storage.touch(key)
            for entry in entries:
                slot = [0]
                await self._store(key, entry, slot, 0)
            log.debug("dht.republish key=%s entries=%d", key.hex()[:12], len(entries))


def _merge_into(merged: dict[str, VerifiedEntry], more: dict[str, VerifiedEntry]) -> None:
    for subkey, (entry, record) in more.items():
        current = merged.get(subkey)
        if current is None or entry_order(record, entry) > entry_order(current[1], current[0]):
            merged[subkey] = (entry, record)
