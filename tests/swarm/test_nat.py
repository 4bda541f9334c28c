"""A server behind a home router: found unreachable, served through relays, replaced relays.

The router is a network namespace made by the test (bench/netns.py; as root, skipped where
namespaces cannot be made): a veth pair joins it to this machine, and a policy rule drops every
packet the server sends from its listening port, so nobody outside can open a TCP connection to it (the SYN-ACK
never leaves), while its own outbound connections work, as behind NAT. Everything else is real:
daemons as subprocesses, the embedded model, the client in this process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from beectl.local_swarm import Daemon, stop_daemons
from beed.dht import DHTConfig, DHTNode
from beed.dht.peers import parse_initial_peers
from beed.dht.records import ServerRecord
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir, resolve_model
from beed.net.dial import DialPolicy
from beed.net.relay import RelayAddress, dial_relayed
from bench.netns import Router, RouterError, make_router, remove_router
from protocol.errors import RelayRefusedError
from tests.swarm.test_failover import Trigger, assert_same, generate_with, reference  # noqa: F401

NET = 20 + os.getpid() % 200  # 10.77.NET.0/24, one per test process


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    try:
        r = make_router(NET)
    except RouterError as exc:
        pytest.skip(str(exc))
    yield r
    remove_router(r)


@dataclass
class NatSwarm:
    router: Router
    tmp: Path
    env: dict[str, str]
    bootstrap: Daemon | None = None
    servers: list[Daemon] = field(default_factory=list)
    initial_peers: list[tuple[str, int]] = field(default_factory=list)

    def start_bootstrap(self) -> None:
        self.bootstrap = Daemon(
            "bootstrap",
            ["bootstrap", "--host", self.router.outside, "--port", "0"],
            self.tmp / "bootstrap.log",
        )
        self.bootstrap.start(self.env)
        self.initial_peers = parse_initial_peers([self.bootstrap.wait_ready(60.0).split()[-1]])

    def serve(self, name: str, blocks: str, *, behind_nat: bool = False) -> Daemon:
        host = self.router.inside if behind_nat else self.router.outside
        port = str(self.router.port) if behind_nat else "0"
        peers = ",".join(f"{h}:{p}" for h, p in self.initial_peers)
        args = ["serve", "--model", "smollm2-135m", "--host", host, "--port", port]
        args += ["--initial-peers", peers, "--block-indices", blocks, "--num-threads", "1"]
        args += ["--announce-period", "5"]
        prefix = self.router.prefix if behind_nat else []
        daemon = Daemon(name, args, self.tmp / f"{name}.log", prefix=prefix)
        daemon.start(self.env)
        self.servers.append(daemon)
        return daemon

    def live_peers(self) -> list[tuple[str, int]]:
        """DHT addresses of the daemons still running outside the router (a server's DHT port
        is its TCP port's number)."""
        daemons = [self.bootstrap, *(s for s in self.servers if s.name != "home")]
        peers = []
        for daemon in daemons:
            if daemon is None or daemon.process is None or daemon.process.poll() is not None:
                continue
            peers += self.initial_peers if daemon is self.bootstrap else [daemon.address]
        return peers

    def daemon_at(self, host: str, port: int) -> Daemon:
        if self.bootstrap is not None and (host, port) in self.initial_peers:
            return self.bootstrap
        return next(s for s in self.servers if s.ready_line and s.address == (host, port))

    def stop(self) -> None:
        stop_daemons([*self.servers, *([self.bootstrap] if self.bootstrap else [])])


@pytest.fixture(scope="module")
def nat_swarm(router) -> Iterator[NatSwarm]:
    with tempfile.TemporaryDirectory(prefix="beed-nat-") as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        swarm = NatSwarm(router, Path(tmp), env)
        try:
            swarm.start_bootstrap()
            a = swarm.serve("public-a", "0:15")
            b = swarm.serve("public-b", "0:15")
            a.wait_ready(180.0)
            b.wait_ready(180.0)
            swarm.serve("home", "15:30", behind_nat=True).wait_ready(180.0)
            yield swarm
        finally:
            swarm.stop()


def records(swarm: NatSwarm) -> dict[str, ServerRecord]:
    async def read() -> dict[str, ServerRecord]:
        node = DHTNode(DHTConfig(rpc_timeout_s=1.0), client_mode=True)
        await node.start(swarm.router.outside, 0)
        try:
            await node.bootstrap(swarm.live_peers())
            fingerprint = model_fingerprint(
                resolve_model("smollm2-135m").path, cache_dir() / "fingerprints.json"
            )
            found = await node.get_servers(fingerprint)
            contacts = node.protocol.router.find_neighbors(node.node, k=100)
            assert all(c.ip != swarm.router.inside for c in contacts), "a NAT'ed contact"
            return {r.peer_id: r for r in found}
        finally:
            await node.aclose()

    return asyncio.run(read())


def wait_for(predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(1.0)


def home_record(swarm: NatSwarm) -> ServerRecord:
    home = next(s for s in swarm.servers if s.name == "home")
    return records(swarm)[home.peer_id]


def test_a_server_behind_nat_is_found_unreachable_and_serves_through_relays(
    nat_swarm,
    reference,  # noqa: F811
):
    home = wait_for(lambda: (r := home_record(nat_swarm)).relays and len(r.relays) == 2 and r)
    assert home.reachability == "unreachable" and home.host == nat_swarm.router.inside
    public = [r for r in records(nat_swarm).values() if r.peer_id != home.peer_id]
    assert all(r.reachability == "public" and r.relaying for r in public)
    # Dialled directly, the server does not answer: that is what the relays are for.
    with pytest.raises(OSError):
        import socket

        socket.create_connection((home.host, home.port), timeout=2.0)
    ids, ref = reference
    out, _ = generate_with(nat_swarm, ids, Trigger(-1, lambda route: None))
    assert_same(out, ref)
    # The servers of blocks 0:15 push to it through its relays too (a push connection is also
    # what measures their round trip to it).
    pushed = f"push.connected host={home.host} port={home.port} peer={home.peer_id[:8]}"
    assert any(pushed in s.log_path.read_text() for s in nat_swarm.servers if s.name != "home")


def test_a_relay_refuses_to_splice_to_peers_that_did_not_ask_for_it(nat_swarm):
    host, port = nat_swarm.initial_peers[0]
    public = next(s for s in nat_swarm.servers if s.name == "public-a")

    async def ask(target: str) -> None:
        relay = RelayAddress("", host, port)
        await dial_relayed(relay, target, timeout_s=5.0, policy=DialPolicy(True))

    with pytest.raises(RelayRefusedError, match="does not listen"):
        asyncio.run(ask(public.peer_id))  # a reachable server never asked to be relayed
    with pytest.raises(RelayRefusedError, match="does not listen"):
        asyncio.run(ask("f" * 52))  # nobody at all


def test_a_relay_that_dies_is_replaced_and_the_session_fails_over(
    nat_swarm,
    reference,  # noqa: F811
):
    home = wait_for(lambda: (r := home_record(nat_swarm)).relays and len(r.relays) == 2 and r)
    # The relay clients dial first: the client's connection to the server goes through it.
    first = home.relays[0]
    victim = nat_swarm.daemon_at(first.host, first.port)
    killed: list[Daemon] = []

    def kill(route) -> None:
        victim.signal(signal.SIGKILL)
        killed.append(victim)

    ids, ref = reference
    out, recoveries = generate_with(nat_swarm, ids, Trigger(20, kill))
    assert killed and victim.process.wait(10) == -signal.SIGKILL
    assert recoveries >= 1
    assert_same(out, ref)
    # The server listens through another relay soon after (of the bootstrap node and the two
    # public servers, the one it did not use), and announces it.
    replaced = wait_for(
        lambda: (
            (r := home_record(nat_swarm)).relays
            and len(r.relays) == 2
            and (first.host, first.port) not in {(x.host, x.port) for x in r.relays}
            and r
        )
    )
    assert replaced, home_record(nat_swarm)
