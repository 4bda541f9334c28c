"""Block execution: the one server module that holds model weights and runs them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from beed.models.adapters import Span, SpanInput, family_of, load_config, num_blocks
from beed.models.decode_graphs import MAX_ROWS, DecodeGraphs
from beed.models.kv_cache import DynamicSpanCache, SpanCache, kv_bytes_per_token
from beed.models.offload import WeightStreamer, plan_offload
from beed.models.paged_cache import PAGE_TOKENS, KVArena, PagedSpanCache
from beed.models.quant import check_quant, quantize_linears, quantized_bytes, resident_bytes
from beed.models.tree_mask import Tree
from beed.models.weights import load_tensors, tensor_bytes
from protocol.errors import BadRequestError, BeeError, InternalServerError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How a merged forward runs its linear layers: "per-session" (bit-identical to each session
# alone), "shared" (one product over all rows), "auto" (per-session in float32, else shared).
BATCH_MATMUL = ("auto", "shared", "per-session")
# Sessions' caches: "dynamic" (transformers' DynamicCache, grown by concatenation), "paged"
# (a preallocated arena, paged_cache.py; what CUDA graphs need), "auto" (paged on CUDA).
KV_CACHES = ("auto", "dynamic", "paged")


@dataclass(frozen=True)
class StepRequest:
    """One session's step as the scheduler hands it to the backend."""

    cache: SpanCache
    blocks: range  # local block indices
    hidden: torch.Tensor  # [batch, tokens, hidden_size], as received
    position: int
    attention_mask: torch.Tensor | None = None  # [batch, position + tokens]
    position_ids: torch.Tensor | None = None  # [batch, tokens]
    tree: Tree | None = None  # a tree step's structure (checked; tree_mask.py)


_PENDING = BadRequestError("not run")


def _prompted(hidden: torch.Tensor, prompts: torch.Tensor | None, n: int) -> torch.Tensor:
    """hidden with the n-th block's deep prompt added at its first positions (a new tensor)."""
    if prompts is None:
        return hidden
    prefix = prompts.shape[2]
    return torch.cat([hidden[:, :prefix] + prompts[n], hidden[:, prefix:]], dim=1)


