"""Prefill activations over one emulated link: time per transfer with compression off vs auto.

    python bench/prefill_link.py                       # 100 Mbit/s and 1 Gbit/s, bf16 and fp32
    python bench/prefill_link.py --rates 50,100,1000 --tokens 512 --repeats 10

A beed connection (FramedStream, as servers and clients use it) sends 512-token hidden states of
SmolLM2-135M's width through the link emulator (bench/linkemu.py, 10 ms one-way delay) to a peer
that answers every Ping at once and echoes each tensor back after it arrived in full. The table
gives the median one-way transfer time (half the echo's round trip, minus the link's delay) for
raw frames and for the automatic codec choice, which measures the link from the traffic itself
(the first transfers are raw until it has), and checks that every echo is bit-exact.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkemu import Link, LinkEmulator, Mapping

from beed.net.stream import FramedStream, open_stream
from protocol.codecs import ALL_CODECS, CodecPolicy, choose_codec
from protocol.messages import Ping, Pong, Step, StepResult

POLICY = CodecPolicy(allowed=frozenset(ALL_CODECS))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


async def _read(stream: FramedStream):
    while isinstance(msg := await stream.read(timeout_s=60.0), Ping):
        stream.send_nowait(Pong(0, msg.nonce))
    return msg


async def measure(
    rate_mbit: float, delay_ms: float, hidden: torch.Tensor, compression: str, repeats: int
) -> tuple[float, str, bool]:
    """Median one-way transfer seconds (after 3 warm-ups), the codec used at the end, exact."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, compression=compression)
        stream.codec_policy = POLICY
        stream.ping_rtt()
        try:
            while True:
                msg = await _read(stream)
                if isinstance(msg, Step):
                    await stream.send(StepResult(msg.stream_id, msg.step_id, msg.hidden))
        except Exception:
            await stream.aclose()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    link = Link(delay_ms=delay_ms, rate_mbit=rate_mbit)
    port = server.sockets[0].getsockname()[1]
    emulator = LinkEmulator([Mapping("127.0.0.1", 0, "127.0.0.1", port, link, link)])
    await emulator.start()
    client = await open_stream(
        "127.0.0.1", emulator.ports[0], timeout_s=10.0, compression=compression
    )
    client.codec_policy = POLICY
    times, exact = [], True
    try:
        client.ping_rtt()
        while not isinstance(await _read(client), Pong):
            pass
        for i in range(3 + repeats):
            began = time.perf_counter()
            await client.send(Step(1, i, 0, hidden), timeout_s=60.0)
            while not isinstance(reply := await _read(client), StepResult):
                pass
            elapsed = time.perf_counter() - began
            exact &= torch.equal(reply.hidden.view(torch.uint8), hidden.view(torch.uint8))
            if i >= 3:
                times.append(elapsed / 2 - delay_ms / 1000)
        codec = choose_codec(hidden, client.codec_policy or POLICY).wire_name
        return statistics.median(times), codec, exact
    finally:
        await client.aclose()
        await emulator.aclose()
        server.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,1000", help="Mbit/s")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=576)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    # Real activations: the embedded model's hidden states after its first 10 blocks.
    from beed.models.registry import resolve_model
    from beed.server.backend import BlockBackend

    backend = BlockBackend(resolve_model("smollm2-135m").path, 0, 10)
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1, args.tokens, args.hidden_size, generator=gen) * 0.05
    acts = backend.forward(backend.blocks(0, 10), emb, None)
    print(
        "| Mbit/s | dtype | MB raw | raw ms | auto ms | auto codec | raw/auto | exact |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for rate in (float(r) for r in args.rates.split(",")):
        for name in args.dtypes.split(","):
            hidden = acts.to(DTYPES[name]).contiguous()
            mb = hidden.numel() * hidden.element_size() / 1e6
            raw, _, ok1 = await measure(rate, args.delay_ms, hidden, "off", args.repeats)
            auto, codec, ok2 = await measure(rate, args.delay_ms, hidden, "auto", args.repeats)
            print(
                f"| {rate:g} | {name} | {mb:.2f} | {1000 * raw:.1f} | {1000 * auto:.1f} | "
                f"{codec} | {raw / auto:.2f}x | {'yes' if ok1 and ok2 else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
