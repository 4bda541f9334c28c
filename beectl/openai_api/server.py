"""`beectl api`: OpenAI's chat and text completions over the swarm, on aiohttp.

Each request is one inference session (`n` choices are its rows), so concurrent requests are
concurrent sessions and the servers batch their steps. Streaming answers are server-sent events;
a client that goes away cancels its handler (aiohttp's handler cancellation), which closes the
session on the servers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from aiohttp import web

from beectl.generation import GenerationOutput, SamplingConfig, generate
from beectl.head_batch import HeadBatcher
from beectl.model import RemoteModel
from beectl.openai_api.choices import Choice
from beectl.openai_api.metrics import ApiMetrics
from beectl.openai_api.prefix_pool import Pooled, PrefixPool
from beectl.openai_api.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    parse_chat,
    parse_completion,
)
from beectl.speculative.adaptive import SpeculationConfig
from protocol.errors import (
    BadRequestError,
    BeeError,
    RequestTooLargeError,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    speculate: str = "auto"  # requests without their own "speculate"
    draft_model: str | None = None  # None: prompt lookup


def error_of(exc: BaseException) -> ApiError:
    """The OpenAI-shaped error for a failure while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BadRequestError | RequestTooLargeError):
        return ApiError(400, str(exc))
    if isinstance(exc, BeeError):  # no route, busy or unreachable servers, timeouts: the swarm
        return ApiError(
            503,
            f"the swarm cannot serve this request now: {exc}",
            type="service_unavailable",
            code=f"beed_{exc.code}",
        )
    return ApiError(500, f"internal error: {exc!r}", type="server_error")


