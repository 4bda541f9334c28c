"""BeeProtocol: kademlia's UDP protocol with subkey STORE/FIND_VALUE, input checks and owned tasks.

Fixes over kademlia 2.2.3 / rpcudp 5.0.1 kept here:
- peer input is validated before use; a garbage datagram is logged and dropped, never raised;
- one missed reply no longer evicts a contact (`max_missed_replies` in a row do);
- keys handed to a newly seen node are not hashed a second time (stored at the right place);
- replies are matched to the address the request went to; late replies and timeouts after a
  caller gave up are ignored instead of raising InvalidStateError;
- background work (key hand-over, bucket-head pings) runs in tasks owned by the node;
- in client mode the node announces an empty node id, so peers never add it to their routing
  tables, and it refuses STOREs.

Against hostile peers (docs/security.md, "DHT"): requests are rate limited per source before
they are parsed, replies we did not ask for are dropped unparsed; STOREs pass cheap checks and a
signature budget before their signature is verified; a reply to an address that has not
answered us lately is at most `max_amplification` times its request (our requests are padded
for full replies); a sender joins the routing table only once it answered a ping, and a known
node id moves to another address only when its old address is silent and the new one answers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from beed.dht.config import DHTConfig
from beed.dht.envelope import (
    SignedEntry,
    entry_order,
    inspect_entry,
    verify_entry,
)
from beed.dht.errors import RecordError
from beed.dht.identity import NODE_ID_BYTES
from beed.dht.limits import ProvenAddresses, RateLimiter
from beed.dht.replies import ReplyReader
from beed.dht.routing import BeeRoutingTable
from beed.dht.storage import SubkeyStorage
from beed.net.tasks import TaskOwner

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # rpcudp refuses to send requests over 8 KiB; we keep its limit
_REQUEST, _RESPONSE = b"\x00", b"\x01"
_MSG_ID_BYTES = 20
_HEADER_BYTES = 1 + _MSG_ID_BYTES
# Upper bounds of a reply's bytes besides its entries / contacts (msgpack map, cursor, summary).
_PAGE_OVERHEAD_BYTES = 96
_CONTACT_BYTES = 67  # one [id, ip, port] of a find_node reply, IPv6 at its longest

Address = tuple[str, int]
RpcResult = tuple[bool, Any]


class MalformedRequest(Exception):
    """A peer's datagram does not follow the RPC format (internal; dropped at the boundary)."""


