"""The client's view of the swarm: a client-mode DHT node, server discovery and connections."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time

from beectl.bans import BanList
from beectl.config import ClientConfig
from beectl.routing import Hop, find_route
from beectl.speeds import SpeedCheck
from beectl.verify import Verifier
from beed.dht.node import DHTNode
from beed.dht.records import QUANTS, ModelEntry, ServerRecord, ServerState
from beed.models.fingerprint import fingerprint_quant, served_fingerprints
from beed.net.dial import DialPolicy
from beed.net.peer import PeerConnection
from protocol.errors import (
    BeeError,
    ModelMismatchError,
    NoRouteError,
    PeerUnreachableError,
    PhaseTimeoutError,
)

log = logging.getLogger(__name__)

MEASURE_RETRY_S = 60.0  # a server that could not be measured is not tried again this soon


class Swarm:
    """Finds servers of a model in the DHT and keeps one connection per server."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.dht = DHTNode(
            dataclasses.replace(config.dht, swarm_key=config.swarm_key), client_mode=True
        )
        self._connections: dict[str, PeerConnection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self.rtt_s: dict[str, float] = {}
        self.bans = BanList()  # shared by every session of this client
        self.speeds = SpeedCheck()  # measured per-block times, against announced throughput
        self.verifier = Verifier(config.verify_rate, config.verify_first_steps)
        self._servers_cache: dict[str, tuple[float, list[ServerRecord]]] = {}
        self.load: dict[str, int] = {}  # server sessions this client holds, per server
        self._measure_failed: dict[str, float] = {}  # peer id -> when measuring it failed
        # Records name addresses chosen by strangers: only those a swarm like ours may use.
        self.policy = DialPolicy.for_swarm(
            (host for host, _ in config.initial_peers), config.allow_private_addresses
        )
        self._refused_hosts: set[str] = set()
        self._overclaim_logged: set[str] = set()

    def session_opened(self, peer_id: str) -> None:
        self.load[peer_id] = self.load.get(peer_id, 0) + 1

    def session_closed(self, peer_id: str) -> None:
        left = self.load.get(peer_id, 0) - 1
        if left > 0:
            self.load[peer_id] = left
        else:
            self.load.pop(peer_id, None)

    async def start(self) -> None:
        if not self.config.initial_peers:
            raise PeerUnreachableError(
                "no --initial-peers given: pass the address printed by `beed bootstrap`"
            )
        self.policy = await DialPolicy.for_swarm_resolved(
            [host for host, _ in self.config.initial_peers], self.config.allow_private_addresses
        )
        await self.dht.start("0.0.0.0", 0)
        await self.dht.bootstrap(list(self.config.initial_peers))

    async def servers(
        self, fingerprint: str, num_blocks: int, *, max_age_s: float = 0.0
    ) -> list[ServerRecord]:
        """The servers of the model files `fingerprint`, in every quantization (each announces
        its own fingerprint: served_fingerprint), read in parallel. A record whose quant field
        and fingerprint disagree is left out."""
        reads = await asyncio.gather(
            *(
                self.servers_announcing(f, num_blocks, max_age_s=max_age_s)
                for f in served_fingerprints(fingerprint)
            )
        )
        return [
            r
            for found in reads
            for r in found
            if fingerprint_quant(fingerprint, r.model_fingerprint) == r.quant
        ]

    async def servers_announcing(
        self, fingerprint: str, num_blocks: int, *, max_age_s: float = 0.0
    ) -> list[ServerRecord]:
        """The servers announcing `fingerprint`, from the DHT, or from the last read if it is
        fresh enough.

        Failover reads the cache first: a DHT lookup right after a server died waits for that
        node's RPC timeout, while the replica is usually in the list already."""
        cached = self._servers_cache.get(fingerprint)
        if cached is not None and time.monotonic() - cached[0] <= max_age_s:
            return [r for r in cached[1] if r.state != ServerState.OFFLINE]
        try:
            async with asyncio.timeout(self.config.discovery_timeout_s):
                found = await self.dht.get_servers(fingerprint, 0, num_blocks, include_offline=True)
        except TimeoutError:
            raise PhaseTimeoutError(
                f"the DHT did not answer within {self.config.discovery_timeout_s:g} s"
            ) from None
        # A read can miss records (a lookup that stopped at nodes holding an older set): merge
        # it with what we saw before, newest record per server, until each record expires.
        # Offline records are kept in the merge so that they replace older online ones.
        now = time.time()
        merged = {
            r.peer_id: r for r in (cached[1] if cached is not None else []) if r.expires_at > now
        }
        for record in found:
            if not self.policy.allows(record.host):
                if record.host not in self._refused_hosts:
                    self._refused_hosts.add(record.host)
                    log.warning(
                        "swarm.address_refused peer=%s host=%s: a record of a public swarm names "
                        "a private address; not used (--allow-private-addresses to use it)",
                        record.peer_id[:8],
                        record.host,
                    )
                continue
            old = merged.get(record.peer_id)
            if old is None or record.newer_than(old):
                merged[record.peer_id] = record
        servers = sorted(
            (r for r in merged.values() if r.state != ServerState.OFFLINE),
            key=lambda r: (r.span_start, r.peer_id),
        )
        self._servers_cache[fingerprint] = (
            time.monotonic(),
            [*servers, *(r for r in merged.values() if r.state == ServerState.OFFLINE)],
        )
        return servers

    async def models(self) -> list[ModelEntry]:
        try:
            async with asyncio.timeout(self.config.discovery_timeout_s):
                return await self.dht.list_models()
        except TimeoutError:
            raise PhaseTimeoutError(
                f"the DHT did not answer within {self.config.discovery_timeout_s:g} s"
            ) from None

    async def route(
        self,
        fingerprint: str,
        model_name: str,
        num_blocks: int,
        *,
        start: int = 0,
        end: int | None = None,
        needed_kv_tokens: int = 0,
        max_age_s: float = 0.0,
        exclude: frozenset[str] = frozenset(),
        quant: str | None = None,
    ) -> list[Hop]:
        """The cheapest chain of online, unbanned servers for blocks [start, end), from a DHT
        read at most `max_age_s` old, leaving the servers in `exclude` out.

        Servers of one quantization only (`quant`, else the first of none, int8, nf4 that has
        a route), unless the config allows mixing (allow_quant) and no `quant` is asked."""
        servers = await self.servers(fingerprint, num_blocks, max_age_s=max_age_s)
        if not servers:
            await self._explain_missing(fingerprint, model_name)
        end = num_blocks if end is None else end
        if quant is None and self.config.allow_quant:
            return await self._route_among(
                servers, model_name, start, end, needed_kv_tokens, exclude
            )
        present = {s.quant for s in servers}
        tries = [quant] if quant is not None else [q for q in QUANTS if q in present]
        failure: NoRouteError | None = None
        for q in tries:
            group = [s for s in servers if s.quant == q]
            try:
                return await self._route_among(
                    group, model_name, start, end, needed_kv_tokens, exclude
                )
            except NoRouteError as exc:
                failure = failure or exc
        if quant is None and len(present) > 1:
            by_quant = ", ".join(
                f"{q}: {_spans([s for s in servers if s.quant == q])}"
                for q in QUANTS
                if q in present
            )
            raise NoRouteError(
                f"no route of one quantization covers blocks {start}:{end} (servers by "
                f"quantization: {by_quant}); pass --allow-quant (allow_quant=True) to chain "
                "servers of different quantizations"
            )
        if failure is None:  # no server of the asked quantization at all
            raise NoRouteError(f"no {quant} server of {model_name!r} for blocks {start}:{end}")
        raise failure

    async def _route_among(
        self,
        servers: list[ServerRecord],
        model_name: str,
        start: int,
        end: int,
        needed_kv_tokens: int,
        exclude: frozenset[str],
    ) -> list[Hop]:
        await self.measure(servers, start, end)
        measured = self.speeds.overrides(servers)
        for peer_id, seconds in measured.items():
            if peer_id not in self._overclaim_logged:
                self._overclaim_logged.add(peer_id)
                log.warning(
                    "swarm.overclaim peer=%s measured_block_ms=%.3f: slower than its record "
                    "claims; routed by the measured speed",
                    peer_id[:8],
                    1000 * seconds,
                )
        try:
            return find_route(
                servers,
                start,
                end,
                rtt_s=self.rtt_s,
                banned=self.bans.banned() | exclude,
                measured_block_s=measured,
                needed_kv_tokens=needed_kv_tokens,
                mode=self.config.routing,
                load=self.load,
                push=self.config.push,
            )
        except NoRouteError as exc:
            raise NoRouteError(
                f"{exc}. Start a server for the missing blocks: "
                f"beed serve --model {model_name} --blocks N --initial-peers ..."
            ) from None

    async def measure(self, servers: list[ServerRecord], start: int, end: int) -> None:
        """Measure the round trip to servers of [start, end) not measured yet (connecting to
        them, at most `measure_servers` at once, each bounded by `measure_timeout_s`), so that
        routes are costed with real link latencies; a server that does not answer in time is
        left to the default (and to the failover path, should a route use it)."""
        now = time.monotonic()
        todo = [
            s
            for s in servers
            if s.peer_id not in self.rtt_s
            and now - self._measure_failed.get(s.peer_id, -math.inf) > MEASURE_RETRY_S
            and s.state == ServerState.ONLINE
            and s.intersects(start, end)
            and s.peer_id not in self.bans.banned()
        ][: self.config.measure_servers]
        if not todo:
            return

        async def one(server: ServerRecord) -> None:
            try:
                async with asyncio.timeout(self.config.measure_timeout_s):
                    await self.connection(server)
            except (BeeError, TimeoutError) as exc:
                self._measure_failed[server.peer_id] = time.monotonic()
                log.debug("swarm.measure_failed peer=%s error=%s", server.peer_id[:8], exc)

        await asyncio.gather(*(one(s) for s in todo))

    async def _explain_missing(self, fingerprint: str, model_name: str) -> None:
        models = await self.models()
        same_name = [
            m for m in models if m.model_name == model_name and m.fingerprint != fingerprint
        ]
        if same_name:
            other = ", ".join(m.fingerprint for m in same_name)
            raise ModelMismatchError(
                f"servers announce {model_name!r} with other weights (fingerprint {other}; "
                f"yours is {fingerprint}); the client and servers must use the same model files"
            )
        present = ", ".join(sorted({m.model_name for m in models})) or "none"
        raise NoRouteError(
            f"no server serves {model_name!r} (fingerprint {fingerprint}); models in the swarm: "
            f"{present}"
        )

    async def connection(self, server: ServerRecord) -> PeerConnection:
        """A connected PeerConnection to this server (reused while it is healthy)."""
        conn = self._connections.get(server.peer_id)
        if conn is not None and not conn.closed:
            return conn
        lock = self._connecting.setdefault(server.peer_id, asyncio.Lock())
        async with lock:
            conn = self._connections.get(server.peer_id)
            if conn is not None and not conn.closed:
                return conn
            conn = PeerConnection(
                server.host,
                server.port,
                peer_id=server.peer_id,
                tls=server.tls,
                swarm_key=self.config.swarm_key,
                compression=self.config.compression,
                policy=self.policy,
                relays=server.dial_relays,
            )
            await conn.connect(self.config.connect_timeout_s)
            link = conn.link
            if link is not None and link.min_rtt_s is not None:  # the Hello round trip
                self.rtt_s[server.peer_id] = link.min_rtt_s
            self._connections[server.peer_id] = conn
            return conn

    async def aclose(self) -> None:
        conns, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        await self.dht.aclose()


def _spans(servers: list[ServerRecord]) -> str:
    spans = sorted({s.span for s in servers})
    return " ".join(f"{a}:{b}" for a, b in spans) or "none"
