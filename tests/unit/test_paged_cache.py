"""The preallocated paged KV cache (beed/models/paged_cache.py) against transformers' dynamic one.

Both run the same transformers layers; only where keys and values live and how the mask is built
differ, so every step must agree (float32: within 1e-5; the dynamic path itself equals the local
model, tests/swarm).
"""

from __future__ import annotations

import gc

import pytest
import torch

from beed.models.paged_cache import PAGE_TOKENS, KVArena, PagedSpanCache, causal_mask
from beed.server.backend import BlockBackend, StepRequest
from protocol.errors import BadRequestError, ServerBusyError
from tests.tiny_models import make_tiny_llama
from tests.unit.test_models import make_tiny_gemma3

TOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request, tmp_path_factory) -> tuple[BlockBackend, BlockBackend]:
    path = tmp_path_factory.mktemp(request.param) / request.param
    (make_tiny_llama if request.param == "llama" else make_tiny_gemma3)(path)
    paged = BlockBackend(path, 0, 4, kv_cache="paged")
    paged.allocate_kv(512)
    return BlockBackend(path, 0, 4, kv_cache="dynamic"), paged


def hidden(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL


def test_steps_rollback_and_a_sliding_window_match_the_dynamic_cache(pair):
    dynamic, paged = pair
    blocks = range(4)
    d, p = dynamic.new_cache(), paged.new_cache()
    assert isinstance(p, PagedSpanCache)
    # 12 prompt tokens (past gemma3's window of 8), then single tokens: prefill, decode.
    assert close(
        dynamic.step(d, blocks, hidden(1, 12, 1), 0), paged.step(p, blocks, hidden(1, 12, 1), 0)
    )
    for pos in range(12, 20):
        x = hidden(1, 1, pos)
        assert close(dynamic.step(d, blocks, x, pos), paged.step(p, blocks, x, pos)), pos
    assert p.snapshot() == [20] * 4 and p.capacity == 2 * PAGE_TOKENS
    # The paged cache keeps every position, also in sliding-window blocks: it rolls back anywhere.
    first = paged.step(p, blocks, hidden(1, 1, 99), 20)
    p.rollback(blocks, 3)
    fresh = paged.new_cache()
    paged.step(fresh, blocks, hidden(1, 12, 1)[:, :3], 0)
    # (equal up to rounding: the kept positions came from a 12-row product, the fresh ones from 3)
    assert close(
        paged.step(p, blocks, hidden(1, 2, 7), 3), paged.step(fresh, blocks, hidden(1, 2, 7), 3)
    )
    with pytest.raises(BadRequestError, match="cannot truncate to 9"):
        p.rollback(blocks, 9)
    del first


def test_left_padding_and_a_batch_of_sequences(pair):
    dynamic, paged = pair
    blocks = range(4)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # the second sequence is left-padded by 3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    d, p = dynamic.new_cache(), paged.new_cache()
    x = hidden(2, 6, 3)
    a = dynamic.step(d, blocks, x, 0, mask[:, :6], positions[:, :6])
    b = paged.step(p, blocks, x, 0, mask[:, :6], positions[:, :6])
    assert close(a[0], b[0]) and close(a[1, 3:], b[1, 3:])  # padded positions are never read
    x = hidden(2, 1, 4)
    a = dynamic.step(d, blocks, x, 6, mask, positions[:, 6:])
    b = paged.step(p, blocks, x, 6, mask, positions[:, 6:])
    assert close(a, b)
    with pytest.raises(BadRequestError, match="2 sequences"):
        paged.step(p, blocks, hidden(1, 1, 5), 7)


def test_merged_steps_of_several_sessions_match_each_alone(pair):
    _, paged = pair
    blocks = range(4)
    caches = [paged.new_cache() for _ in range(3)]
    alone = [paged.new_cache() for _ in range(3)]
    for i, (c, a) in enumerate(zip(caches, alone, strict=True)):
        paged.step(c, blocks, hidden(1, 3 + i, i), 0)
        paged.step(a, blocks, hidden(1, 3 + i, i), 0)
    requests = [StepRequest(c, blocks, hidden(1, 1, 10 + i), 3 + i) for i, c in enumerate(caches)]
    merged = paged.step_many(requests)
    for i, a in enumerate(alone):
        out = merged[i]
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, paged.step(a, blocks, hidden(1, 1, 10 + i), 3 + i))  # per-session


def test_pages_come_back_when_a_cache_goes_and_a_full_arena_refuses_before_writing(pair):
    _, paged = pair
    arena = paged.arena
    assert arena is not None
    gc.collect()  # caches of earlier tests held by their pytest.raises tracebacks
    free = arena.free_pages
    cache = paged.new_cache()
    paged.step(cache, range(4), hidden(1, 40, 1), 0)  # 3 pages
    assert arena.free_pages == free - 3
    del cache
    gc.collect()
    assert arena.free_pages == free
    greedy = paged.new_cache()
    with pytest.raises(ServerBusyError, match="free pages"):
        paged.step(greedy, range(4), hidden(1, 16 * (free + 1), 2), 0)
    assert greedy.snapshot() == [0] * 4 and arena.free_pages == free


