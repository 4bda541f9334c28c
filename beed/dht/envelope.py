"""Signed subkey entries, the unit a DHT key holds: (subkey, value bytes, expires_at, signature)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from beed.dht.config import DHTConfig
from beed.dht.errors import RecordError
from beed.dht.identity import SIGNATURE_BYTES, Identity, verify
from beed.dht.keys import keys_for_record
from beed.dht.records import ServerRecord, decode_record

SIGNING_DOMAIN = b"beed-dht-entry/1"
MAX_SUBKEY_CHARS = 64
MAX_VALUE_BYTES = 2048

DEFAULT_CONFIG = DHTConfig()

Order = tuple[float, float]  # (issued_at, expires_at): the larger replaces the smaller


@dataclass(frozen=True)
class SignedEntry:
    """One writer's entry under one key; `subkey` is the writer's peer id."""

    subkey: str
    value: bytes  # msgpack ServerRecord (records.encode_record)
    expires_at: float  # unix time chosen by the writer; covered by the signature
    signature: bytes  # Ed25519 over signing_payload(key, subkey, value, expires_at)

    def to_wire(self) -> list[Any]:
        return [self.subkey, self.value, self.expires_at, self.signature]

    @classmethod
    def from_wire(cls, obj: object) -> SignedEntry:
        """Parse the wire form `[subkey, value, expires_at, signature]`; raises RecordError."""
        if not isinstance(obj, list | tuple) or len(obj) != 4:
            raise RecordError("entry is not a 4-element array")
        subkey, value, expires_at, signature = obj
        if not isinstance(subkey, str) or not 0 < len(subkey) <= MAX_SUBKEY_CHARS:
            raise RecordError("entry subkey is not a short string")
        if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
            raise RecordError("entry value is not bytes or too long")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
            raise RecordError("entry expires_at is not a number")
        if not math.isfinite(expires_at):
            raise RecordError("entry expires_at is not finite")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            raise RecordError("entry signature is not 64 bytes")
        return cls(subkey, value, float(expires_at), signature)


def signing_payload(key: bytes, subkey: str, value: bytes, expires_at: float) -> bytes:
    """The exact bytes that are signed: msgpack [domain, key, subkey, value, expires_at]."""
    payload = [SIGNING_DOMAIN, key, subkey, value, float(expires_at)]
    return bytes(msgpack.packb(payload, use_bin_type=True))


def sign_entry(identity: Identity, key: bytes, value: bytes, expires_at: float) -> SignedEntry:
    payload = signing_payload(key, identity.peer_id, value, expires_at)
    return SignedEntry(identity.peer_id, value, float(expires_at), identity.sign(payload))


def inspect_entry(
    key: bytes, entry: SignedEntry, now: float, config: DHTConfig = DEFAULT_CONFIG
) -> ServerRecord:
    """The cheap checks of an entry found under `key`, all before its signature; raises RecordError.

    In order: not expired, nor expiring later than `max_entry_lifetime_s` from now; value
    decodes to a valid record; issued before it expires and not later than `max_clock_skew_s`
    from now; span of at most `max_span_blocks` blocks; subkey is the signer's peer id; the
    record belongs under `key` (one of its block groups or the model list).
    """
    if entry.expires_at <= now:
        raise RecordError("entry expired")
    if entry.expires_at > now + config.max_entry_lifetime_s:
        raise RecordError("entry expires too far in the future")
    record = decode_record(entry.value, expires_at=entry.expires_at)
    if record.issued_at > now + config.max_clock_skew_s or record.issued_at > entry.expires_at:
        raise RecordError("record issued in the future")
    if record.span_end - record.span_start > config.max_span_blocks:
        raise RecordError(f"record span longer than {config.max_span_blocks} blocks")
    if entry.subkey != record.peer_id:
        raise RecordError("entry subkey is not the signer's peer id")
    if key not in keys_for_record(record):
        raise RecordError("record does not belong under this key")
    return record


def verify_entry(key: bytes, entry: SignedEntry, record: ServerRecord) -> None:
    """Raise RecordError unless the entry's signature verifies under the record's public key."""
    payload = signing_payload(key, entry.subkey, entry.value, entry.expires_at)
    if not verify(record.public_key, entry.signature, payload):
        raise RecordError("entry signature does not verify")


def check_entry(
    key: bytes, entry: SignedEntry, now: float, config: DHTConfig = DEFAULT_CONFIG
) -> ServerRecord:
    """Decode and authenticate an entry found under `key`: inspect_entry, then verify_entry."""
    record = inspect_entry(key, entry, now, config)
    verify_entry(key, entry, record)
    return record


def entry_order(record: ServerRecord, entry: SignedEntry) -> Order:
    return (record.issued_at, entry.expires_at)
