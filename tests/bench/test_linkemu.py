"""The link emulator (bench/linkemu.py) over real sockets on 127.0.0.1: delay, bandwidth, order, close."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.linkemu import load_linkemu

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


linkemu = load_linkemu()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read until EOF (half-close), then answer with the byte count and close."""
    total = 0
    while data := await reader.read(65536):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


class Setup:
    def __init__(self, emulator: object, port: int, server: asyncio.Server) -> None:
        self.emulator = emulator
        self.port = port
        self.server = server

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def _start(handler: Handler, link: object) -> tuple[Setup, Callable[[], Awaitable[None]]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    mapping = linkemu.Mapping("127.0.0.1", 0, "127.0.0.1", target, link, link)
    emulator = linkemu.LinkEmulator([mapping], seed=1)
    await emulator.start()

    async def stop() -> None:
        await emulator.aclose()
        server.close()

    return Setup(emulator, emulator.ports[0], server), stop


@pytest.fixture
async def behind() -> AsyncIterator[Callable[..., Awaitable[Setup]]]:
    """`await behind(handler, Link(...))`: a server on 127.0.0.1 and an emulator in front of it."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def make(handler: Handler, link: object) -> Setup:
        setup, stop = await _start(handler, link)
        stops.append(stop)
        return setup

    yield make
    for stop in stops:
        await stop()


async def test_round_trip_takes_two_delays(behind: Callable[..., Awaitable[Setup]]) -> None:
    setup = await behind(echo, linkemu.Link(delay_ms=50))
    reader, writer = await setup.connect()
    times = []
    for _ in range(3):
        began = time.perf_counter()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        times.append(time.perf_counter() - began)
    writer.close()
    assert min(times) >= 0.0995
    assert min(times) < 0.1 + 0.4  # generous: the machine is shared


async def test_bandwidth_limits_a_bulk_transfer(behind: Callable[..., Awaitable[Setup]]) -> None:
    setup = await behind(count_then_reply, linkemu.Link(rate_mbit=100))
    reader, writer = await setup.connect()
    payload = os.urandom(2 * 1024 * 1024)
    began = time.perf_counter()
    writer.write(payload)
    writer.write_eof()
    assert int(await reader.read()) == len(payload)  # the reply comes after EOF: half-close works
    elapsed = time.perf_counter() - began
    writer.close()
    assert elapsed >= 0.16  # 2 MiB * 8 / 100 Mbit/s = 0.168 s
    assert elapsed < 0.168 + 2.0


async def test_bytes_arrive_intact_and_in_order_with_jitter(
    behind: Callable[..., Awaitable[Setup]],
) -> None:
    setup = await behind(echo, linkemu.Link(delay_ms=5, jitter_ms=5, rate_mbit=500))
    reader, writer = await setup.connect()
    sent = bytearray()
    received = bytearray()

    async def read_all() -> None:
        while data := await reader.read(65536):
            received.extend(data)

    reading = asyncio.create_task(read_all())
    for i in range(200):
        chunk = os.urandom(1 + (i * 7919) % 20000)
        sent.extend(chunk)
        writer.write(chunk)
        if i % 10 == 0:
            await writer.drain()
            await asyncio.sleep(0.001)
    writer.write_eof()
    await asyncio.wait_for(reading, 10)
    writer.close()
    assert received == sent


async def test_close_propagates_both_ways(behind: Callable[..., Awaitable[Setup]]) -> None:
    # The target closes: the client sees EOF.
    setup = await behind(close_at_once, linkemu.Link(delay_ms=5))
    reader, writer = await setup.connect()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()

    # The client closes: the target sees EOF (and its reply after our EOF still comes through).
    seen_eof = asyncio.Event()

    async def wait_eof(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        seen_eof.set()
        w.write(b"bye")
        await w.drain()
        w.close()

    setup = await behind(wait_eof, linkemu.Link(delay_ms=5))
    reader, writer = await setup.connect()
    writer.write_eof()
    await asyncio.wait_for(seen_eof.wait(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b"bye"
    writer.close()


async def test_unreachable_target_closes_the_client() -> None:
    probe = await asyncio.start_server(echo, "127.0.0.1", 0)
    dead = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    emulator = linkemu.LinkEmulator([linkemu.Mapping("127.0.0.1", 0, "127.0.0.1", dead)])
    await emulator.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", emulator.ports[0])
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
    finally:
        await emulator.aclose()
    assert emulator.stats_dict()[next(iter(emulator.stats))]["failed_connects"] == 1


async def test_aclose_tears_down_open_connections() -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    link = linkemu.Link(delay_ms=20)
    emulator = linkemu.LinkEmulator(
        [linkemu.Mapping("127.0.0.1", 0, "127.0.0.1", target, link, link)]
    )
    await emulator.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", emulator.ports[0])
    writer.write(b"x" * 1000)
    assert await reader.readexactly(1000) == b"x" * 1000
    await emulator.aclose()
    assert not emulator._tasks
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass
    writer.close()
    server.close()


def test_subprocess_helper_starts_and_stops() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emu = linkemu.LinkEmulatorProcess([f"127.0.0.1:{port}=127.0.0.1:9"], linkemu.Link(delay_ms=1))
    with emu:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.settimeout(5)
            try:
                assert c.recv(10) == b""  # nothing listens on the target: closed at once
            except ConnectionResetError:
                pass
    assert emu.process is None
    assert emu.stats[f"127.0.0.1:{port}=127.0.0.1:9"]["failed_connects"] == 1
