"""Private swarms: a pre-shared key that every DHT datagram and TCP connection must prove.

A swarm key is 32 random bytes in a file (`beed keygen FILE`, 64 hex digits, mode 0600), given to
`beed bootstrap`, `beed serve` and `beectl` as `--swarm-key FILE`. Two keys are derived from it
with HKDF-SHA256 (one per use, so neither use can be turned against the other):

- DHT datagrams are sealed with ChaCha20-Poly1305: a random 12-byte nonce, then the ciphertext
  and its 16-byte tag. A datagram that does not open under the key is dropped unanswered, so a
  peer without the key can neither join the routing tables, store, nor read a record.
- TCP connections are TLS (beed/net/tls.py) and each Hello carries an HMAC-SHA256 proof bound to
  the server's TLS identity: the client's for "client", the server's for "server". A proof sent
  inside one server's TLS session is worth nothing at another server (another public key), and
  nobody but that server can read it. A client without the key is refused (error 210) before
  any request is read; a server that cannot prove the key is not spoken to.

Nothing here is home-made cryptography: HKDF, ChaCha20-Poly1305 and HMAC come from the
`cryptography` package and the standard library, used as their documentation says.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Any

import click
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import BeeError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES  # bytes a sealed datagram adds
_DHT_AAD = b"beed dht datagram v1"


class SwarmKeyError(BeeError):
    """The swarm key file is missing, unreadable, readable by others or malformed."""


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"beed swarm key: " + purpose).derive(
        secret
    )


class SwarmKey:
    """A loaded swarm key and the keys derived from it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key is {KEY_BYTES} bytes, not {len(secret)}")
        self._datagrams = ChaCha20Poly1305(_derive(secret, b"dht datagrams"))
        self._hello = _derive(secret, b"tcp hello")
        # Not secret: tells operators whether two machines hold the same key.
        self.key_id = hashlib.sha256(_derive(secret, b"key id")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SwarmKey(id={self.key_id})"

    @classmethod
    def generate_file(cls, path: str | os.PathLike[str]) -> SwarmKey:
        """Write a new random key to `path` (mode 0600); never overwrites a file."""
        path = Path(path)
        secret = os.urandom(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SwarmKeyError(f"{path} exists; a swarm key is never overwritten") from None
        except OSError as exc:
            raise SwarmKeyError(f"cannot create {path}: {exc}") from exc
        with os.fdopen(fd, "w") as file:
            file.write(secret.hex() + "\n")
        return cls(secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwarmKey:
        path = Path(path)
        try:
            text = path.read_text(encoding="ascii")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise SwarmKeyError(f"cannot read swarm key {path}: {exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SwarmKeyError(
                f"swarm key {path} has mode {mode & 0o777:o}: other users may read it. "
                f"Run `chmod 600 {path}`."
            )
        try:
            secret = bytes.fromhex(text.strip())
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise SwarmKeyError(
                f"{path} is not a swarm key ({2 * KEY_BYTES} hex digits; `beed keygen` makes one)"
            )
        return cls(secret)

    # --- DHT datagrams ---------------------------------------------------------------------------

    def seal(self, datagram: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._datagrams.encrypt(nonce, datagram, _DHT_AAD)

    def open(self, data: bytes) -> bytes | None:
        """The datagram inside `data`, or None when it was not sealed with this key."""
        if len(data) < SEAL_OVERHEAD:
            return None
        try:
            return self._datagrams.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _DHT_AAD)
        except InvalidTag:
            return None

    # --- TCP Hello proofs ------------------------------------------------------------------------

    def proof(self, role: str, server_public_key: bytes) -> str:
        """The Hello proof of `role` ("client" or "server") on a connection whose TLS server
        holds `server_public_key`."""
        message = b"beed hello v1\0" + role.encode() + b"\0" + server_public_key
        return hmac.new(self._hello, message, hashlib.sha256).hexdigest()

    def check(self, role: str, server_public_key: bytes, proof: str) -> bool:
        return hmac.compare_digest(self.proof(role, server_public_key), proof)


def swarm_key_option(f: Any) -> Any:
    """`--swarm-key FILE` (env BEED_SWARM_KEY) for every command that joins a swarm: the loaded
    SwarmKey, or None; a bad file is a usage error that says why."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> SwarmKey | None:
        if value is None:
            return None
        try:
            return SwarmKey.load(value)
        except SwarmKeyError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return click.option(
        "--swarm-key",
        type=click.Path(dir_okay=False),
        callback=load,
        envvar="BEED_SWARM_KEY",
        help="Join the private swarm of this key file (`beed keygen FILE` makes one): peers "
        "without it are ignored and refused [env BEED_SWARM_KEY; default: a public swarm].",
    )(f)
