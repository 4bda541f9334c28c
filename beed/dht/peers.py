"""Parsing and formatting of `--initial-peers` values: HOST:PORT, [IPv6]:PORT, comma-separated."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import click

from beed.dht.errors import DHTError

__all__ = [
    "InitialPeersError",
    "format_initial_peers",
    "initial_peers_callback",
    "parse_initial_peers",
    "reachable_host",
]


class InitialPeersError(DHTError, ValueError):
    """An --initial-peers item is not HOST:PORT."""


def parse_initial_peers(values: Iterable[str]) -> list[tuple[str, int]]:
    """Addresses from repeated and/or comma-separated `HOST:PORT` items, duplicates dropped.

    Accepts `1.2.3.4:31340`, `host.example:31340`, `[::1]:31340`; empty items are skipped.
    Raises InitialPeersError naming the bad item.
    """
    peers: list[tuple[str, int]] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item:
                peer = _parse_one(item)
                if peer not in peers:
                    peers.append(peer)
    return peers


def _parse_one(item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, sep, port_text = item[1:].partition("]:")
        if not sep:
            raise InitialPeersError(f"{item!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InitialPeersError(f"{item!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise InitialPeersError(f"{item!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
        if ":" in host:
            raise InitialPeersError(f"{item!r}: write IPv6 addresses in brackets, [ADDR]:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InitialPeersError(f"{item!r}: port must be a number in 1-65535")
    return host, int(port_text)


def format_initial_peers(addresses: Iterable[tuple[str, int]]) -> str:
    """The comma-separated `--initial-peers` value for `addresses` (IPv6 in brackets)."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)


def initial_peers_callback(
    ctx: click.Context, param: click.Parameter, value: Iterable[str] | None
) -> list[tuple[str, int]]:
    """A click option callback: `multiple=True` values to addresses, bad input as BadParameter."""
    try:
        return parse_initial_peers(value or ())
    except InitialPeersError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def reachable_host(bind_host: str) -> str:
    """The address other machines should use to reach a socket bound to `bind_host`.

    A wildcard bind (0.0.0.0 or ::) is replaced by the address of the interface that routes
    outwards (found without sending anything), or loopback when there is no route.
    """
    try:
        address = ipaddress.ip_address(bind_host)
    except ValueError:
        return bind_host  # a host name: others resolve it
    if not address.is_unspecified:
        return bind_host
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    probe: Any = ("2001:db8::1", 9) if family == socket.AF_INET6 else ("192.0.2.1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(probe)  # UDP connect picks a route; no packet is sent
            return str(sock.getsockname()[0])
    except OSError:
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"
