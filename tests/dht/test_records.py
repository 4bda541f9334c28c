"""Record encoding, validation, signed entries and the merge rules of storage."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import msgpack
import pytest

from beed.dht import Identity, RecordError, ServerRecord, ServerState
from beed.dht.envelope import SignedEntry, check_entry, entry_order, sign_entry
from beed.dht.keys import BLOCKS_PER_KEY, dht_key, group_key_name, groups_for_span, keys_for_record
from beed.dht.records import decode_record, encode_record, with_signing_fields
from beed.dht.storage import SubkeyStorage, entry_bytes, format_cursor


def make(identity: Identity, start: int = 0, end: int = 12, **fields: object) -> ServerRecord:
    record = ServerRecord(
        peer_id=identity.peer_id,
        state=ServerState.ONLINE,
        span_start=start,
        span_end=end,
        host="10.1.2.3",
        port=31337,
        model_fingerprint="a" * 64,
        model_name="smollm2-135m",
        num_blocks=30,
        dtype="bfloat16",
        compute_tokens_per_s=1234.5,
        network_bytes_per_s=1e8,
        free_kv_tokens=4096,
        protocol_version=1,
        codecs=("none", "lz4", "zstd"),
        software_version="0.1.0",
    )
    now = time.time()
    signed = with_signing_fields(record, identity.public_key_bytes, now, now + 60)
    return dataclasses.replace(signed, **fields)  # type: ignore[arg-type]


def test_round_trip_and_size() -> None:
    record = make(Identity.generate())
    data = encode_record(record)
    assert len(data) < 400  # ~15 records fit one 7 KB reply page
    assert decode_record(data, expires_at=record.expires_at) == record


def test_the_tls_flag_is_written_only_when_set() -> None:
    plain = make(Identity.generate())
    assert "tl" not in msgpack.unpackb(encode_record(plain))
    encrypted = dataclasses.replace(plain, tls=True)
    fields = msgpack.unpackb(encode_record(encrypted))
    assert fields["tl"] is True
    assert decode_record(encode_record(encrypted), encrypted.expires_at) == encrypted
    fields["tl"] = 1  # only a msgpack true means TLS
    assert not decode_record(msgpack.packb(fields), encrypted.expires_at).tls


def test_unknown_fields_are_tolerated_and_missing_ones_rejected() -> None:
    record = make(Identity.generate())
    fields = msgpack.unpackb(encode_record(record))
    fields["future_field"] = [1, 2, 3]
    fields["v"] = 2
    assert decode_record(msgpack.packb(fields), record.expires_at) == record
    del fields["p"]
    with pytest.raises(RecordError, match="'p'"):
        decode_record(msgpack.packb(fields))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 0}), msgpack.packb({"v": 1})],
)
def test_garbage_is_a_record_error(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(data)


@pytest.mark.parametrize(
    "change",
    [
        {"span_start": 5, "span_end": 5},
        {"span_end": 31},
        {"port": 0},
        {"free_kv_tokens": -1},
        {"compute_tokens_per_s": float("nan")},
        {"peer_id": Identity.generate().peer_id},
        {"model_fingerprint": ""},
    ],
)
def test_out_of_range_fields_are_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        encode_record(make(Identity.generate(), **change))


def test_groups_and_keys() -> None:
    assert list(groups_for_span(0, 8)) == [0]
    assert list(groups_for_span(7, 9)) == [0, 1]
    assert list(groups_for_span(0, 30)) == [0, 1, 2, 3]
    record = make(Identity.generate(), 3, 17)
    names = [group_key_name(record.model_fingerprint, g) for g in (0, 1, 2)]
    assert keys_for_record(record)[:3] == [dht_key(n) for n in names]
    assert len(keys_for_record(record)) == 17 // BLOCKS_PER_KEY + 2


def test_signed_entry_checks() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    record = make(alice)
    key = keys_for_record(record)[0]
    value = encode_record(record)
    entry = sign_entry(alice, key, value, record.expires_at)
    assert check_entry(key, entry, time.time()) == record
    wire = SignedEntry.from_wire(entry.to_wire())
    assert wire == entry

    forged = sign_entry(mallory, key, value, record.expires_at)  # signed by someone else
    tampered = dataclasses.replace(entry, value=encode_record(dataclasses.replace(record, port=1)))
    extended = dataclasses.replace(entry, expires_at=entry.expires_at + 1000)
    wrong_subkey = dataclasses.replace(entry, subkey=mallory.peer_id)
    other_key = keys_for_record(make(alice, 20, 30))[0]
    moved = sign_entry(alice, other_key, value, record.expires_at)
    for bad, reason in [
        (forged, "subkey"),
        (tampered, "signature"),
        (extended, "signature"),
        (wrong_subkey, "subkey"),
        (moved, "belong"),
    ]:
        with pytest.raises(RecordError, match=reason):
            check_entry(other_key if bad is moved else key, bad, time.time())
    with pytest.raises(RecordError, match="expired"):
        check_entry(key, entry, record.expires_at + 1)
    for bad_wire in [None, [], ["a", b"", 1.0], ["", b"x", 1.0, b"s" * 64], ["a", b"x", 1.0, b""]]:
        with pytest.raises(RecordError):
            SignedEntry.from_wire(bad_wire)


def test_storage_merge_rules_and_pages() -> None:
    clock = [1000.0]
    storage = SubkeyStorage(
        max_ttl_s=100, max_subkeys_per_key=3, max_keys=10, clock=lambda: clock[0]
    )
    key = b"k" * 20

    def entry(subkey: str, expires_at: float) -> SignedEntry:
        return SignedEntry(subkey, b"v" * 100, expires_at, b"s" * 64)

    assert storage.merge(key, entry("a", 1050), (1.0, 1050))
    assert not storage.merge(key, entry("a", 1060), (0.5, 1060))  # replay of an older issue
    assert not storage.merge(key, entry("a", 1050), (1.0, 1050))  # same entry again
    assert storage.merge(key, entry("a", 1040), (2.0, 1040))  # newer issue, shorter life
    assert storage.merge(key, entry("b", 5000), (1.0, 5000))  # capped at now + max_ttl
    assert storage.merge(key, entry("c", 1010), (1.0, 1010))
    assert not storage.merge(key, entry("d", 1010), (1.0, 1010))  # key full
    assert not storage.merge(key, entry("e", 999), (1.0, 999))  # already expired
    assert [e.subkey for e in storage.entries(key)] == ["a", "b", "c"]

    page, cursor = storage.page(key, None, max_bytes=250)
    assert [e.subkey for e in page] == ["a"] and cursor == format_cursor(1)
    page, cursor = storage.page(key, cursor, max_bytes=10_000)
    assert [e.subkey for e in page] == ["b", "c"] and cursor is None

    clock[0] = 1020  # c expired
    assert [e.subkey for e in storage.entries(key)] == ["a", "b"]
    clock[0] = 1099  # a expired (1040), b capped at 1100
    assert [e.subkey for e in storage.entries(key)] == ["b"]
    clock[0] = 1100
    assert storage.entries(key) == [] and storage.get(key) is None and len(storage) == 0


def test_storage_pages_oldest_first_and_caps_each_source() -> None:
    storage = SubkeyStorage(
        max_ttl_s=100,
        max_subkeys_per_key=100,
        max_keys=10,
        clock=lambda: 1000.0,
        max_subkeys_per_ip=3,
        max_subkeys_per_prefix=4,
    )
    key = b"k" * 20

    def entry(subkey: str) -> SignedEntry:
        return SignedEntry(subkey, b"v" * 100, 1050.0, b"s" * 64)

    def store(subkey: str, source: str, issued: float = 1.0) -> bool:
        return storage.merge(key, entry(subkey), (issued, 1050.0), source)

    assert store("z-honest", "10.0.0.1")
    assert all(store(f"a-{i}", "10.0.0.2") for i in range(3))  # the /24 has 4 now
    assert storage.refusal(key, "a-3", (1.0, 1050.0), "10.0.0.2") == "key full for this source ip"
    assert storage.refusal(key, "b-0", (1.0, 1050.0), "10.0.0.9") == (
        "key full for this source prefix"
    )
    assert store("b-0", "10.0.1.9")  # another /24
    assert store("z-honest", "10.0.0.2", issued=2.0)  # a refresh is never refused
    assert store("own", "")  # this node's own writes are not counted
    order = [e.subkey for e in storage.entries(key)]
    assert order[0] == "z-honest" and order[-1] == "own"  # first seen first, refresh keeps place
    held = storage.entries(key)
    page, cursor = storage.page(key, None, entry_bytes(held[0]) + entry_bytes(held[1]))
    assert [e.subkey for e in page] == order[:2]
    rest, end = storage.page(key, cursor, max_bytes=10_000)
    assert [e.subkey for e in page + rest] == order and end is None
    assert storage.page(key, None, max_bytes=10) == ([], format_cursor(0))  # nothing fits
    with pytest.raises(ValueError):
        storage.page(key, "a-1", max_bytes=10_000)  # not a cursor


def test_storage_caps_the_entries_of_one_source_ip_across_keys() -> None:
    clock = [1000.0]
    storage = SubkeyStorage(100, 100, 100, clock=lambda: clock[0], max_entries_per_ip=3)
    entry = SignedEntry("a", b"v", 1050.0, b"s" * 64)
    assert all(storage.merge(bytes([i]) * 20, entry, (1.0, 1050.0), "10.0.0.1") for i in range(3))
    assert not storage.merge(b"x" * 20, entry, (1.0, 1050.0), "10.0.0.1")
    assert storage.merge(b"x" * 20, entry, (1.0, 1050.0), "10.0.0.2")
    clock[0] = 1050.0  # all expired: the source's count is back to zero
    assert len(storage) == 0
    assert storage.merge(
        b"x" * 20, dataclasses.replace(entry, expires_at=1090.0), (2.0, 1090.0), "10.0.0.1"
    )


def test_entry_order_prefers_newer_issue_then_later_expiry() -> None:
    alice = Identity.generate()
    old, new = make(alice, issued_at=10.0), make(alice, issued_at=20.0)
    e = SignedEntry(alice.peer_id, b"", 100.0, b"s" * 64)
    assert entry_order(new, e) > entry_order(old, dataclasses.replace(e, expires_at=500.0))