class BeeProtocol(KademliaProtocol):  # type: ignore[misc]
    """The UDP endpoint of one DHT node (server or client mode)."""

    def __init__(
        self,
        source_node: Node,
        storage: SubkeyStorage,
        config: DHTConfig,
        tasks: TaskOwner,
        client_mode: bool = False,
    ) -> None:
        super().__init__(source_node, storage, config.ksize)
        self.storage: SubkeyStorage = storage
        self.config = config
        self.tasks = tasks
        self.client_mode = client_mode
        self.router = BeeRoutingTable(self, config.ksize, source_node)
        self.wire_id = b"" if client_mode else source_node.id
        self._dialing = 0  # dial-backs in flight (reach)
        self._wait_timeout = config.rpc_timeout_s
        self._addresses: dict[bytes, Address] = {}
        self._missed: dict[bytes, int] = {}
        self.last_heard: dict[bytes, float] = {}  # node id -> monotonic time of its last datagram
        self.limiter = RateLimiter(config)
        self.proven = ProvenAddresses(config.proven_address_ttl_s, config.rate_table_size)
        self._checks: set[bytes] = set()  # node ids whose address is being checked by a ping
        self.replies = ReplyReader(config, source_node.id)
        self.stats: collections.Counter[str] = collections.Counter()  # refusals, for tests/logs
        self.pad_find_value = _pad_bytes(config.max_page_bytes + _PAGE_OVERHEAD_BYTES, config)
        self.pad_find_node = _pad_bytes(config.ksize * _CONTACT_BYTES + 8, config)

    # --- datagrams ----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The one boundary for peer bytes: nothing a peer sends may raise out of here.
        address = (addr[0], addr[1])
        try:
            key = self.config.swarm_key
            if key is not None:
                opened = key.open(data)
                if opened is None:  # not of this private swarm: never answered
                    self.stats["wrong_swarm_key"] += 1
                    return
                data = opened
            if data[:1] == _RESPONSE:
                if self._addresses.get(data[1:_HEADER_BYTES]) != address:
                    self.stats["unexpected_reply"] += 1  # dropped unparsed
                    return
            elif not self.limiter.allow_request(address):
                self.stats["rate_limited"] += 1
                return
            self._dispatch(data, address)
        except Exception as exc:
            self.stats["bad_datagram"] += 1
            log.debug("dht.bad_datagram peer=%s:%s error=%r", addr[0], addr[1], exc)

    def error_received(self, exc: Exception) -> None:
        log.debug("dht.socket_error error=%r", exc)

    def _dispatch(self, data: bytes, addr: Address) -> None:
        if len(data) < _HEADER_BYTES + 1:
            raise MalformedRequest("datagram too short")
        kind, msg_id = data[:1], data[1:_HEADER_BYTES]
        body = umsgpack.unpackb(data[_HEADER_BYTES:])  # ignores trailing padding
        if kind == _RESPONSE:
            self._accept_response(msg_id, body, addr)
        elif kind == _REQUEST:
            if not (isinstance(body, list) and len(body) == 2 and isinstance(body[1], list)):
                raise MalformedRequest("request is not [name, args]")
            name, args = body
            if name == "reach":
                self._reach(msg_id, addr, args)
                return
            handler = self._handlers().get(name) if isinstance(name, str) else None
            if handler is None:
                raise MalformedRequest(f"unknown rpc {name!r}")
            limit = None if addr in self.proven else int(self.config.max_amplification * len(data))
            if name in ("find_node", "find_value"):
                response = handler(addr, *args, budget=limit)
            else:
                response = handler(addr, *args)
            self.stats["handled"] += 1
            reply = _RESPONSE + msg_id + umsgpack.packb(response)
            if limit is not None and len(reply) > limit:
                self.stats["reply_too_large"] += 1  # never an amplifier for a spoofed source
                return
            self._send(reply, addr)
        else:
            raise MalformedRequest("unknown datagram kind")

    def _send(self, datagram: bytes, address: Address) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        key = self.config.swarm_key
        self.transport.sendto(datagram if key is None else key.seal(datagram), address)

    def _handlers(self) -> dict[str, Any]:
        return {
            "ping": self.rpc_ping,
            "store": self.rpc_store,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
        }

    # --- reachability: dialling a sender's TCP port back -----------------------------------------

    def _reach(self, msg_id: bytes, addr: Address, args: list[Any]) -> None:
        """`reach [nodeid, port]`: dial the sender's own IP at `port` (never another host, so
        nobody can point us at a third party) and answer whether a TCP connection opened."""
        if len(args) != 2 or type(args[1]) is not int or not 0 < args[1] < 65536:
            raise MalformedRequest("reach takes [nodeid, port]")
        self.stats["handled"] += 1
        if self._dialing >= self.config.max_dial_backs:
            self.stats["reach_skipped"] += 1
            self._send(_RESPONSE + msg_id + umsgpack.packb(None), addr)
            return
        self._dialing += 1
        self.tasks.spawn(self._dial_back(msg_id, addr, args[1]), "dial-back")

    async def _dial_back(self, msg_id: bytes, addr: Address, port: int) -> None:
        try:
            async with asyncio.timeout(self.config.dial_back_timeout_s):
                _reader, writer = await asyncio.open_connection(addr[0], port)
            writer.close()
            opened = True
        except (OSError, TimeoutError):
            opened = False
        finally:
            self._dialing -= 1
        self.stats["reach_open" if opened else "reach_closed"] += 1
        self._send(_RESPONSE + msg_id + umsgpack.packb(opened), addr)

    async def call_reach(self, address: Address, port: int) -> bool | None:
        """Ask the node at `address` to dial our IP at `port`: True (it connected), False (it
        could not), None (no answer, or it had no room to try)."""
        timeout = self.config.rpc_timeout_s + self.config.dial_back_timeout_s
        ok, reply = await self._call(address, "reach", self.wire_id, port, timeout_s=timeout)
        return reply if ok and isinstance(reply, bool) else None

    def _accept_response(self, msg_id: bytes, data: Any, address: Address) -> None:
        expected = self._addresses.get(msg_id)
        if expected is None or expected != address:
            log.debug("dht.unexpected_reply peer=%s:%s", *address)
            return
        future, timer = self._outstanding.pop(msg_id)
        del self._addresses[msg_id]
        timer.cancel()
        self.proven.add(address)  # it answered our random message id: not a spoofed address
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        address = self._addresses.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            log.debug("dht.rpc_timeout peer=%s", address)
            entry[0].set_result((False, None))

    def _call(
        self,
        address: Address,
        name: str,
        *args: Any,
        pad_to: int = 0,
        timeout_s: float | None = None,
    ) -> asyncio.Future[RpcResult]:
        """Send one request, padded to `pad_to` bytes; the future resolves to (True, reply) or
        (False, None) on timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RpcResult] = loop.create_future()
        data = umsgpack.packb([name, list(args)])
        if len(data) > MAX_REQUEST_BYTES:
            raise RecordError(f"rpc {name} is {len(data)} bytes, over {MAX_REQUEST_BYTES}")
        data += bytes(max(0, min(pad_to, MAX_REQUEST_BYTES) - _HEADER_BYTES - len(data)))
        if self.transport is None or self.transport.is_closing():
            future.set_result((False, None))
            return future
        msg_id = os.urandom(_MSG_ID_BYTES)
        self._send(_REQUEST + msg_id + data, address)
        timer = loop.call_later(timeout_s or self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer)
        self._addresses[msg_id] = (address[0], address[1])
        return future

    def close(self) -> None:
        """Resolve every outstanding request as missed (on node close)."""
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._addresses.clear()

    def set_client_mode(self, client_mode: bool) -> None:
        """Switch modes (a server found unreachable, or reachable again): a client-mode node
        names no node id, so peers do not keep it as a contact, and stores nothing."""
        self.client_mode = client_mode
        self.wire_id = b"" if client_mode else self.source_node.id

    # --- requests we answer --------------------------------------------------------------------

    def _source(self, sender: Address, nodeid: object) -> Node | None:
        """The sending node, or None for a client-mode sender (empty id) or ourselves.

        A sender at an address that has not answered us lately is pinged first (it joins the
        routing table once it answers): a spoofed datagram adds no contact and gets no hand-over.
        """
        if not isinstance(nodeid, bytes) or len(nodeid) not in (0, NODE_ID_BYTES):
            raise MalformedRequest("bad node id")
        if not nodeid or nodeid == self.source_node.id:
            return None
        node = Node(nodeid, sender[0], sender[1])
        known = self.router.contact(nodeid)
        if (known is not None and (known.ip, known.port) == sender) or sender in self.proven:
            self.welcome_if_new(node)
        elif known is None:
            self._check(node, self._check_sender(node))
        else:
            self._check(node, self._check_move(known, node))
        return node

    def rpc_ping(self, sender: Address, nodeid: object) -> bytes:
        self._source(sender, nodeid)
        return self.wire_id

    def rpc_store(self, sender: Address, nodeid: object, key: object, entry: object) -> bool:
        self._source(sender, nodeid)
        key = _key(key)
        if self.client_mode:
            return False
        try:
            signed = SignedEntry.from_wire(entry)
            record = inspect_entry(key, signed, time.time(), self.config)
            order = entry_order(record, signed)
            reason = self.storage.refusal(key, signed.subkey, order, sender[0])
            if reason is not None:
                raise RecordError(reason)
            if not self.limiter.allow_store(sender[0]):
                self.stats["store_over_budget"] += 1
                raise RecordError("over the signature budget")
            self.stats["store_verified"] += 1
            verify_entry(key, signed, record)
        except RecordError as exc:
            self.stats["store_refused"] += 1
            log.debug("dht.store_refused peer=%s:%s reason=%s", sender[0], sender[1], exc)
            return False
        return self.storage.merge(key, signed, order, sender[0])

    def rpc_find_node(
        self, sender: Address, nodeid: object, key: object, *, budget: int | None = None
    ) -> list[list[Any]]:
        source = self._source(sender, nodeid)
        exclude = source or Node(bytes(NODE_ID_BYTES), sender[0], sender[1])
        neighbors = self.router.find_neighbors(Node(_key(key)), exclude=exclude)
        contacts = [[n.id, n.ip, n.port] for n in neighbors]
        if budget is None:
            return contacts
        room = budget - _HEADER_BYTES - 3  # the reply's array header
        for i, contact in enumerate(contacts):
            room -= len(umsgpack.packb(contact))
            if room < 0:
                return contacts[:i]
        return contacts

    def rpc_find_value(
        self,
        sender: Address,
        nodeid: object,
        key: object,
        after: object = None,
        *,
        budget: int | None = None,
    ) -> Any:
        key = _key(key)
        if after is not None and not isinstance(after, str):
            raise MalformedRequest("bad page cursor")
        if not self.storage.has(key):
            return self.rpc_find_node(sender, nodeid, key, budget=budget)
        self._source(sender, nodeid)
        max_bytes = self.config.max_page_bytes
        if budget is not None:
            max_bytes = min(max_bytes, budget - _HEADER_BYTES - _PAGE_OVERHEAD_BYTES)
        try:
            page, cursor = self.storage.page(key, after, max_bytes)
        except ValueError as exc:
            raise MalformedRequest(str(exc)) from exc
        count, digest = self.storage.summary(key)
        return {"value": [e.to_wire() for e in page], "next": cursor, "n": count, "sum": digest}

    # --- checks of senders and of moved node ids -----------------------------------------------

    def _check(self, node: Node, coro: Any) -> None:
        """Run one contact check for `node.id` (one at a time per id, `max_contact_checks` in all)."""
        if node.id in self._checks or len(self._checks) >= self.config.max_contact_checks:
            coro.close()
            self.stats["check_skipped"] += 1
            return
        self._checks.add(node.id)
        self.tasks.spawn(coro, "check-contact")

    async def _check_sender(self, node: Node) -> None:
        try:
            await self.call_ping(node)  # answered: call_ping welcomes it
        finally:
            self._checks.discard(node.id)

    async def _check_move(self, known: Node, claim: Node) -> None:
        """`claim` says it is `known` at another address: move it only if `known` is silent and
        `claim` answers a ping with that id."""
        try:
            ok, reply = await self._call((known.ip, known.port), "ping", self.wire_id)
            if ok and reply == known.id:
                self.last_heard[known.id] = time.monotonic()
                log.debug(
                    "dht.claim_refused id=%s claim=%s:%s", known.id.hex()[:12], claim.ip, claim.port
                )
                return
            ok, reply = await self._call((claim.ip, claim.port), "ping", self.wire_id)
            if ok and reply == claim.id and self.router.contact(claim.id) is not None:
                log.info("dht.contact_moved peer=%s", claim)
                self.router.move(claim)
                self._missed.pop(claim.id, None)
                self.last_heard[claim.id] = time.monotonic()
        finally:
            self._checks.discard(known.id)

    # --- requests we make ----------------------------------------------------------------------

    async def call_ping(self, node_to_ask: Node) -> RpcResult:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "ping", self.wire_id)
        if result[0] and result[1] != node_to_ask.id:  # someone else (or nobody) lives there now
            result = (False, None)
        return self.handle_call_response(result, node_to_ask)

    async def ping_address(self, address: Address) -> bytes | None:
        """Ping an address whose node id we do not know yet; its id, or None if silent."""
        ok, reply = await self._call(address, "ping", self.wire_id)
        if ok and isinstance(reply, bytes) and len(reply) == NODE_ID_BYTES:
            return reply
        return None

    async def call_store(self, node_to_ask: Node, key: bytes, entry: SignedEntry) -> RpcResult:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self._call(address, "store", self.wire_id, key, entry.to_wire())
        if result[0] and not isinstance(result[1], bool):
            result = (False, None)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self._call(
            address, "find_node", self.wire_id, node_to_find.id, pad_to=self.pad_find_node
        )
        if result[0]:
            nodes = self.replies.node_list(result[1])
            result = (False, None) if nodes is None else (True, nodes)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node, after: str | None = None
    ) -> RpcResult:
        """(True, node list) or (True, {"value": [(entry, record)...], "next", "sum"}).

        `sum` identifies the holder's whole subkey set ((count, digest)), or is None if absent.
        """
        address = (node_to_ask.ip, node_to_ask.port)
        args: list[Any] = [self.wire_id, node_to_find.id] + ([after] if after else [])
        result = await self._call(address, "find_value", *args, pad_to=self.pad_find_value)
        if result[0]:
            parsed = self.replies.value_reply(node_to_find.id, result[1])
            result = (False, None) if parsed is None else (True, parsed)
        return self.handle_call_response(result, node_to_ask)

    # --- routing table maintenance --------------------------------------------------------------

    def handle_call_response(self, result: RpcResult, node: Node) -> RpcResult:
        if not result[0]:
            known = self.router.contact(node.id)
            if known is None or (known.ip, known.port) != (node.ip, node.port):
                return result  # not a contact at that address: nothing to count or evict
            missed = self._missed.get(node.id, 0) + 1
            if missed >= self.config.max_missed_replies:
                log.info("dht.contact_evicted peer=%s missed=%d", node, missed)
                self.router.remove_contact(node)
                self._missed.pop(node.id, None)
                self.last_heard.pop(node.id, None)
            else:
                self._missed[node.id] = missed
            return result
        self._missed.pop(node.id, None)
        self.last_heard[node.id] = time.monotonic()
        self.welcome_if_new(node)
        return result

    def welcome_if_new(self, node: Node) -> None:
        """Add `node` to the routing table; if new, hand it the entries it should now hold."""
        if node.id == self.source_node.id:
            return
        known = self.router.contact(node.id)
        if known is not None and (known.ip, known.port) != (node.ip, node.port):
            self._check(known, self._check_move(known, node))
            return
        self.last_heard[node.id] = time.monotonic()
        if known is not None:
            self.router.add_contact(node)  # refresh its place in the bucket (LRU)
            return
        log.debug("dht.contact_new peer=%s", node)
        handover: list[tuple[bytes, SignedEntry]] = []
        for key, entries in self.storage:
            keynode = Node(key)  # keys are already digests (kademlia hashes them twice)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(
                    keynode
                )
            if not neighbors or (new_node_close and this_closest):
                handover.extend((key, e) for e in entries)
        if handover:
            self.tasks.spawn(self._hand_over(node, handover), "hand-over")
        self.router.add_contact(node)

    async def _hand_over(self, node: Node, entries: list[tuple[bytes, SignedEntry]]) -> None:
        for key, entry in entries:
            ok, _ = await self.call_store(node, key, entry)
            if not ok:
                return


def _key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != NODE_ID_BYTES:
        raise MalformedRequest("bad key")
    return key


def _pad_bytes(reply_bytes: int, config: DHTConfig) -> int:
    """The request size for which a reply of `reply_bytes` is within the amplification bound."""
    return math.ceil((reply_bytes + _HEADER_BYTES) / config.max_amplification)
