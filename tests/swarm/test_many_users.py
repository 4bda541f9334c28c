"""Many clients at once: batched steps on the servers, the KV budget, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
import torch

from beectl.config import ClientConfig
from beectl.generation import GenerationOutput, SamplingConfig, generate
from beectl.head import LocalHead
from beectl.local_swarm import LocalSwarm
from beectl.model import RemoteModel, load_model_files
from beectl.swarm import Swarm
from beed.dht.peers import parse_initial_peers
from protocol.errors import ServerBusyError
from tests.conftest import STORY, peers_of
from tests.swarm.test_batch import PROMPTS as BATCH_PROMPTS
from tests.swarm.test_exactness import reference
from tests.swarm.test_sessions import info

PROMPTS = [  # the batch test's eight, seven more and a long one
    *BATCH_PROMPTS,
    "List three colours:",
    "def fibonacci(n):",
    "In 1969, the first",
    "My favourite food is",
    "Translate to French: good morning",
    "The opposite of hot is",
    "Question: what is 2 + 2? Answer:",
    " ".join([STORY] * 40),  # ~600 tokens: its prefill runs in chunks between the others' steps
]
NEW_TOKENS = 16


class Clients:
    """Independent clients in this process: each has its own DHT node and connections; they
    share only the (read-only) embeddings and head."""

    def __init__(self, swarm: LocalSwarm, count: int, **config: object) -> None:
        self.config = ClientConfig(
            initial_peers=tuple(parse_initial_peers(peers_of(swarm))),
            **config,  # type: ignore[arg-type]
        )
        self.count = count
        self.models: list[RemoteModel] = []

    async def __aenter__(self) -> list[RemoteModel]:
        files = load_model_files("smollm2-135m")
        head = LocalHead(files.path)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(files.path)
        for _ in range(self.count):
            swarm = Swarm(self.config)
            await swarm.start()
            self.models.append(RemoteModel(files, head, tokenizer, swarm, self.config))
        return self.models

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.gather(*(m.aclose() for m in self.models))


async def generate_one(model: RemoteModel, ids: torch.Tensor, new_tokens: int) -> GenerationOutput:
    async with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        return await generate(
            model.head,
            session,
            ids,
            SamplingConfig(max_new_tokens=new_tokens),
            output_logits=True,
        )


def assert_same(out: GenerationOutput, ref) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))
    assert worst <= 1e-4, worst


async def wait_for_sessions(swarm: LocalSwarm, count: int) -> None:
    """Until the servers together hold `count` sessions (at most 30 s)."""
    for _ in range(300):
        if sum([(await info(s))["sessions"] for s in swarm.servers]) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the servers never held {count} sessions")


async def assert_idle(swarm: LocalSwarm) -> None:
    """Every server: no session, no reserved cache, no queued step (waits for closes to land)."""
    for server in swarm.servers:
        for _ in range(50):
            current = await info(server)
            if current["sessions"] == 0 and current["queued_steps"] == 0:
                break
            await asyncio.sleep(0.2)
        assert current["sessions"] == 0, (server.name, current)
        assert current["used_kv_bytes"] == 0 and current["queued_steps"] == 0, current
        assert current["waiting_sessions"] == 0, current


async def test_sixteen_concurrent_clients_get_what_they_get_alone(swarm2, local_model, tokenizer):
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    refs = [reference(local_model, i, NEW_TOKENS) for i in ids]
    before = [await info(s) for s in swarm2.servers]
    async with Clients(swarm2, len(PROMPTS)) as models:
        outs = await asyncio.gather(
            *(generate_one(m, i, NEW_TOKENS) for m, i in zip(models, ids, strict=True))
        )
    for out, ref in zip(outs, refs, strict=True):
        assert_same(out, ref)
    # The servers did merge steps of different sessions into shared forwards.
    for server, old in zip(swarm2.servers, before, strict=True):
        now = await info(server)
        batches = now["batches"] - old["batches"]
        steps = now["batched_steps"] - old["batched_steps"]
        assert steps >= len(PROMPTS) * NEW_TOKENS and batches < steps, (server.name, now)
        assert now["batch_fallbacks"] == 0, (server.name, now)  # merged, not run one by one
    await assert_idle(swarm2)


@pytest.mark.parametrize("batching", [False, True], ids=["batching-off", "batching-on"])
async def test_steps_are_bit_identical_to_the_local_model(local_model, tokenizer, batching):
    """Batching off, each step runs alone; on, concurrent sessions' steps share forwards whose
    linear layers multiply each session's rows alone (float32's --batch-matmul auto), so both
    give the local model's logits bit for bit."""
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS[:4]]
    refs = [reference(local_model, i, 8) for i in ids]
    # Bit-identical needs the reference's thread count for decode steps too (attention over 8
    # or more cached tokens sums in an order set by its threads): the default decode threads
    # give ~3e-5 differences. Prefills too (LocalSwarm would give each server half the cores).
    threads = ["--decode-threads", str(torch.get_num_threads())]
    mode = "--continuous-batching" if batching else "--no-continuous-batching"
    with LocalSwarm(
        num_servers=2, extra_args=[mode, *threads], num_threads=torch.get_num_threads()
    ) as swarm:
        async with Clients(swarm, len(ids)) as models:
            outs = await asyncio.gather(
                *(generate_one(m, i, 8) for m, i in zip(models, ids, strict=True))
            )
        for out, ref in zip(outs, refs, strict=True):
            assert torch.equal(out.sequences, ref.sequences)
            assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
        for server in swarm.servers:
            now = await info(server)
            assert now["continuous_batching"] == batching
            if batching:  # steps did share forwards, and not by falling back one by one
                assert now["batches"] < now["batched_steps"] and now["batch_fallbacks"] == 0
                assert now["batch_matmul"] == "per-session"
            else:
                assert now["batches"] == now["batched_steps"]


