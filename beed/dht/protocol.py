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
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from beed.dht.config import DHTConfig
from beed.dht.envelope import SignedEntry, check_entry, entry_order
from beed.dht.errors import RecordError
from beed.dht.identity import NODE_ID_BYTES
from beed.dht.records import ServerRecord
from beed.dht.storage import SubkeyStorage
from beed.net.tasks import TaskOwner

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # rpcudp refuses to send requests over 8 KiB; we keep its limit
_REQUEST, _RESPONSE = b"\x00", b"\x01"
_MSG_ID_BYTES = 20

Address = tuple[str, int]
RpcResult = tuple[bool, Any]
VerifiedEntry = tuple[SignedEntry, ServerRecord]


class MalformedRequest(Exception):
    """A peer's datagram does not follow the RPC format (internal; dropped at the boundary)."""


class BeeRoutingTable(RoutingTable):  # type: ignore[misc]
    """kademlia's routing table, pinging a full bucket's head from an owned task."""

    protocol: BeeProtocol

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # Per section 4.2 of the paper, as kademlia does.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.tasks.spawn(self.protocol.call_ping(bucket.head()), "ping-head")


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
        self._wait_timeout = config.rpc_timeout_s
        self._addresses: dict[bytes, Address] = {}
        self._missed: dict[bytes, int] = {}
        self.last_heard: dict[bytes, float] = {}  # node id -> monotonic time of its last datagram

    # --- datagrams ----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The one boundary for peer bytes: nothing a peer sends may raise out of here.
        try:
            self._dispatch(data, (addr[0], addr[1]))
        except Exception as exc:
            log.warning("dht.bad_datagram peer=%s:%s error=%r", addr[0], addr[1], exc)

    def error_received(self, exc: Exception) -> None:
        log.debug("dht.socket_error error=%r", exc)

    def _dispatch(self, data: bytes, addr: Address) -> None:
        if len(data) < 1 + _MSG_ID_BYTES + 1:
            raise MalformedRequest("datagram too short")
        kind, msg_id = data[:1], data[1 : 1 + _MSG_ID_BYTES]
        body = umsgpack.unpackb(data[1 + _MSG_ID_BYTES :])
        if kind == _RESPONSE:
            self._accept_response(msg_id, body, addr)
        elif kind == _REQUEST:
            if not (isinstance(body, list) and len(body) == 2 and isinstance(body[1], list)):
                raise MalformedRequest("request is not [name, args]")
            name, args = body
            handler = self._handlers().get(name) if isinstance(name, str) else None
            if handler is None:
                raise MalformedRequest(f"unknown rpc {name!r}")
            response = handler(addr, *args)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(_RESPONSE + msg_id + umsgpack.packb(response), addr)
        else:
            raise MalformedRequest("unknown datagram kind")

    def _handlers(self) -> dict[str, Any]:
        return {
            "ping": self.rpc_ping,
            "store": self.rpc_store,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
        }

    def _accept_response(self, msg_id: bytes, data: Any, address: Address) -> None:
        expected = self._addresses.get(msg_id)
        if expected is None or expected != address:
            log.debug("dht.unexpected_reply peer=%s:%s", *address)
            return
        future, timer = self._outstanding.pop(msg_id)
        del self._addresses[msg_id]
        timer.cancel()
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        address = self._addresses.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            log.debug("dht.rpc_timeout peer=%s", address)
            entry[0].set_result((False, None))

    def _call(self, address: Address, name: str, *args: Any) -> asyncio.Future[RpcResult]:
        """Send one request; the future resolves to (True, reply) or (False, None) on timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RpcResult] = loop.create_future()
        data = umsgpack.packb([name, list(args)])
        if len(data) > MAX_REQUEST_BYTES:
            raise RecordError(f"rpc {name} is {len(data)} bytes, over {MAX_REQUEST_BYTES}")
        if self.transport is None or self.transport.is_closing():
            future.set_result((False, None))
            return future
        msg_id = os.urandom(_MSG_ID_BYTES)
        self.transport.sendto(_REQUEST + msg_id + data, address)
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
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

    # --- requests we answer --------------------------------------------------------------------

    def _source(self, sender: Address, nodeid: object) -> Node | None:
        """The sending node, or None for a client-mode sender (empty id) or ourselves."""
        if not isinstance(nodeid, bytes) or len(nodeid) not in (0, NODE_ID_BYTES):
            raise MalformedRequest("bad node id")
        if not nodeid or nodeid == self.source_node.id:
            return None
        node = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(node)
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
            record = check_entry(key, signed, time.time())
        except RecordError as exc:
            log.debug("dht.store_rejected peer=%s:%s reason=%s", sender[0], sender[1], exc)
            return False
        return self.storage.merge(key, signed, entry_order(record, signed))

    def rpc_find_node(self, sender: Address, nodeid: object, key: object) -> list[list[Any]]:
        source = self._source(sender, nodeid)
        exclude = source or Node(bytes(NODE_ID_BYTES), sender[0], sender[1])
        neighbors = self.router.find_neighbors(Node(_key(key)), exclude=exclude)
        return [[n.id, n.ip, n.port] for n in neighbors]

    def rpc_find_value(
        self, sender: Address, nodeid: object, key: object, after: object = None
    ) -> Any:
        key = _key(key)
        if after is not None and not isinstance(after, str):
            raise MalformedRequest("bad page cursor")
        if not self.storage.entries(key):
            return self.rpc_find_node(sender, nodeid, key)
        self._source(sender, nodeid)
        page, cursor = self.storage.page(key, after, self.config.max_page_bytes)
        count, digest = self.storage.summary(key)
        return {"value": [e.to_wire() for e in page], "next": cursor, "n": count, "sum": digest}

    # --- requests we make ----------------------------------------------------------------------

    async def call_ping(self, node_to_ask: Node) -> RpcResult:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "ping", self.wire_id)
        if result[0] and not (isinstance(result[1], bytes) and len(result[1]) == NODE_ID_BYTES):
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
        result = await self._call(address, "find_node", self.wire_id, node_to_find.id)
        if result[0]:
            nodes = self._node_list(result[1])
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
        result = await self._call(address, "find_value", *args)
        if result[0]:
            parsed = self._value_reply(node_to_find.id, result[1])
            result = (False, None) if parsed is None else (True, parsed)
        return self.handle_call_response(result, node_to_ask)

    def _node_list(self, reply: Any) -> list[tuple[bytes, str, int]] | None:
        if not isinstance(reply, list):
            return None
        nodes = []
        for item in reply[: self.config.ksize * 2]:
            if (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], bytes)
                and len(item[0]) == NODE_ID_BYTES
                and isinstance(item[1], str)
                and isinstance(item[2], int)
                and 0 < item[2] < 65536
                and item[0] != self.source_node.id
            ):
                nodes.append((item[0], item[1], item[2]))
        return nodes

    def _value_reply(self, key: bytes, reply: Any) -> Any:
        if isinstance(reply, list):
            return self._node_list(reply)
        if not isinstance(reply, dict) or not isinstance(reply.get("value"), list):
            return None
        cursor = reply.get("next")
        verified: list[VerifiedEntry] = []
        now = time.time()
        for item in reply["value"]:
            try:
                entry = SignedEntry.from_wire(item)
                verified.append((entry, check_entry(key, entry, now)))
            except RecordError as exc:
                log.debug("dht.entry_rejected reason=%s", exc)
        count, digest = reply.get("n"), reply.get("sum")
        summary = None
        if isinstance(count, int) and isinstance(digest, bytes) and len(digest) == 8:
            summary = (count, digest)
        return {
            "value": verified,
            "next": cursor if isinstance(cursor, str) else None,
            "sum": summary,
        }

    # --- routing table maintenance --------------------------------------------------------------

    def handle_call_response(self, result: RpcResult, node: Node) -> RpcResult:
        if not result[0]:
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
        self.last_heard[node.id] = time.monotonic()
        if not self.router.is_new_node(node):
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