def test_an_arena_hands_out_each_page_once():
    arena = KVArena(1, 1, 4, 64, dtype=torch.float32, device=torch.device("cpu"))
    assert arena.pages == 5 and arena.free_pages == 4  # page 0 is scratch
    a, b = arena.take(3), arena.take(1)
    assert sorted(a + b) == [1, 2, 3, 4]
    with pytest.raises(ServerBusyError):
        arena.take(1)
    arena.give(a)
    assert arena.free_pages == 3 and a == []


def test_the_mask_is_causal_padded_windowed_and_never_empty():
    past = torch.tensor([2, 0])
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    m = causal_mask(past, 3, 5, pad, window=2)[:, 0]
    assert m[0].tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]
    # Sequence 1's queries at padded positions 0 and 1 may see nothing: they see every key.
    assert (
        m[1, 0].all() and m[1, 1].all() and m[1, 2].tolist() == [False, False, True, False, False]
    )


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def graphed(request, tmp_path_factory) -> tuple[BlockBackend, BlockBackend]:
    """A backend whose one-token steps take the decode-graph path (run without capture on a
    CPU: the same static buffers, arena gathers and in-graph masks), and a plain paged one."""
    path = tmp_path_factory.mktemp(request.param) / request.param
    (make_tiny_llama if request.param == "llama" else make_tiny_gemma3)(path)
    backends = []
    for graphs in (True, False):
        backend = BlockBackend(path, 0, 4, kv_cache="paged", decode_graphs=graphs)
        backend.allocate_kv(2048)
        backends.append(backend)
    return backends[0], backends[1]


def test_the_decode_graph_path_matches_the_eager_path(graphed):
    fast, eager = graphed
    assert fast.graphs is not None and eager.graphs is None
    blocks = range(4)
    f, e = fast.new_cache(), eager.new_cache()
    assert torch.equal(
        fast.step(f, blocks, hidden(1, 10, 1), 0), eager.step(e, blocks, hidden(1, 10, 1), 0)
    )
    for pos in range(10, 140):  # across the first length bucket (128) and gemma3's window
        x = hidden(1, 1, pos)
        assert close(fast.step(f, blocks, x, pos), eager.step(e, blocks, x, pos)), pos
    # Rollback on the graph path: the replayed position gives what a first try gave.
    again = fast.step(f, blocks, hidden(1, 1, 7), 140)
    fast.truncate(f, blocks, 140)
    assert torch.equal(fast.step(f, blocks, hidden(1, 1, 7), 140), again)
    assert {g.rows for g in fast.graphs._graphs.values()} == {1}
    assert {g.length for g in fast.graphs._graphs.values()} == {128, 256}


@pytest.mark.parametrize("matmul", ["shared", "per-session"])
def test_merged_decode_steps_through_graphs_give_each_session_its_own_result(
    graphed, matmul, monkeypatch
):
    fast, eager = graphed
    monkeypatch.setattr(fast, "shared_matmul", matmul == "shared")
    blocks = range(4)
    # Three sessions of 1, 2 and 1 sequences at different lengths, one with left padding.
    shapes = [(1, 3), (2, 9), (1, 20)]
    fasts = [fast.new_cache() for _ in shapes]
    eagers = [eager.new_cache() for _ in shapes]
    masks = [None, torch.tensor([[0, 0] + [1] * 8, [1] * 10]), None]
    for i, (rows, length) in enumerate(shapes):
        x = hidden(rows, length, i)
        m = None if masks[i] is None else masks[i][:, :length]
        fast.step(fasts[i], blocks, x, 0, m)
        eager.step(eagers[i], blocks, x, 0, m)
    requests = [
        StepRequest(c, blocks, hidden(rows, 1, 50 + i), length, masks[i])
        for i, (c, (rows, length)) in enumerate(zip(fasts, shapes, strict=True))
    ]
    merged = fast.step_many(requests)
    for i, (rows, length) in enumerate(shapes):
        alone = eager.step(eagers[i], blocks, hidden(rows, 1, 50 + i), length, masks[i])
        out = merged[i]
        assert isinstance(out, torch.Tensor) and out.shape == alone.shape
        assert close(out, alone), i
        assert fasts[i].snapshot() == [length + 1] * 4
    rows = {g.rows for g in fast.graphs._graphs.values()}
    assert (4 in rows) if matmul == "shared" else ({1, 2} <= rows)


@pytest.mark.slow
def test_the_compiled_decode_path_matches_the_eager_path(tmp_path):
    """torch.compile of what a decode graph holds (inductor's C++ backend on a CPU: ~40 s)."""
    path = make_tiny_llama(tmp_path / "llama")
    fast = BlockBackend(path, 0, 4, kv_cache="paged", decode_graphs=True, compile_step=True)
    eager = BlockBackend(path, 0, 4, kv_cache="paged", decode_graphs=False)
    for backend in (fast, eager):
        backend.allocate_kv(1024)
    assert fast.graphs is not None and fast.graphs.compiled
    f, e = fast.new_cache(), eager.new_cache()
    assert close(
        fast.step(f, range(4), hidden(1, 8, 1), 0), eager.step(e, range(4), hidden(1, 8, 1), 0)
    )
    for pos in range(8, 16):
        x = hidden(1, 1, pos)
        assert close(fast.step(f, range(4), x, pos), eager.step(e, range(4), x, pos)), pos
