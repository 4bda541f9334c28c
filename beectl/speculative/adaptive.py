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
T(0)); while drafting is off, a round drafts anyway now and then (after PROBE_EVERY plain rounds,
then twice as many after each probe that did not pay, up to MAX_PROBE_EVERY), so a change is
noticed without paying for probes all along a long generation.

A batch keeps a draft only where every row accepts it, so before anything is measured a batch of
B rows expects a^B (each row: the prior a = 1/2), and where speculation cannot pay (a big batch,
compute-bound servers) it is not tried at all until a probe.

Tree drafts (tree.py) add a width w, the branches proposed: a round of depth k and width w
sends about k * w tokens, and its acceptance a_w (how often the walk goes one level deeper) is
measured per width. Widths not tried yet start a little more optimistic than the linear a (per
row: a^(1/B) plus WIDTH_OPTIMISM per extra branch, so each is tried), then follow what they do; the (k, w) with the largest E_w(k) / T(k * w) wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protocol.errors import BadRequestError

MAX_DRAFT = 8  # the longest draft `auto` tries
PROBE_EVERY = 8
MAX_PROBE_EVERY = 64
REBASE_EVERY = 32
DECAY = 0.9  # weight of the past per round
OPTIMISM = 0.02  # untried lengths: T(0) times this per draft and row beyond the longest tried
WIDTHS = (1, 2, 4)  # the tree widths `auto` tries where the servers take tree steps
MAX_NODES = 32  # the most drafted tokens of one tree round
WIDTH_OPTIMISM = 0.1  # an untried width's acceptance: the linear one plus this per extra branch


@dataclass(frozen=True)
class SpeculationConfig:
    """`beectl generate --speculate auto|off|N|NxW` (who drafts is the caller's choice)."""

    mode: str = "auto"  # "auto": adaptive length and width; "off"; "fixed": always `length`
    length: int = MAX_DRAFT  # fixed: the draft length (tree depth); auto: the longest tried
    width: int = 0  # fixed: the tree width (1: a linear draft); auto: 0 (adaptive)

    @classmethod
    def parse(cls, value: str | int | None) -> SpeculationConfig:
        """'auto', 'off', a draft length N >= 0 (0 is off), or NxW: trees of depth N and W
        branches."""
        if value is None or value == "auto":
            return cls("auto", MAX_DRAFT)
        if value == "off":
            return cls("off", 0)
        text = str(value)
        depth, times, branches = text.partition("x")
        try:
            n = int(depth)
            w = int(branches) if times else 1
        except (TypeError, ValueError):
            raise BadRequestError(
                f"speculate must be 'auto', 'off', a draft length N or NxW (depth x branches), "
                f"not {value!r}"
            ) from None
        if not 0 <= n <= 64:
            raise BadRequestError("a draft length must be between 0 and 64")
        if not 1 <= w <= 16 or n * w > 256:
            raise BadRequestError("a tree has 1 to 16 branches and at most 256 drafted tokens")
        return cls("fixed" if n else "off", n, w if n else 0)

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
    """Chooses each round's draft length, and tree width (see the module doc)."""

    def __init__(self, config: SpeculationConfig, rows: int = 1) -> None:
        self.config = config
        self.rows = max(1, rows)
        prior = 0.5**self.rows  # every row accepts, each with a = 1/2
        self.successes, self.failures = 2 * prior, 2 - 2 * prior
        self.by_width: dict[int, list[float]] = {}  # width > 1 -> [successes, failures]
        self.times: dict[int, float] = {}  # drafted tokens -> seconds per round (moving average)
        self._since_drafts = 0
        self._probe_every = PROBE_EVERY
        self._since_base = 0

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    def width_acceptance(self, width: int) -> float:
        if width <= 1:
            return self.acceptance
        counts = self.by_width.get(width)
        if counts is None:
            per_row = self.acceptance ** (1 / self.rows)
            return min(0.95, per_row + WIDTH_OPTIMISM * (width - 1)) ** self.rows
        return counts[0] / (counts[0] + counts[1])

    def expected_tokens(self, k: int, width: int = 1) -> float:
        a = min(self.width_acceptance(width), 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def round_time(self, k: int) -> float:
        """T(k): measured, or interpolated between measured lengths, or extrapolated from the
        longest one measured at OPTIMISM of T(0) per extra draft and row (a batch computes each
        draft once per row)."""
        if k in self.times:
            return self.times[k]
        below = max(j for j in self.times if j < k)
        above = [j for j in self.times if j > k]
        if above:
            hi = min(above)
            share = (k - below) / (hi - below)
            return self.times[below] + share * (self.times[hi] - self.times[below])
        return self.times[below] + (k - below) * OPTIMISM * self.rows * self.times[0]

    def choose(self, limit: int) -> int:
        """The draft length for the next round, at most `limit` (what the generation may still
        add after the pending token)."""
        return self.plan(limit, trees=False)[0]

    def plan(self, limit: int, *, trees: bool) -> tuple[int, int]:
        """(draft length, width) for the next round; width > 1 only where `trees` (the route
        takes tree steps)."""
        if not self.config.enabled or limit <= 0:
            return 0, 1
        longest = min(self.config.length, limit)
        if self.config.mode == "fixed":
            return longest, max(1, self.config.width) if trees else 1
        if 0 not in self.times or self._since_base >= REBASE_EVERY:
            return 0, 1  # measure a plain round
        widths = WIDTHS if trees else (1,)
        rates = {
            (k, w): self.expected_tokens(k, w) / self.round_time(k * w)
            for w in widths
            for k in range(1 if w > 1 else 0, longest + 1)
            if k * w <= MAX_NODES
        }
        best = max(rates, key=lambda kw: rates[kw])
        if rates[best] < rates[(0, 1)] * 1.02:  # a gain smaller than the noise is no gain
            self._since_drafts += 1
            if self._since_drafts < self._probe_every:
                return 0, 1
            self._since_drafts = 0
            self._probe_every = min(2 * self._probe_every, MAX_PROBE_EVERY)
            return max((kw for kw in rates if kw[0]), key=lambda kw: rates[kw])
        self._since_drafts = 0
        self._probe_every = PROBE_EVERY
        return best

    def record(
        self, drafted: int, accepted: int, seconds: float, width: int = 1, depth: int = 0
    ) -> None:
        """A round that sent `drafted` drafted tokens (a tree's nodes: `width` branches asked
        for, `depth` deep), kept `accepted` of them and took `seconds`."""
        old = self.times.get(drafted)
        self.times[drafted] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if drafted == 0:
            self._since_base = 0
            return
        self._since_base += 1
        if width > 1:
            counts = self.by_width.setdefault(width, [1.0, 1.0])
            counts[0] = DECAY * counts[0] + accepted
            counts[1] = DECAY * counts[1] + (1.0 if accepted < depth else 0.0)
            return
        self.successes = DECAY * self.successes + accepted
        self.failures = DECAY * self.failures + (1.0 if accepted < drafted else 0.0)
