"""Private swarms and encrypted links through real daemons: strangers learn nothing, a changed
byte breaks the connection instead of the text."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import LocalSwarm
from beed.dht import DHTConfig, DHTNode
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from beed.net.peer import PeerConnection
from beed.net.swarm_key import SwarmKey
from protocol import encode_message_bytes
from protocol.errors import PeerUnreachableError, UnauthorizedError
from protocol.messages import Hello
from tests.conftest import peers_of
from tests.swarm.test_exactness import check_same
from tests.swarm.test_faults import RawPeer


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("key") / "swarm.key"
    SwarmKey.generate_file(path)
    return path


@pytest.fixture(scope="module")
def private(key_file) -> Iterator[LocalSwarm]:
    with LocalSwarm(num_servers=2, swarm_key=key_file) as swarm:
        yield swarm


def test_members_generate_exactly_and_strangers_learn_nothing(
    private, key_file, local_model, tokenizer, model_path
):
    check_same(local_model, tokenizer, peers_of(private), swarm_key=str(key_file))

    # Without the key: the bootstrap node does not answer, so no session can even be routed.
    with pytest.raises(PeerUnreachableError, match="swarm-key"):
        AutoDistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=peers_of(private)
        )

    async def stranger_reads() -> list:
        node = DHTNode(DHTConfig(rpc_timeout_s=0.5, bootstrap_timeout_s=2.0), client_mode=True)
        await node.start("127.0.0.1", 0)
        try:
            with pytest.raises(PeerUnreachableError):
                await node.bootstrap(private.initial_peers)
            fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
            return await node.get_servers(fingerprint)
        finally:
            await node.aclose()

    assert asyncio.run(stranger_reads()) == []

    # Knowing a server's address and identity (leaked some other way) is not enough either:
    # its Hello answer is error 210, and nothing else.
    server = private.servers[0]

    async def stranger_connects(key: SwarmKey | None) -> None:
        host, port = server.address
        conn = PeerConnection(host, port, peer_id=server.peer_id, tls=True, swarm_key=key)
        try:
            await conn.connect(5.0)
        finally:
            await conn.aclose()

    with pytest.raises(UnauthorizedError) as refused:
        asyncio.run(stranger_connects(None))
    assert refused.value.code == 210 and "--swarm-key" in str(refused.value)
    with pytest.raises(UnauthorizedError) as wrong:
        asyncio.run(stranger_connects(SwarmKey(bytes(32))))
    assert wrong.value.code == 210
    peer = RawPeer(server.address)  # a plain Hello inside TLS: refused the same way
    try:
        peer.send(encode_message_bytes(Hello()))
        reply = peer.read()
    finally:
        peer.close()
    assert reply.code == 210


def test_a_server_with_another_key_cannot_join(private, tmp_path):
    other = tmp_path / "other.key"
    SwarmKey.generate_file(other)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "beed.cli",
            "serve",
            "--model",
            "smollm2-135m",
            "--block-indices",
            "0:30",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--initial-peers",
            peers_of(private)[0],
            "--swarm-key",
            str(other),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no initial peer answered" in proc.stderr and "--swarm-key" in proc.stderr


class BitFlipper:
    """A man in the middle on 127.0.0.1: forwards both ways to `target` and flips one bit of
    the first client-to-server read of at least 2000 bytes (a prompt's activations).
    `server_hung_up` is set when, on the connection that carried the flip, the server closed
    first (not the client at its end)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.flipped = 0
        self.server_hung_up = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> BitFlipper:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._pair, sock=self.sock)

    async def _pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        flipped_here = False
        first_to_end: list[str] = []

        async def pump(src, dst, side: str) -> None:
            nonlocal flipped_here
            try:
                while data := await src.read(1 << 16):
                    if side == "client" and not self.flipped and len(data) >= 2000:
                        changed = bytearray(data)
                        changed[len(data) // 2] ^= 0x10
                        data = bytes(changed)
                        self.flipped += 1
                        flipped_here = True
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                first_to_end.append(side)
                dst.close()

        await asyncio.gather(
            pump(reader, up_writer, "client"),
            pump(up_reader, writer, "server"),
            return_exceptions=True,
        )
        if flipped_here and first_to_end[0] == "server":
            self.server_hung_up.set()


def test_a_flipped_bit_breaks_the_connection_not_the_text(local_model, tokenizer, tmp_path):
    # One server, announced at a proxy that flips a bit of the prompt's activations once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with BitFlipper(("127.0.0.1", port)) as mitm:
        extra = ["--port", str(port), "--public-port", str(mitm.port)]
        with LocalSwarm(spans=[(0, 30)], extra_args=extra) as swarm:
            # The client reconnects after the broken connection; the text is the model's.
            check_same(local_model, tokenizer, peers_of(swarm), speculate="off")
            assert mitm.flipped == 1
            assert mitm.server_hung_up.is_set()  # TLS refused the changed record
            log = Path(swarm.servers[0].log_path).read_text()
    assert "Traceback" not in log
