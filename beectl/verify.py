"""Spot checks of servers' results: which steps to re-run elsewhere, what counts as equal, who lost.

A server's answer is plausible by construction (shape, dtype and finite values are checked in
replies.py), so a server that adds a small push to its outputs changes the text unseen. The
client re-runs a sampled share of the steps (`verify_rate`), and every new server's first
`verify_first_steps` steps, on other servers of the same blocks: a replica, or any other split of
them (the hop's whole history is replayed there, as failover does), and compares the outputs.
The step waits for the check, so a wrong answer never reaches the head: the hop fails over and
the step is recomputed. Which side lied is decided by a third opinion where one exists;
without one, the checked server loses (the route chose it, so a server that bought its routes by
overclaiming is the likelier liar) — docs/security.md says what this cannot catch.

Equal means: at every position the mask keeps, the largest difference is within the dtype's
share of the largest value (`TOLERANCE`). Honest servers differ only by the order of their sums
(thread counts, batching, another split): about 1e-7 of the largest value in float32.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from beectl.bans import BanList
from beectl.routing import Hop
from protocol.errors import InvalidReplyError

log = logging.getLogger(__name__)

# The hop's output for its last step from other servers of its blocks, leaving out the given
# peer ids: (output, the servers that computed it), or None when there are none.
Rerun = Callable[[frozenset[str]], Awaitable[tuple[torch.Tensor, list[str]] | None]]

# Largest |ours - theirs| over the largest |theirs|, per dtype of the compared outputs.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
BAN_S = 24 * 3600.0  # a server caught returning wrong results is not used again by this client


@dataclass
class VerifyStats:
    checked: int = 0  # hop steps re-run elsewhere and compared
    mismatches: int = 0  # of those, the ones where the checked server was found wrong
    unverifiable: int = 0  # sampled, but no other server of those blocks was available
    caught_at: list[int] = field(default_factory=list)  # per mismatch: the server's step number

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "mismatches": self.mismatches,
            "unverifiable": self.unverifiable,
            "caught_at_step": list(self.caught_at),
        }


@dataclass
class Verifier:
    """Which hop steps this client checks (one per client: a server is new once)."""

    rate: float = 0.02
    first_steps: int = 2
    rng: random.Random = field(default_factory=random.Random)
    stats: VerifyStats = field(default_factory=VerifyStats)
    _seen: dict[str, int] = field(default_factory=dict)  # peer id -> its steps so far

    def wants(self, peer_id: str) -> bool:
        """Whether to check this server's current step (counts it)."""
        if self.rate <= 0 and self.first_steps <= 0:
            return False
        seen = self._seen.get(peer_id, 0)
        self._seen[peer_id] = seen + 1
        return seen < self.first_steps or self.rng.random() < self.rate

    def steps_of(self, peer_id: str) -> int:
        """Steps of this server seen so far (the current one included)."""
        return self._seen.get(peer_id, 0)


def difference(ours: torch.Tensor, theirs: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """The largest |ours - theirs| at kept positions ([batch, tokens] mask, 1 = compared), over
    the largest |theirs| there (0 when nothing is kept)."""
    a, b = ours.float(), theirs.float()
    if keep is not None:
        rows = keep.bool()
        a, b = a[rows], b[rows]
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    scale = b.abs().max().clamp_min(1e-6)
    return float((a - b).abs().max() / scale)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


async def check_step(
    verifier: Verifier,
    bans: BanList,
    hop: Hop,
    position: int,
    ours: torch.Tensor,
    keep: torch.Tensor | None,
    rerun: Rerun,
) -> None:
    """Compare a hop's answer `ours` (its step at `position`) with other servers' (`rerun`);
    InvalidReplyError when the hop's server is found wrong (it is banned then)."""
    stats = verifier.stats
    peer = hop.peer_id
    tokens = ours.shape[1]
    limit = tolerance(ours.dtype)
    other = await rerun(frozenset({peer}))
    if other is None:
        stats.unverifiable += 1
        return
    stats.checked += 1
    theirs, verifiers = other
    diff = difference(ours, theirs[:, -tokens:], keep)
    if diff <= limit:
        log.debug("verify.ok peer=%s diff=%.3g", peer[:8], diff)
        return
    # Two servers disagree: a third opinion decides where there is one.
    third = await rerun(frozenset({peer, *verifiers}))
    if third is not None and difference(ours, third[0][:, -tokens:], keep) <= limit:
        for v in verifiers:
            bans.ban(v, seconds=BAN_S)
        log.warning(
            "verify.mismatch_verifier peer=%s span=%d:%d position=%d diff=%.3g verifiers=%s "
            "third=%s: the verifiers were wrong; banned",
            peer[:8],
            hop.start,
            hop.end,
            position,
            diff,
            ",".join(v[:8] for v in verifiers),
            ",".join(v[:8] for v in third[1]),
        )
        return
    stats.mismatches += 1
    stats.caught_at.append(verifier.steps_of(peer))
    bans.ban(peer, seconds=BAN_S)
    log.warning(
        "verify.mismatch peer=%s span=%d:%d position=%d tokens=%d diff=%.3g tolerance=%.3g "
        "verifiers=%s third=%s: banned, the step is recomputed elsewhere",
        peer[:8],
        hop.start,
        hop.end,
        position,
        tokens,
        diff,
        limit,
        ",".join(v[:8] for v in verifiers),
        "none" if third is None else ",".join(v[:8] for v in third[1]),
    )
    raise InvalidReplyError(
        f"server {peer[:8]} answered blocks {hop.start}:{hop.end} differently from "
        f"{len(verifiers)} other server(s) (difference {diff:.3g}, tolerance {limit:.3g})"
    )
