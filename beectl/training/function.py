"""The remote blocks as a differentiable function: autograd on the client's side calls the
servers' Forward in its forward pass and their Backward in its backward pass."""

from __future__ import annotations

from typing import Any

import torch

from beectl.runner import LoopThread
from beectl.training.remote import RemoteBlocks, Traces


class BlockRunner:
    """Runs RemoteBlocks' coroutines on the client's event loop from the caller's thread,
    moving tensors between the caller's device and the host (where the wire is)."""

    def __init__(self, blocks: RemoteBlocks, loop: LoopThread) -> None:
        self.blocks = blocks
        self.loop = loop

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, Traces]:
        out, traces = self.loop.run(
            self.blocks.forward(
                hidden.detach().cpu(),
                None if mask is None else mask.cpu(),
                None if prompts is None else prompts.detach().cpu(),
            )
        )
        return out.to(hidden.device), traces

    def backward(
        self, traces: Traces, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_in, grad_prompts = self.loop.run(self.blocks.backward(traces, grad.detach().cpu()))
        device = grad.device
        return grad_in.to(device), None if grad_prompts is None else grad_prompts.to(device)


class _RemoteSpan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        runner: BlockRunner,
    ) -> torch.Tensor:
        out, traces = runner.forward(hidden, mask, prompts)
        ctx.runner, ctx.traces = runner, traces
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        traces, ctx.traces = ctx.traces, None  # a second backward through it is an error
        if traces is None:
            raise RuntimeError("backward through the remote blocks a second time")
        grad_in, grad_prompts = ctx.runner.backward(traces, grad)
        return grad_in, grad_prompts, None, None


def remote_blocks(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: torch.Tensor | None,
    runner: BlockRunner,
) -> torch.Tensor:
    """hidden [batch, tokens, hidden] through every remote block, differentiable with respect
    to hidden and the deep prompts [num_blocks, batch, prefix, hidden] when they need it."""
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or (prompts is not None and prompts.requires_grad)
    )
    if not wants_grad:
        return runner.forward(hidden, mask, prompts)[0]
    out: torch.Tensor = _RemoteSpan.apply(hidden, prompts, mask, runner)
    return out
