"""What one connection knows about its link: round-trip time and throughput, from its own traffic.

Round trip: the Hello exchange, and a Ping (type 2) whose Pong comes straight back. Throughput:
after a frame of at least `PROBE_BYTES` the sender writes a Ping; the peer answers it once it
has read the whole frame (a connection reads in order), so the Pong arrives after about
`frame / throughput + rtt` and `frame / (elapsed - min rtt)` is the throughput of the link in
the sending direction, compressed bytes as they crossed it (the best of the recent samples:
every disturbance makes a sample low, never high). Both estimates feed the sender's
codec policy (`policy_for`): compression switches on where the link, not the CPU, is the limit.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field

from protocol.codecs import CodecPolicy

PROBE_BYTES = 64 * 1024  # frames at least this large are followed by a throughput probe
RTT_PROBE_PERIOD_S = 30.0  # a connection in use re-measures its round trip this often
RATE_SAMPLES = 8  # the throughput is the best of this many recent samples
RATE_CHANGE = 0.2  # the codec policy is rebuilt when the throughput moved by this share
COMPRESSION_MODES = ("auto", "off")


@dataclass
class LinkStats:
    """Round trip and sending throughput of one connection, as measured so far."""

    rtt_s: float | None = None  # smoothed round trip
    min_rtt_s: float | None = None  # the least seen: the part of a probe that is not transfer
    # Throughput of our frames to the peer: the best of the recent samples (a sample only errs
    # low: anything queued ahead of the Pong, a busy peer, scheduling delays add time).
    send_bytes_per_s: float | None = None
    rtt_samples: int = 0
    rate_samples: int = 0
    last_rtt_probe: float = 0.0  # monotonic time of the last round-trip probe sent
    _probes: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)
    _rates: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RATE_SAMPLES), repr=False
    )
    _next_nonce: int = field(default_factory=lambda: random.getrandbits(48), repr=False)

    def add_rtt(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        self.rtt_samples += 1
        self.min_rtt_s = seconds if self.min_rtt_s is None else min(self.min_rtt_s, seconds)
        self.rtt_s = seconds if self.rtt_s is None else 0.7 * self.rtt_s + 0.3 * seconds

    def add_rate(self, nbytes: int, seconds: float) -> None:
        transfer = seconds - (self.min_rtt_s or 0.0)
        if nbytes <= 0 or not math.isfinite(transfer):
            return
        rate = nbytes / max(transfer, 1e-4)  # a transfer hidden in the rtt's noise: fast link
        self.rate_samples += 1
        self._rates.append(rate)
        self.send_bytes_per_s = max(self._rates)

    def probe(self, nbytes: int, now: float | None = None) -> int:
        """A nonce for a Ping sent now: after a frame of `nbytes` (throughput), or 0 (rtt)."""
        nonce = self._next_nonce
        self._next_nonce += 1
        now = time.monotonic() if now is None else now
        if not nbytes:
            self.last_rtt_probe = now
        self._probes[nonce] = (now, nbytes)
        if len(self._probes) > 64:  # peers that never answer must not grow this
            self._probes.pop(next(iter(self._probes)))
        return nonce

    def pong(self, nonce: int, now: float | None = None) -> bool:
        """Account for the Pong of a probe; False if the nonce is not ours."""
        sent = self._probes.pop(nonce, None)
        if sent is None:
            return False
        elapsed = (time.monotonic() if now is None else now) - sent[0]
        if sent[1]:
            self.add_rate(sent[1], elapsed)
        else:
            self.add_rtt(elapsed)
        return True

    def rtt_probe_due(self, now: float) -> bool:
        return now - self.last_rtt_probe >= RTT_PROBE_PERIOD_S


def policy_for(current: CodecPolicy, stats: LinkStats, compression: str) -> CodecPolicy:
    """The codec policy for the link as measured: raw while unknown or with compression off;
    otherwise the cost model with the measured throughput (rebuilt only on a real change)."""
    if compression == "off" or stats.send_bytes_per_s is None:
        return current
    old = current.link_bytes_per_s
    new = stats.send_bytes_per_s
    if old is not None and abs(new - old) <= RATE_CHANGE * old:
        return current
    return dataclasses.replace(current, link_bytes_per_s=new, _choices={})
