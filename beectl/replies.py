"""What a client accepts as a server's answer: nothing it has not checked."""

from __future__ import annotations

import torch

from protocol.errors import InvalidReplyError
from protocol.messages import BackwardResult, ForwardResult, Message, SessionOpened, StepResult


def checked_step_result(reply: Message, shape: torch.Size) -> StepResult:
    """reply, if it can be the answer to a step whose input had `shape`; else InvalidReplyError
    (the hop's server is then treated as failed: banned, replaced, its history replayed)."""
    if not isinstance(reply, StepResult):
        raise InvalidReplyError(f"server answered a Step with {type(reply).__name__}")
    out = reply.hidden
    if out.shape != shape:
        raise InvalidReplyError(
            f"server answered a step of shape {list(shape)} with shape {list(out.shape)}"
        )
    if not out.is_floating_point():
        raise InvalidReplyError(f"server answered a step with {out.dtype} values")
    # One reduction checks both (NaN propagates through amax); ~10x faster than isfinite().all()
    # and any() on a bf16 host tensor, which took 0.3 ms per 32-row answer.
    peak = out.float().abs().amax() if out.numel() else torch.zeros(())
    if not bool(torch.isfinite(peak)):
        raise InvalidReplyError("server answered a step with NaN or infinite values")
    if out.numel() and not bool(peak > 0):
        # A transformer's residual stream is never exactly zero: a server that answers zeros
        # has not computed anything.
        raise InvalidReplyError("server answered a step with all zeros")
    return reply


def checked_session_opened(reply: Message, start: int, end: int, max_length: int) -> SessionOpened:
    """reply, if it opens blocks [start, end) for `max_length` tokens as asked; else
    InvalidReplyError (a server that opens other blocks than asked would compute the wrong
    thing, silently)."""
    if not isinstance(reply, SessionOpened):
        raise InvalidReplyError(f"server answered OpenSession with {type(reply).__name__}")
    if (reply.span_start, reply.span_end) != (start, end) or reply.max_length < max_length:
        raise InvalidReplyError(
            f"server opened blocks {reply.span_start}:{reply.span_end} for {reply.max_length} "
            f"tokens when asked for {start}:{end} and {max_length}"
        )
    return reply


def _check_values(out: torch.Tensor, what: str) -> None:
    if not out.is_floating_point():
        raise InvalidReplyError(f"server answered a {what} with {out.dtype} values")
    peak = out.float().abs().amax() if out.numel() else torch.zeros(())
    if not bool(torch.isfinite(peak)):
        raise InvalidReplyError(f"server answered a {what} with NaN or infinite values")


def checked_forward_result(reply: Message, shape: torch.Size) -> ForwardResult:
    """reply, if it can be the answer to a Forward of hidden states of `shape`."""
    if not isinstance(reply, ForwardResult):
        raise InvalidReplyError(f"server answered a Forward with {type(reply).__name__}")
    if reply.hidden.shape != shape:
        raise InvalidReplyError(
            f"server answered a Forward of shape {list(shape)} with {list(reply.hidden.shape)}"
        )
    _check_values(reply.hidden, "Forward")
    if reply.hidden.numel() and not bool(reply.hidden.float().abs().amax() > 0):
        raise InvalidReplyError("server answered a Forward with all zeros")
    return reply


def checked_backward_result(
    reply: Message, shape: torch.Size, prompts_shape: torch.Size | None
) -> BackwardResult:
    """reply, if it can be the answer to a Backward of hidden states of `shape` (and deep
    prompts of `prompts_shape`): gradients of those shapes, finite (zeros are gradients too)."""
    if not isinstance(reply, BackwardResult):
        raise InvalidReplyError(f"server answered a Backward with {type(reply).__name__}")
    if reply.grad_input.shape != shape:
        raise InvalidReplyError(
            f"server answered a Backward of shape {list(shape)} with {list(reply.grad_input.shape)}"
        )
    _check_values(reply.grad_input, "Backward")
    got = None if reply.grad_prompts is None else reply.grad_prompts.shape
    if got != prompts_shape:
        raise InvalidReplyError(
            f"server answered a Backward with prompts {prompts_shape} with gradients {got}"
        )
    if reply.grad_prompts is not None:
        _check_values(reply.grad_prompts, "Backward")
    return reply
