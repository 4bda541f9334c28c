"""Link measurement over real sockets through the link emulator: a slow link switches lossless
compression on (both directions), a fast one keeps frames raw, and every tensor arrives bit-exact."""

from __future__ import annotations

import asyncio

import pytest
import torch

from beed.net.link import LinkStats, policy_for
from beed.net.stream import FramedStream, open_stream
from protocol.codecs import ALL_CODECS, Codec, CodecPolicy, choose_codec
from protocol.messages import Ping, Pong, Step, StepResult
from tests.linkemu import load_linkemu

linkemu = load_linkemu()
POLICY = CodecPolicy(allowed=frozenset(ALL_CODECS))


async def _echo_server(compression: str):
    """A peer that answers Pings at once and echoes every Step's hidden as a StepResult a
    moment later (as a server answers a step after computing it)."""
    streams: list[FramedStream] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, compression=compression)
        stream.codec_policy = POLICY
        streams.append(stream)
        stream.ping_rtt()  # as a server does after the handshake

        async def echo(msg: Step) -> None:
            await asyncio.sleep(0.01)
            await stream.send(StepResult(msg.stream_id, msg.step_id, msg.hidden))

        tasks = set()
        try:
            while True:
                msg = await stream.read()
                if isinstance(msg, Ping):
                    stream.send_nowait(Pong(0, msg.nonce))
                elif isinstance(msg, Step):
                    tasks.add(asyncio.create_task(echo(msg)))
        except Exception:
            await stream.aclose()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, streams


async def _read(stream: FramedStream):
    """The next message other than a Ping (Pings are answered, as every peer does)."""
    while isinstance(msg := await stream.read(timeout_s=30.0), Ping):
        stream.send_nowait(Pong(0, msg.nonce))
    return msg


async def _exchange(rate_mbit: float, compression: str = "auto"):
    """Five bf16 prefill-sized steps through an emulated link; the client stream, the server
    stream and whether every echo came back bit-exact."""
    server, streams = await _echo_server(compression)
    port = server.sockets[0].getsockname()[1]
    link = linkemu.Link(delay_ms=2.0, rate_mbit=rate_mbit)
    emulator = linkemu.LinkEmulator(
        [linkemu.Mapping("127.0.0.1", 0, "127.0.0.1", port, link, link)]
    )
    await emulator.start()
    client = await open_stream(
        "127.0.0.1", emulator.ports[0], timeout_s=5.0, compression=compression
    )
    client.codec_policy = POLICY
    exact = True
    try:
        client.ping_rtt()  # the round trip first, as the Hello exchange gives it
        while not isinstance(await _read(client), Pong):
            pass
        gen = torch.Generator().manual_seed(0)
        for step in range(5):
            hidden = (torch.randn(1, 512, 576, generator=gen) * 3).to(torch.bfloat16)
            await client.send(Step(1, step, 0, hidden), timeout_s=30.0)
            while not isinstance(reply := await _read(client), StepResult):
                pass
            exact &= torch.equal(reply.hidden.view(torch.int16), hidden.view(torch.int16))
        return client, streams[0], exact
    finally:
        await client.aclose()
        await emulator.aclose()
        server.close()


async def test_slow_link_compresses_both_ways_and_stays_exact():
    client, peer, exact = await _exchange(rate_mbit=40.0)
    assert exact
    sample = torch.zeros(1, 512, 576, dtype=torch.bfloat16)
    for stream in (client, peer):
        rate = stream.link.send_bytes_per_s
        assert rate is not None and 1e6 < rate < 40e6 / 8 * 1.5, rate
        assert stream.codec_policy is not None
        assert choose_codec(sample, stream.codec_policy) is Codec.PLANES_ZSTD


async def test_fast_link_stays_raw():
    client, peer, exact = await _exchange(rate_mbit=0.0)  # unlimited: loopback speed
    assert exact
    sample = torch.zeros(1, 512, 576, dtype=torch.bfloat16)
    for stream in (client, peer):
        assert stream.link.send_bytes_per_s is not None
        assert stream.codec_policy is not None
        assert choose_codec(sample, stream.codec_policy) is Codec.NONE


async def test_compression_off_never_measures_or_compresses():
    client, peer, exact = await _exchange(rate_mbit=40.0, compression="off")
    assert exact
    for stream in (client, peer):
        assert stream.link.send_bytes_per_s is None
        assert stream.codec_policy is POLICY


def test_rate_from_a_probe_subtracts_the_round_trip():
    stats = LinkStats()
    stats.add_rtt(0.1)
    nonce = stats.probe(1_000_000, now=10.0)
    assert stats.pong(nonce, now=10.3)  # 0.3 s elapsed, 0.1 s of it the round trip
    assert stats.send_bytes_per_s == pytest.approx(5e6)
    assert not stats.pong(nonce)  # a nonce counts once
    slow = policy_for(POLICY, stats, "auto")
    assert slow.link_bytes_per_s == pytest.approx(5e6)
    assert policy_for(slow, stats, "auto") is slow  # no change: the memo is kept
    assert policy_for(POLICY, stats, "off") is POLICY
