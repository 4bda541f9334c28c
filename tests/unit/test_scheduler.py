"""Continuous batching: batched steps equal steps alone; the scheduler's order and chunking."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
import torch

from beed.server.backend import BlockBackend, StepRequest
from beed.server.config import SchedulerConfig
from beed.server.scheduler import Scheduler
from tests.tiny_models import make_tiny_llama
from tests.unit.test_models import make_tiny_gemma3

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(
    scope="module",
    params=[
        ("llama", "cpu"),
        ("gemma3", "cpu"),
        pytest.param(("llama", "cuda"), marks=CUDA),
        pytest.param(("gemma3", "cuda"), marks=CUDA),
    ],
    ids=lambda p: "-".join(p),
)
def backend(request, tmp_path_factory) -> BlockBackend:
    family, device = request.param
    path = tmp_path_factory.mktemp(family) / family
    make = make_tiny_llama if family == "llama" else make_tiny_gemma3
    make(path)
    return BlockBackend(path, 0, 4 if family == "llama" else 6, device=device)


def hidden(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed))


def alone(backend: BlockBackend, steps: list[StepRequest]) -> list[torch.Tensor]:
    """Each step of one session, in order, on a fresh cache (what a lone client gets)."""
    cache = backend.new_cache()
    blocks = steps[0].blocks
    return [
        backend.step(cache, blocks, s.hidden, s.position, s.attention_mask, s.position_ids)
        for s in steps
    ]


def test_batched_steps_equal_each_session_alone(backend: BlockBackend):
    blocks = range(len(backend.span.layers))
    # Three sessions: different lengths (past gemma's sliding window of 8), one of two rows with
    # left padding and explicit positions.
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 12])
    ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    sessions = [
        [(hidden(1, 11, 1), None, None), (hidden(1, 1, 2), None, None)],
        [(hidden(1, 3, 3), None, None), (hidden(1, 1, 4), None, None)],
        [
            (hidden(2, 12, 5), mask, ids),
            (hidden(2, 1, 6), torch.cat([mask, mask[:, :1] * 0 + 1], 1), ids[:, -1:] + 1),
        ],
    ]
    requests: list[list[StepRequest]] = []
    caches = [backend.new_cache() for _ in sessions]
    for cache, steps in zip(caches, sessions, strict=True):
        position, rows = 0, []
        for h, m, p in steps:
            rows.append(StepRequest(cache, blocks, h, position, m, p))
            position += h.shape[1]
        requests.append(rows)
    expected = [alone(backend, rows) for rows in requests]
    for step in range(2):
        outs = backend.step_many([rows[step] for rows in requests])
        for out, want in zip(outs, expected, strict=True):
            assert isinstance(out, torch.Tensor)
            # float32: each session's rows are multiplied alone, so bit-identical.
            assert torch.equal(out, want[step])
    # ... from one merged forward (not the per-session fallback after a failed one).
    assert backend.batch_fallbacks == 0
    # A batch of one is the lone path itself: bit-identical.
    cache = backend.new_cache()
    (one,) = backend.step_many([StepRequest(cache, blocks, hidden(1, 5, 7), 0)])
    assert torch.equal(one, alone(backend, [StepRequest(None, blocks, hidden(1, 5, 7), 0)])[0])


def test_shared_matrix_products_agree_up_to_rounding(backend: BlockBackend):
    """`--batch-matmul shared` (the bf16/fp16 default): one product over all sessions' rows."""
    blocks = range(len(backend.span.layers))
    lengths = [1, 1, 7, 3]
    want = [
        alone(backend, [StepRequest(None, blocks, hidden(1, n, 20 + n), 0)])[0] for n in lengths
    ]
    backend.shared_matmul = True
    try:
        steps = [StepRequest(backend.new_cache(), blocks, hidden(1, n, 20 + n), 0) for n in lengths]
        outs = backend.step_many(steps)
    finally:
        backend.shared_matmul = False
    for out, expected in zip(outs, want, strict=True):
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert backend.batch_fallbacks == 0


def test_a_malformed_step_fails_alone(backend: BlockBackend):
    blocks = range(len(backend.span.layers))
    good = StepRequest(backend.new_cache(), blocks, hidden(1, 4, 1), 0)
    late = StepRequest(backend.new_cache(), blocks, hidden(1, 1, 2), 5)  # cache holds 0 tokens
    out, error = backend.step_many([good, late])
    assert isinstance(out, torch.Tensor) and not isinstance(error, torch.Tensor)
    assert "cannot truncate" in str(error)