class ApiServer:
    """The HTTP application over one loaded model."""

    def __init__(self, remote: RemoteModel, config: ApiConfig) -> None:
        self.remote = remote
        self.config = config
        self.tokenizer: Any = remote.tokenizer
        self.name = remote.files.name
        self.context = int(getattr(remote.head.config, "max_position_embeddings", 0) or 0)
        gc = remote.generation_config
        eos = gc.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos_ids))
        self.pad_token_id = int(gc.pad_token_id if gc.pad_token_id is not None else 0)
        self.requests = 0
        self.head = HeadBatcher(remote.head)  # one LM head product per burst of answers
        self.metrics = ApiMetrics(lambda: self.head)
        self.pool = PrefixPool(remote, context=self.context)  # sessions kept between turns
        self.draft = remote.draft_model(config.draft_model) if config.draft_model else None
        self.app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model}", self.model)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/metrics", self.exposition)

    # -- plumbing

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        key = self.config.api_key
        if key is not None and request.headers.get("Authorization", "") != f"Bearer {key}":
            error = ApiError(401, "invalid or missing API key", code="invalid_api_key")
            return web.json_response(error.body(), status=401)
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"
        began = time.perf_counter()
        status = 499  # the client went away
        self.metrics.active.inc()
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # aiohttp's own (404 route, 405 method, 413 size)
            error = ApiError(exc.status, exc.reason or "error", code=str(exc.status))
            status = exc.status
            return web.json_response(error.body(), status=exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = error_of(exc)
            if error.status >= 500:
                log.warning("api.failed path=%s error=%r", request.path, exc)
            status = error.status
            return web.json_response(error.body(), status=error.status)
        finally:
            self.metrics.active.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.seconds.labels(endpoint=endpoint).observe(time.perf_counter() - began)

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist here (this API serves {self.name!r})",
                param="model",
                code="model_not_found",
            )

    # -- routes

    async def _served(self) -> bool:
        """Whether the swarm serves every block of the model now."""
        ref = self.remote.ref
        for entry in await self.remote.swarm.models():
            if entry.fingerprint == ref.fingerprint:
                return entry.covered_blocks >= entry.num_blocks
        return False

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "beed"}

    async def exposition(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def models(self, request: web.Request) -> web.Response:
        data = [self._model_object()] if await self._served() else []
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        if not await self._served():
            raise ApiError(
                404, f"the swarm does not serve all of {self.name!r} now", code="model_not_found"
            )
        return web.json_response(self._model_object())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        parsed: ChatRequest = parse_chat(await self._body(request))
        self._check_model(parsed.model)
        try:
            encoded = self.tokenizer.apply_chat_template(
                parsed.messages, add_generation_prompt=True, return_dict=True
            )
        except Exception as exc:  # a template that refuses the roles' order, say
            raise ApiError(400, f"the chat template refuses these messages: {exc}") from None
        ids = list(encoded["input_ids"])
        return await self._complete(request, ids, parsed.sampling, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed: CompletionRequest = parse_completion(await self._body(request))
        self._check_model(parsed.model)
        ids = list(self.tokenizer(parsed.prompt).input_ids)
        return await self._complete(request, ids, parsed.sampling, chat=False)

    # -- generation

    def _sampling_config(self, s: Sampling) -> SamplingConfig:
        greedy = s.temperature == 0.0 or s.top_p == 0.0
        return SamplingConfig(
            max_new_tokens=s.max_tokens,
            do_sample=not greedy,
            temperature=1.0 if greedy else s.temperature,
            top_p=1.0 if greedy else s.top_p,
            seed=s.seed,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            stop_strings=s.stop,
        )

    async def _complete(
        self, request: web.Request, ids: list[int], s: Sampling, *, chat: bool
    ) -> web.StreamResponse:
        if self.context and len(ids) + s.max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) and max_tokens ({s.max_tokens}) exceed the "
                f"model's context of {self.context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        self.requests += 1
        kind = "chatcmpl" if chat else "cmpl"
        meta = {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.name,
        }

        def decode(tokens: list[int]) -> str:
            return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

        choices = [Choice(self.eos_token_ids, s.stop, decode) for _ in range(s.n)]
        stats = {"cached": 0}  # prompt tokens the servers held already (prefix reuse)
        events = self._run(ids, s, choices, stats)
        try:
            if not s.stream:
                async for _ in events:
                    pass
                return web.json_response(self._final(meta, chat, choices, len(ids), stats))
            return await self._stream(request, events, meta, chat, choices, len(ids), s, stats)
        finally:
            await events.aclose()  # a client that left: the generation and session end now

    async def _run(
        self, ids: list[int], s: Sampling, choices: list[Choice], stats: dict[str, int]
    ) -> AsyncGenerator[None, None]:
        """Generate in a task; yield after each step (the choices hold the tokens so far)."""
        steps: asyncio.Queue[object] = asyncio.Queue()
        done = object()
        input_ids = torch.tensor([ids] * s.n)

        began = time.perf_counter()
        first = [True]

        def on_tokens(next_ids: torch.Tensor) -> None:
            if first[0]:
                first[0] = False
                self.metrics.first_token.observe(time.perf_counter() - began)
            for choice, token in zip(choices, next_ids.tolist(), strict=True):
                before = len(choice.ids)
                choice.add(int(token))
                self.metrics.tokens.inc(len(choice.ids) - before)
            steps.put_nowait(None)

        async def run() -> None:
            if s.n > 1:  # n rows of one fresh session
                async with self.remote.inference_session(
                    max_length=len(ids) + s.max_tokens, batch_size=s.n
                ) as session:
                    with self.head.member():
                        await self._generate(session, input_ids, s, on_tokens, None)
                return
            need = len(ids) + s.max_tokens
            entry = await self.pool.take(ids, need)
            try:
                await self._on_pooled(entry, input_ids, s, on_tokens, stats)
            except BeeError:
                if entry.cached is None or not first[0]:
                    raise
                # The reused session is gone (timed out on a server, say): start afresh.
                entry = await self.pool.take(ids, need, reuse=False)
                await self._on_pooled(entry, input_ids, s, on_tokens, stats)

        task = asyncio.create_task(run())
        task.add_done_callback(lambda _: steps.put_nowait(done))
        try:
            while True:
                item = await steps.get()
                if item is done:
                    break
                yield None
            task.result()  # raises what the generation raised
            for choice in choices:
                choice.finish()
        finally:
            if not task.done():  # the client left (or the handler failed): close the session
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _on_pooled(
        self,
        entry: Pooled,
        input_ids: torch.Tensor,
        s: Sampling,
        on_tokens: Callable[[torch.Tensor], None],
        stats: dict[str, int],
    ) -> None:
        """Generate on a pooled session; back to the pool if it ended cleanly, closed if not."""
        stats["cached"] = 0 if entry.cached is None else int(entry.cached.shape[1])
        clean = False
        try:
            with self.head.member():
                out = await self._generate(entry.session, input_ids, s, on_tokens, entry.cached)
            # The last new token was never fed to the servers: it is not cached.
            entry.cached = out.sequences[:, : entry.session.position]
            clean = True
        finally:
            if clean:
                await self.pool.give(entry)
            else:
                await self.pool.discard(entry)

    async def _generate(
        self,
        session: Any,
        input_ids: torch.Tensor,
        s: Sampling,
        on_tokens: Callable[[torch.Tensor], None],
        cached: torch.Tensor | None,
    ) -> GenerationOutput:
        return await generate(
            self.remote.head,
            session,
            input_ids,
            self._sampling_config(s),
            cached_ids=cached,
            on_tokens=on_tokens,
            decode_text=lambda t: str(self.tokenizer.decode(t, skip_special_tokens=True)),
            logits=self.head.logits,
            speculation=SpeculationConfig.parse(s.speculate or self.config.speculate),
            draft_model=self.draft,
        )

    def _usage(
        self, choices: list[Choice], prompt_tokens: int, stats: dict[str, int]
    ) -> dict[str, Any]:
        completion = sum(len(c.ids) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            # OpenAI's field for prompt caching: the tokens the servers held already.
            "prompt_tokens_details": {"cached_tokens": stats["cached"]},
        }

    def _final(
        self,
        meta: dict[str, Any],
        chat: bool,
        choices: list[Choice],
        prompt_tokens: int,
        stats: dict[str, int],
    ) -> dict[str, Any]:
        if chat:
            items = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": None,
                }
                for i, c in enumerate(choices)
            ]
        else:
            items = [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(choices)
            ]
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": items,
            "usage": self._usage(choices, prompt_tokens, stats),
        }

    async def _stream(
        self,
        request: web.Request,
        events: AsyncGenerator[None, None],
        meta: dict[str, Any],
        chat: bool,
        choices: list[Choice],
        prompt_tokens: int,
        s: Sampling,
        stats: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        obj = "chat.completion.chunk" if chat else "text_completion"
        reported = [False] * len(choices)

        def chunk(items: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            body: dict[str, Any] = {**meta, "object": obj, "choices": items}
            if s.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n".encode()

        def item(i: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}

        await response.prepare(request)
        if chat:
            await response.write(chunk([item(i, "", None, True) for i in range(len(choices))]))
        try:
            async for _ in events:
                await self._send_deltas(response, choices, reported, chunk, item)
            await self._send_deltas(response, choices, reported, chunk, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the status line is sent already: an error event, then end
            if isinstance(exc, ConnectionResetError):
                raise
            error = error_of(exc)
            await response.write(f"data: {json.dumps(error.body())}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        if s.include_usage:
            await response.write(chunk([], self._usage(choices, prompt_tokens, stats)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _send_deltas(
        self,
        response: web.StreamResponse,
        choices: list[Choice],
        reported: list[bool],
        chunk: Callable[..., bytes],
        item: Callable[..., dict[str, Any]],
    ) -> None:
        items = []
        for i, c in enumerate(choices):
            if reported[i]:
                continue
            text = c.delta()
            if c.finish_reason is not None:
                items.append(item(i, text or None, c.finish_reason, False))
                reported[i] = True
            elif text:
                items.append(item(i, text, None, False))
        if items:
            await response.write(chunk(items))


async def serve_api(
    remote: RemoteModel, config: ApiConfig, on_ready: Callable[[str, int], None]
) -> None:
    """Serve until cancelled; `on_ready(host, port)` once listening."""
    server = ApiServer(remote, config)
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    addresses = runner.addresses  # the bound (host, port, ...): --port 0 picks one
    port = int(addresses[0][1]) if addresses else config.port
    on_ready(config.host, port)
    try:
        await asyncio.Event().wait()
    finally:
        log.info(
            "api.stopped requests=%d head_flushes=%d head_rows=%d",
            server.requests,
            server.head.flushes,
            server.head.rows,
        )
        await runner.cleanup()
        await server.pool.aclose()
