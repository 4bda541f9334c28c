"""Generation after tuned prompts: the virtual tokens run as the session's first step, then
generation goes on as usual, the prompt positions holding placeholder ids."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from beectl.generation import GenerationOutput, SamplingConfig, generate
from beectl.head import LocalHead
from beectl.session import InferenceSession
from beectl.training.prompts import PromptTuning
from protocol.errors import BadRequestError


def check_generates(prompts: PromptTuning) -> None:
    if prompts.deep_prompts is not None:
        raise BadRequestError(
            "generation after deep prompts (tuning_mode='deep_ptune') is not supported: "
            "servers take deep prompts in Forward/Backward only; tune with 'ptune' to generate"
        )


async def generate_prompted(
    head: LocalHead,
    session: InferenceSession,
    input_ids: torch.Tensor,
    sampling: SamplingConfig,
    prompts: PromptTuning,
    *,
    attention_mask: torch.Tensor | None = None,
    cached_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> GenerationOutput:
    """`generate` with the virtual tokens of `prompts` before `input_ids`. A fresh session
    (`cached_ids` None) gets the prompts as its first step; a reused one holds them already
    (its `cached_ids` start with their placeholders, as returned in `sequences` here: the
    output keeps them, callers strip `prompts.num_prompts` columns)."""
    check_generates(prompts)
    batch = input_ids.shape[0]
    k = prompts.num_prompts
    placeholders = torch.full((batch, k), sampling.pad_token_id, dtype=input_ids.dtype)
    if cached_ids is None:
        if session.position != 0:
            raise BadRequestError("tuned prompts need a fresh session (or its cached ids)")
        with torch.no_grad():
            prefix = prompts.input_prefix(batch).to(head.device, head.dtype)
        await session.step(prefix)
        cached_ids = placeholders
    ids = torch.cat([placeholders, input_ids], dim=1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([torch.ones_like(placeholders), attention_mask.to(ids.dtype)], dim=1)
    return await generate(
        head, session, ids, sampling, attention_mask=mask, cached_ids=cached_ids, **kwargs
    )


def strip_prompts(out: GenerationOutput, prompts: PromptTuning) -> GenerationOutput:
    return dataclasses.replace(out, sequences=out.sequences[:, prompts.num_prompts :])
