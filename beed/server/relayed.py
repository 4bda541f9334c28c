"""RelayedListening: an unreachable server's connections to its relays.

The server keeps a control connection (listen, signed with its identity) to up to `want`
relays; when a relay sends `incoming`, the server dials that relay once more (accept) and serves
the new socket like any accepted connection (TLS as the server, beed/server/listen.py). A relay
whose control connection dies is replaced by another candidate; every change of the set calls
`on_change` (the server re-announces its record with the relays it is reachable through).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from beed.dht.identity import Identity
from beed.net.dial import DialPolicy
from beed.net.relay import (
    RelayAddress,
    check_answer,
    open_socket,
    read_message,
    send_message,
    swarm_proof,
)
from beed.net.swarm_key import SwarmKey
from beed.net.tasks import TaskOwner
from beed.server.listen import TcpListener
from protocol.errors import BeeError
from protocol.relay import encode_relay, signed_bytes

log = logging.getLogger(__name__)

PING_PERIOD_S = 20.0  # control connections are pinged this often (relays drop them after 90 s)
RETRY_S = 5.0  # between rounds of looking for relays while short of `want`
FAILED_FOR_S = 60.0  # a relay that failed is not tried again this soon


class RelayedListening:
    def __init__(
        self,
        identity: Identity,
        listener: TcpListener,
        candidates: Callable[[], Awaitable[list[RelayAddress]]],
        on_change: Callable[[], None],
        *,
        want: int = 2,
        swarm_key: SwarmKey | None = None,
        policy: DialPolicy | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.identity = identity
        self.listener = listener
        self.candidates = candidates
        self.on_change = on_change
        self.want = want
        self.swarm_key = swarm_key
        self.policy = policy
        self.timeout_s = timeout_s
        self.active: dict[RelayAddress, socket.socket] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._tasks = TaskOwner("relayed")
        self._accepts = TaskOwner("relayed-accepts", isolate=True)
        self.accepted = 0  # relayed connections served

    @property
    def relays(self) -> tuple[RelayAddress, ...]:
        return tuple(sorted(self.active, key=lambda r: (r.host, r.port)))

    def start(self) -> None:
        self._tasks.spawn(self._keep_relays(), "keep-relays")

    async def aclose(self) -> None:
        for sock in self.active.values():
            sock.close()
        await self._tasks.aclose()
        await self._accepts.aclose()
        self.active.clear()

    async def _keep_relays(self) -> None:
        while True:
            if len(self.active) < self.want:
                await self._find_relays()
            await asyncio.sleep(RETRY_S)

    async def _find_relays(self) -> None:
        try:
            found = await self.candidates()
        except (BeeError, OSError, TimeoutError) as exc:
            log.warning("relay.candidates_failed error=%r", exc)
            return
        now = time.monotonic()
        held = {(r.host, r.port) for r in self.active}
        for relay in found:
            if len(self.active) >= self.want:
                return
            address = (relay.host, relay.port)
            if address in held or now - self._failed.get(address, -FAILED_FOR_S) < FAILED_FOR_S:
                continue
            held.add(address)
            try:
                sock, relay = await self._listen(relay)
            except (BeeError, OSError, TimeoutError) as exc:
                self._failed[address] = time.monotonic()
                log.info("relay.listen_failed relay=%s:%d error=%s", *address, exc)
                continue
            self.active[relay] = sock
            log.info(
                "relay.listening relay=%s:%d peer=%s", relay.host, relay.port, relay.peer_id[:16]
            )
            self._tasks.spawn(self._control(relay, sock), "control")
            self.on_change()

    async def _listen(self, relay: RelayAddress) -> tuple[socket.socket, RelayAddress]:
        sock = await asyncio.wait_for(
            open_socket(relay.host, relay.port, self.policy), self.timeout_s
        )
        try:
            ts = time.time()
            peer_id = self.identity.peer_id
            data = signed_bytes("listen", peer_id, ts)
            message = encode_relay(
                "listen",
                peer_id=peer_id,
                pk=self.identity.public_key_bytes,
                ts=ts,
                sig=self.identity.sign(data),
                **swarm_proof(self.swarm_key, data),
            )
            await send_message(sock, message, self.timeout_s)
            answer = await read_message(sock, self.timeout_s)
            check_answer(answer, f"{relay.host}:{relay.port}")
        except BaseException:
            sock.close()
            raise
        named = answer.get("peer_id")
        if isinstance(named, str) and 0 < len(named) <= 128:
            relay = RelayAddress(named, relay.host, relay.port)  # a bootstrap relay names itself
        return sock, relay

    async def _control(self, relay: RelayAddress, sock: socket.socket) -> None:
        """Serve one relay's control connection until it dies; then forget that relay."""
        pings = 0
        try:
            while True:
                try:
                    message = await read_message(sock, PING_PERIOD_S)
                except TimeoutError:
                    if pings:  # the last ping went unanswered for a whole period
                        raise
                    pings += 1
                    await send_message(sock, encode_relay("ping", n=pings), self.timeout_s)
                    continue
                if message.op == "pong":
                    pings = 0
                elif message.op == "incoming":
                    self._accepts.spawn(self._accept(relay, message.get("id")), "accept")
        except (BeeError, OSError, TimeoutError) as exc:
            log.warning("relay.lost relay=%s:%d error=%r", relay.host, relay.port, exc)
        finally:
            sock.close()
            self._failed[(relay.host, relay.port)] = time.monotonic()
            if self.active.get(relay) is sock:
                del self.active[relay]
                self.on_change()

    async def _accept(self, relay: RelayAddress, request: int) -> None:
        try:
            sock = await asyncio.wait_for(
                open_socket(relay.host, relay.port, self.policy), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            log.info("relay.accept_failed relay=%s:%d error=%r", relay.host, relay.port, exc)
            return
        try:
            ts = time.time()
            peer_id = self.identity.peer_id
            data = signed_bytes("accept", peer_id, ts, request)
            message = encode_relay(
                "accept",
                peer_id=peer_id,
                id=request,
                ts=ts,
                sig=self.identity.sign(data),
                **swarm_proof(self.swarm_key, data),
            )
            await send_message(sock, message, self.timeout_s)
            check_answer(await read_message(sock, self.timeout_s), f"{relay.host}:{relay.port}")
        except (BeeError, OSError, TimeoutError) as exc:
            sock.close()
            log.info("relay.accept_failed relay=%s:%d error=%r", relay.host, relay.port, exc)
            return
        self.accepted += 1
        await self.listener.hand_over(sock)
