"""Tree steps (beed/models/tree_mask.py): each branch of a tree computes what it computes alone.

A tree step runs several candidate continuations after a cached prefix at once; every token may
see the prefix and its own ancestors only, at the position its depth gives. So the output at a
node must equal the output of a plain causal step of that node's branch after the same prefix,
for full and sliding-window attention (Gemma 3's window here is 8: the prefix is longer), on the
dynamic and the paged cache, in a prefill cut into chunks and merged with other sessions' steps.
"""

from __future__ import annotations

import pytest
import torch

from beed.models.tree_mask import MAX_TREE_TOKENS, build_tree, check_parents
from beed.server.backend import BlockBackend, StepRequest
from beed.server.scheduler import _StepJob
from protocol.errors import BadRequestError
from tests.tiny_models import make_tiny_llama
from tests.unit.test_models import make_tiny_gemma3

# Two rows with different trees of 9 nodes (node 0 follows the prefix).
PARENTS = torch.tensor(
    [
        [-1, 0, 1, 2, 0, 4, 1, 6, 3],  # branches 0-1-2-3-8, 0-4-5, 0-1-6-7
        [-1, 0, 0, 0, 1, 2, 3, 4, 7],  # a wide root: 0-1-4-7-8, 0-2-5, 0-3-6
    ]
)
PREFIX = 12


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / request.param
    (make_tiny_llama if request.param == "llama" else make_tiny_gemma3)(path)
    return path


@pytest.fixture(scope="module", params=["dynamic", "paged"])
def backend(request, family) -> BlockBackend:
    backend = BlockBackend(family, 0, 4, kv_cache=request.param)
    if request.param == "paged":
        backend.allocate_kv(1024)
    return backend


def hidden(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed))


def branch(parents: list[int], node: int) -> list[int]:
    """The nodes from the root to `node`."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def assert_branches_alone(backend: BlockBackend, prefix: torch.Tensor, nodes, out) -> None:
    """Each row's output at every node equals a causal step of its branch after the prefix."""
    blocks = range(4)
    for row in range(PARENTS.shape[0]):
        parents = PARENTS[row].tolist()
        for node in range(len(parents)):
            path = branch(parents, node)
            cache = backend.new_cache()
            backend.step(cache, blocks, prefix[row : row + 1], 0)
            alone = backend.step(cache, blocks, nodes[row : row + 1, path], PREFIX)
            torch.testing.assert_close(out[row, node], alone[0, -1], rtol=0, atol=1e-5)


def test_every_branch_equals_its_causal_step(backend: BlockBackend):
    blocks = range(4)
    prefix, nodes = hidden(2, PREFIX, 1), hidden(2, PARENTS.shape[1], 2)
    cache = backend.new_cache()
    backend.step(cache, blocks, prefix, 0)
    out = backend.step(cache, blocks, nodes, PREFIX, tree=build_tree(PARENTS, PREFIX))
    assert_branches_alone(backend, prefix, nodes, out)
    # The cache holds the tree's tokens until the next step rolls back what was not kept: a
    # step after node 2 of row 0's first branch (kept: nodes 0-1-2, contiguous) is plain.
    again = backend.step(cache, blocks, hidden(2, 1, 3), PREFIX + 3)
    fresh = backend.new_cache()
    backend.step(fresh, blocks, torch.cat([prefix, nodes[:, :3]], dim=1), 0)
    torch.testing.assert_close(
        again[0], backend.step(fresh, blocks, hidden(2, 1, 3), PREFIX + 3)[0], rtol=0, atol=1e-5
    )


def test_a_chunked_tree_step_and_a_merged_batch_equal_the_whole_step(backend: BlockBackend):
    blocks = range(4)
    prefix, nodes = hidden(2, PREFIX, 4), hidden(2, PARENTS.shape[1], 5)
    tree = build_tree(PARENTS, PREFIX)
    whole_cache = backend.new_cache()
    backend.step(whole_cache, blocks, prefix, 0)
    whole = backend.step(whole_cache, blocks, nodes, PREFIX, tree=tree)
    # As the scheduler cuts a long step into prefill chunks.
    cache = backend.new_cache()
    backend.step(cache, blocks, prefix, 0)
    job = _StepJob(backend, StepRequest(cache, blocks, nodes, PREFIX, tree=tree), "o", None)  # type: ignore[arg-type]
    parts = []
    for size in (4, 5):
        (out,) = backend.step_many([job.chunk(size)])
        parts.append(out)
        job.done_tokens += size
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)
    # Merged with another session's plain step.
    other, mine = backend.new_cache(), backend.new_cache()
    backend.step(other, blocks, hidden(1, 5, 6), 0)
    backend.step(mine, blocks, prefix, 0)
    plain, merged = backend.step_many(
        [
            StepRequest(other, blocks, hidden(1, 2, 7), 5),
            StepRequest(mine, blocks, nodes, PREFIX, tree=tree),
        ]
    )
    assert not isinstance(merged, Exception) and not isinstance(plain, Exception)
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-5)


def test_left_padding_with_a_tree(backend: BlockBackend):
    """Row 1 is left-padded by 3: its positions are shifted as the client sends them."""
    blocks = range(4)
    prefix, nodes = hidden(2, PREFIX, 8), hidden(2, PARENTS.shape[1], 9)
    mask = torch.ones(2, PREFIX + PARENTS.shape[1], dtype=torch.long)
    mask[1, :3] = 0
    shift = torch.tensor([[0], [3]])
    cache = backend.new_cache()
    positions = (torch.arange(PREFIX)[None, :] - shift).clamp_min(1)
    backend.step(cache, blocks, prefix, 0, mask[:, :PREFIX], positions)
    tree = build_tree(PARENTS, PREFIX)
    out = backend.step(cache, blocks, nodes, PREFIX, mask, PREFIX + tree.depth - shift, tree)
    # Row 1's branches as plain causal steps of the same padded batch (row 0: any filler).
    for node in range(PARENTS.shape[1]):
        path = branch(PARENTS[1].tolist(), node)
        plain = backend.new_cache()
        backend.step(plain, blocks, prefix, 0, mask[:, :PREFIX], positions)
        rows = torch.stack([nodes[0, : len(path)], nodes[1, path]])
        ids = PREFIX + torch.arange(len(path))[None, :] - shift
        want = backend.step(plain, blocks, rows, PREFIX, mask[:, : PREFIX + len(path)], ids)
        torch.testing.assert_close(out[1, node], want[1, -1], rtol=0, atol=1e-5)


def test_malformed_trees_are_refused():
    check_parents(PARENTS, 2, 9)
    bad = [
        (PARENTS[:, :5], "shape"),
        (PARENTS.float(), "integers"),
        (torch.tensor([[-1, 1]]), "parent"),  # a token its own parent
        (torch.tensor([[-1, 2, 0]]), "parent"),  # a parent after the token
        (torch.tensor([[-2, 0]]), "parent"),
    ]
    for parents, words in bad:
        batch, tokens = (2, 9) if parents.shape[0] == 2 else (1, parents.shape[1])
        with pytest.raises(BadRequestError, match=words):
            check_parents(parents, batch, tokens)
    with pytest.raises(BadRequestError, match="at most"):
        check_parents(torch.full((1, MAX_TREE_TOKENS + 1), -1), 1, MAX_TREE_TOKENS + 1)
