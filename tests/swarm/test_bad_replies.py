"""A server that answers with garbage (NaNs, zeros, a wrong shape, integers, other blocks than
asked, a reply far larger than the step) or that stops answering is treated as failed: the client
bans it, moves its blocks to a replica, and the text equals local transformers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

import beed
from beectl import AutoDistributedModelForCausalLM
from beectl.config import ClientConfig
from beectl.local_swarm import LocalSwarm
from beed.dht.identity import Identity
from beed.dht.node import DHTNode
from beed.dht.records import ServerRecord, ServerState
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from beed.net.stream import FramedStream
from beed.server.backend import BlockBackend
from protocol.codecs import ALL_CODECS
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Close,
    Hello,
    OpenSession,
    Ping,
    Pong,
    SessionOpened,
    Step,
    StepResult,
    Truncate,
)
from tests.conftest import STORY, peers_of

NEW_TOKENS = 12
HONEST_STEPS = 5  # a "hang" server answers this many steps right, then none


def garbage(kind: str, hidden: torch.Tensor) -> torch.Tensor:
    if kind == "nan":
        return torch.full_like(hidden, float("nan"))
    if kind == "shape":
        return torch.zeros(hidden.shape[0], hidden.shape[1] + 1, hidden.shape[2])
    if kind == "zeros":
        return torch.zeros_like(hidden)
    if kind == "huge":  # ~46 MB for a step that answers a few KB
        return torch.zeros(hidden.shape[0], 20_000, hidden.shape[2])
    return torch.zeros(hidden.shape, dtype=torch.int64)


class LyingServer:
    """Speaks the protocol correctly and announces blocks 15:30 as a very fast server, but
    misbehaves in one way (`kind`): answers every Step with garbage, opens sessions for other
    blocks than asked ("span"), or computes the blocks honestly for a few steps and then never
    answers again ("hang"). Runs its own event loop in a thread."""

    def __init__(self, kind: str, initial_peers, fingerprint: str, model_path=None) -> None:
        self.kind, self.initial_peers, self.fingerprint = kind, initial_peers, fingerprint
        self.identity = Identity.generate()
        self.backend = BlockBackend(model_path, 15, 30) if kind == "hang" else None
        self.caches: dict[int, object] = {}
        self.opened = 0
        self.steps = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    def __enter__(self) -> LyingServer:
        self._thread.start()
        assert self._ready.wait(30), "the lying server did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer)
        try:
            await stream.read(timeout_s=10)  # the client's Hello
            hello = Hello(
                protocol_version=PROTOCOL_VERSION,
                software_version=beed.__version__,
                peer_id=self.identity.peer_id,
            )
            await stream.send(hello, timeout_s=10)
            while True:
                msg = await stream.read()
                if isinstance(msg, Ping):
                    await stream.send(Pong(0, msg.nonce), timeout_s=10)
                elif isinstance(msg, OpenSession):
                    self.opened += 1
                    start = msg.span_start + (1 if self.kind == "span" else 0)
                    reply = SessionOpened(msg.stream_id, start, msg.span_end, 10_000)
                    if self.backend is not None:
                        self.caches[msg.stream_id] = self.backend.new_cache()
                    await stream.send(reply, timeout_s=10)
                elif isinstance(msg, Step):
                    self.steps += 1
                    if self.backend is None:
                        out = garbage(self.kind, msg.hidden)
                    elif self.steps <= HONEST_STEPS:
                        out = self.backend.step(
                            self.caches[msg.stream_id], range(15), msg.hidden, msg.position
                        )
                    else:
                        continue  # hangs: the connection stays open, the answer never comes
                    await stream.send(StepResult(msg.stream_id, msg.step_id, out), timeout_s=60)
                elif isinstance(msg, Truncate | Close):
                    await stream.send(Ack(msg.stream_id), timeout_s=10)
        except Exception:
            await stream.aclose()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        dht = DHTNode(identity=self.identity)
        await dht.start("127.0.0.1", 0)
        await dht.bootstrap(list(self.initial_peers))
        record = ServerRecord(
            peer_id=self.identity.peer_id,
            state=ServerState.ONLINE,
            span_start=15,
            span_end=30,
            host="127.0.0.1",
            port=port,
            model_fingerprint=self.fingerprint,
            model_name="smollm2-135m",
            num_blocks=30,
            compute_tokens_per_s=1e9,  # the fastest server: routes take it first
            free_kv_tokens=1_000_000,
            codecs=tuple(ALL_CODECS),
            software_version=beed.__version__,
        )
        await dht.announce(record, ttl_s=120)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            # Gone from routes at once (the next test's liar is the only fast server).
            await dht.announce(dataclasses.replace(record, state=ServerState.OFFLINE), ttl_s=120)
            await dht.aclose()


@pytest.fixture(scope="module")
def swarm_with_replica():
    with LocalSwarm(spans=[(0, 15), (15, 30)]) as swarm:
        yield swarm


@pytest.mark.parametrize("kind", ["nan", "shape", "int", "zeros", "huge", "span", "hang"])
def test_a_server_answering_garbage_is_banned_and_the_text_is_exact(
    kind, swarm_with_replica, local_model, tokenizer, model_path
):
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = local_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    liar = LyingServer(kind, swarm_with_replica.initial_peers, fingerprint, model_path)
    with liar:
        with AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=peers_of(swarm_with_replica)
        ) as model:
            with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                began = time.monotonic()
                out = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, session=session
                )
                took = time.monotonic() - began
                recoveries = session.inner.recoveries
                route = [h.peer_id for h in session.inner.route]
        used = liar.steps if kind != "span" else liar.opened
        assert used >= 1, "the lying server was never used: the test proves nothing"
        # (A bad open is routed around while the session opens, not recovered from later.)
        assert (recoveries >= 1 or kind == "span") and liar.identity.peer_id not in route
    assert torch.equal(out, ref)
    if kind == "hang":
        # It answered decode steps in milliseconds, so the hung step was given up after the
        # adaptive timeout (at least min_step_timeout_s), not the fixed minute.
        assert liar.steps > HONEST_STEPS
        assert took < ClientConfig().step_timeout_s / 2, took
