"""Failover cost: time from a server's death to the next token, and throughput under churn.

    python bench/failover.py                     # 10 kills with a 512-token history; 40 s churn
    python bench/failover.py --kills 3 --churn-seconds 20

(a) A session holds a ~512-token history (long prompt + generated tokens) on a swarm where the
    blocks 15:30 have a replica. The server of 15:30 on the route is killed (SIGKILL) right after
    a token; we time until the next token arrives, against the median token interval without a
    failure, then restart a server for the next kill.
(b) A swarm with 3 replicas of each half generates back to back for --churn-seconds with no
    failures, then again while one server (chosen at random) is killed every 10 s and restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import statistics
import threading
import time

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as the beectl CLI sets it

import torch

from beectl.config import ClientConfig
from beectl.generation import SamplingConfig, generate
from beectl.local_swarm import Daemon, LocalSwarm
from beectl.model import RemoteModel

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
)


def live(swarm: LocalSwarm) -> list[Daemon]:
    return [s for s in swarm.servers if s.process is not None and s.process.poll() is None]


async def recovery_trials(swarm: LocalSwarm, kills: int) -> tuple[list[float], float, int]:
    remote = await RemoteModel.load(
        "smollm2-135m", ClientConfig(initial_peers=tuple(swarm.initial_peers))
    )
    ids = remote.tokenizer(TEXT * 14, return_tensors="pt").input_ids[:, :480]
    recoveries: list[float] = []
    normal: list[float] = []
    try:
        for _ in range(kills):
            stamps: list[float] = []
            killed_at: list[float] = []
            async with remote.inference_session(max_length=ids.shape[1] + 64) as session:

                def on_tokens(
                    _ids: torch.Tensor, session=session, stamps=stamps, killed_at=killed_at
                ) -> None:
                    stamps.append(time.perf_counter())
                    if len(stamps) == 32:  # the history is now ~512 tokens
                        peer = next(h.peer_id for h in session.route if h.start == 15)
                        victim = next(s for s in live(swarm) if s.peer_id == peer)
                        victim.signal(signal.SIGKILL)
                        killed_at.append(time.perf_counter())

                await generate(
                    remote.head,
                    session,
                    ids,
                    SamplingConfig(max_new_tokens=48),
                    on_tokens=on_tokens,
                )
            recoveries.append(stamps[32] - killed_at[0])
            normal.extend(b - a for a, b in itertools.pairwise(stamps[1:32]))
            swarm.servers = live(swarm)
            swarm.add_server("15:30").wait_ready(300)
            history = ids.shape[1] + 32
    finally:
        await remote.aclose()
    return recoveries, statistics.median(normal), history


def churn(swarm: LocalSwarm, seconds: float, kill_every_s: float | None) -> tuple[float, int]:
    stop = threading.Event()
    restarts = 0

    def killer() -> None:
        nonlocal restarts
        rng = random.Random(7)
        while not stop.wait(kill_every_s or 1e9):
            ready = [s for s in live(swarm) if s.ready_line]
            victim = rng.choice(ready)
            span = victim.ready_line.split()[3]
            victim.signal(signal.SIGKILL)
            victim.process.wait()
            swarm.servers = live(swarm)
            restarted = swarm.add_server(span)  # restarts while the client carries on
            threading.Thread(target=restarted.wait_ready, args=(300,), daemon=True).start()
            restarts += 1

    async def run() -> int:
        remote = await RemoteModel.load(
            "smollm2-135m", ClientConfig(initial_peers=tuple(swarm.initial_peers))
        )
        ids = remote.tokenizer(TEXT, return_tensors="pt").input_ids
        tokens = 0
        deadline = time.perf_counter() + seconds
        try:
            while time.perf_counter() < deadline:
                async with remote.inference_session(max_length=ids.shape[1] + 64) as session:
                    out = await generate(
                        remote.head, session, ids, SamplingConfig(max_new_tokens=64)
                    )
                tokens += out.num_new_tokens
        finally:
            await remote.aclose()
        return tokens

    thread = threading.Thread(target=killer, daemon=True)
    if kill_every_s:
        thread.start()
    began = time.perf_counter()
    tokens = asyncio.run(run())
    elapsed = time.perf_counter() - began
    stop.set()
    if kill_every_s:
        thread.join()
    for server in swarm.servers:
        if not server.ready_line:
            server.wait_ready(300)
    return tokens / elapsed, restarts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--churn-seconds", type=float, default=40.0)
    args = parser.parse_args()
    print(
        f"# {os.cpu_count()} cores, torch {torch.__version__}; smollm2-135m float32, loopback",
        flush=True,
    )

    if args.kills:
        with LocalSwarm(spans=[(0, 15), (15, 30), (15, 30)]) as swarm:
            recoveries, normal, history = asyncio.run(recovery_trials(swarm, args.kills))
        print(f"\n(a) recovery after SIGKILL, history {history} tokens, {len(recoveries)} kills")
        print("| measure | seconds |")
        print("|---|---:|")
        print(f"| normal token interval (median) | {normal:.3f} |")
        print(f"| death to next token, median | {statistics.median(recoveries):.3f} |")
        print(f"| death to next token, worst | {max(recoveries):.3f} |")

    spans = [(0, 15)] * 3 + [(15, 30)] * 3
    with LocalSwarm(spans=spans) as swarm:
        calm, _ = churn(swarm, args.churn_seconds, None)
        stormy, restarts = churn(swarm, args.churn_seconds, 10.0)
    print(f"\n(b) 3 replicas of each half, {args.churn_seconds:.0f} s each")
    print("| setup | tok/s | vs no failures |")
    print("|---|---:|---:|")
    print(f"| no failures | {calm:.2f} | 1.00x |")
    print(
        f"| one server killed and restarted every 10 s ({restarts} kills) | {stormy:.2f} | {stormy / calm:.2f}x |"
    )


if __name__ == "__main__":
    main()
