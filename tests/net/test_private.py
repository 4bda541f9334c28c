"""Swarm keys, identity-bound TLS and sealed DHT datagrams, on real sockets of 127.0.0.1."""

from __future__ import annotations

import asyncio
import os

import pytest

from beed.dht.identity import Identity, peer_id_for
from beed.net import tls
from beed.net.swarm_key import SEAL_OVERHEAD, SwarmKey, SwarmKeyError
from protocol.errors import PeerUnreachableError


def test_a_swarm_key_file_is_made_once_private_and_checked_on_load(tmp_path):
    path = tmp_path / "swarm.key"
    key = SwarmKey.generate_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 64
    assert SwarmKey.load(path).key_id == key.key_id
    with pytest.raises(SwarmKeyError, match="never overwritten"):
        SwarmKey.generate_file(path)
    path.chmod(0o644)
    with pytest.raises(SwarmKeyError, match="chmod 600"):
        SwarmKey.load(path)
    bad = tmp_path / "bad.key"
    bad.write_text("not hex\n")
    bad.chmod(0o600)
    with pytest.raises(SwarmKeyError, match="beed keygen"):
        SwarmKey.load(bad)
    with pytest.raises(SwarmKeyError, match="cannot read"):
        SwarmKey.load(tmp_path / "missing.key")


def test_sealed_datagrams_open_only_under_their_key_and_unchanged():
    key, other = SwarmKey(os.urandom(32)), SwarmKey(os.urandom(32))
    datagram = b"\x00" + os.urandom(20) + b"payload"
    sealed = key.seal(datagram)
    assert len(sealed) == len(datagram) + SEAL_OVERHEAD
    assert datagram not in sealed
    assert key.open(sealed) == datagram
    assert key.seal(datagram) != sealed  # a fresh nonce each time
    assert other.open(sealed) is None
    for i in (0, 12, len(sealed) - 1):  # nonce, ciphertext, tag
        flipped = bytearray(sealed)
        flipped[i] ^= 1
        assert key.open(bytes(flipped)) is None
    assert key.open(datagram) is None and key.open(b"") is None


def test_hello_proofs_are_bound_to_the_role_and_the_server_identity():
    key = SwarmKey(os.urandom(32))
    a, b = os.urandom(32), os.urandom(32)
    proof = key.proof("client", a)
    assert key.check("client", a, proof)
    assert not key.check("server", a, proof)  # a client's proof is not a server's
    assert not key.check("client", b, proof)  # nor worth anything at another server
    assert not SwarmKey(os.urandom(32)).check("client", a, proof)
    assert not key.check("client", a, "")


async def _tls_server(identity: Identity) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        echo, "127.0.0.1", 0, ssl=tls.server_context(identity), ssl_handshake_timeout=5
    )
    return server, server.sockets[0].getsockname()[1]


async def test_tls_proves_the_identity_the_record_names():
    identity = Identity.generate()
    server, port = await _tls_server(identity)
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(), server_hostname=""
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        key = tls.check_server(ssl_object, identity.peer_id, "s")
        assert key == identity.public_key_bytes and peer_id_for(key) == identity.peer_id
        assert tls.check_server(ssl_object, "", "s") == identity.public_key_bytes
        with pytest.raises(PeerUnreachableError, match="TLS identity"):
            tls.check_server(ssl_object, Identity.generate().peer_id, "s")
        writer.write(b"ping")
        assert await reader.read(100) == b"ping"
        writer.close()


def test_route_entries_carry_the_tls_flag_of_the_next_hop():
    from beed.server.push import NextHop, parse_next_hops
    from protocol.errors import BadRequestError

    entry = {"host": "127.0.0.1", "port": 4000, "peer_id": "p" * 32, "token": "0" * 32}
    assert parse_next_hops([entry])[0].tls is False
    hop = parse_next_hops([{**entry, "tls": True}])[0]
    assert hop.tls and hop.as_dict()["tls"] is True
    assert "tls" not in NextHop("h", 1, "p", "0" * 32).as_dict()  # old servers read the same
    with pytest.raises(BadRequestError, match="tls"):
        parse_next_hops([{**entry, "tls": "yes"}])
