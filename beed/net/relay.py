"""Dialling through a relay, and the preamble I/O both ends of a relayed connection share.

A server behind NAT announces relays (`RelayAddress`); `dial_relayed` connects to one, asks it for
that server (protocol/relay.py: connect), and returns the raw socket once the relay answered ok:
from then on the socket carries the ordinary stream to the server (TLS end to end), which the
caller opens on it. Preambles are read and written on raw non-blocking sockets with exact reads,
so not one byte of the stream that follows is consumed here.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any

from beed.net.dial import DialPolicy
from beed.net.swarm_key import SwarmKey
from protocol.errors import (
    AddressRefusedError,
    BeeError,
    MalformedHeaderError,
    PeerUnreachableError,
    RelayRefusedError,
)
from protocol.relay import (
    PREFIX,
    RelayMessage,
    body_length,
    decode_relay,
    encode_relay,
    signed_bytes,
)

MAX_RELAYS = 4  # relays one record may name


@dataclass(frozen=True)
class RelayAddress:
    """A relay a server listens at: its peer id (for logs and routing), host and TCP port."""

    peer_id: str
    host: str
    port: int

    def as_list(self) -> list[Any]:
        return [self.peer_id, self.host, self.port]


def parse_relays(raw: object, where: str = "relays") -> tuple[RelayAddress, ...]:
    """Relay entries of a record or route ([[peer_id, host, port], ...]); ValueError if bad."""
    if not isinstance(raw, list | tuple) or len(raw) > MAX_RELAYS:
        raise ValueError(f"{where} must be a list of at most {MAX_RELAYS} relays")
    out = []
    for i, entry in enumerate(raw):
        if not (isinstance(entry, list | tuple) and len(entry) == 3):
            raise ValueError(f"{where}[{i}] must be [peer_id, host, port]")
        peer_id, host, port = entry
        if not (isinstance(peer_id, str) and 0 < len(peer_id) <= 128):
            raise ValueError(f"{where}[{i}] peer id must be a string")
        if not (isinstance(host, str) and 0 < len(host) <= 253):
            raise ValueError(f"{where}[{i}] host must be a host name or address")
        if not (type(port) is int and 0 < port < 65536):
            raise ValueError(f"{where}[{i}] port must be in 1..65535")
        out.append(RelayAddress(peer_id, host, port))
    return tuple(out)


async def send_message(sock: socket.socket, data: bytes, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        await loop.sock_sendall(sock, data)


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes (a relay preamble's prefix or body); ConnectionError at EOF."""
    loop = asyncio.get_running_loop()
    chunks, left = [], n
    while left:
        chunk = await loop.sock_recv(sock, left)
        if not chunk:
            raise ConnectionResetError("the peer closed the connection inside a relay preamble")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


async def read_message(sock: socket.socket, timeout_s: float | None) -> RelayMessage:
    """One preamble message; MalformedHeaderError for bytes that are not one."""
    async with asyncio.timeout(timeout_s):
        length = body_length(await read_exactly(sock, PREFIX.size))
        return decode_relay(await read_exactly(sock, length))


def check_answer(answer: RelayMessage, where: str) -> None:
    if answer.op == "error":
        raise RelayRefusedError(f"relay {where} refused: {answer.get('message')}")
    if answer.op != "ok":
        raise MalformedHeaderError(f"relay {where} answered {answer.op!r}, not ok")


def swarm_proof(key: SwarmKey | None, data: bytes) -> dict[str, str]:
    """The `sp` field of a preamble in a private swarm (nothing in a public one)."""
    return {} if key is None else {"sp": key.proof("relay", data)}


async def open_socket(host: str, port: int, policy: DialPolicy | None) -> socket.socket:
    """A connected non-blocking TCP socket to host:port, where `policy` allows the address."""
    loop = asyncio.get_running_loop()
    if policy is not None and not policy.allows(host):
        raise AddressRefusedError(
            f"relay {host} is not a public address: not dialled "
            "(beectl/beed --allow-private-addresses dials such addresses)"
        )
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for family, kind, proto, _name, address in infos:
        if policy is not None and not policy.allows(str(address[0])):
            continue
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise OSError(f"cannot connect to {host}:{port}: {last or 'no allowed address'}")


async def dial_relayed(
    relay: RelayAddress,
    target_peer_id: str,
    *,
    timeout_s: float,
    policy: DialPolicy | None = None,
    swarm_key: SwarmKey | None = None,
) -> socket.socket:
    """A socket spliced through `relay` to the server `target_peer_id` (not yet TLS).

    PeerUnreachableError when the relay cannot be reached or does not answer in time;
    RelayRefusedError when it refuses (the server does not listen there)."""
    where = f"{relay.host}:{relay.port}"
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout_s):
            sock = await open_socket(relay.host, relay.port, policy)
            ts = time.time()
            proof = swarm_proof(swarm_key, signed_bytes("connect", target_peer_id, ts))
            await send_message(
                sock, encode_relay("connect", target=target_peer_id, ts=ts, **proof), timeout_s
            )
            check_answer(await read_message(sock, None), where)
    except (TimeoutError, OSError) as exc:
        if sock is not None:
            sock.close()
        raise PeerUnreachableError(
            f"cannot reach {target_peer_id[:16]} through relay {where}: {exc or 'timed out'}"
        ) from exc
    except BeeError:
        if sock is not None:
            sock.close()
        raise
    return sock