class Compute:
    """The server's arrangement: one thread runs all compute; `hold()` blocks it for a while."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.holds: list[asyncio.Future] = []

    def run(self, fn):
        return asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def hold(self, scheduler: Scheduler) -> threading.Event:
        gate = threading.Event()
        self.holds.append(asyncio.ensure_future(scheduler.call(lambda: gate.wait(10))))
        return gate


async def test_steps_of_concurrent_sessions_share_forwards_and_chunks_interleave(
    backend: BlockBackend,
):
    compute = Compute()
    scheduler = Scheduler(compute.run, SchedulerConfig(prefill_chunk_tokens=16))
    scheduler.start()
    blocks = range(len(backend.span.layers))
    try:
        gate = compute.hold(scheduler)
        await asyncio.sleep(0.05)
        long = StepRequest(backend.new_cache(), blocks, hidden(1, 70, 1), 0)
        short = [StepRequest(backend.new_cache(), blocks, hidden(1, 2, s), 0) for s in (2, 3)]
        tasks = [
            asyncio.ensure_future(scheduler.step(backend, r, f"s{i}"))
            for i, r in enumerate([long, *short])
        ]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(*tasks)
        for out, r in zip(outs, [long, *short], strict=True):
            want = alone(backend, [StepRequest(None, blocks, r.hidden, 0)])[0]
            assert (out - want).abs().max().item() < 1e-5
        # 70 prompt tokens in chunks of 16 (the others are active): 5 forwards, the two short
        # prompts rode in the first.
        assert (scheduler.batches, scheduler.batched_steps) == (5, 7)
    finally:
        await scheduler.aclose()
        compute.pool.shutdown()


async def test_inference_goes_before_stateless_work_and_abandoned_steps_never_run(
    backend: BlockBackend,
):
    compute = Compute()
    scheduler = Scheduler(compute.run, SchedulerConfig())
    scheduler.start()
    blocks = range(len(backend.span.layers))
    finished: list[str] = []
    try:
        gate = compute.hold(scheduler)
        await asyncio.sleep(0.05)

        async def track(name: str, coro) -> None:
            await coro
            finished.append(name)

        stateless = asyncio.ensure_future(
            track("forward", scheduler.call(lambda: backend.forward(blocks, hidden(1, 4, 9))))
        )
        await asyncio.sleep(0.01)
        steps = [
            asyncio.ensure_future(
                track(
                    f"step{i}",
                    scheduler.step(
                        backend,
                        StepRequest(backend.new_cache(), blocks, hidden(1, 3, i), 0),
                        f"s{i}",
                    ),
                )
            )
            for i in range(2)
        ]
        abandoned_cache = backend.new_cache()
        abandoned = asyncio.ensure_future(
            scheduler.step(
                backend, StepRequest(abandoned_cache, blocks, hidden(1, 3, 5), 0), "gone"
            )
        )
        await asyncio.sleep(0.01)
        abandoned.cancel()
        gate.set()
        await asyncio.gather(stateless, *steps)
        assert finished == ["step0", "step1", "forward"]
        assert BlockBackend.cache_length(abandoned_cache, blocks) == 0
        assert scheduler.queued_steps == 0
    finally:
        await scheduler.aclose()
        compute.pool.shutdown()


def test_a_step_that_breaks_the_merged_forward_fails_alone(backend: BlockBackend):
    from beed.models.adapters import span_config
    from beed.models.kv_cache import DynamicSpanCache

    blocks = range(len(backend.span.layers))
    caches = [backend.new_cache() for _ in range(2)]
    for cache in caches:
        backend.step(cache, blocks, hidden(1, 5, 1), 0)
    # A cache with too few layers passes every check and then fails inside the forward, after
    # the other sessions' caches were extended by the first blocks.
    broken = DynamicSpanCache(config=span_config(backend.span.config, 0, 2))
    requests = [
        StepRequest(caches[0], blocks, hidden(1, 1, 2), 5),
        StepRequest(broken, blocks, hidden(1, 1, 3), 0),
        StepRequest(caches[1], blocks, hidden(1, 2, 4), 5),
    ]
    first, error, last = backend.step_many(requests)
    assert isinstance(error, Exception) and not isinstance(error, torch.Tensor)
    expected = [
        alone(backend, [StepRequest(None, blocks, hidden(1, 5, 1), 0), r])[1]
        for r in (requests[0], requests[2])
    ]
    assert torch.equal(first, expected[0]) and torch.equal(last, expected[1])
    assert [BlockBackend.cache_length(c, blocks) for c in caches] == [6, 7]


@pytest.mark.parametrize("kept", ["none", "some", "all"])
def test_backward_block_by_block_equals_autograd_through_the_span(backend: BlockBackend, kept):
    """Backward runs one block per scheduler job, keeping blocks' autograd graphs within the
    budget and recomputing the others' forwards: the gradient is bit-identical to autograd
    through the whole span at once, and every graph's bytes are given back."""
    blocks = range(len(backend.span.layers))
    h, g = hidden(2, 6, 30).to(backend.device), hidden(2, 6, 31).to(backend.device)
    x = h.clone().requires_grad_(True)
    positions = torch.arange(6, device=backend.device).unsqueeze(0).expand(2, -1)
    with torch.enable_grad():
        out = backend.span(x, positions, None, None, blocks)
        (want,) = torch.autograd.grad(out, x, g)
    budget = {"none": 0, "some": 1, "all": 1 << 40}[kept]
    if kept == "some":  # room for one block's graph of this shape, as backward_units counts it
        probe = backend.backward_units(blocks, h, g, graph_budget_bytes=1 << 40)
        next(probe)
        budget = backend.graph_bytes_held
        probe.close()
    assert backend.graph_bytes_held == 0
    units, peak = [], 0
    for unit in backend.backward_units(blocks, h, g, graph_budget_bytes=budget):
        units.append(unit)
        peak = max(peak, backend.graph_bytes_held)
        assert backend.graph_bytes_held <= budget
    assert backend.graph_bytes_held == 0
    assert (peak > 0) == (kept != "none")
    # A forward per block (the last one's runs with its backward unless its graph is kept),
    # a backward per block, then the gradients.
    assert len(units) == 2 * len(blocks) - (0 if kept == "all" else 1)
    assert all(u is None for u in units[:-1])
    grad, grad_prompts = units[-1]
    assert torch.equal(grad, want.cpu()) and grad_prompts is None


