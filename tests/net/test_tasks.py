"""TaskOwner: a crashed child stops its owner (siblings cancelled, on_crash told); isolated owners
only log; aclose cancels everything."""

from __future__ import annotations

import asyncio
import contextlib

from beed.net.tasks import TaskOwner


async def _boom() -> None:
    await asyncio.sleep(0)
    raise RuntimeError("boom")


async def test_crashed_child_cancels_siblings_and_tells_owner() -> None:
    crashes: list[BaseException] = []
    owner = TaskOwner("t", on_crash=crashes.append)
    sibling = owner.spawn(asyncio.sleep(60), "sleeper")
    owner.spawn(_boom(), "boom")
    assert sibling is not None
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(sibling), 2.0)
    assert sibling.cancelled()
    assert len(crashes) == 1 and str(crashes[0]) == "boom"
    assert isinstance(owner.failure, RuntimeError)
    # A failed owner starts nothing new.
    coro = asyncio.sleep(1)
    assert owner.spawn(coro, "late") is None
    await owner.aclose()
    assert len(owner) == 0


async def test_isolated_owner_keeps_other_children() -> None:
    owner = TaskOwner("t", isolate=True)
    sibling = owner.spawn(asyncio.sleep(60), "sleeper")
    crashed = owner.spawn(_boom(), "boom")
    assert sibling is not None and crashed is not None
    await asyncio.wait([crashed])
    await asyncio.sleep(0)
    assert not sibling.done() and owner.failure is None
    assert owner.spawn(asyncio.sleep(0), "more") is not None
    await owner.aclose()
    assert sibling.cancelled() and len(owner) == 0
