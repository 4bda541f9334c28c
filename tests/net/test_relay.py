"""Relay preambles and the relay's splice over real sockets on 127.0.0.1 (no daemons)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from beed.dht.identity import Identity
from beed.net.relay import RelayAddress, dial_relayed, read_message, send_message
from beed.net.swarm_key import SwarmKey
from beed.relay.service import RelayConfig, RelayService
from beed.server.listen import TcpListener, bind_tcp
from beed.server.relayed import RelayedListening
from protocol.errors import MalformedHeaderError, RelayRefusedError
from protocol.relay import PREFIX, body_length, decode_relay, encode_relay, signed_bytes


def test_preambles_round_trip_and_malformed_ones_are_refused():
    data = encode_relay("connect", target="abc", ts=1.5, sp="00")
    assert body_length(data[: PREFIX.size]) == len(data) - PREFIX.size
    message = decode_relay(data[PREFIX.size :])
    assert message.op == "connect" and message.get("target") == "abc" and message.get("ts") == 1.5
    with pytest.raises(MalformedHeaderError, match="not a relay preamble"):
        body_length(b"BEED" + bytes(4))
    with pytest.raises(MalformedHeaderError, match="over"):
        body_length(PREFIX.pack(b"BEER", 1 << 20))
    for body in (b"\xc1", b"\x91\x01", encode_relay("ok")[PREFIX.size :][:-1] + b"\x00"):
        with pytest.raises(MalformedHeaderError):
            decode_relay(body)
    with pytest.raises(ValueError, match="unknown relay op"):
        encode_relay("splice-anything")
    with pytest.raises(ValueError, match="field 'id'"):
        encode_relay("incoming", id=-1)
    with pytest.raises(ValueError, match="field 'target'"):
        encode_relay("connect", target="", ts=1.0)
    assert signed_bytes("listen", "p", 1.0) != signed_bytes("accept", "p", 1.0)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


class Relay:
    """A relay on 127.0.0.1 and a server (plain TCP, an echo) listening through it."""

    def __init__(self, key: SwarmKey | None = None) -> None:
        self.key = key
        self.identity = Identity.generate()

    async def __aenter__(self) -> Relay:
        relay_sock = bind_tcp("127.0.0.1", 0)
        self.address = RelayAddress("", "127.0.0.1", relay_sock.getsockname()[1])
        self.service = RelayService(RelayConfig(swarm_key=self.key), "relay-peer")
        self.relay = TcpListener(relay_sock, None, None, 5.0, self.service)
        self.relay.start()
        self.server = TcpListener(bind_tcp("127.0.0.1", 0), echo, None, 5.0)
        self.changes = 0

        async def candidates() -> list[RelayAddress]:
            return [self.address]

        self.relayed = RelayedListening(
            self.identity, self.server, candidates, self._changed, want=1, swarm_key=self.key
        )
        self.relayed.start()
        for _ in range(100):
            if self.relayed.relays:
                break
            await asyncio.sleep(0.05)
        assert self.relayed.relays and self.relayed.relays[0].peer_id == "relay-peer"
        return self

    def _changed(self) -> None:
        self.changes += 1

    async def __aexit__(self, *exc: object) -> None:
        await self.relayed.aclose()
        await self.server.aclose()
        await self.relay.aclose()

    async def through(self, payload: bytes, key: SwarmKey | None = None) -> bytes:
        sock = await dial_relayed(self.address, self.identity.peer_id, timeout_s=5.0, swarm_key=key)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(payload)
        writer.write_eof()
        back = await reader.read()
        writer.close()
        return back


async def test_a_relay_splices_bytes_exactly_and_refuses_peers_not_listening():
    async with Relay() as r:
        payload = os.urandom(3 << 20)
        assert await r.through(payload) == payload
        assert r.relayed.accepted == 1 and r.service.bandwidth.total >= 2 * len(payload)
        with pytest.raises(RelayRefusedError, match="does not listen"):
            await dial_relayed(r.address, Identity.generate().peer_id, timeout_s=5.0)
        # Garbage, a stray frame and a forged listen change nothing for the others.
        for junk in (b"BEER" + bytes(4) + b"\xc1" * 8, b"BEED" + bytes(16), b"GET / HTTP/1.0\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", r.address.port)
            writer.write(junk)
            try:
                assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed, nothing said
            except ConnectionResetError:
                pass
            writer.close()
        other = Identity.generate()
        ts = time.time()
        forged = encode_relay(
            "listen",
            peer_id=r.identity.peer_id,  # someone else's peer id, with their own key
            pk=other.public_key_bytes,
            ts=ts,
            sig=other.sign(signed_bytes("listen", r.identity.peer_id, ts)),
        )
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", r.address.port))
        await send_message(s, forged, 5.0)
        answer = await read_message(s, 5.0)
        s.close()
        assert answer.op == "error" and "derive" in answer.get("message")
        assert r.service.listening == [r.identity.peer_id]
        assert await r.through(b"still here") == b"still here"


async def test_a_private_swarms_relay_needs_the_key():
    key = SwarmKey(os.urandom(32))
    async with Relay(key) as r:
        assert await r.through(b"members", key) == b"members"
        with pytest.raises(RelayRefusedError, match="private swarm"):
            await r.through(b"stranger")
        with pytest.raises(RelayRefusedError, match="private swarm"):
            await r.through(b"stranger", SwarmKey(os.urandom(32)))


async def test_a_dead_relay_is_forgotten_and_announced():
    async with Relay() as r:
        before = r.changes
        await r.relay.aclose()  # the relay goes away: its control connection ends
        for _ in range(100):
            if not r.relayed.relays:
                break
            await asyncio.sleep(0.05)
        assert not r.relayed.relays and r.changes > before
