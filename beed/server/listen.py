"""A server's sockets: TCP bound first (port 0 picks one), the DHT on the same number, and the
TCP port served (in TLS with the identity's certificate where encryption is on)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from beed.dht.identity import Identity
from beed.dht.node import DHTNode
from beed.net.tls import server_context

log = logging.getLogger(__name__)


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


async def serve_tcp(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    sock: socket.socket,
    tls: Identity | None,
    handshake_timeout_s: float,
) -> asyncio.Server:
    """Serve connections on the bound `sock`; with `tls`, TLS 1.3 with that identity's
    certificate, whose handshake must complete within `handshake_timeout_s`."""
    return await asyncio.start_server(
        handler,
        sock=sock,
        limit=1 << 20,
        ssl=server_context(tls) if tls is not None else None,
        ssl_handshake_timeout=handshake_timeout_s if tls is not None else None,
    )
