"""`beed bootstrap` as a subprocess: prints --initial-peers first, serves the DHT, exits 0."""

from __future__ import annotations

import asyncio
import signal
import stat
import sys
from pathlib import Path

from beed.dht import DHTNode, Identity, parse_initial_peers

from .conftest import FAST, server_record


async def _start_bootstrap(identity: Path) -> tuple[asyncio.subprocess.Process, tuple[str, int]]:
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "beed.cli", "bootstrap", "--host", "127.0.0.1", "--port", "0"],
        *["--identity", str(identity)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
    flag, value = line.split()
    assert flag == "--initial-peers"
    (address,) = parse_initial_peers([value])
    return process, address


async def test_bootstrap_serves_and_exits_cleanly(tmp_path: Path) -> None:
    identity_path = tmp_path / "bootstrap.id"
    process, address = await _start_bootstrap(identity_path)
    nodes = [DHTNode(FAST), DHTNode(FAST), DHTNode(FAST, client_mode=True)]
    try:
        assert stat.S_IMODE(identity_path.stat().st_mode) == 0o600
        for node in nodes:
            await node.start("127.0.0.1", 0)
            await node.bootstrap([address])
        assert await nodes[0].protocol.ping_address(address) == (
            Identity.load_or_create(identity_path).node_id
        )
        await nodes[0].announce(server_record(nodes[0], 0, 30))
        assert len(await nodes[2].get_servers("fp-test", 0, 30)) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
        for node in nodes:
            await node.aclose()
    assert process.returncode == 0, stderr.decode()
    assert b"bootstrap.ready" in stderr and b"dht.closed" in stderr

    # Restarted with the same identity file: same node id; SIGINT also exits with 0.
    process, address = await _start_bootstrap(identity_path)
    probe = DHTNode(FAST, client_mode=True)
    await probe.start("127.0.0.1", 0)
    try:
        node_id = await probe.protocol.ping_address(address)
        assert node_id == Identity.load_or_create(identity_path).node_id
    finally:
        await probe.aclose()
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0


async def test_bad_initial_peers_is_a_usage_error() -> None:
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "beed.cli", "bootstrap", "--port", "0"],
        *["--initial-peers", "nonsense"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert b"--initial-peers" in stderr and b"HOST:PORT" in stderr
