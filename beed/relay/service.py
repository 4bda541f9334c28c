"""RelayService: the relay's side of protocol/relay.py.

Servers behind NAT hold a control connection here (listen, signed with their identity); a
client's connect names one of them; the relay sends that server `incoming`, the server dials in
with `accept`, and the relay copies bytes between the two sockets, under one bandwidth cap for
all of them. It never reads what it copies: the stream is TLS end to end between the peers.
A connect to a peer that does not listen here is refused (error 211), as is everything past the
caps. Nothing a peer sends raises out of `handle`: a bad preamble closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from beed.dht.identity import PUBLIC_KEY_BYTES, peer_id_for, verify
from beed.net.relay import read_message, send_message
from beed.net.swarm_key import SwarmKey
from beed.relay.bandwidth import Bandwidth
from protocol.errors import BeeError, RelayRefusedError
from protocol.relay import RelayMessage, encode_relay, signed_bytes

log = logging.getLogger(__name__)

SPLICE_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class RelayConfig:
    """Limits of one relay (docs/operations.md, "Relays")."""

    bandwidth_bytes_per_s: float = 12_500_000.0  # all spliced bytes, both ways (0: no cap)
    max_peers: int = 64  # servers listening here at once
    max_splices_per_peer: int = 32  # open relayed connections to one server
    max_pending: int = 256  # connects waiting for their server to dial in
    accept_timeout_s: float = 10.0  # a server dials in this soon after `incoming`, or the
    # connect is refused
    preamble_timeout_s: float = 10.0  # the first message arrives this soon after connecting
    idle_timeout_s: float = 90.0  # a control connection silent this long is dropped (servers
    # ping every 20 s)
    max_clock_skew_s: float = 600.0  # signed preambles dated further off are refused
    swarm_key: SwarmKey | None = None  # a private swarm's: every preamble proves it


@dataclass
class _Listener:
    peer_id: str
    public_key: bytes
    sock: socket.socket
    splices: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RelayService:
    """The relaying of one daemon; `handle(sock)` takes a connection whose first bytes are a
    relay preamble (the listener in beed/server/listen.py decides that)."""

    def __init__(self, config: RelayConfig, peer_id: str) -> None:
        self.config = config
        self.peer_id = peer_id  # named in the ok to a listen (bootstrap relays have no record)
        self.bandwidth = Bandwidth(config.bandwidth_bytes_per_s)
        self._listeners: dict[str, _Listener] = {}
        self._pending: dict[int, tuple[str, asyncio.Future[socket.socket]]] = {}
        self.stats: Counter[str] = Counter()

    @property
    def listening(self) -> list[str]:
        return sorted(self._listeners)

    async def handle(self, sock: socket.socket, address: str) -> None:
        """Serve one relay connection until it ends; closes `sock` unless it was handed on."""
        keep = False
        try:
            first = await read_message(sock, self.config.preamble_timeout_s)
            if first.op == "listen":
                await self._listen(sock, first, address)
            elif first.op == "connect":
                await self._connect(sock, first, address)
            elif first.op == "accept":
                keep = await self._accept(sock, first)
            else:
                raise RelayRefusedError(f"a relay connection cannot begin with {first.op!r}")
        except RelayRefusedError as exc:
            self.stats["refused"] += 1
            log.info("relay.refused peer=%s reason=%s", address, exc)
            with contextlib.suppress(OSError, TimeoutError):
                await send_message(
                    sock, encode_relay("error", code=exc.code, message=str(exc)), 2.0
                )
        except (BeeError, OSError, TimeoutError) as exc:
            self.stats["bad_preamble"] += 1
            log.debug("relay.dropped peer=%s error=%r", address, exc)
        finally:
            if not keep:
                sock.close()

    # --- a server listening here -------------------------------------------------------------

    async def _listen(self, sock: socket.socket, msg: RelayMessage, address: str) -> None:
        peer_id, public_key = msg.get("peer_id"), msg.get("pk")
        if len(public_key) != PUBLIC_KEY_BYTES or peer_id_for(public_key) != peer_id:
            raise RelayRefusedError("listen: the public key does not derive the peer id")
        self._check_signed(msg, "listen", peer_id, public_key, 0)
        old = self._listeners.get(peer_id)
        if old is None and len(self._listeners) >= self.config.max_peers:
            raise RelayRefusedError(f"this relay serves {self.config.max_peers} peers already")
        listener = _Listener(peer_id, public_key, sock)
        self._listeners[peer_id] = listener
        if old is not None:  # the same server again (it reconnected): the newer one wins
            old.sock.close()
        self.stats["listens"] += 1
        log.info("relay.listening peer=%s from=%s", peer_id[:16], address)
        try:
            await send_message(sock, encode_relay("ok", peer_id=self.peer_id), 5.0)
            while True:
                message = await read_message(sock, self.config.idle_timeout_s)
                if message.op != "ping":
                    raise RelayRefusedError(f"a control connection cannot send {message.op!r}")
                async with listener.lock:
                    await send_message(sock, encode_relay("pong", n=message.get("n")), 5.0)
        finally:
            if self._listeners.get(peer_id) is listener:
                del self._listeners[peer_id]
                log.info("relay.stopped_listening peer=%s", peer_id[:16])

    async def _accept(self, sock: socket.socket, msg: RelayMessage) -> bool:
        peer_id, request = msg.get("peer_id"), msg.get("id")
        listener = self._listeners.get(peer_id)
        if listener is None:
            raise RelayRefusedError("accept from a peer that does not listen here")
        self._check_signed(msg, "accept", peer_id, listener.public_key, request)
        pending = self._pending.get(request)
        if pending is None or pending[0] != peer_id or pending[1].done():
            raise RelayRefusedError("accept names no waiting connection of that peer")
        pending[1].set_result(sock)  # the connect handler owns the socket from here
        return True

    def _check_signed(
        self, msg: RelayMessage, op: str, peer_id: str, public_key: bytes, request: int
    ) -> None:
        ts = float(msg.get("ts"))
        if abs(time.time() - ts) > self.config.max_clock_skew_s:
            raise RelayRefusedError(f"{op}: dated {ts:.0f}, too far from this relay's clock")
        data = signed_bytes(op, peer_id, msg.get("ts"), request)
        if not verify(public_key, msg.get("sig"), data):
            raise RelayRefusedError(f"{op}: bad signature")
        self._check_swarm(msg, data)

    def _check_swarm(self, msg: RelayMessage, data: bytes) -> None:
        key = self.config.swarm_key
        if key is not None and not key.check("relay", data, msg.get("sp") or ""):
            raise RelayRefusedError("the preamble does not prove this private swarm's key")

    # --- a client asking for one of them ---------------------------------------------------------

    async def _connect(self, sock: socket.socket, msg: RelayMessage, address: str) -> None:
        target = msg.get("target")
        ts = msg.get("ts")
        if abs(time.time() - float(ts)) > self.config.max_clock_skew_s:
            raise RelayRefusedError("connect: dated too far from this relay's clock")
        self._check_swarm(msg, signed_bytes("connect", target, ts))
        listener = self._listeners.get(target)
        if listener is None:
            raise RelayRefusedError(f"peer {target[:16]} does not listen at this relay")
        if listener.splices >= self.config.max_splices_per_peer:
            raise RelayRefusedError(f"peer {target[:16]} has its share of relayed connections")
        if len(self._pending) >= self.config.max_pending:
            raise RelayRefusedError("too many connections wait for their server")
        request = int.from_bytes(os.urandom(8), "little") >> 1
        future: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._pending[request] = (target, future)
        listener.splices += 1
        server: socket.socket | None = None
        try:
            async with listener.lock:
                await send_message(listener.sock, encode_relay("incoming", id=request), 5.0)
            try:
                server = await asyncio.wait_for(future, self.config.accept_timeout_s)
            except TimeoutError:
                raise RelayRefusedError(f"peer {target[:16]} did not dial in") from None
            await send_message(server, encode_relay("ok"), 5.0)
            await send_message(sock, encode_relay("ok"), 5.0)
            self.stats["splices"] += 1
            log.debug("relay.splice client=%s peer=%s", address, target[:16])
            await self._splice(sock, server)
        finally:
            listener.splices -= 1
            self._pending.pop(request, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
            elif not future.done():
                future.cancel()

    async def _splice(self, a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until one side ends; the sockets stay owned by the caller."""
        loop = asyncio.get_running_loop()

        async def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    chunk = await loop.sock_recv(src, SPLICE_CHUNK_BYTES)
                    if not chunk:
                        break
                    await self.bandwidth.take(len(chunk))
                    await loop.sock_sendall(dst, chunk)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        one = asyncio.ensure_future(pump(a, b))
        two = asyncio.ensure_future(pump(b, a))
        try:
            # One direction ending (a peer closed, or reset) ends the splice soon after: peers
            # close both ways together, and a half-open relayed stream helps nobody.
            _done, rest = await asyncio.wait({one, two}, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(rest, timeout=5.0)  # what the other side still had in flight
        finally:
            for task in (one, two):
                task.cancel()
            await asyncio.gather(one, two, return_exceptions=True)

    async def aclose(self) -> None:
        for listener in list(self._listeners.values()):
            listener.sock.close()
        self._listeners.clear()
