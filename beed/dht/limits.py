"""Budgets against hostile peers: token buckets per source, source prefixes, proven addresses.

Pure bookkeeping with an injectable clock; `BeeProtocol` asks before it parses or verifies.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from beed.dht.config import DHTConfig

Clock = Callable[[], float]
Address = tuple[str, int]


@dataclass
class TokenBucket:
    """Holds up to `burst` tokens, refilled at `rate_hz` tokens per second."""

    rate_hz: float
    burst: float
    tokens: float
    stamp: float  # clock time of the last refill

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_hz)
        self.stamp = now
        return self.tokens


class BucketTable:
    """Token buckets by source, at most `size` of them (the least recently used is evicted).

    An evicted source starts again with a full bucket: the table bounds memory, the per-IP and
    global buckets bound what sources cycling through the table can get.
    """

    def __init__(self, rate_hz: float, burst: int, size: int) -> None:
        self.rate_hz, self.burst, self.size = rate_hz, float(burst), size
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def get(self, source: Hashable, now: float) -> TokenBucket:
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = TokenBucket(self.rate_hz, self.burst, self.burst, now)
            while len(self._buckets) > self.size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def _take(buckets: list[TokenBucket], now: float) -> bool:
    """Take one token from each bucket if every one has a token; else take none."""
    if any(b.refill(now) < 1.0 for b in buckets):
        return False
    for bucket in buckets:
        bucket.tokens -= 1.0
    return True


class RateLimiter:
    """The request budget (per address, per IP, global) and the STORE budget (per IP, global)."""

    def __init__(self, config: DHTConfig, clock: Clock = time.monotonic) -> None:
        c, now = config, clock()
        self._clock = clock
        self.per_address = BucketTable(
            c.request_rate_per_address_hz, c.request_burst_per_address, c.rate_table_size
        )
        self.per_ip = BucketTable(
            c.request_rate_per_ip_hz, c.request_burst_per_ip, c.rate_table_size
        )
        self.total = TokenBucket(c.request_rate_hz, c.request_burst, c.request_burst, now)
        self.stores_per_ip = BucketTable(
            c.store_rate_per_ip_hz, c.store_burst_per_ip, c.rate_table_size
        )
        self.stores = TokenBucket(c.store_rate_hz, c.store_burst, c.store_burst, now)

    def allow_request(self, address: Address) -> bool:
        now = self._clock()
        if self.total.refill(now) < 1.0:  # a flood of spoofed sources stops here, table untouched
            return False
        buckets = [self.total, self.per_ip.get(address[0], now), self.per_address.get(address, now)]
        return _take(buckets, now)

    def allow_store(self, ip: str) -> bool:
        now = self._clock()
        if self.stores.refill(now) < 1.0:
            return False
        return _take([self.stores, self.stores_per_ip.get(ip, now)], now)


class ProvenAddresses:
    """Addresses that answered one of our requests recently (so they are not spoofed)."""

    def __init__(self, ttl_s: float, size: int, clock: Clock = time.monotonic) -> None:
        self.ttl_s, self.size, self._clock = ttl_s, size, clock
        self._seen: OrderedDict[Address, float] = OrderedDict()

    def add(self, address: Address) -> None:
        self._seen[address] = self._clock()
        self._seen.move_to_end(address)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def __contains__(self, address: object) -> bool:
        seen = self._seen.get(address)  # type: ignore[call-overload]
        return seen is not None and self._clock() - seen < self.ttl_s

    def __len__(self) -> int:
        return len(self._seen)


def source_prefix(ip: str) -> str:
    """The network an address belongs to for per-prefix caps: its /24 (IPv4) or /48 (IPv6)."""
    try:
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    bits = 24 if parsed.version == 4 else 48
    return str(ipaddress.ip_network(f"{parsed}/{bits}", strict=False))
