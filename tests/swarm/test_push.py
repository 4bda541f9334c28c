"""Server-to-server push through real daemons: exact output, pushes really happen, a push runs
once and only on the session it names, and a killed middle server costs nothing but a pause."""

from __future__ import annotations

import asyncio
import secrets
import signal

import pytest
import torch

from beectl.local_swarm import Daemon, LocalSwarm
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from beed.net.peer import PeerConnection
from protocol.errors import BadRequestError, PushRefusedError
from protocol.messages import Ack, OpenSession, Push, SessionOpened, Step, StepResult
from tests.conftest import peers_of
from tests.swarm.test_exactness import check_same
from tests.swarm.test_failover import Trigger, assert_same, generate_with, server_on_route
from tests.swarm.test_sessions import info

# Three hops with a replica of the middle one (killed by the last test).
SPANS = [(0, 10), (10, 20), (10, 20), (20, 30)]
PUSH_KEYS = ("pushes_sent", "pushes_received", "push_failures", "pushes_refused")


@pytest.fixture(scope="module")
def swarm4():
    with LocalSwarm(spans=SPANS) as swarm:
        yield swarm


def counters(swarm: LocalSwarm) -> list[dict[str, int]]:
    async def read() -> list[dict[str, int]]:
        infos = [await info(s) for s in swarm.servers if s.process.poll() is None]
        return [{k: i[k] for k in (*PUSH_KEYS, "duplicate_steps")} for i in infos]

    return asyncio.run(read())


def test_push_through_three_servers_equals_local_and_pushes_happen(swarm4, local_model, tokenizer):
    before = counters(swarm4)
    check_same(local_model, tokenizer, peers_of(swarm4), speculate="off")  # a step per token
    after = counters(swarm4)
    sent = sum(a["pushes_sent"] - b["pushes_sent"] for a, b in zip(after, before, strict=True))
    received = sum(
        a["pushes_received"] - b["pushes_received"] for a, b in zip(after, before, strict=True)
    )
    # 64 new tokens = 1 prefill + 63 decode steps (the last token needs no step), two pushes each.
    assert sent == received == 2 * 64, (before, after)
    assert all(a["push_failures"] == b["push_failures"] for a, b in zip(after, before, strict=True))


def test_no_push_relays_every_hop(swarm4, local_model, tokenizer):
    from beectl import AutoDistributedModelForCausalLM
    from tests.conftest import STORY

    before = counters(swarm4)
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm4), push=False
    ) as model:
        out = model.generate(ids, max_new_tokens=8, eos_token_id=None)
    ref = local_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert counters(swarm4) == before


async def _open(conn: PeerConnection, fingerprint: str, span, token: str = "") -> int:
    sid = conn.new_stream_id()
    reply = await conn.request(
        OpenSession(sid, fingerprint, span[0], span[1], max_length=32, push_token=token), 10.0
    )
    assert isinstance(reply, SessionOpened)
    return sid


def _server(swarm: LocalSwarm, span: tuple[int, int]) -> Daemon:
    return swarm.servers[SPANS.index(span)]


async def test_unsolicited_and_malformed_pushes_are_refused(swarm4, model_path):
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    target = _server(swarm4, (20, 30))
    owner = PeerConnection(*target.address, tls=True)
    pusher = PeerConnection(*target.address, tls=True, local_peer_id="f" * 64)
    anonymous = PeerConnection(*target.address, tls=True)
    for conn in (owner, pusher, anonymous):
        await conn.connect(5.0)
    try:
        token = secrets.token_hex(16)
        sid = await _open(owner, fingerprint, (20, 30), token)
        plain = await _open(owner, fingerprint, (20, 30))  # opened without a push token
        hidden = torch.randn(1, 3, 576)

        def push(tok: str, **kw) -> Push:
            return Push(pusher.new_stream_id(), tok, 1, 0, hidden, **kw)

        # A token nobody opened a session with (the plain session has none) never runs.
        with pytest.raises(PushRefusedError, match="no session here accepts this push token"):
            await pusher.request(push(secrets.token_hex(16)), 10.0)
        with pytest.raises(PushRefusedError):
            await pusher.request(push(""), 10.0)
        # A peer that did not name a peer id (a client) may not push, even with the token.
        with pytest.raises(PushRefusedError, match="names its peer id"):
            await anonymous.request(Push(anonymous.new_stream_id(), token, 1, 0, hidden), 10.0)
        # A malformed route is refused before anything runs.
        bad_route = ({"host": "127.0.0.1", "port": 0, "peer_id": "x", "token": token},)
        with pytest.raises(BadRequestError, match=r"next_hops\[0\]\.port"):
            await pusher.request(push(token, next_hops=bad_route), 10.0)
        # Nothing ran on either session: both still start at position 0.
        for stream in (sid, plain):
            reply = await owner.request(Step(stream, 5, 0, hidden), 30.0)
            assert isinstance(reply, StepResult) and reply.hidden.shape == hidden.shape
        refused = (await info(target))["pushes_refused"]
        assert refused >= 4
        # A client's Step with a malformed route is refused too (and runs nothing).
        with pytest.raises(BadRequestError, match="next_hops"):
            await owner.request(Step(plain, 6, 3, hidden[:, :1], next_hops=({"host": 5},)), 10.0)
    finally:
        for conn in (owner, pusher, anonymous):
            await conn.aclose()


