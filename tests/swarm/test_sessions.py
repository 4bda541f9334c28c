"""Server-side session lifetime: the KV budget returns to zero on close, timeout and disconnect."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from beectl.local_swarm import Daemon
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from beed.net.peer import PeerConnection
from protocol.errors import (
    BadRequestError,
    ModelMismatchError,
    SpanNotServedError,
    UnknownSessionError,
)
from protocol.messages import Close, GetInfo, Info, OpenSession, SessionOpened, Step, StepResult


async def info(daemon: Daemon) -> dict:
    conn = PeerConnection(*daemon.address, tls=True)
    await conn.connect(5.0)
    try:
        reply = await conn.request(GetInfo(conn.new_stream_id()), 5.0)
        assert isinstance(reply, Info)
        return reply.info
    finally:
        await conn.aclose()


async def wait_sessions(daemon: Daemon, count: int, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        current = await info(daemon)
        if current["sessions"] == count or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.2)


async def open_session(
    conn: PeerConnection, fingerprint: str, span, timeout_s: float = 60.0
) -> int:
    sid = conn.new_stream_id()
    reply = await conn.request(
        OpenSession(sid, fingerprint, span[0], span[1], max_length=64, timeout_s=timeout_s), 10.0
    )
    assert isinstance(reply, SessionOpened)
    return sid


async def test_budget_returns_to_zero_on_close_timeout_and_disconnect(swarm2, model_path):
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    server = swarm2.servers[0]
    span = (0, 15)
    before = await info(server)
    assert before["sessions"] == 0 and before["used_kv_bytes"] == 0

    # 1. explicit Close
    conn = PeerConnection(*server.address, tls=True)
    await conn.connect(5.0)
    sid = await open_session(conn, fingerprint, span)
    reply = await conn.request(Step(sid, 1, 0, torch.randn(1, 5, 576)), 30.0)
    assert isinstance(reply, StepResult) and reply.hidden.shape == (1, 5, 576)
    during = await info(server)
    assert during["sessions"] == 1 and during["used_kv_bytes"] > 0
    await conn.request(Close(sid), 5.0)
    assert (await info(server))["used_kv_bytes"] == 0

    # 2. idle timeout (the server reaps once a second)
    sid = await open_session(conn, fingerprint, span, timeout_s=1.0)
    assert (await info(server))["sessions"] == 1
    after = await wait_sessions(server, 0)
    assert after["sessions"] == 0 and after["used_kv_bytes"] == 0
    try:
        await conn.request(Step(sid, 1, 0, torch.randn(1, 1, 576)), 10.0)
    except UnknownSessionError as exc:
        assert "closed or timed out" in str(exc)
    else:
        raise AssertionError("a step on a timed-out session must fail")

    # 3. the client disconnects without closing
    await open_session(conn, fingerprint, span)
    await open_session(conn, fingerprint, span)
    assert (await info(server))["sessions"] == 2
    await conn.aclose()
    after = await wait_sessions(server, 0)
    assert after["sessions"] == 0 and after["used_kv_bytes"] == 0


async def test_bad_requests_get_errors_and_the_connection_survives(swarm2, model_path):
    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    server = swarm2.servers[1]
    conn = PeerConnection(*server.address, tls=True)
    await conn.connect(5.0)
    try:
        sid = await open_session(conn, fingerprint, (15, 30))
        for bad in (
            Step(sid, 1, 0, torch.randn(1, 3, 100)),  # wrong hidden size
            Step(sid, 1, 5, torch.randn(1, 3, 576)),  # position past the cached end
            Step(sid, 1, 0, torch.randn(1, 65, 576)),  # beyond max_length
            Step(sid, 1, 0, torch.randn(2, 3, 576)),  # batch differs from the session's
            Step(sid, 1, 0, torch.randn(1, 3, 576), tree=torch.tensor([[-1, 1, 0]])),  # a loop
            Step(sid, 1, 0, torch.randn(1, 3, 576), tree=torch.tensor([[-1, 0]])),  # its shape
            Step(sid, 1, 0, torch.randn(1, 3, 576), tree=torch.tensor([[-1.0, 0.0, 1.0]])),
        ):
            try:
                await conn.request(bad, 10.0)
            except BadRequestError:
                pass
            else:
                raise AssertionError(f"{bad} must be refused")
        # The session is intact after the refusals.
        reply = await conn.request(Step(sid, 2, 0, torch.randn(1, 3, 576)), 10.0)
        assert isinstance(reply, StepResult)
        await conn.request(Close(sid), 5.0)
    finally:
        await conn.aclose()


async def test_stateless_forward_and_backward(swarm2, model_path, local_model, tokenizer):
    from protocol.messages import Backward, BackwardResult, Forward, ForwardResult

    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    ids = tokenizer("Forward passes for training", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = local_model(ids, output_hidden_states=True).hidden_states
    hidden = ref[0]
    conns = []
    try:
        for server, (start, end) in zip(swarm2.servers, [(0, 15), (15, 30)], strict=True):
            conn = PeerConnection(*server.address, tls=True)
            await conn.connect(5.0)
            conns.append(conn)
            reply = await conn.request(
                Forward(conn.new_stream_id(), fingerprint, start, end, hidden), 30.0
            )
            assert isinstance(reply, ForwardResult)
            hidden = reply.hidden
            if end == 15:  # transformers' hidden_states[15] is the output of block 14
                # Float32 rounding only (SmolLM2's hidden states reach ~2e4 here; the server's
                # thread count changes the order of its sums).
                torch.testing.assert_close(hidden, ref[15], rtol=1e-5, atol=1e-4)
        grad_out = torch.randn_like(hidden)
        reply = await conns[1].request(
            Backward(conns[1].new_stream_id(), fingerprint, 15, 30, ref[15], grad_out), 30.0
        )
        assert isinstance(reply, BackwardResult) and reply.grad_input.shape == ref[15].shape
        assert torch.isfinite(reply.grad_input).all() and reply.grad_input.abs().sum() > 0
        # The gradient is that of the served blocks: check it against a finite difference.
        direction = torch.randn_like(ref[15]) * 1e-2
        outs = []
        for sign in (1, -1):
            fwd = await conns[1].request(
                Forward(conns[1].new_stream_id(), fingerprint, 15, 30, ref[15] + sign * direction),
                30.0,
            )
            outs.append((fwd.hidden * grad_out).sum().item())
        numeric = (outs[0] - outs[1]) / 2
        analytic = (reply.grad_input * direction).sum().item()
        assert abs(numeric - analytic) <= 0.05 * abs(analytic) + 1e-3
        with pytest.raises(ModelMismatchError):
            await conns[0].request(Forward(conns[0].new_stream_id(), "0" * 24, 0, 15, ref[0]), 30.0)
        with pytest.raises(SpanNotServedError):
            await conns[0].request(
                Forward(conns[0].new_stream_id(), fingerprint, 0, 16, ref[0]), 30.0
            )
    finally:
        for conn in conns:
            await conn.aclose()


async def test_pipelined_requests_keep_order_and_truncate_rolls_back(swarm2, model_path):
    from protocol.messages import Ack, Truncate

    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    server = swarm2.servers[1]
    conn = PeerConnection(*server.address, tls=True)
    await conn.connect(5.0)
    torch.manual_seed(3)
    prompt, more = torch.randn(1, 20, 576), torch.randn(1, 3, 576)
    try:
        sid = await open_session(conn, fingerprint, (15, 30))
        # Sent back to back: a long step, a rollback, a step after it, and Close.
        replies = await asyncio.gather(
            conn.request(Step(sid, 1, 0, prompt), 30.0),
            conn.request(Truncate(sid, 10), 30.0),
            conn.request(Step(sid, 2, 10, more), 30.0),
            conn.request(Close(sid), 30.0),
        )
        assert [type(r) for r in replies] == [StepResult, Ack, StepResult, Ack]
        with pytest.raises(UnknownSessionError):
            await conn.request(Truncate(sid, 0), 10.0)

        # The rolled-back session computes what a fresh one fed the first 10 tokens computes.
        fresh = await open_session(conn, fingerprint, (15, 30))
        await conn.request(Step(fresh, 1, 0, prompt[:, :10]), 30.0)
        expected = await conn.request(Step(fresh, 2, 10, more), 30.0)
        # (A 20-token prefill cut to 10 and a 10-token prefill differ in float rounding only.)
        torch.testing.assert_close(replies[2].hidden, expected.hidden, rtol=1e-4, atol=1e-3)

        # Refused steps leave the cache alone.
        bad_ids = Step(fresh, 3, 5, torch.randn(1, 2, 576), position_ids=torch.zeros(1, 7))
        with pytest.raises(BadRequestError, match="position_ids"):
            await conn.request(bad_ids, 10.0)
        again = await conn.request(Step(fresh, 4, 10, more), 30.0)
        assert torch.equal(again.hidden, expected.hidden)
        with pytest.raises(BadRequestError, match="timeout_s"):
            await conn.request(
                OpenSession(conn.new_stream_id(), fingerprint, 15, 30, 8, timeout_s=float("nan")),
                10.0,
            )
        await conn.request(Close(fresh), 10.0)
    finally:
        await conn.aclose()
    after = await wait_sessions(server, 0)
    assert after["sessions"] == 0 and after["used_kv_bytes"] == 0
