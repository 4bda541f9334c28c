"""Binding a server's sockets: TCP first (port 0 picks one), then the DHT on the same number."""

from __future__ import annotations

import logging
import socket

from beed.dht.node import DHTNode

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