async def test_a_step_that_arrives_by_push_and_directly_runs_once(swarm4, model_path):
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    target = _server(swarm4, (20, 30))
    owner = PeerConnection(*target.address, tls=True)
    pusher = PeerConnection(*target.address, tls=True, local_peer_id="e" * 64)
    await owner.connect(5.0)
    await pusher.connect(5.0)
    try:
        token = secrets.token_hex(16)
        sid = await _open(owner, fingerprint, (20, 30), token)
        prompt, nxt = torch.randn(1, 4, 576), torch.randn(1, 1, 576)
        before = (await info(target))["duplicate_steps"]
        pushed = owner.expect_step(sid, 1)
        ack = await pusher.request(Push(pusher.new_stream_id(), token, 1, 0, prompt), 10.0)
        assert isinstance(ack, Ack)
        first = await owner.wait(pushed, "pushed step", 30.0)
        assert isinstance(first, StepResult) and first.step_id == 1
        # The same step again, straight from the owner (its fallback): answered, not rerun.
        again = await owner.request(Step(sid, 1, 0, prompt), 30.0)
        assert isinstance(again, StepResult) and torch.equal(again.hidden, first.hidden)
        assert (await info(target))["duplicate_steps"] == before + 1
        # The cache holds the prompt once: the next step at position 4 is accepted and exact.
        step2 = await owner.request(Step(sid, 2, 4, nxt), 30.0)
        assert isinstance(step2, StepResult)
        # An older step id is refused: a late push can never rewind a session.
        with pytest.raises(BadRequestError, match="older than"):
            await owner.request(Step(sid, 1, 5, nxt), 30.0)
        # Reference: the same inputs on a fresh session without push.
        plain = await _open(owner, fingerprint, (20, 30))
        ref = await owner.request(Step(plain, 1, 0, prompt), 30.0)
        ref2 = await owner.request(Step(plain, 2, 4, nxt), 30.0)
        assert isinstance(ref, StepResult) and isinstance(ref2, StepResult)
        assert torch.equal(ref.hidden, first.hidden)
        assert torch.equal(ref2.hidden, step2.hidden)
    finally:
        await owner.aclose()
        await pusher.aclose()


async def test_a_refused_push_is_reported_to_the_owner_after_the_copy(swarm4, model_path):
    """The first server answers with its copy at once; when the next server then refuses the
    push (a token it does not know), the owner gets a second StepResult saying so."""
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    first, nxt = _server(swarm4, (0, 10)), _server(swarm4, (20, 30))
    owner = PeerConnection(*first.address, tls=True)
    await owner.connect(5.0)
    try:
        sid = await _open(owner, fingerprint, (0, 10), secrets.token_hex(16))
        host, port = nxt.address
        route = (
            {"host": host, "port": port, "peer_id": nxt.peer_id, "token": "ab" * 16, "tls": True},
        )
        copy = owner.expect_step(sid, 1)
        notice = owner.expect_step(sid, 1)
        await owner.send(Step(sid, 1, 0, torch.randn(1, 2, 576), next_hops=route), 10.0)
        got = await owner.wait(copy, "copy", 30.0)
        assert isinstance(got, StepResult) and got.push_error == ""
        late = await owner.wait(notice, "notice", 30.0)
        assert isinstance(late, StepResult) and late.step_id == 1
        assert "no session here accepts this push token" in late.push_error
        assert torch.equal(late.hidden, got.hidden)
    finally:
        await owner.aclose()


def test_servers_announce_round_trips_to_the_next_servers(swarm4, model_path):
    """The first server measures both replicas of the middle span, each middle server the
    last one: clients cost push hops from these figures."""
    import time

    from beectl.config import ClientConfig
    from beectl.swarm import Swarm

    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    peers = {span: _server(swarm4, span).peer_id for span in SPANS if span != (10, 20)}
    middle = {s.peer_id for s, span in zip(swarm4.servers, SPANS, strict=True) if span == (10, 20)}

    async def read() -> dict[str, dict[str, float]]:
        swarm = Swarm(ClientConfig(initial_peers=tuple(swarm4.initial_peers)))
        await swarm.start()
        try:
            return {r.peer_id: dict(r.next_rtt_ms) for r in await swarm.servers(fingerprint, 30)}
        finally:
            await swarm.aclose()

    deadline = time.monotonic() + 60
    while True:
        rtts = asyncio.run(read())
        first, last = rtts.get(peers[(0, 10)], {}), rtts.get(peers[(20, 30)], {})
        mids = [rtts.get(p, {}) for p in middle]
        if set(first) == middle and all(set(m) == {peers[(20, 30)]} for m in mids):
            break
        assert time.monotonic() < deadline, rtts
        time.sleep(1.0)
    assert last == {}  # nothing comes after the last blocks
    assert all(0 < ms < 1000 for m in (first, *mids) for ms in m.values())


def test_kill_the_middle_server_with_push_on(swarm4, local_model, tokenizer):
    """Last in this module: it kills one of the two middle servers."""
    from tests.conftest import STORY

    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = local_model.generate(
        ids,
        max_new_tokens=64,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    killed: list[Daemon] = []

    def kill(route) -> None:
        victim = server_on_route(swarm4, route, 10)
        victim.signal(signal.SIGKILL)
        killed.append(victim)

    out, recoveries = generate_with(swarm4, ids, Trigger(20, kill))
    assert killed and killed[0].process.wait(10) == -signal.SIGKILL
    assert recoveries == 1
    assert_same(out, ref)
