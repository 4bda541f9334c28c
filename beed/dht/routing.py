"""BeeRoutingTable: kademlia's routing table that never lets a claim move a known node id."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kademlia.node import Node
from kademlia.routing import RoutingTable

if TYPE_CHECKING:
    from beed.dht.protocol import BeeProtocol


class BeeRoutingTable(RoutingTable):  # type: ignore[misc]
    """kademlia's routing table, pinging a full bucket's head from an owned task.

    kademlia's KBucket.add_node replaces a contact by any node of the same id, so one datagram
    claiming a known id from another address would move it. Here `add_contact` leaves a known
    id where it is; only `move` (after the protocol checked the old address is silent and the
    new one answers with that id) changes a contact's address.
    """

    protocol: BeeProtocol

    def contact(self, node_id: bytes) -> Node | None:
        """The contact with this id in the table, or None."""
        bucket = self.buckets[self.get_bucket_for(Node(node_id))]
        found: Node | None = bucket.nodes.get(node_id)
        return found

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        known = bucket.nodes.get(node.id)
        if known is not None and (known.ip, known.port) != (node.ip, node.port):
            return  # a moved id goes through BeeProtocol's check, then `move`
        if bucket.add_node(node):
            return
        # Per section 4.2 of the paper, as kademlia does.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.tasks.spawn(self.protocol.call_ping(bucket.head()), "ping-head")

    def move(self, node: Node) -> None:
        """Give the contact of `node.id` the address of `node` (most recently seen)."""
        bucket = self.buckets[self.get_bucket_for(node)]
        if node.id in bucket.nodes:
            del bucket.nodes[node.id]
            bucket.nodes[node.id] = node
            bucket.touch_last_updated()
