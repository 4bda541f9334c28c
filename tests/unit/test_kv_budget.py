"""KV cache budget accounting (pure)."""

from __future__ import annotations

import pytest

from beed.server.kv_budget import KVBudget
from protocol.errors import BadRequestError, ServerBusyError


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
