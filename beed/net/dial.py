"""Which addresses a peer may be made to dial.

Records in the DHT and routes in a Step are written by strangers: without a rule, a record could
point every client at a host inside their own network (a router's admin page, a database), and a
route could make a server connect anywhere. A public swarm's servers have public addresses, so
addresses that are not globally routable (loopback, RFC 1918 private, link-local, CGNAT,
unique-local, multicast, unspecified) are refused, unless the swarm itself runs on them: the
client's initial peers, or the server's own announced address, are such addresses; or the user
passed `--allow-private-addresses`. Host names are not resolved here (a name is checked by the
address it resolves to when the connection is made: see `open_stream`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass


def is_public(host: str) -> bool:
    """Whether an IP address literal is globally routable; names count as public here."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class DialPolicy:
    """allow_private: private and loopback addresses may be dialled (a LAN or test swarm)."""

    allow_private: bool = False

    @classmethod
    def for_swarm(cls, known_hosts: Iterable[str], allow_private: bool | None = None) -> DialPolicy:
        """allow_private True/False decides; None: private addresses are allowed when any
        address literal the swarm is known by (initial peers, our own address) is private."""
        if allow_private is not None:
            return cls(allow_private)
        return cls(any(not is_public(h) for h in known_hosts))

    @classmethod
    async def for_swarm_resolved(
        cls, known_hosts: Iterable[str], allow_private: bool | None = None, timeout_s: float = 5.0
    ) -> DialPolicy:
        """for_swarm, with host names resolved first (`localhost:31340` is a private swarm)."""
        if allow_private is not None:
            return cls(allow_private)
        loop = asyncio.get_running_loop()
        addresses: list[str] = []
        for host in known_hosts:
            addresses.append(host)
            try:
                async with asyncio.timeout(timeout_s):
                    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            except (OSError, TimeoutError):
                continue
            addresses.extend(str(info[4][0]) for info in infos)
        return cls.for_swarm(addresses)

    def allows(self, host: str) -> bool:
        return self.allow_private or is_public(host)
