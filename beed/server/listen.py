"""A server's sockets: TCP bound first (port 0 picks one), the DHT on the same number, and the
TCP port served (in TLS with the identity's certificate where encryption is on)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from beed.dht.identity import Identity
from beed.dht.node import DHTNode
from beed.net.tasks import TaskOwner
from beed.net.tls import server_context
from beed.relay.service import RelayService
from protocol.relay import MAGIC as RELAY_MAGIC

log = logging.getLogger(__name__)

READ_LIMIT_BYTES = 1 << 20
# A connection that sends nothing this long after it was accepted is not a relay client (they
# send their preamble with their first segment): it goes to the handler unsorted.
SILENT_S = 1.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind the TCP socket first (port 0 picks one), so the DHT can reuse its number."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_dht(dht: DHTNode, host: str, port: int) -> int:
    try:
        return (await dht.start(host, port))[1]
    except OSError:
        log.warning("dht.port_taken port=%d: using a free one", port)
        return (await dht.start(host, 0))[1]


class TcpListener:
    """Accepts connections on a bound socket and sorts them by their first bytes: a relay
    preamble (protocol/relay.py) goes to `relay`, anything else to `handler`, in TLS with the
    identity's certificate where `tls` is given. With `handler` None (a bootstrap node that only
    relays), connections that are not relay preambles are closed."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler | None,
        tls: Identity | None,
        handshake_timeout_s: float,
        relay: RelayService | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.relay = relay
        self.handshake_timeout_s = handshake_timeout_s
        self._ssl = server_context(tls) if tls is not None else None
        self._tasks = TaskOwner("tcp-listener")
        self._conns = TaskOwner("tcp-conns", isolate=True)
        self._accepting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._accepting = self._tasks.spawn(self._accept_loop(), "accept")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self.sock)
            except OSError as exc:  # out of descriptors, a reset before accept: keep serving
                if self.sock.fileno() == -1:
                    return  # closed
                log.warning("tcp.accept_failed error=%r", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.spawn(self._sort(conn, f"{address[0]}:{address[1]}"), "conn")

    async def _sort(self, conn: socket.socket, address: str) -> None:
        try:
            head = await peek(conn, len(RELAY_MAGIC), SILENT_S)
        except TimeoutError:
            # Silent: not a relay client (those speak at once). The handler takes it as it
            # takes any connection (it may refuse it before reading a byte, or time out the
            # TLS handshake or the Hello).
            head = b""
            if self.handler is not None:
                await self.hand_over(conn)
                return
        except OSError:
            conn.close()
            return
        if head == RELAY_MAGIC and self.relay is not None:
            await self.relay.handle(conn, address)
            return
        if self.handler is None or len(head) < len(RELAY_MAGIC):
            conn.close()
            return
        await self.hand_over(conn)

    async def hand_over(self, conn: socket.socket) -> None:
        """Serve `conn` (accepted here, or dialled in for a relay) as an ordinary connection."""
        loop = asyncio.get_running_loop()
        assert self.handler is not None
        reader = asyncio.StreamReader(limit=READ_LIMIT_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader, self.handler)
        try:
            await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self.handshake_timeout_s if self._ssl is not None else None,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.debug("tcp.handshake_failed error=%r", exc)
            conn.close()

    def close(self) -> None:
        """Stop accepting (connections already served go on)."""
        if self._accepting is not None:
            self._accepting.cancel()
        self.sock.close()

    async def aclose(self) -> None:
        await self._tasks.aclose()
        self.sock.close()
        await self._conns.aclose()
        if self.relay is not None:
            await self.relay.aclose()


async def peek(conn: socket.socket, n: int, timeout_s: float) -> bytes:
    """The first n bytes waiting on `conn`, left unread (fewer at EOF)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                data = conn.recv(n, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data is not None and (len(data) >= n or not data):
                return data
            if data:  # part of them: the rest is on its way
                await asyncio.sleep(0.005)
                continue
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def serve_tcp(
    handler: Handler,
    sock: socket.socket,
    tls: Identity | None,
    handshake_timeout_s: float,
    relay: RelayService | None = None,
) -> TcpListener:
    """Serve connections on the bound `sock`; with `tls`, TLS 1.3 with that identity's
    certificate, whose handshake must complete within `handshake_timeout_s`; relay preambles go
    to `relay` when given."""
    listener = TcpListener(sock, handler, tls, handshake_timeout_s, relay)
    listener.start()
    return listener
