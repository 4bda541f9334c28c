"""A session's open hops and one step's trip through a run of them (relayed or pushed).

`send_chain` sends one Step to the first hop of a run; with push, each server sends its output on
to the next and every hop answers the client with a copy, so the client gets every hop's result
(and each hop's input, kept in its history for failover) from one send. Failures come back as
`ChainBroken` with the replies received so far, for the session to fail over from there.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from beectl.config import ClientConfig
from beectl.history import History
from beectl.replies import checked_step_result
from beectl.routing import Hop
from beectl.timeouts import HopTimer
from beed.net.peer import PeerConnection
from protocol.errors import BadRequestError, BeeError, ConnectionClosed
from protocol.messages import Message, Step, StepResult


@dataclass
class OpenHop:
    """One hop of a session's route, with its server session open."""

    hop: Hop
    conn: PeerConnection
    stream_id: int
    push_token: str = ""  # the server session accepts pushes with it ("" = relayed only)
    history: History = field(default_factory=History)
    timer: HopTimer | None = None  # its answer times (adaptive step timeouts)

    def next_hop(self) -> dict[str, object]:
        """This hop as a route entry for the previous hop's push."""
        server = self.hop.server
        entry: dict[str, object] = {
            "host": server.host,
            "port": server.port,
            "peer_id": server.peer_id,
            "token": self.push_token,
        }
        if server.tls:
            entry["tls"] = True
        if server.dial_relays:
            entry["relays"] = [r.as_list() for r in server.dial_relays]
        return entry

    def timer_for(self, config: ClientConfig) -> HopTimer:
        if self.timer is None:
            self.timer = HopTimer(config.min_step_timeout_s, config.step_timeout_s)
        return self.timer


# What the session does with each hop's reply before it counts (speeds, spot checks).
HopCheck = Callable[["OpenHop", StepResult, int, float], Awaitable[None]]


class PushFailedError(ConnectionClosed):
    """A server could not push its output to the next hop; the client sends it itself."""


class ChainBroken(Exception):
    """A step through several hops stopped at `done` hops: `error` is the next hop's failure."""

    def __init__(self, done: list[StepResult], error: BeeError) -> None:
        super().__init__(str(error))
        self.done, self.error = done, error


def takes_trees(h: OpenHop) -> bool:
    """Whether the hop's server runs tree steps (an older one would read a tree step as a
    causal one, silently wrong)."""
    hello = h.conn.remote_hello
    return hello is not None and "tree" in hello.features


def check_takes_trees(h: OpenHop, tree: torch.Tensor | None) -> None:
    if tree is not None and not takes_trees(h):
        raise BadRequestError(f"server {h.hop.peer_id[:8]} does not run tree steps")


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Each token's depth in a tree step [batch, tokens] (0: it follows the cache)."""
    out = torch.zeros_like(parents)
    for j in range(parents.shape[1]):
        p = parents[:, j]
        has = p >= 0
        out[has, j] = out[has, p[has]] + 1
    return out


def push_run(hops: list[OpenHop], index: int) -> int:
    """How many hops from `index` one Step reaches: all the rest when every one of them accepts
    pushes (and push is on), else just the one."""
    count = 1
    while index + count < len(hops) and hops[index + count].push_token:
        count += 1
    return count


async def send_chain(
    hops: list[OpenHop],
    step_id: int,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    position: int,
    config: ClientConfig,
    tree: torch.Tensor | None = None,
    check: HopCheck | None = None,
) -> list[StepResult]:
    """One Step to `hops[0]` that servers push through the rest; the replies of all of them
    (each hop's output is the next one's input, kept in its history). Raises ChainBroken with
    the replies so far when a hop fails. `check(hop, reply, rows x tokens, compute seconds)`
    sees each hop's reply before it counts (its BeeError fails the hop)."""
    done: list[StepResult] = []
    first = hops[0]
    # Before anything can fail: a replacement of the first hop replays its history, and must
    # replay this step too (its connection may be gone already, when an earlier hop's failure
    # took the same relay or host down with it).
    first.history.add(position, hidden, mask, position_ids, tree)
    # Per hop: its result, and (all but the last) a notice that its push failed after it
    # answered (the server confirms the next hop's Ack after sending its copy).
    results: list[asyncio.Future[Message]] = []
    for j, h in enumerate(hops):
        try:
            results.append(h.conn.expect_step(h.stream_id, step_id, 4 * hidden.numel()))
        except BeeError as exc:  # this hop's connection is gone already
            if j == 0:
                raise ChainBroken(done, exc) from exc
            hops = hops[:j]  # go as far as the hop before; this one fails on its own turn
            break
    notices = [h.conn.expect_step(h.stream_id, step_id, 4 * hidden.numel()) for h in hops[:-1]]
    try:
        try:
            for h in hops:
                check_takes_trees(h, tree)
            step = Step(
                first.stream_id,
                step_id,
                position,
                hidden,
                mask,
                position_ids,
                next_hops=tuple(h.next_hop() for h in hops[1:]),
                tree=tree,
            )
            await first.conn.send(step, config.step_timeout_s)
        except BeeError as exc:
            raise ChainBroken(done, exc) from exc
        size = hidden.shape[0] * hidden.shape[1]
        since = time.monotonic()
        for j, h in enumerate(hops):
            timer = h.timer_for(config)
            try:
                reply = await _hop_result(
                    h, results[j], notices[j - 1] if j else None, timer.timeout_s(size)
                )
            except BeeError as exc:
                raise ChainBroken(done, exc) from exc
            now = time.monotonic()
            timer.observe(size, now - since)
            # The interval less the link: a round trip to the first hop, half of one after a push.
            link = h.conn.link
            rtt = (link.min_rtt_s or 0.0) if link is not None else 0.0
            compute_s = now - since - (rtt if j == 0 else rtt / 2)
            since = now
            try:
                reply = checked_step_result(reply, hidden.shape)
                if check is not None:
                    await check(h, reply, size, compute_s)
            except BeeError as exc:
                raise ChainBroken(done, exc) from exc
            done.append(reply)
            if j + 1 < len(hops):
                hops[j + 1].history.add(position, reply.hidden, mask, position_ids, tree)
                if reply.push_error:
                    raise ChainBroken(done, PushFailedError(reply.push_error))
        return done
    finally:
        for h in hops:
            h.conn.forget_step(h.stream_id, step_id)


async def _hop_result(
    h: OpenHop,
    result: asyncio.Future[Message],
    notice: asyncio.Future[Message] | None,
    timeout_s: float,
) -> Message:
    """Hop h's StepResult; PushFailedError if, first, the previous hop reports that its push to
    h failed (h will never answer then)."""
    if notice is not None:
        await asyncio.wait({result, notice}, timeout=timeout_s, return_when=FIRST_COMPLETED)
        if not result.done() and notice.done() and not notice.cancelled():
            late = notice.result() if notice.exception() is None else None
            if isinstance(late, StepResult) and late.push_error:
                raise PushFailedError(late.push_error)
    return await h.conn.wait(result, "Step", timeout_s)
