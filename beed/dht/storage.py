"""Local storage of a DHT node: per key, a set of signed subkey entries merged newest-wins."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from kademlia.storage import IStorage

from beed.dht.envelope import Order, SignedEntry

log = logging.getLogger(__name__)

CULL_PERIOD_S = 1.0  # a full sweep of expired entries at most this often; reads cull their key
# Per-entry overhead in a msgpack page beyond the value and subkey (array, float, signature).
_ENTRY_OVERHEAD_BYTES = 90


def subkey_digest(subkeys: Iterable[str]) -> bytes:
    """SHA-256 of the sorted subkeys joined by newlines, first 8 bytes (a set's fingerprint)."""
    return hashlib.sha256("\n".join(sorted(subkeys)).encode()).digest()[:8]


@dataclass(frozen=True)
class StoredEntry:
    entry: SignedEntry
    order: Order  # (issued_at, expires_at); a STORE replaces only with a strictly larger order
    deadline: float  # unix time we drop it: min(signed expires_at, received + max_ttl_s)


class SubkeyStorage(IStorage):  # type: ignore[misc]
    """Keys map to {subkey: entry}. Entries must be authenticated (envelope.check_entry) first.

    Merge rule: an incoming entry replaces the stored one of the same subkey only when its order
    (issued_at, expires_at) is larger, so a replayed older entry never replaces a newer one.
    Each entry lives until its signed expiry, capped at `max_ttl_s` after this node received it.
    """

    def __init__(
        self,
        max_ttl_s: float,
        max_subkeys_per_key: int,
        max_keys: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_ttl_s = max_ttl_s
        self.max_subkeys_per_key = max_subkeys_per_key
        self.max_keys = max_keys
        self._clock = clock
        self.data: OrderedDict[bytes, dict[str, StoredEntry]] = OrderedDict()
        self._last_merge: dict[bytes, float] = {}  # monotonic time of the last accepted entry
        self._last_cull = float("-inf")

    # --- our interface -----------------------------------------------------------------------

    def merge(self, key: bytes, entry: SignedEntry, order: Order) -> bool:
        """Store `entry` under `key` unless an entry with an equal or larger order is held."""
        now = self._clock()
        self._cull_now_and_then(now)
        deadline = min(entry.expires_at, now + self.max_ttl_s)
        if deadline <= now:
            return False
        subkeys = self.data.get(key)
        if subkeys is None:
            if len(self.data) >= self.max_keys:
                log.warning("storage.full keys=%d", len(self.data))
                return False
            subkeys = self.data[key] = {}
        current = subkeys.get(entry.subkey)
        if current is not None and current.order >= order:
            return False
        if current is None and len(subkeys) >= self.max_subkeys_per_key:
            log.warning("storage.key_full key=%s subkeys=%d", key.hex()[:12], len(subkeys))
            return False
        subkeys[entry.subkey] = StoredEntry(entry, order, deadline)
        self._last_merge[key] = time.monotonic()
        return True

    def entries(self, key: bytes) -> list[SignedEntry]:
        """Unexpired entries under `key`, sorted by subkey."""
        now = self._clock()
        self._cull_now_and_then(now)
        subkeys = self.data.get(key)
        if not subkeys:
            return []
        for subkey in [s for s, stored in subkeys.items() if stored.deadline <= now]:
            del subkeys[subkey]
        if not subkeys:
            del self.data[key]
            self._last_merge.pop(key, None)
        return [subkeys[s].entry for s in sorted(subkeys)]

    def page(
        self, key: bytes, after: str | None, max_bytes: int
    ) -> tuple[list[SignedEntry], str | None]:
        """Entries with subkey > `after` that fit in about `max_bytes`, and the next cursor."""
        selected: list[SignedEntry] = []
        size = 0
        remaining = [e for e in self.entries(key) if after is None or e.subkey > after]
        for entry in remaining:
            cost = len(entry.value) + len(entry.subkey) + _ENTRY_OVERHEAD_BYTES
            if selected and size + cost > max_bytes:
                return selected, selected[-1].subkey
            selected.append(entry)
            size += cost
        return selected, None

    def touch(self, key: bytes) -> None:
        """Mark `key` as fresh (after republishing it), so iter_older_than skips it a while."""
        if key in self.data:
            self._last_merge[key] = time.monotonic()

    def _cull_now_and_then(self, now: float) -> None:
        if now - self._last_cull >= CULL_PERIOD_S or now < self._last_cull:
            self.cull(now)

    def summary(self, key: bytes) -> tuple[int, bytes]:
        """How many entries `key` holds and an 8-byte digest of their subkeys (sorted)."""
        subkeys = [e.subkey for e in self.entries(key)]
        return len(subkeys), subkey_digest(subkeys)

    def cull(self, now: float | None = None) -> None:
        """Drop entries past their deadline, and keys left empty."""
        now = self._clock() if now is None else now
        self._last_cull = now
        for key in list(self.data):
            subkeys = self.data[key]
            for subkey in [s for s, stored in subkeys.items() if stored.deadline <= now]:
                del subkeys[subkey]
            if not subkeys:
                del self.data[key]
                self._last_merge.pop(key, None)

    def __len__(self) -> int:
        self.cull()
        return sum(len(subkeys) for subkeys in self.data.values())

    # --- kademlia.storage.IStorage -----------------------------------------------------------

    def __setitem__(self, key: bytes, value: Iterable[tuple[SignedEntry, Order]]) -> None:
        for entry, order in value:
            self.merge(key, entry, order)

    def __getitem__(self, key: bytes) -> list[SignedEntry]:
        found = self.entries(key)
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: object = None) -> object:
        return self.entries(key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[SignedEntry]]]:
        """Keys that received no new entry for `seconds_old` seconds, with their entries."""
        self.cull()
        limit = time.monotonic() - seconds_old
        return [
            (key, self.entries(key))
            for key in list(self.data)
            if self._last_merge.get(key, 0.0) <= limit
        ]

    def __iter__(self) -> Iterator[tuple[bytes, list[SignedEntry]]]:
        self.cull()
        return iter([(key, self.entries(key)) for key in list(self.data)])
