"""Identity files, peer ids and signatures."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from beed.dht import Identity, IdentityError, verify
from beed.dht.identity import node_id_for, peer_id_for


def test_load_or_create_makes_a_0600_file_and_reuses_it(tmp_path: Path) -> None:
    path = tmp_path / "node.id"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = Identity.load_or_create(path)
    assert second.peer_id == first.peer_id
    assert second.public_key_bytes == first.public_key_bytes


def test_peer_id_derives_from_public_key() -> None:
    identity = Identity.generate()
    assert identity.peer_id == peer_id_for(identity.public_key_bytes)
    assert identity.node_id == node_id_for(identity.public_key_bytes)
    assert len(identity.node_id) == 20
    assert identity.peer_id.isalnum() and identity.peer_id.islower()
    assert Identity.generate().peer_id != identity.peer_id


def test_sign_and_verify() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"hello")
    assert verify(identity.public_key_bytes, signature, b"hello")
    assert not verify(identity.public_key_bytes, signature, b"hellO")
    assert not verify(Identity.generate().public_key_bytes, signature, b"hello")
    assert not verify(identity.public_key_bytes[:31], signature, b"hello")
    assert not verify(identity.public_key_bytes, signature[:63], b"hello")


def test_corrupt_identity_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.id"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an unencrypted PEM"):
        Identity.load_or_create(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_identity_files_others_can_read_are_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.id"
    peer_id = Identity.load_or_create(path).peer_id
    path.chmod(mode)
    with pytest.raises(IdentityError, match=rf"mode {mode:o}.*chmod 600"):
        Identity.load_or_create(path)
    path.chmod(0o600)
    assert Identity.load_or_create(path).peer_id == peer_id


def test_beed_refuses_a_loose_identity_file_with_a_clear_message(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "node.id"
    Identity.load_or_create(path)
    path.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "beed.cli", "bootstrap", "--port", "0", "--identity", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "chmod 600" in result.stderr and "Traceback" not in result.stderr, result.stderr
