"""The cost model the planner optimises: what one micro-batch costs on one server and one link.

A micro-batch of `tokens` (rows x tokens of one step) crosses a chain of servers. On a server
holding `blocks` blocks, `offloaded` of them in host memory (streamed in one block ahead of
compute, so a block costs the longer of its compute and its copy), the stage takes

    (blocks - offloaded) * compute_s * tokens + offloaded * max(compute_s * tokens, block_bytes / pcie)

and entering the server costs its link: half its round trip plus the micro-batch's activations
over its bandwidth. Both depend on the server and the number of blocks only, not on which blocks
or on the other servers of the chain: that is what makes the chain problem a knapsack over
servers (dp.py). Offloading is decided per span length: a server keeps as many blocks on its GPU
as fit and offloads the rest, up to its host memory (offloading a block that fits never shortens
a stage in this model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    num_blocks: int
    block_bytes: int  # weights of one block, in the served dtype
    activation_bytes_per_token: int  # hidden states of one token on the wire


@dataclass(frozen=True)
class ServerSpec:
    """A server as the planner sees it: measured, or announced, figures."""

    name: str
    compute_s: float  # seconds per block per token, at the batch sizes planned for
    gpu_blocks: int  # blocks that fit in device memory next to its KV cache
    host_blocks: int = 0  # blocks more it can hold in host memory (offloaded)
    pcie_bytes_per_s: float = 0.0  # host-to-device copy speed (for offloaded blocks)
    rtt_s: float = 0.0  # round trip to the swarm's other servers
    bandwidth_bytes_per_s: float = float("inf")

    def max_blocks(self) -> int:
        return self.gpu_blocks + (self.host_blocks if self.pcie_bytes_per_s > 0 else 0)


def offloaded(server: ServerSpec, blocks: int) -> int | None:
    """Blocks of a span of `blocks` kept in host memory, or None if it cannot hold them."""
    extra = max(0, blocks - server.gpu_blocks)
    if extra == 0:
        return 0
    if server.pcie_bytes_per_s <= 0 or extra > server.host_blocks:
        return None
    return extra


def stage_s(server: ServerSpec, blocks: int, model: ModelSpec, tokens: int) -> float | None:
    """Seconds for a micro-batch of `tokens` through `blocks` blocks of this server (None: the
    span does not fit)."""
    off = offloaded(server, blocks)
    if off is None or blocks < 1:
        return None
    compute = server.compute_s * tokens
    copy = model.block_bytes / server.pcie_bytes_per_s if off else 0.0
    return (blocks - off) * compute + off * max(compute, copy)


def link_s(server: ServerSpec, model: ModelSpec, tokens: int) -> float:
    """Seconds for a micro-batch to enter this server: half its round trip plus the transfer."""
    wire = model.activation_bytes_per_token * tokens / server.bandwidth_bytes_per_s
    return server.rtt_s / 2 + wire
