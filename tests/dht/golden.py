"""The golden DHT entry of docs/protocol.md (section "DHT records"), built from a fixed key."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from beed.dht import Identity, ServerRecord, ServerState
from beed.dht.envelope import SignedEntry, sign_entry, signing_payload
from beed.dht.keys import dht_key, group_key_name
from beed.dht.records import encode_record

IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
KEY_NAME = group_key_name("f" * 16, 0)
KEY = dht_key(KEY_NAME)
RECORD = ServerRecord(
    peer_id=IDENTITY.peer_id,
    state=ServerState.ONLINE,
    span_start=0,
    span_end=8,
    host="10.0.0.2",
    port=31337,
    model_fingerprint="f" * 16,
    model_name="tiny",
    num_blocks=30,
    dtype="bfloat16",
    compute_tokens_per_s=1000.0,
    network_bytes_per_s=1.25e8,
    free_kv_tokens=4096,
    protocol_version=1,
    codecs=("none", "lz4"),
    software_version="0.1.0",
    public_key=IDENTITY.public_key_bytes,
    issued_at=1_800_000_000.0,
    expires_at=1_800_000_360.0,
)
VALUE = encode_record(RECORD)
PAYLOAD = signing_payload(KEY, IDENTITY.peer_id, VALUE, RECORD.expires_at)
ENTRY: SignedEntry = sign_entry(IDENTITY, KEY, VALUE, RECORD.expires_at)


def hex_lines(data: bytes, width: int = 64) -> str:
    text = data.hex()
    return "\n".join(text[i : i + width] for i in range(0, len(text), width))


if __name__ == "__main__":
    print("peer_id", IDENTITY.peer_id)
    print("public_key", IDENTITY.public_key_bytes.hex())
    print("key_name", KEY_NAME)
    print("key", KEY.hex())
    print("value\n" + hex_lines(VALUE))
    print("payload\n" + hex_lines(PAYLOAD))
    print("signature\n" + hex_lines(ENTRY.signature))
