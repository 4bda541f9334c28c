"""`beed bootstrap`: run a DHT-only node until SIGINT/SIGTERM, announcing how to reach it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from beed.dht import DHTConfig, DHTNode, Identity, format_initial_peers
from beed.dht.errors import PeerUnreachableError
from beed.dht.peers import reachable_host
from beed.systemd import notify_systemd

log = logging.getLogger(__name__)

STATS_PERIOD_S = 300.0


async def run_bootstrap(
    host: str,
    port: int,
    identity_path: Path | None,
    initial_peers: Sequence[tuple[str, int]],
    on_ready: Callable[[str], None],
    config: DHTConfig | None = None,
) -> int:
    """Serve the DHT on host:port; call `on_ready` with the --initial-peers value; exit code."""
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
    try:
        bound = await node.start(host, port)
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
        await node.aclose()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0
