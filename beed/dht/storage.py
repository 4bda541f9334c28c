"""Local storage of a DHT node: per key, a set of signed subkey entries merged newest-wins."""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from kademlia.storage import IStorage

from beed.dht.envelope import Order, SignedEntry
from beed.dht.limits import source_prefix

log = logging.getLogger(__name__)

CULL_PERIOD_S = 1.0  # a full sweep of expired entries at most this often; reads cull their key
# Per-entry overhead in a msgpack page beyond the value and subkey (array, float, signature).
_ENTRY_OVERHEAD_BYTES = 90


def entry_bytes(entry: SignedEntry) -> int:
    """About how many bytes an entry takes in a reply page (an upper bound)."""
    return len(entry.value) + len(entry.subkey) + _ENTRY_OVERHEAD_BYTES


def subkey_digest(subkeys: Iterable[str]) -> bytes:
    """SHA-256 of the sorted subkeys joined by newlines, first 8 bytes (a set's fingerprint)."""
    return hashlib.sha256("\n".join(sorted(subkeys)).encode()).digest()[:8]


@dataclass(frozen=True)
class StoredEntry:
    entry: SignedEntry
    order: Order  # (issued_at, expires_at); a STORE replaces only with a strictly larger order
    deadline: float  # unix time we drop it: min(signed expires_at, received + max_ttl_s)
    seq: int = 0  # first-seen number under its key (kept by refreshes): pages go oldest first
    source: str = ""  # IP the subkey's first STORE came from ("": this node's own write)


@dataclass
class _KeyState:
    """Bookkeeping beside one key's {subkey: StoredEntry} (which is kept in first-seen order)."""

    per_ip: Counter[str] = field(default_factory=Counter)  # subkeys by first source IP
    per_prefix: Counter[str] = field(default_factory=Counter)  # and by its /24 or /48
    next_deadline: float = math.inf  # no entry expires before this (a lower bound)
    summary: tuple[int, bytes] | None = None  # cached (count, digest); None: recompute
    seqs: list[int] | None = None  # cached seq of each subkey in order; None: rebuild
    subkeys: list[str] = field(default_factory=list)


def format_cursor(seq: int) -> str:
    """A page cursor: the first-seen number of the last entry sent, as 16 hex digits.

    Fixed width, so cursors compare as strings in the order pages are served."""
    return f"{seq:016x}"


def parse_cursor(cursor: str) -> int:
    """The first-seen number in a page cursor; raises ValueError if it is not one."""
    if len(cursor) != 16 or cursor.strip("0123456789abcdef"):
        raise ValueError(f"bad page cursor {cursor[:20]!r}")
    return int(cursor, 16)


