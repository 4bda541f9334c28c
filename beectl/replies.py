"""What a client accepts as a server's answer to a step: nothing it has not checked."""

from __future__ import annotations

import torch

from protocol.errors import InvalidReplyError
from protocol.messages import Message, StepResult


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
    if not bool(torch.isfinite(out).all()):
        raise InvalidReplyError("server answered a step with NaN or infinite values")
    return reply
