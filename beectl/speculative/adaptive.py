"""How many tokens to draft: the length that maximises expected tokens per second.

A round that sends the pending token plus k drafts takes T(k) seconds (one trip through the
chain, the extra compute, the drafting) and yields E(k) = 1 + a + ... + a^k tokens when each
draft is accepted with probability a given the ones before it. Both are measured as the
generation runs: T(k) for each length tried (older rounds count less), and a from accepted and
refused drafts (a round that accepted all of its k drafts tells only that a is high: k
successes, no failure). T is not linear in k on every machine (on the 2-core reference CPU one
draft costs as much as four), so lengths not tried yet are estimated optimistically from their
neighbours, which gets them tried once. The chosen k has the largest E(k) / T(k); it is 0 (no
drafts) when nothing beats a plain step: a fast link, a compute-bound batch, drafts that miss.
The first decode round and every REBASE_EVERY-th drafted round go without drafts (they measure
T(0)); while drafting is off, every PROBE_EVERY-th round drafts anyway, so a change is noticed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protocol.errors import BadRequestError

MAX_DRAFT = 8  # the longest draft `auto` tries
PROBE_EVERY = 8
REBASE_EVERY = 32
DECAY = 0.9  # weight of the past per round
OPTIMISM = 0.02  # untried lengths: T(0) times this per draft beyond the longest tried


@dataclass(frozen=True)
class SpeculationConfig:
    """`beectl generate --speculate auto|off|N` (who drafts is the caller's choice)."""

    mode: str = "auto"  # "auto": adaptive length; "off"; "fixed": always `length`
    length: int = MAX_DRAFT  # fixed: the draft length; auto: the longest tried

    @classmethod
    def parse(cls, value: str | int | None) -> SpeculationConfig:
        """'auto', 'off' or a draft length N >= 0 (0 is off)."""
        if value is None or value == "auto":
            return cls("auto", MAX_DRAFT)
        if value == "off":
            return cls("off", 0)
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise BadRequestError(
                f"speculate must be 'auto', 'off' or a draft length, not {value!r}"
            ) from None
        if not 0 <= n <= 64:
            raise BadRequestError("a draft length must be between 0 and 64")
        return cls("fixed" if n else "off", n)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass
class SpeculationStats:
    rounds: int = 0  # verification steps that carried drafts
    proposed: int = 0  # drafted tokens sent
    accepted: int = 0  # drafted tokens kept

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class DraftLength:
    """Chooses each round's draft length (see the module doc)."""

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.successes, self.failures = 1.0, 1.0  # prior: a = 0.5
        self.times: dict[int, float] = {}  # draft length -> seconds per round (moving average)
        self._since_drafts = 0
        self._since_base = 0

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def round_time(self, k: int) -> float:
        """T(k): measured, or interpolated between measured lengths, or extrapolated from the
        longest one measured at OPTIMISM of T(0) per extra draft."""
        if k in self.times:
            return self.times[k]
        below = max(j for j in self.times if j < k)
        above = [j for j in self.times if j > k]
        if above:
            hi = min(above)
            share = (k - below) / (hi - below)
            return self.times[below] + share * (self.times[hi] - self.times[below])
        return self.times[below] + (k - below) * OPTIMISM * self.times[0]

    def choose(self, limit: int) -> int:
        """The draft length for the next round, at most `limit` (what the generation may still
        add after the pending token)."""
        if not self.config.enabled or limit <= 0:
            return 0
        longest = min(self.config.length, limit)
        if self.config.mode == "fixed":
            return longest
        if 0 not in self.times or self._since_base >= REBASE_EVERY:
            return 0  # measure a plain round
        rates = {k: self.expected_tokens(k) / self.round_time(k) for k in range(longest + 1)}
        best = max(rates, key=lambda k: rates[k])
        if rates[best] < rates[0] * 1.02:  # a gain smaller than the noise is no gain
            self._since_drafts += 1
            if self._since_drafts < PROBE_EVERY:
                return 0
            self._since_drafts = 0
            return max(range(1, longest + 1), key=lambda k: rates[k])
        self._since_drafts = 0
        return best

    def record(self, drafted: int, accepted: int, seconds: float) -> None:
        """A round that sent `drafted` drafts, kept `accepted` of them and took `seconds`."""
        old = self.times.get(drafted)
        self.times[drafted] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if drafted == 0:
            self._since_base = 0
            return
        self._since_base += 1
        self.successes = DECAY * self.successes + accepted
        self.failures = DECAY * self.failures + (1.0 if accepted < drafted else 0.0)