class SubkeyStorage(IStorage):  # type: ignore[misc]
    """Keys map to {subkey: entry}. Entries must be authenticated (envelope.check_entry) first.

    Merge rule: an incoming entry replaces the stored one of the same subkey only when its order
    (issued_at, expires_at) is larger, so a replayed older entry never replaces a newer one.
    Each entry lives until its signed expiry, capped at `max_ttl_s` after this node received it.

    Against Sybil floods: entries are kept and paged in the order their subkey was first seen
    (a refresh keeps its place), so what was announced before a flood stays on the first
    pages; a key takes at most `max_subkeys_per_ip` / `max_subkeys_per_prefix` new subkeys
    whose first STORE came from one source IP / prefix, and `max_subkeys_per_key` in all.
    Refreshes of a held subkey are never refused.
    """

    def __init__(
        self,
        max_ttl_s: float,
        max_subkeys_per_key: int,
        max_keys: int,
        clock: Callable[[], float] = time.time,
        max_subkeys_per_ip: int | None = None,
        max_subkeys_per_prefix: int | None = None,
        max_entries_per_ip: int | None = None,
    ) -> None:
        self.max_ttl_s = max_ttl_s
        self.max_subkeys_per_key = max_subkeys_per_key
        self.max_keys = max_keys
        self.max_subkeys_per_ip = max_subkeys_per_ip or max_subkeys_per_key
        self.max_subkeys_per_prefix = max_subkeys_per_prefix or max_subkeys_per_key
        self.max_entries_per_ip = max_entries_per_ip or max_keys * max_subkeys_per_key
        self._per_ip: Counter[str] = Counter()  # entries of all keys by first source IP
        self._clock = clock
        self.data: OrderedDict[bytes, dict[str, StoredEntry]] = OrderedDict()
        self._state: dict[bytes, _KeyState] = {}
        self._last_merge: dict[bytes, float] = {}  # monotonic time of the last accepted entry
        self._last_cull = float("-inf")
        self._seq = 0

    # --- our interface -----------------------------------------------------------------------

    def refusal(self, key: bytes, subkey: str, order: Order, source: str = "") -> str | None:
        """Why a STORE of `subkey` with `order` from IP `source` would be refused, or None.

        Cheap (no signature involved): protocol asks it before verifying an entry."""
        subkeys = self._live(key, self._clock())
        if subkeys is None:
            if source and self._per_ip[source] >= self.max_entries_per_ip:
                return "storage full for this source ip"
            return "storage full" if len(self.data) >= self.max_keys else None
        current = subkeys.get(subkey)
        if current is not None:
            return "not newer than the held entry" if current.order >= order else None
        if len(subkeys) >= self.max_subkeys_per_key:
            return "key full"
        if source:
            if self._per_ip[source] >= self.max_entries_per_ip:
                return "storage full for this source ip"
            state = self._state[key]
            if state.per_ip[source] >= self.max_subkeys_per_ip:
                return "key full for this source ip"
            if state.per_prefix[source_prefix(source)] >= self.max_subkeys_per_prefix:
                return "key full for this source prefix"
        return None

    def merge(self, key: bytes, entry: SignedEntry, order: Order, source: str = "") -> bool:
        """Store `entry` under `key` unless refused (see `refusal`); True if stored."""
        now = self._clock()
        self._cull_now_and_then(now)
        deadline = min(entry.expires_at, now + self.max_ttl_s)
        if deadline <= now:
            return False
        reason = self.refusal(key, entry.subkey, order, source)
        if reason is not None:
            log.debug("storage.refused key=%s source=%s reason=%s", key.hex()[:12], source, reason)
            return False
        subkeys = self.data.get(key)
        if subkeys is None:
            subkeys = self.data[key] = {}
            self._state[key] = _KeyState()
        state = self._state[key]
        current = subkeys.get(entry.subkey)
        if current is None:
            self._seq += 1
            stored = StoredEntry(entry, order, deadline, self._seq, source)
            if source:
                self._count(state, source, 1)
            state.summary, state.seqs = None, None
        else:  # a refresh keeps the subkey's place and its source
            stored = StoredEntry(entry, order, deadline, current.seq, current.source)
        subkeys[entry.subkey] = stored
        state.next_deadline = min(state.next_deadline, deadline)
        self._last_merge[key] = time.monotonic()
        return True

    def has(self, key: bytes) -> bool:
        """True when `key` holds an unexpired entry."""
        return bool(self._live(key, self._clock()))

    def entries(self, key: bytes) -> list[SignedEntry]:
        """Unexpired entries under `key`, oldest first (in the order their subkeys were first seen)."""
        now = self._clock()
        self._cull_now_and_then(now)
        subkeys = self._live(key, now)
        return [stored.entry for stored in subkeys.values()] if subkeys else []

    def page(
        self, key: bytes, after: str | None, max_bytes: int
    ) -> tuple[list[SignedEntry], str | None]:
        """Entries first seen after cursor `after` that fit in `max_bytes`, oldest first, and the
        cursor of the next page (None: this was the last). Raises ValueError for a bad cursor.

        If not even the first entry fits, the page is empty and its cursor is where it began."""
        cursor = 0 if after is None else parse_cursor(after)
        subkeys = self._live(key, self._clock())
        if not subkeys:
            return [], None
        state = self._state[key]
        if state.seqs is None:
            state.seqs = [stored.seq for stored in subkeys.values()]
            state.subkeys = list(subkeys)
        selected: list[SignedEntry] = []
        size = 0
        for index in range(bisect.bisect_right(state.seqs, cursor), len(state.subkeys)):
            stored = subkeys[state.subkeys[index]]
            size += entry_bytes(stored.entry)
            if size > max_bytes:
                return selected, format_cursor(cursor)
            selected.append(stored.entry)
            cursor = stored.seq
        return selected, None

    def summary(self, key: bytes) -> tuple[int, bytes]:
        """How many entries `key` holds and an 8-byte digest of their subkeys (sorted)."""
        subkeys = self._live(key, self._clock())
        if not subkeys:
            return 0, subkey_digest([])
        state = self._state[key]
        if state.summary is None:
            state.summary = (len(subkeys), subkey_digest(subkeys))
        return state.summary

    def _live(self, key: bytes, now: float) -> dict[str, StoredEntry] | None:
        """The key's entries after dropping expired ones (scanned only when one is due)."""
        subkeys = self.data.get(key)
        if subkeys is None:
            return None
        state = self._state.get(key)
        if state is None:  # `data` was edited from outside (tests): start the bookkeeping again
            state = self._state[key] = _KeyState()
            for stored in subkeys.values():
                if stored.source:
                    state.per_ip[stored.source] += 1  # (the node-wide count was kept)
                    state.per_prefix[source_prefix(stored.source)] += 1
            state.next_deadline = -math.inf
        if now >= state.next_deadline:
            self._cull_key(key, subkeys, state, now)
        return self.data.get(key)

    def _count(self, state: _KeyState, source: str, delta: int) -> None:
        """Count one entry in (+1) or out (-1) of its source's caps."""
        for counter, label in (
            (state.per_ip, source),
            (state.per_prefix, source_prefix(source)),
            (self._per_ip, source),
        ):
            counter[label] += delta
            if counter[label] <= 0:
                del counter[label]

    def _cull_key(
        self, key: bytes, subkeys: dict[str, StoredEntry], state: _KeyState, now: float
    ) -> None:
        expired = [s for s, stored in subkeys.items() if stored.deadline <= now]
        for subkey in expired:
            stored = subkeys.pop(subkey)
            if stored.source:
                self._count(state, stored.source, -1)
        if expired:
            state.summary, state.seqs = None, None
        state.next_deadline = min((s.deadline for s in subkeys.values()), default=math.inf)
        if not subkeys:
            del self.data[key]
            self._state.pop(key, None)
            self._last_merge.pop(key, None)

    def touch(self, key: bytes) -> None:
        """Mark `key` as fresh (after republishing it), so iter_older_than skips it a while."""
        if key in self.data:
            self._last_merge[key] = time.monotonic()

    def _cull_now_and_then(self, now: float) -> None:
        if now - self._last_cull >= CULL_PERIOD_S or now < self._last_cull:
            self.cull(now)

    def cull(self, now: float | None = None) -> None:
        """Drop entries past their deadline, and keys left empty."""
        now = self._clock() if now is None else now
        self._last_cull = now
        for key in list(self.data):
            self._live(key, now)
        for key in [k for k in self._state if k not in self.data]:
            del self._state[key]

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
