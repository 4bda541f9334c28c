"""The golden DHT entry: our encoder and signer reproduce the bytes in docs/protocol.md."""

from __future__ import annotations

import re
from pathlib import Path

from beed.dht.envelope import check_entry
from beed.dht.records import decode_record

from .golden import ENTRY, IDENTITY, KEY, PAYLOAD, RECORD, VALUE, hex_lines

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_golden_entry_verifies_and_decodes() -> None:
    assert decode_record(VALUE, RECORD.expires_at) == RECORD
    assert check_entry(KEY, ENTRY, now=RECORD.issued_at) == RECORD
    assert len(VALUE) == 187 and len(PAYLOAD) == 273


def test_golden_bytes_match_the_spec() -> None:
    text = DOC.read_text()
    section = text[text.index("## DHT records") :]
    assert re.search(rf"peer_id\s+{IDENTITY.peer_id}", section)
    assert re.search(rf"public_key\s+{IDENTITY.public_key_bytes.hex()}", section)
    assert re.search(rf"key\s+{KEY.hex()}", section)
    for data in (VALUE, PAYLOAD, ENTRY.signature):
        assert hex_lines(data) in section