async def test_a_full_server_refuses_with_busy_and_admitted_sessions_finish(local_model, tokenizer):
    # Each session reserves 3 × 24 = 72 tokens; a budget of 150 admits two at a time.
    ids = tokenizer("Tell me a story", return_tensors="pt").input_ids.expand(3, -1)
    prompt = ids[:1]
    new_tokens = 24 - prompt.shape[1]
    ref = reference(local_model, prompt, new_tokens)
    budget = ["--kv-budget-tokens", "150", "--max-kv-share-per-peer", "1", "--announce-period", "1"]
    with LocalSwarm(num_servers=2, extra_args=budget) as swarm:
        async with Clients(swarm, 3, kv_wait_s=0.0) as models:
            gate = asyncio.Event()

            async def admitted(model: RemoteModel) -> GenerationOutput:
                async with model.inference_session(max_length=72) as session:
                    await gate.wait()  # hold the cache until the third client was refused
                    return await generate(
                        model.head,
                        session,
                        prompt,
                        SamplingConfig(max_new_tokens=new_tokens),
                        output_logits=True,
                    )

            first = [asyncio.create_task(admitted(m)) for m in models[:2]]
            await wait_for_sessions(swarm, 4)
            with pytest.raises(ServerBusyError, match="server full"):
                await generate_one(models[2], prompt, 60)
            gate.set()
            for out in await asyncio.gather(*first):
                assert_same(out, ref)
        await assert_idle(swarm)

        # A client that agrees to wait gets in as soon as a session closes.
        async with Clients(swarm, 3, kv_wait_s=60.0) as models:
            outs = await asyncio.gather(*(generate_one(m, prompt, 48) for m in models))
        long_ref = reference(local_model, prompt, 48)
        for out in outs:
            assert torch.equal(out.sequences, long_ref.sequences)
        await assert_idle(swarm)


async def test_cancelled_and_killed_clients_leave_the_budget_at_zero(swarm2, tokenizer):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    # In-process clients cancelled mid-generation (their connections stay open) ...
    async with Clients(swarm2, 6) as models:
        tasks = [asyncio.create_task(generate_one(m, ids, 400)) for m in models]
        await wait_for_sessions(swarm2, 12)
        await asyncio.sleep(1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await assert_idle(swarm2)
    # ... and client processes killed mid-step (their connections drop).
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "beectl.cli",
            "generate",
            STORY,
            "--raw",
            "--max-new-tokens",
            "400",
            "--initial-peers",
            peers_of(swarm2)[0],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.read(8), 120)  # it is generating
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
    assert all(proc.returncode == -signal.SIGKILL for proc in procs)
    await assert_idle(swarm2)


