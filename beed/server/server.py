"""BlockServer: the lifetime of one `beed serve` process, from model resolution to clean exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import beed
from beed.dht.identity import Identity
from beed.dht.node import DHTNode
from beed.dht.peers import reachable_host
from beed.dht.records import ServerRecord, ServerState
from beed.models.adapters import load_config, num_blocks
from beed.models.fingerprint import model_fingerprint, served_fingerprint
from beed.models.registry import cache_dir, resolve_model
from beed.net.dial import DialPolicy
from beed.net.stream import FramedStream
from beed.net.tasks import TaskOwner
from beed.net.traffic import TensorTraffic
from beed.relay.service import RelayService
from beed.server.admission import Admission
from beed.server.config import ServerConfig, available_cores, default_decode_threads
from beed.server.connection import ServerConnection
from beed.server.info import server_info
from beed.server.kv_budget import KVBudget
from beed.server.listen import TcpListener, bind_tcp, serve_tcp, start_dht
from beed.server.loading import kv_budget_tokens, load_backend
from beed.server.memory import request_memory, return_large_blocks, trim_heap
from beed.server.metrics import ServerMetrics
from beed.server.neighbours import measure_next_rtts, rtts_changed
from beed.server.placement import better_span, choose_span
from beed.server.probe import measure_block_throughput
from beed.server.push import Pusher
from beed.server.reach import Reachability
from beed.server.scheduler import Scheduler, with_threads
from beed.server.service import ServerState as SharedState
from beed.server.sessions import SessionRegistry
from beed.systemd import notify_systemd
from protocol.codecs import ALL_CODECS
from protocol.errors import BadRequestError, BeeError, DrainingError, InternalServerError
from protocol.messages import PROTOCOL_VERSION, Error, Hello

log = logging.getLogger(__name__)

# On a GPU the blocks run there; this process's torch work on the host is copies and checks of
# activations (a few hundred KiB). With a team of many OpenMP threads every such op above 32K
# elements becomes a parallel region, and the teams of this process, the client's and other
# servers' on the same cores wait for each other: on the H200 host (16 cores, two servers and a
# client) a 32-row step spent ~16 ms per check of 128K values. One thread does each in ~50 us.
CUDA_HOST_THREADS = 1

KV_ANNOUNCE_MIN_S = 5.0  # earliest re-announce after free KV cache changed a lot


@dataclasses.dataclass(frozen=True)
class Ready:
    """Reported once the server accepts connections and has announced itself."""

    host: str
    port: int
    dht_port: int
    span: tuple[int, int]
    peer_id: str
    model_name: str
    fingerprint: str


class BlockServer:
    """Serves one span of one model until `stop()` (or SIGTERM/SIGINT) and exits cleanly."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._tasks = TaskOwner("server", on_crash=self._crashed)
        self._connections = TaskOwner("connections", isolate=True)
        self._request_tasks = TaskOwner("requests", isolate=True)  # push confirmations
        self._failure: BaseException | None = None
        self._next_connection = 0
        self.state: SharedState | None = None
        self.dht: DHTNode | None = None
        self._record: ServerRecord | None = None
        self.scheduler: Scheduler | None = None
        self.pusher: Pusher | None = None
        self.metrics: ServerMetrics | None = None  # --metrics-port
        self.reach: Reachability | None = None  # behind NAT or not (beed/server/reach.py)
        self.relay: RelayService | None = None  # relaying for others (--relay)

    def stop(self) -> None:
        self._stop.set()

    def _crashed(self, exc: BaseException) -> None:
        """A background task of the server (or its scheduler, or DHT node) crashed: stop, and
        let `run` end with that error once everything is cleaned up."""
        if self._failure is None:
            self._failure = exc
        self.stop()

    async def run(self, on_ready: Callable[[Ready], None] | None = None) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        return_large_blocks()
        cores = available_cores()
        threads = cfg.num_threads or (CUDA_HOST_THREADS if cfg.device != "cpu" else cores)
        decode_threads = min(threads, cfg.decode_threads or default_decode_threads(cores))
        torch.set_num_threads(threads)
        log.info("server.threads compute=%d decode=%d cores=%d", threads, decode_threads, cores)
        # Every torch operation of this process runs on this one thread: libgomp gives each
        # calling thread its own OpenMP team, and once teams hold more threads than the machine
        # has cores it stops spin-waiting, which made every step ~60% slower (measured).
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="beed-compute")

        def run_compute(fn: Callable[[], Any]) -> asyncio.Future[Any]:
            return loop.run_in_executor(executor, fn)

        source = await run_compute(lambda: resolve_model(cfg.model))
        fingerprint = served_fingerprint(
            await asyncio.to_thread(
                model_fingerprint, source.path, cache_dir() / "fingerprints.json"
            ),
            cfg.quant,
        )
        total = num_blocks(await asyncio.to_thread(load_config, source.path))
        identity = (
            await asyncio.to_thread(Identity.load_or_create, cfg.identity_path)
            if cfg.identity_path
            else Identity.generate()
        )
        tcp: TcpListener | None = None
        self.dht = dht = DHTNode(
            dataclasses.replace(cfg.dht, swarm_key=cfg.swarm_key), identity, on_crash=self._crashed
        )
        try:
            tcp_sock = bind_tcp(cfg.host, cfg.port)
            port = tcp_sock.getsockname()[1]
            dht_port = await start_dht(
                dht, cfg.host, cfg.dht_port if cfg.dht_port is not None else port
            )
            dht.set_reachable(False)  # a contact of others only once peers could dial us back
            if cfg.initial_peers:
                await dht.bootstrap(list(cfg.initial_peers))
            public_host = cfg.public_host or reachable_host(cfg.host)
            policy = DialPolicy.for_swarm(
                [public_host, *(h for h, _ in cfg.initial_peers)], cfg.allow_private_addresses
            )
            self.reach = Reachability(
                cfg, dht, identity, cfg.public_port or port, fingerprint, policy, self._changed
            )
            await self.reach.check()
            span = await self._choose_span(dht, fingerprint, total)
            base = ServerRecord(
                peer_id=identity.peer_id,
                state=ServerState.JOINING,
                span_start=span[0],
                span_end=span[1],
                host=public_host,
                port=cfg.public_port or port,
                model_fingerprint=fingerprint,
                model_name=source.name,
                num_blocks=total,
                dtype=cfg.dtype,
                quant=cfg.quant,
                protocol_version=PROTOCOL_VERSION,
                codecs=tuple(ALL_CODECS),
                software_version=beed.__version__,
                tls=cfg.encryption,
                **self.reach.record_fields(),
            )
            self._record = base
            await dht.announce(base, ttl_s=cfg.record_ttl_s)
            backend = await run_compute(lambda: load_backend(cfg, source.path, span))
            kv_tokens = kv_budget_tokens(cfg, backend)
            await run_compute(lambda: backend.allocate_kv(kv_tokens))
            per_block_tps = await run_compute(
                lambda: with_threads(decode_threads, lambda: measure_block_throughput(backend))
            )
            budget = KVBudget(kv_tokens, backend.info.kv_bytes_per_token)
            log.info(
                "server.kv_budget tokens=%d bytes=%d",
                budget.capacity_tokens,
                budget.capacity_tokens * budget.bytes_per_token,
            )
            hello = Hello(
                protocol_version=PROTOCOL_VERSION,
                software_version=beed.__version__,
                peer_id=identity.peer_id,
                features=("push", "tree", "prompts")
                if backend.span.family.takes_trees
                else ("push", "prompts"),
            )
            traffic = TensorTraffic()
            self.pusher = Pusher(
                identity.peer_id,
                traffic=traffic,
                connect_timeout_s=cfg.push_connect_timeout_s,
                ack_timeout_s=cfg.push_ack_timeout_s,
                compression=cfg.compression,
                swarm_key=cfg.swarm_key,
                policy=policy,
            )
            scheduler_config = dataclasses.replace(
                cfg.scheduler, compute_threads=threads, decode_threads=decode_threads
            )
            self.scheduler = Scheduler(run_compute, scheduler_config, on_crash=self._crashed)
            self.scheduler.start()
            self.state = SharedState(
                config=cfg,
                backend=backend,
                sessions=SessionRegistry(budget, self.scheduler.forget, cfg.limits),
                fingerprint=fingerprint,
                hello=hello,
                scheduler=self.scheduler,
                info=lambda: self._info(),
                pusher=self.pusher,
                tasks=self._request_tasks,
                memory=request_memory(cfg, backend.info.hidden_size),
                admission=Admission(cfg.limits),
                traffic=traffic,
                public_key=identity.public_key_bytes,
                swarm_key=cfg.swarm_key,
            )
            if cfg.metrics_port is not None:
                self.metrics = ServerMetrics(self._info, asyncio.get_running_loop())
                bound = self.metrics.start(cfg.host, cfg.metrics_port)
                self.state.observe_step = self.metrics.observe_step
                log.info("server.metrics host=%s port=%d", cfg.host, bound)
            tls = identity if cfg.encryption else None
            relay = None
            if cfg.relay:
                relay_config = dataclasses.replace(cfg.relay_config, swarm_key=cfg.swarm_key)
                relay = RelayService(relay_config, identity.peer_id)
            tcp = await serve_tcp(
                self._on_connection, tcp_sock, tls, cfg.limits.hello_timeout_s, relay
            )
            self.relay = relay
            self.reach.attach(tcp)
            self._record = dataclasses.replace(
                base, state=ServerState.ONLINE, compute_tokens_per_s=per_block_tps
            )
            await self._announce()
            self._tasks.spawn(self._announce_loop(), "announce")
            self._tasks.spawn(self._reap_loop(), "reap")
            self._tasks.spawn(self._next_rtt_loop(fingerprint, total), "next-rtt")
            if cfg.block_indices is None and cfg.rebalance_period_s > 0:
                self._tasks.spawn(
                    self._rebalance_loop(source.path, fingerprint, total, run_compute), "rebalance"
                )
            ready = Ready(
                public_host, port, dht_port, span, identity.peer_id, source.name, fingerprint
            )
            log.info(
                "server.ready host=%s port=%d span=%d:%d peer_id=%s",
                public_host,
                port,
                span[0],
                span[1],
                identity.peer_id,
            )
            if on_ready is not None:
                on_ready(ready)
            notify_systemd("READY=1")
            await self._stop.wait()
            await self._drain()
        finally:
            notify_systemd("STOPPING=1")
            if self.metrics is not None:
                self.metrics.stop()
            await self._tasks.aclose()
            if self.reach is not None:
                await self.reach.aclose()
            if tcp is not None:
                await tcp.aclose()
            await self._connections.aclose()
            await self._request_tasks.aclose()
            if self.pusher is not None:
                await self.pusher.aclose()
            if self.scheduler is not None:
                await self.scheduler.aclose()
            if self._record is not None:  # also when loading failed after announcing "joining"
                self._record = dataclasses.replace(self._record, state=ServerState.OFFLINE)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._announce(), timeout=5.0)
            await dht.aclose()
            executor.shutdown(wait=False, cancel_futures=True)
            log.info("server.stopped")
        if self._failure is not None:
            raise InternalServerError(
                f"a server task crashed: {self._failure!r}"
            ) from self._failure

    async def _choose_span(self, dht: DHTNode, fingerprint: str, total: int) -> tuple[int, int]:
        cfg = self.config
        if cfg.block_indices is not None:
            start, end = cfg.block_indices
            if not 0 <= start < end <= total:
                raise BadRequestError(
                    f"--block-indices {start}:{end} is outside the model's blocks 0:{total}"
                )
            return start, end
        servers = await dht.get_servers(fingerprint, 0, total)
        # Our throughput is measured after loading; until then assume we are a typical server.
        rates = sorted(s.compute_tokens_per_s for s in servers if s.compute_tokens_per_s > 0)
        own = rates[len(rates) // 2] if rates else 1.0
        return choose_span(
            servers, total, cfg.num_blocks or total, exclude_peer=dht.peer_id, own_tps=own
        )

    async def _rebalance_loop(
        self,
        model_dir: Path,
        fingerprint: str,
        total: int,
        run_compute: Callable[[Callable[[], Any]], asyncio.Future[Any]],
    ) -> None:
        """Every period (with jitter, so servers do not all move at once), move to a span that
        clearly raises the swarm's weakest coverage: announce it as joining, load the new blocks
        while the old ones keep serving, switch, then let sessions on the old blocks move off
        (they get drain notices) or close within the grace period."""
        while True:
            period = self.config.rebalance_period_s
            await asyncio.sleep(random.uniform(0.5, 1.5) * period)
            if self.state is None or self._record is None or self.dht is None:
                continue
            if self.state.draining:
                return
            if not self.state.sessions:
                await self._remeasure(run_compute)
            try:
                servers = await self.dht.get_servers(fingerprint, 0, total)
            except Exception as exc:  # a failed read is retried next period
                log.warning("rebalance.read_failed error=%r", exc)
                continue
            current = (self._record.span_start, self._record.span_end)
            target = better_span(
                servers,
                total,
                current,
                self_peer=self._record.peer_id,
                own_tps=self._record.compute_tokens_per_s,
            )
            if target is None:
                continue
            await self._move(model_dir, target, run_compute)

    async def _remeasure(
        self, run_compute: Callable[[Callable[[], Any]], asyncio.Future[Any]]
    ) -> None:
        """Measure block throughput again while idle and keep the best figure: a measurement
        only errs low (other processes took the CPU, as when servers start together), and
        placement weighs servers by it, so a low figure would skew where servers go."""
        if self.state is None or self._record is None:
            return
        backend = self.state.backend
        tps = await run_compute(lambda: measure_block_throughput(backend))
        if tps > self._record.compute_tokens_per_s * 1.1:
            log.info("server.throughput old=%.0f new=%.0f", self._record.compute_tokens_per_s, tps)
            self._record = dataclasses.replace(self._record, compute_tokens_per_s=tps)
            await self._announce()

    async def _move(
        self,
        model_dir: Path,
        target: tuple[int, int],
        run_compute: Callable[[Callable[[], Any]], asyncio.Future[Any]],
    ) -> None:
        if self.state is None or self._record is None:
            return
        cfg = self.config
        old_backend, old_record = self.state.backend, self._record
        log.info(
            "rebalance.move from=%d:%d to=%d:%d",
            old_record.span_start,
            old_record.span_end,
            target[0],
            target[1],
        )
        self._record = dataclasses.replace(
            old_record, state=ServerState.JOINING, span_start=target[0], span_end=target[1]
        )
        await self._announce()
        try:
            backend = await run_compute(lambda: load_backend(cfg, model_dir, target))
            capacity = self.state.sessions.budget.capacity_tokens
            await run_compute(lambda: backend.allocate_kv(capacity))
            tps = await run_compute(lambda: measure_block_throughput(backend))
        except Exception as exc:
            log.error("rebalance.load_failed to=%d:%d error=%r", target[0], target[1], exc)
            self._record = old_record
            await self._announce()
            return
        self.state.backend = backend
        self._record = dataclasses.replace(
            self._record, state=ServerState.ONLINE, compute_tokens_per_s=tps
        )
        await self._announce()
        # Sessions on the old blocks get drain notices with each step; close the rest later.
        await asyncio.sleep(cfg.drain_grace_s)
        for key in self.state.sessions.on_backend(old_backend):
            self.state.sessions.close(key, "moved")
        log.info("rebalance.done span=%d:%d", target[0], target[1])

    def _info(self) -> dict[str, Any]:
        if self.state is None or self._record is None:
            return {}
        return server_info(self.state, self._record)

    async def _announce(self) -> None:
        if self.dht is None or self._record is None:
            return
        record = self._record
        if self.reach is not None:
            record = dataclasses.replace(record, **self.reach.record_fields())
        if self.state is not None:
            record = dataclasses.replace(
                record, free_kv_tokens=self.state.sessions.budget.free_tokens
            )
        await self.dht.announce(record, ttl_s=self.config.record_ttl_s)
        if self.metrics is not None:
            self.metrics.announced_at = time.monotonic()

    def _changed(self) -> None:
        """Reachability or the relays we listen through changed: announce it now."""
        self._tasks.spawn(self._announce_quietly(), "announce-change")

    async def _announce_quietly(self) -> None:
        try:
            await self._announce()
        except Exception as exc:  # retried by the announce loop
            log.warning("announce.failed error=%r", exc)

    async def _announce_loop(self) -> None:
        """Refresh the record every announce period, and sooner (at most every
        KV_ANNOUNCE_MIN_S) when free cache moved by a quarter of the budget, so that clients
        route around a server that filled up."""
        last, last_free = time.monotonic(), self._free_kv_tokens()
        while True:
            await asyncio.sleep(min(1.0, self.config.announce_period_s))
            now, free = time.monotonic(), self._free_kv_tokens()
            capacity = self.state.sessions.budget.capacity_tokens if self.state else 0
            due = now - last >= self.config.announce_period_s
            moved = (
                capacity > 0
                and abs(free - last_free) >= capacity / 4
                and now - last >= KV_ANNOUNCE_MIN_S
            )
            if not (due or moved):
                continue
            last, last_free = now, free
            try:
                await self._announce()
            except Exception as exc:  # a failed refresh is retried next period
                log.warning("announce.failed error=%r", exc)

    async def _next_rtt_loop(self, fingerprint: str, total: int) -> None:
        """Measure the round trip to the servers of the blocks after ours (those a route may
        push to from here) every announce period, and announce it when it changed, so clients
        cost push hops by real links."""
        await asyncio.sleep(min(2.0, self.config.announce_period_s))
        while True:
            try:
                await self._measure_next_rtts(fingerprint, total)
            except Exception as exc:  # a failed round is retried next period
                log.warning("next_rtt.failed error=%r", exc)
            await asyncio.sleep(self.config.announce_period_s)

    async def _measure_next_rtts(self, fingerprint: str, total: int) -> None:
        if self.dht is None or self._record is None or self.pusher is None:
            return
        me = self._record
        servers = await self.dht.get_servers(fingerprint, 0, total)
        measured = await measure_next_rtts(self.pusher, me, servers)
        if self._record is not None and rtts_changed(me.next_rtt_ms, measured):
            log.info("next_rtt.measured %s", " ".join(f"{p[:8]}={ms:.1f}ms" for p, ms in measured))
            self._record = dataclasses.replace(self._record, next_rtt_ms=measured)
            await self._announce()

    def _free_kv_tokens(self) -> int:
        return self.state.sessions.budget.free_tokens if self.state is not None else 0

    async def _reap_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            if self.state is not None:
                self.state.sessions.expire()
            if tick % 10 == 0:  # freed compute memory goes back to the OS (off the loop)
                await asyncio.to_thread(trim_heap)

    async def _drain(self) -> None:
        """Refuse new sessions, announce draining, let running sessions finish (bounded)."""
        if self.state is None or self._record is None:
            return
        self.state.draining = True
        self.state.sessions.budget.refuse_waiters(
            DrainingError("this server is shutting down; open the session elsewhere")
        )
        self._record = dataclasses.replace(self._record, state=ServerState.DRAINING)
        log.info("server.draining sessions=%d", len(self.state.sessions))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._announce(), timeout=5.0)
        if not await self.state.sessions.wait_empty(self.config.drain_grace_s):
            log.warning("server.drain_timeout sessions=%d", len(self.state.sessions))

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.state is None:
            writer.close()
            return
        self._next_connection += 1
        stream = FramedStream(reader, writer, compression=self.config.compression)
        stream.traffic = self.state.traffic
        conn = ServerConnection(self.state, stream, self._next_connection)
        refusal = self.state.admission.admit(conn)
        if refusal is not None:
            log.info("conn.refused peer=%s reason=%s", stream.peername, refusal)
            # One small frame, never waited for: the peer learns why (a flood costs us ~100
            # bytes of socket buffer per connection, freed with it).
            if self.state is not None:
                self.state.errors_sent[refusal.code] += 1
            with contextlib.suppress(OSError, BeeError):
                stream.send_nowait(Error.from_exception(0, refusal))
            writer.close()
            return
        try:
            task = self._connections.spawn(conn.run(), f"conn-{conn.id}")
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
        finally:
            self.state.admission.leave(conn)