def _named(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda name: name.startswith(prefixes)  # placeholder while a batch is being assembled


@dataclass(frozen=True)
class SpanInfo:
    """What a loaded span is, for announcements and admission."""

    start: int
    end: int
    num_blocks: int  # of the whole model
    hidden_size: int
    dtype: str
    kv_bytes_per_token: int  # keys and values of all blocks in the span, one sequence
    quant: str = "none"  # weight quantization of the blocks' linear layers (quant.py)
    weight_bytes: int = 0  # bytes the span's weights hold in memory (after quantization)


class BlockBackend:
    """Blocks `[start, end)` of one model on one device, with per-session KV caches."""

    def __init__(
        self,
        model_dir: Path,
        start: int,
        end: int,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        batch_matmul: str = "auto",
        kv_cache: str = "auto",
        decode_graphs: bool | None = None,
        offload_weights: float | str | None = None,
        compile_step: bool = False,
        quant: str = "none",
    ) -> None:
        config = load_config(model_dir)
        check_quant(quant)
        if quant != "none" and offload_weights:
            raise BadRequestError("--quant and --offload-weights cannot be combined yet")
        total = num_blocks(config)
        if not 0 <= start < end <= total:
            raise BadRequestError(f"span {start}:{end} is outside the model's blocks 0:{total}")
        if dtype not in DTYPES:
            raise BadRequestError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if batch_matmul not in BATCH_MATMUL:
            raise BadRequestError(f"batch_matmul {batch_matmul!r} is not one of {BATCH_MATMUL}")
        if kv_cache not in KV_CACHES:
            raise BadRequestError(f"kv_cache {kv_cache!r} is not one of {KV_CACHES}")
        family = family_of(config)
        # Merged forwards share their matrix products except in float32, where beed promises
        # the local model's logits and each session's rows are multiplied alone (segments.py).
        self.shared_matmul = batch_matmul == "shared" or (
            batch_matmul == "auto" and dtype != "float32"
        )
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        if kv_cache == "auto":
            kv_cache = "paged" if self.device.type == "cuda" and not family.alibi else "dynamic"
        if kv_cache == "paged" and family.alibi:
            raise BadRequestError(
                f"{config.model_type} (ALiBi) blocks need --kv-cache dynamic: the paged cache's "
                "masks carry no ALiBi bias"
            )
        self.kv_cache = kv_cache
        self.arena: KVArena | None = None  # allocate_kv() makes it (paged caches)
        # One-token steps through CUDA graphs (decode_graphs.py): on by default on CUDA with
        # paged caches; True on a CPU runs the same static-shape path without capture (tests).
        if decode_graphs and kv_cache != "paged":
            raise BadRequestError("decode graphs need the paged KV cache")
        self._decode_graphs = (
            kv_cache == "paged" and self.device.type == "cuda"
            if decode_graphs is None
            else decode_graphs
        )
        self.graphs: DecodeGraphs | None = None
        self._compile_step = compile_step
        prefixes = [family.block_prefix.format(i=i) for i in range(start, end)]
        rename = family.canonical_name
        block_bytes = tensor_bytes(model_dir, prefixes, dtype=self.dtype, rename=rename)
        block_bytes = [quantized_bytes(b, self.dtype, quant) for b in block_bytes]
        offloaded = set(plan_offload(block_bytes, offload_weights, self.device))
        tensors: dict[str, torch.Tensor] = {}
        # Quantized spans load on the host and are quantized there, then moved: the device
        # never holds the full-precision weights.
        resident = torch.device("cpu") if quant != "none" else self.device
        for where, chosen in ((resident, False), (torch.device("cpu"), True)):
            mine = tuple(p for i, p in enumerate(prefixes) if (i in offloaded) == chosen)
            if mine:
                tensors |= load_tensors(
                    model_dir, _named(mine), dtype=self.dtype, device=where, rename=rename
                )
        self.span = Span(config, start, end, self.device)
        self.batch_fallbacks = 0  # merged forwards that failed and ran session by session
        self._graph_lock = threading.Lock()
        self._graph_held = 0  # bytes of Backward graphs kept (backward_units)
        self._weights: frozenset[int] | None = None
        self.span.load_blocks(tensors, family)
        del tensors
        self.quant = quant
        if quantize_linears(self.span.layers, quant):
            log.info("backend.quantized quant=%s", quant)
        self.streamer: WeightStreamer | None = None
        if offloaded:
            self.streamer = WeightStreamer(self.span.layers, sorted(offloaded), self.device)
            self._decode_graphs = False  # the copies are issued per step by hooks
        self.span.to(self.device)  # buffers computed at construction (weights are there already)
        self.span.eval().requires_grad_(False)
        self.info = SpanInfo(
            start=start,
            end=end,
            num_blocks=total,
            hidden_size=int(config.hidden_size),
            dtype=dtype,
            kv_bytes_per_token=kv_bytes_per_token(config, self.dtype, end - start),
            quant=quant,
            weight_bytes=resident_bytes(self.span.layers),
        )
        log.info("backend.loaded span=%d:%d dtype=%s device=%s", start, end, dtype, device)

    def allocate_kv(self, budget_tokens: int) -> None:
        """Preallocate the paged caches' arena for the KV budget's tokens (of one sequence over
        all blocks); a no-op with dynamic caches, which grow as they fill.

        Sessions reserve `batch * max_length` tokens of the budget but take whole pages, so the
        arena has 1/16 more room (a full one refuses a step, retryably, before writing)."""
        if self.kv_cache != "paged":
            return
        config = self.span.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.arena = self.graphs = None  # a second call replaces them: free the old ones first
        self.arena = KVArena(
            len(self.span.layers),
            int(kv_heads),
            int(head_dim),
            budget_tokens + budget_tokens // 16 + 64 * PAGE_TOKENS,
            dtype=self.dtype,
            device=self.device,
        )
        log.info(
            "backend.kv_arena tokens=%d bytes=%d", self.arena.pages * PAGE_TOKENS, self.arena.nbytes
        )
        if self._decode_graphs:
            self.graphs = DecodeGraphs(
                self.span,
                self.arena,
                capture=self.device.type == "cuda",
                compile_step=self._compile_step,
            )

    def memory_info(self) -> dict[str, int | str]:
        """GetInfo's view of the cache, graphs and offload (docs/operations.md)."""
        arena, graphs, streamer = self.arena, self.graphs, self.streamer
        return {
            "kv_cache": self.kv_cache,
            "kv_free_pages": arena.free_pages if arena is not None else 0,
            "cuda_graphs": graphs.captured if graphs is not None else 0,
            "torch_compile": int(graphs is not None and graphs.compiled),
            "graph_replays": graphs.replays if graphs is not None else 0,
            "offloaded_blocks": len(streamer.order) if streamer is not None else 0,
            "offload_bytes_loaded": streamer.bytes_loaded if streamer is not None else 0,
        }

    def new_cache(self) -> SpanCache:
        if self.kv_cache == "paged":
            if self.arena is None:
                raise InternalServerError("the paged KV arena is not allocated yet")
            return PagedSpanCache(self.arena, len(self.span.layers))
        return DynamicSpanCache(config=self.span.config)

    def blocks(self, start: int, end: int) -> range:
        """Local block indices for the global sub-span [start, end); BadRequestError if not served."""
        if not self.info.start <= start < end <= self.info.end:
            raise BadRequestError(
                f"blocks {start}:{end} are not inside this server's span "
                f"{self.info.start}:{self.info.end}"
            )
        return range(start - self.info.start, end - self.info.start)

    @staticmethod
    def cache_length(cache: SpanCache, blocks: range) -> int:
        return cache.tokens(blocks[0])

    def truncate(self, cache: SpanCache, blocks: range, position: int) -> None:
        """Forget every cached token at `position` and after (rollback)."""
        cache.rollback(blocks, position, first_block=self.info.start)

    def _check_hidden_shape(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.info.hidden_size:
            raise BadRequestError(
                f"hidden states must be [batch, tokens, {self.info.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise BadRequestError(f"hidden states must be floating point, got {hidden.dtype}")
        if hidden.shape[0] < 1 or hidden.shape[1] < 1:
            raise BadRequestError(
                f"hidden states need at least one row and one token, got {list(hidden.shape)}"
            )

    @staticmethod
    def _check_mask_shape(mask: torch.Tensor | None, batch: int, length: int) -> None:
        if mask is not None and (mask.shape != (batch, length) or mask.is_floating_point()):
            raise BadRequestError(
                f"attention mask must be bool or int of shape [batch, past + new] = "
                f"[{batch}, {length}], got {mask.dtype} {list(mask.shape)}"
            )

    def _check_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_hidden_shape(hidden)
        return hidden.to(self.device, self.dtype)

    def _check_mask(
        self, mask: torch.Tensor | None, batch: int, length: int
    ) -> torch.Tensor | None:
        self._check_mask_shape(mask, batch, length)
        return None if mask is None else mask.to(self.device)

    def check_prompts(
        self, prompts: torch.Tensor | None, blocks: range, hidden: torch.Tensor
    ) -> None:
        """Deep prompts must be floating point [blocks, batch, prefix, hidden] with
        1 <= prefix <= tokens (BadRequestError otherwise)."""
        if prompts is None:
            return
        batch, tokens, width = hidden.shape
        if (
            prompts.dim() != 4
            or not prompts.is_floating_point()
            or prompts.shape[0] != len(blocks)
            or prompts.shape[1] != batch
            or not 1 <= prompts.shape[2] <= tokens
            or prompts.shape[3] != width
        ):
            raise BadRequestError(
                f"prompts must be floating point [{len(blocks)}, {batch}, prefix, {width}] "
                f"with 1 <= prefix <= {tokens}, got {prompts.dtype} {list(prompts.shape)}"
            )

    def check_backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        blocks: range | None = None,
    ) -> None:
        """Shape checks of a Backward (cheap): BadRequestError if it is malformed."""
        self._check_hidden_shape(hidden)
        self._check_mask_shape(attention_mask, hidden.shape[0], hidden.shape[1])
        if prompts is not None:
            self.check_prompts(prompts, blocks if blocks is not None else range(0), hidden)
        if grad_output.shape != hidden.shape or not grad_output.is_floating_point():
            raise BadRequestError(
                f"grad_output must be floating point of the hidden states' shape "
                f"{list(hidden.shape)}, got {grad_output.dtype} {list(grad_output.shape)}"
            )

    def check_step(
        self,
        hidden: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> None:
        """Shape checks of a step (cheap, no tensor work): BadRequestError if it is malformed."""
        self._check_hidden_shape(hidden)
        batch, tokens = hidden.shape[:2]
        if tokens < 1:
            raise BadRequestError("a step needs at least one token")
        if position < 0:
            raise BadRequestError(f"position must be >= 0, got {position}")
        self._check_mask_shape(attention_mask, batch, position + tokens)
        if position_ids is not None and (
            position_ids.shape != (batch, tokens) or position_ids.is_floating_point()
        ):
            raise BadRequestError(
                f"position_ids must be integers of shape [{batch}, {tokens}], "
                f"got {position_ids.dtype} {list(position_ids.shape)}"
            )

    def prepare_step(self, request: StepRequest) -> SpanInput:
        """Check a step, roll the cache back to its position and make room in it; the step's
        tensors stay where they are (`_on_device` moves them; decode graphs copy from the host).

        A `position` before the cache's end first rolls the cache back to it (a replay after
        failover or a speculative rollback); one past the end is an error. Every check comes
        before the rollback: a refused step leaves the cache as it was.
        """
        r = request
        self.check_step(r.hidden, r.position, r.attention_mask, r.position_ids)
        batch, tokens = r.hidden.shape[:2]
        tree = r.tree
        if tree is not None and (
            tree.depth.shape[0] != batch
            or tree.start + tree.begin != r.position
            or tree.begin + tokens > tree.depth.shape[1]
        ):
            raise BadRequestError("the tree does not match the step")
        if r.position_ids is None and tree is not None:
            position_ids = tree.position_ids(tokens)
        elif r.position_ids is None:
            position_ids = torch.arange(r.position, r.position + tokens)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        else:
            position_ids = r.position_ids.to(torch.long)
        self.truncate(r.cache, r.blocks, r.position)
        if isinstance(r.cache, PagedSpanCache):  # a full arena refuses before anything is written
            r.cache.reserve(batch, r.position + tokens)
        return SpanInput(r.hidden, position_ids, r.cache, r.attention_mask, tree)

    def _on_device(self, item: SpanInput) -> SpanInput:
        return SpanInput(
            item.hidden.to(self.device, self.dtype),
            item.position_ids.to(self.device),
            item.cache,
            None if item.mask is None else item.mask.to(self.device),
            item.tree,
        )

    @torch.inference_mode()
    def step(
        self,
        cache: SpanCache,
        blocks: range,
        hidden: torch.Tensor,
        position: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tree: Tree | None = None,
    ) -> torch.Tensor:
        """Run new tokens at `position` through the span, extending the session's cache
        (`tree`: their structure, for a tree step)."""
        request = StepRequest(cache, blocks, hidden, position, attention_mask, position_ids, tree)
        result = self.step_many([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.inference_mode()
    def step_many(self, requests: list[StepRequest]) -> list[torch.Tensor | Exception]:
        """Run several sessions' steps over the same blocks as one batched forward.

        Each request is checked on its own: a malformed one gets its error back and the others
        run. Outputs leave on the CPU (the wire encodes host memory; a no-op on a CPU server).
        """
        results: list[torch.Tensor | Exception] = []
        ready: list[tuple[int, SpanInput]] = []
        for request in requests:
            try:
                ready.append((len(results), self.prepare_step(request)))
                results.append(_PENDING)
            except BeeError as exc:
                results.append(exc)
        if not ready:
            return results
        blocks = requests[ready[0][0]].blocks
        if any(requests[i].blocks != blocks for i, _ in ready):
            raise ValueError("a batched step runs one block range")
        graphs = self.graphs
        decode: list[tuple[int, SpanInput]] = []
        if graphs is not None:
            decode = [(i, it) for i, it in ready if graphs.fits([it])]
            if decode and not graphs.gather_fits([it for _, it in decode], blocks):
                decode = []
        graphed = {i for i, _ in decode}
        eager = [(i, self._on_device(it)) for i, it in ready if i not in graphed]
        done: list[tuple[int, torch.Tensor | Exception]] = []
        if graphs is not None and decode:
            outs = self._run_graphs(graphs, [it for _, it in decode], blocks)
            done += [(i, out) for (i, _), out in zip(decode, outs, strict=True)]
        if len(eager) == 1:
            done.append((eager[0][0], self.span.forward_many([eager[0][1]], blocks)[0]))
        elif eager:
            outs = self._forward_isolated([it for _, it in eager], blocks)
            done += [(i, out) for (i, _), out in zip(eager, outs, strict=True)]
        for i, out in done:
            # A copy on the CPU: the batch's output is one tensor; a view would keep it alive.
            results[i] = out if isinstance(out, Exception) else out.to("cpu", copy=True)
        return results

    def _run_graphs(
        self, graphs: DecodeGraphs, items: list[SpanInput], blocks: range
    ) -> list[torch.Tensor | Exception]:
        """Decode steps through the CUDA graphs: all in one replay with shared products, one
        replay per session otherwise (each then computes exactly what it computes alone). A
        replay that fails runs its sessions eagerly, each alone."""
        groups: list[list[SpanInput]] = [[item] for item in items]
        if self.shared_matmul:  # as few replays as the largest bucket allows
            groups, rows = [[]], 0
            for item in items:
                if groups[-1] and rows + item.hidden.shape[0] > MAX_ROWS:
                    groups.append([])
                    rows = 0
                groups[-1].append(item)
                rows += int(item.hidden.shape[0])
        outputs: list[torch.Tensor | Exception] = []
        for group in groups:
            try:
                outputs += graphs.run(group, blocks)
                continue
            except Exception as exc:
                self.batch_fallbacks += 1
                log.warning("backend.graph_failed sessions=%d error=%r", len(group), exc)
            for item in group:
                try:
                    outputs.append(self.span.forward_many([self._on_device(item)], blocks)[0])
                except Exception as exc:
                    outputs.append(exc)
        return outputs

    def _forward_isolated(
        self, items: list[SpanInput], blocks: range
    ) -> list[torch.Tensor | Exception]:
        """A merged forward; if it fails (out of memory, say), every session's cache goes back
        to where it was and each runs alone, so only the step that fails alone fails."""
        saved = [item.cache.snapshot() for item in items]
        try:
            return list(self.span.forward_many(items, blocks, shared_matmul=self.shared_matmul))
        except Exception as exc:
            self.batch_fallbacks += 1
            log.warning("backend.batch_failed sessions=%d error=%r", len(items), exc)
        outputs: list[torch.Tensor | Exception] = []
        for item, lengths in zip(items, saved, strict=True):
            try:
                item.cache.restore(lengths)
                outputs.append(self.span.forward_many([item], blocks)[0])
            except Exception as exc:  # the session's cache is unusable: the caller closes it
                outputs.append(exc)
        return outputs

    @torch.inference_mode()
    def forward(
        self, blocks: range, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stateless forward of a whole sequence (training and scoring)."""
        hidden = self._check_hidden(hidden)
        batch, tokens = hidden.shape[:2]
        attention_mask = self._check_mask(attention_mask, batch, tokens)
        position_ids = torch.arange(tokens, device=self.device).unsqueeze(0).expand(batch, -1)
        return self.span(hidden, position_ids, None, attention_mask, blocks).cpu()

    def forward_units(
        self,
        blocks: range,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> Iterator[torch.Tensor | None]:
        """A stateless forward with deep prompts, one block per unit: yields None after each
        block but the last, then the output (on the CPU). No cache: the same computation as
        `backward_units` differentiates."""
        hidden = self._check_hidden(hidden)
        self.check_prompts(prompts, blocks, hidden)
        batch, tokens = hidden.shape[:2]
        attention_mask = self._check_mask(attention_mask, batch, tokens)
        prompts = None if prompts is None else prompts.to(self.device, self.dtype)
        position_ids = torch.arange(tokens, device=self.device).unsqueeze(0).expand(batch, -1)
        for n, index in enumerate(blocks):
            with torch.inference_mode():
                hidden = self.span(
                    _prompted(hidden, prompts, n),
                    position_ids,
                    None,
                    attention_mask,
                    range(index, index + 1),
                )
            if index != blocks[-1]:
                yield None
        yield hidden.cpu()

    def backward(
        self,
        blocks: range,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the span's output with respect to its input and its deep prompts;
        weights stay frozen."""
        for out in self.backward_units(blocks, hidden, grad_output, attention_mask, prompts):
            if out is not None:
                return out
        raise AssertionError("backward_units ended without a gradient")  # pragma: no cover

    def backward_units(
        self,
        blocks: range,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        graph_budget_bytes: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None] | None]:
        """`backward` one block at a time: yields None after each block's forward and each
        block's backward (the scheduler runs other work between them), then the gradients
        (input, prompts or None).

        The forward runs block by block; a block's autograd graph is kept for its backward
        while the graphs this server holds (all Backwards together) stay within
        `graph_budget_bytes`. Beyond it, activation checkpointing: only the block's input is
        kept, and its forward is recomputed under autograd just before its backward (one
        block's graph at a time: 1.2 GB less RSS for a 1024-token Backward through 30 blocks,
        at the cost of a second forward). The same operations run either way, so the gradient
        is the same. No grad mode is held across a yield (other jobs run on this thread in
        between). Block n's prompt is added to its input, so its gradient is that of the
        block's input at the prompt's positions.
        """
        self.check_backward(hidden, grad_output, attention_mask, prompts, blocks)
        hidden = self._check_hidden(hidden).detach()
        attention_mask = self._check_mask(attention_mask, hidden.shape[0], hidden.shape[1])
        prompts = None if prompts is None else prompts.to(self.device, self.dtype)
        batch, tokens = hidden.shape[:2]
        position_ids = torch.arange(tokens, device=self.device).unsqueeze(0).expand(batch, -1)

        def block(n: int, x: torch.Tensor) -> torch.Tensor:
            index = blocks[n]
            one = range(index, index + 1)
            return self.span(_prompted(x, prompts, n), position_ids, None, attention_mask, one)

        inputs = [hidden]
        kept: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # n -> (input, output, bytes)
        per_block: int | None = None  # saved bytes of one block's graph, as measured
        try:
            for n in range(len(blocks)):
                last = n == len(blocks) - 1
                if graph_budget_bytes and self._graph_room(per_block, graph_budget_bytes):
                    x = inputs[-1].detach().requires_grad_(True)
                    saved = _SavedBytes(self._weight_storages())
                    with torch.enable_grad(), saved.hooks():
                        out = block(n, x)
                    per_block = saved.nbytes
                    if self._hold_graph(saved.nbytes, graph_budget_bytes):
                        kept[n] = (x, out, saved.nbytes)
                    inputs.append(out.detach())
                    del out, x
                elif not last:
                    with torch.no_grad():
                        inputs.append(block(n, inputs[-1]))
                else:
                    break  # the last block's forward runs with its backward
                yield None
            grad = grad_output.to(self.device, self.dtype)
            grad_prompts: list[torch.Tensor] = []
            for n in reversed(range(len(blocks))):
                if n in kept:
                    x, out, nbytes = kept.pop(n)
                    with torch.enable_grad():
                        (grad,) = torch.autograd.grad(out, x, grad.to(out.dtype))
                    self._release_graph(nbytes)
                else:
                    x = inputs[n].detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = block(n, x)
                        (grad,) = torch.autograd.grad(out, x, grad.to(out.dtype))
                if prompts is not None:
                    grad_prompts.append(grad[:, : prompts.shape[2]].cpu())
                del out, x
                if n:
                    yield None
        finally:
            for _, _, nbytes in kept.values():  # closed early: an error, or the request gone
                self._release_graph(nbytes)
            kept.clear()
        stacked = torch.stack(grad_prompts[::-1]) if grad_prompts else None
        yield grad.cpu(), stacked

    # --- the Backward graphs' budget (shared by every Backward of this server) -----------------

    def _graph_room(self, per_block: int | None, budget: int) -> bool:
        with self._graph_lock:
            return per_block is None or self._graph_held + per_block <= budget

    def _hold_graph(self, nbytes: int, budget: int) -> bool:
        with self._graph_lock:
            if self._graph_held + nbytes > budget:
                return False
            self._graph_held += nbytes
            return True

    def _release_graph(self, nbytes: int) -> None:
        with self._graph_lock:
            self._graph_held -= nbytes

    @property
    def graph_bytes_held(self) -> int:
        """Bytes of Backward graphs held now (0 when no Backward runs)."""
        return self._graph_held

    def _weight_storages(self) -> frozenset[int]:
        if self._weights is None:
            self._weights = frozenset(
                t.untyped_storage().data_ptr()
                for t in (*self.span.parameters(), *self.span.buffers())
            )
        return self._weights


class _SavedBytes:
    """Bytes autograd saves for backward during a forward, the weights' own storage left out
    (frozen weights are saved by reference, not copied)."""

    def __init__(self, weights: frozenset[int]) -> None:
        self.weights = weights
        self.nbytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.weights and ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += storage.nbytes()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
