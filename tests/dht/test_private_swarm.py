"""A private swarm's DHT: datagrams sealed with the swarm key; strangers get no answer."""

from __future__ import annotations

import dataclasses
import os

import pytest

from beed.dht import DHTNode
from beed.net.swarm_key import SwarmKey
from protocol.errors import PeerUnreachableError
from tests.dht.conftest import FAST, server_record


async def test_a_dht_node_without_the_key_cannot_join_store_or_read(swarm):
    key = SwarmKey(os.urandom(32))
    private = dataclasses.replace(FAST, swarm_key=key)
    members = await swarm(3, config=private)
    record = server_record(members[1], 0, 10)
    await members[1].announce(record, ttl_s=30)
    # Members find the record through each other.
    found = await members[2].get_servers("fp-test")
    assert [r.peer_id for r in found] == [members[1].peer_id]
    # A stranger (no key) joining through a member: no answer, so no contact, no record.
    stranger = DHTNode(FAST)
    await stranger.start("127.0.0.1", 0)
    try:
        assert members[0].address is not None
        with pytest.raises(PeerUnreachableError):
            await stranger.bootstrap([members[0].address])
        assert await stranger.get_servers("fp-test") == []
        assert members[0].protocol.stats["wrong_swarm_key"] > 0
        assert all(m.routing_table_size() == 2 for m in members)  # each other, not it
        # Another swarm's key is as good as none.
        other = DHTNode(dataclasses.replace(FAST, swarm_key=SwarmKey(os.urandom(32))))
        await other.start("127.0.0.1", 0)
        try:
            with pytest.raises(PeerUnreachableError):
                await other.bootstrap([members[0].address])
        finally:
            await other.aclose()
    finally:
        await stranger.aclose()
