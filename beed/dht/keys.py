"""DHT key naming: which 160-bit keys hold the records of a model's blocks and the model list."""

from __future__ import annotations

from kademlia.utils import digest

from beed.dht.records import ServerRecord

NAMESPACE = "beed/1"
# A record is stored under one key per group of BLOCKS_PER_KEY consecutive blocks its span meets.
# Readers of a 30-block model fetch 4 keys concurrently; writers of a 15-block span store to 2-3.
BLOCKS_PER_KEY = 8


def models_key_name() -> str:
    return f"{NAMESPACE}/models"


def group_key_name(fingerprint: str, group: int) -> str:
    first = group * BLOCKS_PER_KEY
    return f"{NAMESPACE}/model/{fingerprint}/blocks/{first}-{first + BLOCKS_PER_KEY}"


def dht_key(name: str) -> bytes:
    """The 20-byte Kademlia key of a key name (SHA-1, as kademlia.utils.digest)."""
    return bytes(digest(name))


def groups_for_span(start: int, end: int) -> range:
    """Indices of the block groups that the half-open span [start, end) meets."""
    if end <= start:
        return range(0)
    return range(start // BLOCKS_PER_KEY, (end - 1) // BLOCKS_PER_KEY + 1)


def key_names_for_record(record: ServerRecord) -> list[str]:
    """Every key name a record is announced under: its block groups, then the model list."""
    names = [
        group_key_name(record.model_fingerprint, g)
        for g in groups_for_span(record.span_start, record.span_end)
    ]
    names.append(models_key_name())
    return names


def keys_for_record(record: ServerRecord) -> list[bytes]:
    return [dht_key(name) for name in key_names_for_record(record)]
