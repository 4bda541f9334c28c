"""Server-to-server push: a hop's output goes straight to the next hop's session.

`NextHop` is one entry of a Step's `next_hops` (checked here, once); `Pusher` keeps one
connection per next server (the shared `PeerConnection`, naming this server's peer id in its
Hello) and sends a Push, waiting for the Ack that says the next hop accepted it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from beed.net.dial import DialPolicy
from beed.net.peer import PeerConnection
from beed.net.relay import RelayAddress, parse_relays
from beed.net.swarm_key import SwarmKey
from beed.net.traffic import TensorTraffic
from protocol.errors import BadRequestError
from protocol.messages import Ack, Push

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"[0-9a-f]{32}")
MAX_NEXT_HOPS = 64  # a route longer than this is refused (every hop is a server and a frame)


@dataclass(frozen=True)
class NextHop:
    """Where a hop's output goes: the next server and the token of the session there."""

    host: str
    port: int
    peer_id: str
    token: str
    tls: bool = False  # its port speaks TLS (its record says so)
    relays: tuple[RelayAddress, ...] = ()  # it is behind NAT: dial one of these instead

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "peer_id": self.peer_id,
            "token": self.token,
        }
        if self.tls:
            entry["tls"] = True
        if self.relays:
            entry["relays"] = [r.as_list() for r in self.relays]
        return entry


def check_token(token: str) -> str:
    if not TOKEN_RE.fullmatch(token):
        raise BadRequestError("a push token must be 32 lowercase hex digits")
    return token


def parse_next_hops(raw: Sequence[dict[str, Any]]) -> list[NextHop]:
    """The route entries of a Step or Push; BadRequestError names the first bad one."""
    if len(raw) > MAX_NEXT_HOPS:
        raise BadRequestError(f"next_hops has {len(raw)} entries, at most {MAX_NEXT_HOPS}")
    hops = []
    for i, entry in enumerate(raw):
        host, port = entry.get("host"), entry.get("port")
        peer_id, token = entry.get("peer_id"), entry.get("token")
        if not (isinstance(host, str) and 0 < len(host) <= 253):
            raise BadRequestError(f"next_hops[{i}].host must be a host name or address")
        if not (type(port) is int and 0 < port < 65536):
            raise BadRequestError(f"next_hops[{i}].port must be in 1..65535")
        if not (isinstance(peer_id, str) and 0 < len(peer_id) <= 128):
            raise BadRequestError(f"next_hops[{i}].peer_id must be a peer id")
        if not (isinstance(token, str) and TOKEN_RE.fullmatch(token)):
            raise BadRequestError(f"next_hops[{i}].token must be 32 lowercase hex digits")
        tls = entry.get("tls", False)
        if not isinstance(tls, bool):
            raise BadRequestError(f"next_hops[{i}].tls must be true or false")
        try:
            relays = parse_relays(entry.get("relays", []), f"next_hops[{i}].relays")
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        hops.append(NextHop(host, port, peer_id, token, tls, relays))
    return hops


class Pusher:
    """Connections from this server to the servers it pushes to, reused while healthy."""

    def __init__(
        self,
        local_peer_id: str,
        *,
        connect_timeout_s: float,
        ack_timeout_s: float,
        compression: str = "auto",
        swarm_key: SwarmKey | None = None,
        policy: DialPolicy | None = None,
        traffic: TensorTraffic | None = None,
    ):
        self.traffic = traffic  # tensor bytes pushed, counted with the server's
        self.local_peer_id = local_peer_id
        self.compression = compression
        self.swarm_key = swarm_key
        self.policy = policy  # which next-hop addresses a route may name
        self.connect_timeout_s = connect_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self._connections: dict[tuple[Any, ...], PeerConnection] = {}
        self._locks: dict[tuple[Any, ...], asyncio.Lock] = {}
        self._closed = False

    async def connection(self, hop: NextHop) -> PeerConnection:
        key = (hop.host, hop.port, hop.peer_id, hop.tls, hop.relays)
        conn = self._connections.get(key)
        if conn is not None and not conn.closed:
            return conn
        async with self._locks.setdefault(key, asyncio.Lock()):
            conn = self._connections.get(key)
            if conn is not None and not conn.closed:
                return conn
            if self._closed:
                raise BadRequestError("the server is shutting down")
            conn = PeerConnection(
                hop.host,
                hop.port,
                peer_id=hop.peer_id,
                tls=hop.tls,
                swarm_key=self.swarm_key,
                local_peer_id=self.local_peer_id,
                compression=self.compression,
                policy=self.policy,
                traffic=self.traffic,
                relays=hop.relays,
            )
            await conn.connect(self.connect_timeout_s)
            self._connections[key] = conn
            log.info("push.connected host=%s port=%d peer=%s", hop.host, hop.port, hop.peer_id[:8])
            return conn

    async def send(self, hop: NextHop, msg: Push) -> Awaitable[None]:
        """Write msg to `hop` (connecting first if needed); the awaitable returned completes
        when the next hop accepted it and raises a BeeError when it did not (or timed out)."""
        conn = await self.connection(hop)
        msg = dataclasses.replace(msg, stream_id=conn.new_stream_id())
        reply = await conn.submit(msg, self.ack_timeout_s)

        async def accepted() -> None:
            answer = await conn.wait(reply, "Push", self.ack_timeout_s)
            if not isinstance(answer, Ack):
                raise BadRequestError(f"next hop answered Push with {type(answer).__name__}")

        return accepted()

    async def push(self, hop: NextHop, msg: Push) -> None:
        """Send msg to `hop` and wait until it is accepted; raises a BeeError otherwise."""
        await (await self.send(hop, msg))

    async def aclose(self) -> None:
        self._closed = True
        conns, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
