"""KV cache budget accounting (pure)."""

from __future__ import annotations

import asyncio

import pytest

from beed.server.kv_budget import KVBudget
from protocol.errors import BadRequestError, DrainingError, ServerBusyError


def test_reserve_release_returns_to_zero():
    budget = KVBudget(capacity_tokens=100, bytes_per_token=8)
    budget.reserve("a", 60)
    assert budget.used_tokens == 60 and budget.used_bytes == 480
    with pytest.raises(ServerBusyError, match="server full") as info:
        budget.reserve("b", 50)
    assert info.value.retryable
    budget.release("a")
    budget.release("a")
    assert budget.used_tokens == 0 and len(budget) == 0
    budget.reserve("b", 50)


def test_oversized_and_invalid_requests_are_not_retryable():
    budget = KVBudget(capacity_tokens=10, bytes_per_token=1)
    with pytest.raises(BadRequestError, match="whole budget"):
        budget.reserve("a", 11)
    with pytest.raises(BadRequestError):
        budget.reserve("a", 0)
    budget.reserve("a", 1)
    with pytest.raises(BadRequestError, match="already"):
        budget.reserve("a", 1)


async def test_waiting_reservations_are_served_in_order_and_time_out_busy():
    budget = KVBudget(100, 1)
    budget.reserve("holder", 90)
    big = asyncio.ensure_future(budget.reserve_waiting("big", 60, 5.0))
    await asyncio.sleep(0.01)
    # A small newcomer would fit in the 10 free tokens, but the big one waits before it.
    small = asyncio.ensure_future(budget.reserve_waiting("small", 10, 5.0))
    await asyncio.sleep(0.01)
    assert budget.waiting == 2 and not small.done()
    with pytest.raises(ServerBusyError, match="2 sessions waiting before it"):
        await budget.reserve_waiting("impatient", 5, 0.0)
    budget.release("holder")
    assert (await big).tokens == 60 and (await small).tokens == 10
    assert budget.waiting == 0 and budget.free_tokens == 30
    with pytest.raises(ServerBusyError, match=r"server full.*\(waited 0\.\d s\)"):
        await budget.reserve_waiting("late", 40, 0.1)
    assert budget.waiting == 0


async def test_a_drain_refuses_waiting_reservations():
    budget = KVBudget(10, 1)
    budget.reserve("holder", 10)
    waiter = asyncio.ensure_future(budget.reserve_waiting("w", 5, 30.0))
    await asyncio.sleep(0.01)
    budget.refuse_waiters(DrainingError("shutting down"))
    with pytest.raises(DrainingError, match="shutting down"):
        await waiter
    assert budget.waiting == 0 and budget.used_tokens == 10