async def test_a_filling_server_announces_it_and_clients_route_around_it(
    local_model, tokenizer, model_path
):
    from beed.models.fingerprint import model_fingerprint
    from beed.models.registry import cache_dir
    from beed.net.peer import PeerConnection
    from protocol.messages import OpenSession

    # The periodic refresh is a minute away: only the announce on a big change can tell clients.
    args = ["--kv-budget-tokens", "150", "--max-kv-share-per-peer", "1", "--announce-period", "60"]
    with LocalSwarm(spans=[(0, 30), (0, 30)], extra_args=args) as swarm:
        full, other = swarm.servers
        fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
        conn = PeerConnection(*full.address, tls=True)
        await conn.connect(5.0)
        try:
            await conn.request(OpenSession(conn.new_stream_id(), fingerprint, 0, 30, 144), 10.0)
            async with Clients(swarm, 1) as (model,):
                for _ in range(300):
                    records = await model.swarm.servers(fingerprint, 30)
                    free = {r.peer_id: r.free_kv_tokens for r in records}
                    if free.get(full.peer_id) == 6:
                        break
                    await asyncio.sleep(0.1)
                assert free == {full.peer_id: 6, other.peer_id: 150}
                prompt = tokenizer(STORY, return_tensors="pt").input_ids
                async with model.inference_session(max_length=prompt.shape[1] + 8) as session:
                    assert [h.peer_id for h in session.route] == [other.peer_id]
                    out = await generate(
                        model.head, session, prompt, SamplingConfig(max_new_tokens=8)
                    )
            assert torch.equal(out.sequences, reference(local_model, prompt, 8).sequences)
        finally:
            await conn.aclose()


async def test_a_client_that_floods_and_never_reads_does_not_stall_the_others(
    swarm2, local_model, tokenizer, model_path
):
    from beed.models.fingerprint import model_fingerprint
    from beed.models.registry import cache_dir
    from beed.net.stream import open_stream
    from protocol.messages import Hello, OpenSession, Ping, Pong, SessionOpened, Step

    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    first = swarm2.servers[0]
    span = (0, 15) if "blocks 0:15" in first.ready_line else (15, 30)
    hog = await open_stream(*first.address, timeout_s=5.0, tls=True)
    try:
        await hog.send(Hello(), timeout_s=5.0)
        await hog.read(timeout_s=5.0)
        await hog.send(OpenSession(1, fingerprint, span[0], span[1], 256), timeout_s=5.0)
        while isinstance(reply := await hog.read(timeout_s=10.0), Ping | Pong):
            pass  # round-trip probes of either side; this client never answers anything
        assert isinstance(reply, SessionOpened)
        # 200 prompt tokens again and again (each a rollback to 0), replies never read.
        prefill = torch.randn(1, 200, 576)
        for step in range(100):
            hog.send_nowait(Step(1, step, 0, prefill))
        prompt = tokenizer(STORY, return_tensors="pt").input_ids
        async with Clients(swarm2, 1) as (model,):
            out = await generate_one(model, prompt, 12)
        assert_same(out, reference(local_model, prompt, 12))
        assert (await info(first))["sessions"] == 1  # the hog is still there, still busy
    finally:
        await hog.aclose()
    await assert_idle(swarm2)


async def test_throughput_routing_spreads_one_clients_sessions_over_replicas(
    local_model, tokenizer
):
    prompt = tokenizer(STORY, return_tensors="pt").input_ids
    ref = reference(local_model, prompt, 8)
    with LocalSwarm(spans=[(0, 30), (0, 30)]) as swarm:
        async with Clients(swarm, 1, routing="throughput") as (model,):
            outs = await asyncio.gather(*(generate_one(model, prompt, 8) for _ in range(6)))
            assert model.swarm.load == {}  # every session closed
        for out in outs:
            assert torch.equal(out.sequences, ref.sequences)
        served = [(await info(s))["batched_steps"] for s in swarm.servers]
        assert all(steps >= 2 * 8 for steps in served), served  # both replicas took sessions