def test_deep_prompts_forward_and_gradients_equal_autograd(backend: BlockBackend):
    """Deep prompts (added to each block's first positions): forward_units and
    backward_units give what autograd through the span with the prompts added gives, and the
    prompts' gradient is that of each block's input at their positions."""
    blocks = range(len(backend.span.layers))
    h, g = hidden(2, 6, 40).to(backend.device), hidden(2, 6, 41).to(backend.device)
    prompts = torch.randn(
        len(blocks), 2, 3, h.shape[-1], generator=torch.Generator().manual_seed(4)
    )
    x = h.clone().requires_grad_(True)
    p = prompts.clone().to(backend.device).requires_grad_(True)
    positions = torch.arange(6, device=backend.device).unsqueeze(0).expand(2, -1)
    with torch.enable_grad():
        out = x
        for n in blocks:
            out = torch.cat([out[:, :3] + p[n], out[:, 3:]], 1)
            out = backend.span(out, positions, None, None, range(n, n + 1))
        want_x, want_p = torch.autograd.grad(out, (x, p), g)
    *_, forward = backend.forward_units(blocks, h, None, prompts)
    assert torch.allclose(forward, out.detach().cpu(), atol=1e-6)
    grad, grad_prompts = backend.backward(blocks, h, g, None, prompts)
    assert torch.allclose(grad, want_x.cpu(), atol=1e-6)
    assert grad_prompts is not None and torch.allclose(grad_prompts, want_p.cpu(), atol=1e-6)
    from protocol.errors import BadRequestError

    for bad in (prompts[:1], prompts[:, :, :0], torch.zeros(len(blocks), 2, 7, h.shape[-1])):
        with pytest.raises(BadRequestError, match="prompts must be"):
            backend.backward(blocks, h, g, None, bad)


@pytest.mark.parametrize("shape", [(0, 3, 64), (1, 0, 64)], ids=["no-rows", "no-tokens"])
def test_empty_hidden_states_are_bad_requests(backend: BlockBackend, shape):
    """Found by the fuzz campaign: an empty Backward raised a RuntimeError (answered 299)."""
    from protocol.errors import BadRequestError

    blocks = range(len(backend.span.layers))
    empty = torch.zeros(shape)
    with pytest.raises(BadRequestError, match="at least one row and one token"):
        backend.backward(blocks, empty, empty)
    with pytest.raises(BadRequestError):
        backend.check_step(empty, 0, None, None)
