"""Token generation through an inference session: greedy or sampled, batched, streamed."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from beectl.chain import tree_depths
from beectl.head import LocalHead
from beectl.session import InferenceSession
from beectl.speculative.accept import greedy, rejection
from beectl.speculative.adaptive import DraftLength, SpeculationConfig, SpeculationStats
from beectl.speculative.drafts import Draft, Drafter, DraftModel, PromptLookup
from beectl.speculative.tree import DraftTree, step_parents, walk_greedy, walk_rejection
from protocol.errors import BadRequestError

log = logging.getLogger(__name__)

TREE_AFTER = 64  # the most pending tokens a tree round follows (a prompt's prefill goes linear)


@dataclass(frozen=True)
class SamplingConfig:
    """The usual generation arguments, with transformers' meaning."""

    max_new_tokens: int = 64
    do_sample: bool = False  # greedy unless True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # sampling seed; None: nondeterministic
    eos_token_ids: tuple[int, ...] = ()  # a row ends after producing one of these
    pad_token_id: int = 0  # fills finished rows
    stop_strings: tuple[str, ...] = ()  # a row ends once its new text contains one

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise BadRequestError("max_new_tokens must be >= 0")
        if self.do_sample and self.temperature <= 0:
            raise BadRequestError("temperature must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise BadRequestError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise BadRequestError("top_k must be >= 0 and repetition_penalty > 0")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [batch, prompt + new] token ids (finished rows padded)
    num_new_tokens: int  # generated positions (the longest row)
    prefill_s: float  # time to the first token
    decode_s: float  # time for the rest
    logits: list[torch.Tensor] = field(default_factory=list)  # per token [batch, vocab] if asked
    speculation: SpeculationStats = field(default_factory=SpeculationStats)


TokenCallback = Callable[[torch.Tensor], None]


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch: ids and attention mask, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def until_eos(ids: list[int], eos_token_ids: tuple[int, ...]) -> list[int]:
    """The generated ids before the first end-of-sequence token."""
    for i, token in enumerate(ids):
        if token in eos_token_ids:
            return ids[:i]
    return ids


async def generate(
    head: LocalHead,
    session: InferenceSession,
    input_ids: torch.Tensor,
    sampling: SamplingConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    cached_ids: torch.Tensor | None = None,
    on_tokens: TokenCallback | None = None,
    decode_text: Callable[[list[int]], str] | None = None,
    output_logits: bool = False,
    logits: Callable[[torch.Tensor], Awaitable[torch.Tensor]] | None = None,
    speculation: SpeculationConfig | None = None,
    draft_model: DraftModel | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` after `input_ids` [batch, tokens].

    `cached_ids` are the ids the session already holds (a reused session): `input_ids` must start
    with them, and only the rest is sent. `attention_mask` marks left padding (0) in a batch.
    `on_tokens` gets each new token of every row [batch], in order. `logits` replaces
    `head.logits` (a HeadBatcher's, to share the LM head with concurrent generations).

    With `speculation` on, each round sends the pending token and a draft of the next ones
    (by `draft_model`, else by prompt lookup) as one step; the model's scores at those positions
    decide how many drafts to keep (beectl/speculative/accept.py), and the next round starts
    where they end: the servers drop the rest of their cache as part of that step. The tokens
    are those of plain generation (greedy), or distributed as them (sampling).
    """
    batch, total = input_ids.shape
    past = 0 if cached_ids is None else cached_ids.shape[1]
    if past != session.position:
        raise BadRequestError(
            f"the session holds {session.position} tokens but {past} cached ids were given"
        )
    if cached_ids is not None and past and not torch.equal(input_ids[:, :past], cached_ids):
        raise BadRequestError(
            "input_ids do not continue the session's history; start a new session instead"
        )
    if past >= total:
        raise BadRequestError("input_ids add no new token to the session's history")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise BadRequestError("attention_mask must have the shape of input_ids")
    padded = bool((attention_mask == 0).any())
    processors = sampling.processors()
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    spec = speculation or SpeculationConfig.parse("off")
    drafter: Drafter | None = None
    if spec.enabled:
        drafter = PromptLookup()
        if draft_model is not None:
            drafter = draft_model.drafter(
                processors, sample=sampling.do_sample, generator=generator
            )
    lengths = DraftLength(spec, rows=batch)
    stats = SpeculationStats()
    eos = torch.tensor(sampling.eos_token_ids, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool)
    sequences = input_ids.clone()
    mask = attention_mask.clone()
    pending = input_ids[:, past:]  # the tokens not in the servers' cache yet
    logits_out: list[torch.Tensor] = []
    began = time.perf_counter()
    prefill_s = 0.0
    generated = 0
    rounds = 0
    while generated < sampling.max_new_tokens:
        rounds += 1
        round_began = time.perf_counter()
        room = session.max_length - session.position - pending.shape[1]
        limit = min(sampling.max_new_tokens - generated - 1, room)
        trees = drafter is not None and session.takes_trees and pending.shape[1] <= TREE_AFTER
        k, width = lengths.plan(limit, trees=trees)
        draft: Draft | None = None
        tree: DraftTree | None = None
        if k > 0 and drafter is not None and width > 1:
            tree = drafter.propose_tree(sequences, mask, unfinished, k, width)
            if tree is not None and tree.nodes > room:
                tree = None
        elif k > 0 and drafter is not None:
            draft = drafter.propose(sequences, mask, unfinished, k)
        drafts = sequences[:, :0]
        if tree is not None:
            drafts = tree.tokens
        elif draft is not None:
            drafts = draft.tokens
        n, p = drafts.shape[1], pending.shape[1]
        new_ids = torch.cat([pending, drafts], dim=1)
        step_mask = torch.cat([mask, torch.ones(batch, n, dtype=mask.dtype)], dim=1)
        parents = None if tree is None else step_parents(p, tree)
        position_ids = None
        if padded:
            # As transformers does for left padding: count real tokens; pads get position 1.
            full = (step_mask.long().cumsum(-1) - 1).masked_fill(step_mask == 0, 1)
            position_ids = full[:, -new_ids.shape[1] :]
            if tree is not None:  # each node one past its parent (the pending ones: as usual)
                nodes = position_ids[:, p - 1 : p] + 1 + tree_depths(tree.parents)
                position_ids = torch.cat([position_ids[:, :p], nodes], dim=1)
        start = session.position
        hidden = head.embed(new_ids)
        hidden = await session.step(
            hidden,
            attention_mask=step_mask if padded else None,
            position_ids=position_ids,
            tree=parents,
        )
        last = hidden[:, -(n + 1) :, :]  # the last pending token, then each draft
        raw = head.logits(last) if logits is None else await logits(last)  # [batch, n + 1, V]
        if tree is None:
            out, out_raw, contiguous = _linear_round(
                raw, sequences, drafts, draft, unfinished, processors, sampling, generator
            )
        else:
            out, out_raw, contiguous = _tree_round(
                raw, sequences, tree, unfinished, processors, sampling, generator
            )
        keep = out.shape[1]
        emitted = 0
        for j in range(keep):
            next_ids = torch.where(
                unfinished, out[:, j], torch.full_like(out[:, j], sampling.pad_token_id)
            )
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            generated += 1
            emitted += 1
            if output_logits:
                logits_out.append(out_raw[:, j, :].to("cpu", copy=True))
            if generated == 1:
                prefill_s = time.perf_counter() - began
            if on_tokens is not None:
                on_tokens(next_ids)
            before = unfinished.clone()
            if eos.numel():
                unfinished &= ~torch.isin(next_ids, eos)
            if sampling.stop_strings and decode_text is not None:
                for row in range(batch):
                    if unfinished[row]:
                        text = decode_text(sequences[row, total:].tolist())
                        if any(s in text for s in sampling.stop_strings):
                            unfinished[row] = False
            if not torch.equal(before, unfinished):
                break  # a row ended: the rest of the round assumed it went on
        # Cached now: the pending tokens and the kept drafts that sit where they were sent (all
        # of a linear draft's; a tree's up to where the kept branch leaves the main one). The
        # rest of what was emitted goes out again as the next step's first tokens.
        cached = min(contiguous, emitted - 1)
        session.rewind(start + p + cached)
        if drafter is not None:
            drafter.commit(session.position)
        if n:
            stats.rounds += 1
            stats.proposed += n
            stats.accepted += emitted - 1
        if rounds > 1:  # the prefill round is not a decode round
            lengths.record(
                n, emitted - 1, time.perf_counter() - round_began, width if tree else 1, k
            )
        if not unfinished.any():
            break
        if session.position + 1 > session.max_length:
            log.info("generate.max_length session=%d", session.max_length)
            break
        pending = sequences[:, -(emitted - cached) :]
    elapsed = time.perf_counter() - began
    return GenerationOutput(
        sequences=sequences,
        num_new_tokens=generated,
        prefill_s=prefill_s,
        decode_s=elapsed - prefill_s,
        logits=logits_out,
        speculation=stats,
    )


def _linear_round(
    raw: torch.Tensor,
    sequences: torch.Tensor,
    drafts: torch.Tensor,
    draft: Draft | None,
    unfinished: torch.Tensor,
    processors: LogitsProcessorList,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A linear draft's verdict: the tokens every row emits [batch, keep], the raw logits each
    came from [batch, keep, V], and how many of them sit in the cache already (keep - 1)."""
    batch, k = drafts.shape
    scores = raw
    if processors:
        extended = torch.cat([sequences, drafts], dim=1).to(raw.device)
        width = sequences.shape[1]
        scores = torch.stack(
            [processors(extended[:, : width + j], raw[:, j, :]) for j in range(k + 1)],  # type: ignore[arg-type]
            dim=1,
        )
    if sampling.do_sample:
        # On the host, with the seeded host generator: the same draws on any device.
        probs = torch.softmax(scores.cpu(), dim=-1)
        if k:
            accepted, tokens = rejection(
                probs, drafts, None if draft is None else draft.probs, generator
            )
        else:
            tokens = torch.multinomial(probs[:, 0], 1, generator=generator)
            accepted = torch.zeros(batch, dtype=torch.long)
    else:
        accepted, tokens = greedy(scores, drafts)
    keep = 1 + (int(accepted[unfinished].min()) if k and bool(unfinished.any()) else 0)
    return tokens[:, :keep], raw[:, :keep], keep - 1


def _tree_round(
    raw: torch.Tensor,
    sequences: torch.Tensor,
    tree: DraftTree,
    unfinished: torch.Tensor,
    processors: LogitsProcessorList,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A tree draft's verdict, as _linear_round's; `raw` [batch, 1 + nodes, V]: the last pending
    token's logits, then each node's. Every row emits as many tokens as the least lucky
    unfinished row; what sits in the cache is the main branch's part of that."""
    batch = raw.shape[0]
    scores = raw
    if processors:  # each position's context: the sequence, then its node's branch
        rows = []
        for r in range(batch):
            parents, tokens = tree.parents[r].tolist(), tree.tokens[r].tolist()
            per_node = []
            for q in range(raw.shape[1]):
                branch: list[int] = []
                node = q - 1
                while node >= 0:
                    branch.append(tokens[node])
                    node = parents[node]
                context = torch.cat([sequences[r], torch.tensor(branch[::-1], dtype=torch.long)])
                per_node.append(processors(context[None].to(raw.device), raw[r : r + 1, q])[0])  # type: ignore[arg-type]
            rows.append(torch.stack(per_node))
        scores = torch.stack(rows)
    if sampling.do_sample:
        walks = walk_rejection(torch.softmax(scores.cpu(), dim=-1), tree, generator)
    else:
        walks = walk_greedy(scores, tree)
    live = [r for r in range(batch) if bool(unfinished[r])] or list(range(batch))
    keep = min(len(walks[r][0]) + 1 for r in live)
    out = torch.zeros(batch, keep, dtype=torch.long)
    sources = torch.zeros(batch, keep, dtype=torch.long)  # the position each token came from
    contiguous = keep - 1
    for r, (path, bonus) in enumerate(walks):
        emitted = [int(tree.tokens[r, c]) for c in path] + [bonus]
        froms = [0] + [c + 1 for c in path]
        emitted, froms = (emitted + emitted[-1:] * keep)[:keep], (froms + froms[-1:] * keep)[:keep]
        out[r] = torch.tensor(emitted)
        sources[r] = torch.tensor(froms)
        if r in live:
            lead = next((i for i, c in enumerate(path) if c != i), len(path))
            contiguous = min(contiguous, lead)
    picked = raw.gather(1, sources.to(raw.device)[:, :, None].expand(-1, -1, raw.shape[-1]))
    return out, picked, contiguous
