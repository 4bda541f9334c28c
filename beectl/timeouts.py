"""How long to wait for one hop's answer: adapted to how fast that server has answered so far.

A fixed step timeout must cover a long prefill on a slow server, so a server that hangs on a
one-token decode step would cost the whole of it (a minute). Decode-sized steps instead wait a
multiple of the hop's recent answer times (never less than a floor that absorbs a GC pause or a
burst of other sessions' steps); large steps, and a hop's first few steps, keep the fixed one.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE_STEP_TOKENS = 8  # rows x tokens of a step that is timed adaptively
WARMUP_SAMPLES = 3  # answers seen before the adaptive timeout applies


@dataclass
class HopTimer:
    """Recent answer times of one hop (seconds) and the timeout they imply."""

    floor_s: float  # shortest adaptive timeout
    ceiling_s: float  # the fixed step timeout (large steps, warm-up)
    factor: float = 10.0  # the timeout is this many times the typical answer time
    typical_s: float = 0.0  # exponentially weighted mean of decode-sized answer times
    samples: int = 0

    def timeout_s(self, rows_x_tokens: int) -> float:
        if rows_x_tokens > DECODE_STEP_TOKENS or self.samples < WARMUP_SAMPLES:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.factor * self.typical_s))

    def observe(self, rows_x_tokens: int, seconds: float) -> None:
        if rows_x_tokens > DECODE_STEP_TOKENS:
            return
        self.typical_s = seconds if not self.samples else 0.8 * self.typical_s + 0.2 * seconds
        self.samples += 1
