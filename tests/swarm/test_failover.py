"""Servers that die or drain mid-generation cost a pause, never a wrong or lost token."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest
import torch

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import Daemon, LocalSwarm
from tests.conftest import STORY, peers_of
from tests.swarm.test_sessions import wait_sessions

NEW_TOKENS = 64


class Trigger:
    """A streamer that runs `action(route)` once, when the `at`-th new token arrives."""

    def __init__(self, at: int, action) -> None:
        self.at, self.action, self.count, self.session = at, action, -1, None

    def put(self, ids: torch.Tensor) -> None:
        self.count += 1  # the first put is the prompt
        if self.count == self.at:
            self.action(self.session.inner.route)

    def end(self) -> None:
        pass


def server_on_route(swarm: LocalSwarm, route, start: int) -> Daemon:
    peer = next(h.peer_id for h in route if h.start == start)
    return next(
        s for s in swarm.servers if s.process and s.process.poll() is None and s.peer_id == peer
    )


def generate_with(swarm: LocalSwarm, ids: torch.Tensor, trigger: Trigger):
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm), failover_timeout_s=120.0
    ) as model:
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            trigger.session = session
            out = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                session=session,
                streamer=trigger,
                return_dict_in_generate=True,
                output_logits=True,
            )
            recoveries = session.inner.recoveries
    return out, recoveries


@pytest.fixture(scope="module")
def reference(local_model, tokenizer):
    ids = tokenizer(STORY, return_tensors="pt").input_ids
    ref = local_model.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return ids, ref


def assert_same(out, ref) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))
    assert worst <= 1e-4, worst


def assert_no_sessions_left(swarm: LocalSwarm) -> None:
    for server in swarm.servers:
        if server.process is not None and server.process.poll() is None:
            info = asyncio.run(wait_sessions(server, 0, timeout_s=10.0))
            assert info["sessions"] == 0 and info["used_kv_bytes"] == 0, (server.name, info)


def test_kill_with_a_replica_running(reference):
    ids, ref = reference
    with LocalSwarm(spans=[(0, 15), (15, 30), (15, 30)]) as swarm:
        killed: list[Daemon] = []

        def kill(route) -> None:
            victim = server_on_route(swarm, route, 15)
            victim.signal(signal.SIGKILL)
            killed.append(victim)

        out, recoveries = generate_with(swarm, ids, Trigger(20, kill))
        assert killed and killed[0].process.wait(10) == -signal.SIGKILL
        assert recoveries == 1
        assert_same(out, ref)
        assert_no_sessions_left(swarm)


def test_kill_and_the_replica_starts_only_afterwards(reference):
    ids, ref = reference
    with LocalSwarm(spans=[(0, 15), (15, 30)]) as swarm:
        started: list[Daemon] = []

        def kill_then_start(route) -> None:
            server_on_route(swarm, route, 15).signal(signal.SIGKILL)
            started.append(swarm.add_server("15:30"))

        began = time.monotonic()
        out, recoveries = generate_with(swarm, ids, Trigger(30, kill_then_start))
        assert started and started[0].process.poll() is None
        started[0].wait_ready(10)  # it printed its ready line before the client could use it
        assert recoveries == 1 and time.monotonic() - began < 120
        assert_same(out, ref)
        assert_no_sessions_left(swarm)


def test_sigterm_drains_without_a_client_visible_error(reference):
    ids, ref = reference
    with LocalSwarm(
        spans=[(0, 15), (15, 30), (15, 30)], extra_args=["--drain-grace", "60"]
    ) as swarm:
        drained: list[Daemon] = []

        def terminate(route) -> None:
            victim = server_on_route(swarm, route, 15)
            victim.signal(signal.SIGTERM)
            drained.append(victim)

        began = time.monotonic()
        out, recoveries = generate_with(swarm, ids, Trigger(10, terminate))
        assert_same(out, ref)
        assert recoveries == 1
        # The session moved off on the drain notice: the server exits long before its grace.
        assert drained[0].process.wait(30) == 0
        assert time.monotonic() - began < 50
        assert_no_sessions_left(swarm)


def test_both_hops_killed_in_the_same_step(reference):
    # The second hop's connection is found dead only after the first hop was replaced, on the
    # same step: its replacement must replay that step too (once it did not, and the next step
    # found the new server one token short).
    ids, ref = reference
    with LocalSwarm(spans=[(0, 15), (0, 15), (15, 30), (15, 30)]) as swarm:
        killed: list[Daemon] = []

        def kill(route) -> None:
            for start in (0, 15):
                victim = server_on_route(swarm, route, start)
                victim.signal(signal.SIGKILL)
                killed.append(victim)
            for victim in killed:
                victim.process.wait(10)

        out, recoveries = generate_with(swarm, ids, Trigger(20, kill))
        assert len(killed) == 2
        assert recoveries == 2
        assert_same(out, ref)
        assert_no_sessions_left(swarm)


@pytest.mark.slow
def test_twenty_random_kill_points(reference):
    ids, ref = reference
    rng = random.Random(20261122)
    with LocalSwarm(spans=[(0, 15), (0, 15), (15, 30), (15, 30)]) as swarm:
        for trial in range(20):

            def kill(route) -> None:
                victim = server_on_route(swarm, route, rng.choice([0, 15]))
                victim.signal(signal.SIGKILL)
                victim.process.wait(10)
                start, end = (0, 15) if "blocks 0:15" in victim.ready_line else (15, 30)
                swarm.servers.remove(victim)
                swarm.add_server(f"{start}:{end}")  # restore the replica for the next trial

            out, _ = generate_with(swarm, ids, Trigger(rng.randrange(1, NEW_TOKENS), kill))
            assert_same(out, ref), trial
            for server in swarm.servers:
                server.wait_ready(300) if not server.ready_line else None


def test_four_servers_with_blocks_15_cover_every_block_twice():
    import json

    from tests.swarm.test_user_errors import beectl

    swarm = LocalSwarm(spans=[])
    with swarm:
        peers = peers_of(swarm)[0]
        daemons = [
            swarm.add_server(
                "",
                extra_args=[
                    "--blocks",
                    "15",
                    "--rebalance-period",
                    "3",
                    "--drain-grace",
                    "2",
                    "--announce-period",
                    "1",
                ],
            )
            for _ in range(4)
        ]
        for daemon in daemons:
            daemon.wait_ready(300)
        deadline = time.monotonic() + 120
        while True:
            listing = json.loads(beectl("swarm", "--json", "--initial-peers", peers).stdout)
            spans = sorted(
                tuple(s["blocks"]) for s in listing[0]["servers"] if s["state"] == "online"
            )
            if spans == [(0, 15), (0, 15), (15, 30), (15, 30)]:
                break
            assert time.monotonic() < deadline, spans
            time.sleep(2)
