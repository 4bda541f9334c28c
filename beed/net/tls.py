"""TLS for activation connections, with the server authenticated as its DHT identity.

There is no certificate authority: a server's certificate is self-signed with its Ed25519 identity
key (the key whose public half its signed DHT record names), and a client accepts it only when
the certificate's public key derives the peer id it dialled (`peer_id_for`). TLS 1.3 itself
proves the server holds that key (its CertificateVerify signs the handshake), so a man in the
middle can neither read nor change a byte: any change fails the record's AEAD tag and ends the
connection. Clients do not present certificates; what they may do is decided by the session
tokens and, in a private swarm, by the swarm-key proof in the Hello (beed/net/swarm_key.py).
"""

from __future__ import annotations

import datetime
import functools
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from beed.dht.identity import Identity, peer_id_for
from protocol.errors import PeerUnreachableError

CERT_VALIDITY = datetime.timedelta(days=3650)  # the identity, not the certificate, is what expires


def certificate_pem(key: Ed25519PrivateKey, peer_id: str) -> bytes:
    """A self-signed certificate for `key`, named after its peer id."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CERT_VALIDITY)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def server_context(identity: Identity) -> ssl.SSLContext:
    """The server side: TLS 1.3 with a certificate of the server's identity key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    key_pem = identity.private_key_pem()
    cert_pem = certificate_pem(identity.private_key, identity.peer_id)
    # load_cert_chain reads files only: a private directory that exists for this call.
    with tempfile.TemporaryDirectory(prefix="beed-tls-") as folder:
        path = os.path.join(folder, "identity.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(key_pem + cert_pem)
        context.load_cert_chain(path)
    return context


@functools.cache
def client_context() -> ssl.SSLContext:
    """The client side: TLS 1.3; the certificate is checked against the peer id afterwards
    (`check_server`), not against a certificate authority."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def server_public_key(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes:
    """The raw Ed25519 public key of the server's certificate; PeerUnreachableError when it
    presented none or one of another kind."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerUnreachableError("the server presented no TLS certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise PeerUnreachableError(f"the server's TLS certificate is unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PeerUnreachableError("the server's TLS certificate is not of an Ed25519 identity")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_server(ssl_object: ssl.SSLObject | ssl.SSLSocket, peer_id: str, where: str) -> bytes:
    """The public key of the server's certificate; PeerUnreachableError when `peer_id` is
    given ("" accepts any identity) and the key derives another one."""
    key = server_public_key(ssl_object)
    proven = peer_id_for(key)
    if peer_id and proven != peer_id:
        raise PeerUnreachableError(
            f"{where} holds the TLS identity {proven[:16]}, not the expected {peer_id[:16]}"
        )
    return key
