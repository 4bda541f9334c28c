"""`beed bootstrap`: run a DHT-only node until SIGINT/SIGTERM, announcing how to reach it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from beed.dht import DHTConfig, DHTNode, Identity, format_initial_peers
from beed.dht.errors import PeerUnreachableError
from beed.dht.peers import reachable_host
from beed.relay.service import RelayConfig, RelayService
from beed.server.listen import TcpListener, bind_tcp
from beed.systemd import notify_systemd

log = logging.getLogger(__name__)

STATS_PERIOD_S = 300.0
# The DHT protocol's event counts (beed/dht/protocol.py: stats), exported as counters.
DHT_COUNTERS = frozenset(
    {
        "handled",
        "rate_limited",
        "bad_datagram",
        "unexpected_reply",
        "reply_too_large",
        "check_skipped",
        "store_refused",
        "store_verified",
        "store_over_budget",
    }
)


def _relay_listener(
    host: str, port: int, relay: RelayConfig, identity: Identity, node: DHTNode
) -> TcpListener | None:
    try:
        sock = bind_tcp(host, port)
    except OSError as exc:
        log.warning("bootstrap.relay_off port=%d error=%s", port, exc)
        return None
    config = dataclasses.replace(relay, swarm_key=node.config.swarm_key)
    listener = TcpListener(sock, None, None, 10.0, RelayService(config, identity.peer_id))
    listener.start()
    log.info("bootstrap.relaying port=%d", port)
    return listener


async def run_bootstrap(
    host: str,
    port: int,
    identity_path: Path | None,
    initial_peers: Sequence[tuple[str, int]],
    on_ready: Callable[[str], None],
    config: DHTConfig | None = None,
    metrics_port: int | None = None,
    relay: RelayConfig | None = None,
) -> int:
    """Serve the DHT on host:port; call `on_ready` with the --initial-peers value; exit code.

    With `relay`, also relay for servers behind NAT on the TCP port of the same number
    (beed/relay/service.py); a TCP port that cannot be bound is logged and relaying skipped."""
    if identity_path is None:
        identity = Identity.generate()
        log.warning("bootstrap.ephemeral_identity peer_id=%s", identity.peer_id)
    else:
        identity = Identity.load_or_create(identity_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    node = DHTNode(config, identity)
    metrics: Any = None  # ServerMetrics with --metrics-port
    listener: TcpListener | None = None
    try:
        bound = await node.start(host, port)
        if relay is not None:
            listener = _relay_listener(host, bound[1], relay, identity, node)
        if metrics_port is not None:
            from beed.server.metrics import ServerMetrics

            def info() -> dict[str, int]:
                return {
                    "contacts": node.routing_table_size(),
                    "entries": len(node.storage),
                    **node.protocol.stats,
                }

            metrics = ServerMetrics(info, loop, prefix="beed_dht", counters=DHT_COUNTERS)
            log.info("bootstrap.metrics port=%d", metrics.start(host, metrics_port))
        advertised = format_initial_peers([(reachable_host(bound[0]), bound[1])])
        on_ready(advertised)
        notify_systemd(f"READY=1\nSTATUS=serving the DHT at {advertised}")
        if initial_peers:
            try:
                await node.bootstrap(initial_peers)
            except PeerUnreachableError as exc:
                log.warning("bootstrap.peers_unreachable error=%s", exc)
        log.info("bootstrap.ready initial_peers=%s peer_id=%s", advertised, identity.peer_id)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), STATS_PERIOD_S)
            except TimeoutError:
                log.info(
                    "bootstrap.stats contacts=%d entries=%d",
                    node.routing_table_size(),
                    len(node.storage),
                )
        log.info("bootstrap.stopping")
        notify_systemd("STOPPING=1")
    finally:
        if metrics is not None:
            metrics.stop()
        if listener is not None:
            await listener.aclose()
        await node.aclose()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0
