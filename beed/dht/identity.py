"""Ed25519 node identities: key files, peer ids derived from public keys, signing and verifying."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from beed.dht.errors import IdentityError

log = logging.getLogger(__name__)

PeerId = NewType("PeerId", str)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_BYTES = 20  # Kademlia ids are 160 bits.


def node_id_for(public_key: bytes) -> bytes:
    """The 20-byte Kademlia node id of a public key: the first 20 bytes of its SHA-256."""
    return hashlib.sha256(public_key).digest()[:NODE_ID_BYTES]


def peer_id_for(public_key: bytes) -> PeerId:
    """The printable peer id of a public key: lowercase unpadded base32 of its node id (32 chars)."""
    return PeerId(base64.b32encode(node_id_for(public_key)).decode("ascii").lower())


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` under `public_key`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair; its peer id and Kademlia node id derive from the public key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: PeerId = peer_id_for(self.public_key_bytes)
        self.node_id: bytes = node_id_for(self.public_key_bytes)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id})"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (not saved anywhere)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, or create it there with mode 0600 if it does not exist."""
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        pem = identity.private_key_pem()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls._load(path)  # another process created it first
        except OSError as exc:
            raise IdentityError(f"cannot create identity file {path}: {exc}") from exc
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        log.info("identity.created path=%s peer_id=%s", path, identity.peer_id)
        return identity

    @classmethod
    def _load(cls, path: Path) -> Identity:
        try:
            data = path.read_bytes()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {path}: {exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # Anyone who can read the key can announce as this server (and sign its records).
            raise IdentityError(
                f"identity file {path} has mode {mode & 0o777:o}: other users may read or "
                f"change the private key. Run `chmod 600 {path}` (or delete it to make a new "
                "identity)."
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        identity = cls(key)
        log.info("identity.loaded path=%s peer_id=%s", path, identity.peer_id)
        return identity

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The private key (for the server's TLS certificate, beed/net/tls.py)."""
        return self._private_key

    def private_key_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature (64 bytes) of `data`."""
        return self._private_key.sign(data)
