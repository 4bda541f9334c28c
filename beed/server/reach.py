"""Reachability: whether peers can dial this server, and what it does when they cannot.

At start-up, and every `reachability_period_s`, the server asks a few DHT peers to dial its
announced TCP port back (beed/dht/node.py: check_reachability). "public": it serves directly
and, with `--relay`, relays for others. "unreachable" (behind NAT or a firewall): its DHT node
runs in client mode (never a contact in peers' tables, stores nothing) and it listens through
relays (beed/server/relayed.py), which its record names. `--public-host`/`--public-port` are the
operator's word that the announced address is reachable: no check is made.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from beed.dht.identity import Identity
from beed.dht.node import DHTNode
from beed.net.dial import DialPolicy
from beed.net.relay import RelayAddress
from beed.net.tasks import TaskOwner
from beed.server.config import ServerConfig
from beed.server.listen import TcpListener
from beed.server.relayed import RelayedListening
from protocol.errors import BeeError

log = logging.getLogger(__name__)


class Reachability:
    def __init__(
        self,
        config: ServerConfig,
        dht: DHTNode,
        identity: Identity,
        announced_port: int,
        fingerprint: str,
        policy: DialPolicy,
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self.dht = dht
        self.identity = identity
        self.port = announced_port
        self.fingerprint = fingerprint
        self.policy = policy
        self.on_change = on_change
        self.status = ""  # "public", "unreachable", or "" (nobody to ask)
        self.relayed: RelayedListening | None = None
        self._listener: TcpListener | None = None
        self._tasks = TaskOwner("reachability")

    @property
    def declared(self) -> bool:
        return self.config.public_host is not None or self.config.public_port is not None

    async def check(self) -> str:
        """Check once (or take the operator's word) and set the DHT's mode to match."""
        if self.declared:
            status = "public"
        else:
            status = await self.dht.check_reachability(self.port)
        if status != self.status:
            log.info("server.reachability status=%s port=%d", status or "unchecked", self.port)
        self.status = status
        self.dht.set_reachable(status != "unreachable")
        return status

    def attach(self, listener: TcpListener) -> None:
        """The TCP port serves: listen through relays if unreachable, and re-check periodically."""
        self._listener = listener
        self._sync_relayed()
        if not self.declared and self.config.reachability_period_s > 0:
            self._tasks.spawn(self._recheck_loop(), "recheck")

    def record_fields(self) -> dict[str, Any]:
        relays = self.relayed.relays if self.relayed is not None else ()
        return {
            "reachability": self.status,
            "relays": relays,
            "relaying": self.config.relay and self.status != "unreachable",
        }

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reachability_period_s)
            before = self.status
            try:
                await self.check()
            except (BeeError, OSError) as exc:
                log.warning("server.reachability_failed error=%r", exc)
                continue
            if self.status != before:
                self._sync_relayed()
                self.on_change()

    def _sync_relayed(self) -> None:
        if self.status == "unreachable" and self.relayed is None and self._listener is not None:
            self.relayed = RelayedListening(
                self.identity,
                self._listener,
                self._candidates,
                self.on_change,
                want=self.config.relays_wanted,
                swarm_key=self.config.swarm_key,
                policy=self.policy,
            )
            self.relayed.start()
        elif self.status != "unreachable" and self.relayed is not None:
            relayed, self.relayed = self.relayed, None
            self._tasks.spawn(relayed.aclose(), "stop-relayed")

    async def _candidates(self) -> list[RelayAddress]:
        """Relays to try: reachable servers of this model that relay (in random order, so
        servers behind NAT spread over them), then the initial peers (bootstrap nodes relay on
        their DHT port number when started with --relay); or exactly `--relays`."""
        if self.config.relays:
            return [RelayAddress("", host, port) for host, port in self.config.relays]
        servers = await self.dht.get_servers(self.fingerprint)
        relays = [
            RelayAddress(s.peer_id, s.host, s.port)
            for s in servers
            if s.relaying and s.reachability != "unreachable" and s.peer_id != self.identity.peer_id
        ]
        random.shuffle(relays)
        relays += [RelayAddress("", host, port) for host, port in self.config.initial_peers]
        return relays

    async def aclose(self) -> None:
        await self._tasks.aclose()
        if self.relayed is not None:
            await self.relayed.aclose()
