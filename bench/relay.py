"""Relay benchmark: decode through a relay against the same server reached directly.

    sudo python bench/relay.py                       # loopback and 100 ms RTT, 32 new tokens
    sudo python bench/relay.py --rtts 0 --new-tokens 64 --runs 3

One server holds all 30 blocks of the embedded model. "direct": a public server, dialled by the
client. "relay": the same server inside a network namespace that drops inbound TCP
(bench/netns.py, so it needs root), found unreachable by its own check and served through a
bootstrap node's relay. With an RTT, a link emulator (bench/linkemu.py) carries every TCP link
that would cross the internet: client -> server (direct); client -> relay and server -> relay
(relayed: the relay is one more internet hop, as it is for a volunteer behind NAT). DHT
datagrams are not delayed. Per row: greedy decode at batch 1 (speculation off), tokens/s after
the first token and the median ms per token, median of --runs; the ratio is against direct at
the same RTT, measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linkemu import Link, LinkEmulatorProcess
from netns import RouterError, make_router, remove_router

from beectl import AutoDistributedModelForCausalLM
from beectl.local_swarm import Daemon, stop_daemons
from beed.dht.peers import parse_initial_peers

PROMPT = "The history of the bee begins in the"


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Clock:
    """A streamer noting when each put arrives (the first is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, _ids: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode(peers: list[str], new_tokens: int, runs: int) -> tuple[float, float]:
    """(tokens/s after the first token, median ms per token), medians over `runs`."""
    from transformers import AutoTokenizer

    from beed.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    rates, per_token = [], []
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers
    ) as model:
        model.generate(ids, max_new_tokens=4, eos_token_id=None, speculate="off")  # warm-up
        for _ in range(runs):
            clock = Clock()
            model.generate(
                ids, max_new_tokens=new_tokens, eos_token_id=None, speculate="off", streamer=clock
            )
            gaps = [b - a for a, b in itertools.pairwise(clock.stamps[1:])]
            rates.append(len(gaps) / sum(gaps))
            per_token.append(1000 * statistics.median(gaps))
    return statistics.median(rates), statistics.median(per_token)


def run_row(mode: str, rtt_ms: float, args: argparse.Namespace, tmp: Path) -> tuple[float, float]:
    router = make_router(30 + os.getpid() % 150)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemons: list[Daemon] = []
    emu: LinkEmulatorProcess | None = None
    try:
        boot = Daemon(
            "bootstrap",
            ["bootstrap", "--host", router.outside, "--port", "0", "--relay-bandwidth", "0"],
            tmp / f"{mode}-{rtt_ms}-bootstrap.log",
        )
        boot.start(env)
        daemons.append(boot)
        peers = parse_initial_peers([boot.wait_ready(60).split()[-1]])
        (bhost, bport) = peers[0]
        serve = ["serve", "--model", "smollm2-135m", "--block-indices", "0:30"]
        serve += ["--initial-peers", f"{bhost}:{bport}", "--num-threads", "1"]
        link = Link(delay_ms=rtt_ms / 2)
        if mode == "direct":
            port = free_port(router.outside)
            serve += ["--host", router.outside, "--port", str(port)]
            if rtt_ms:
                proxy = free_port(router.outside)
                emu = LinkEmulatorProcess(
                    [f"{router.outside}:{proxy}={router.outside}:{port}"], link
                )
                serve += ["--public-host", router.outside, "--public-port", str(proxy)]
            prefix: list[str] = []
        else:
            serve += ["--host", router.inside, "--port", str(router.port)]
            if rtt_ms:
                proxy = free_port(router.outside)
                emu = LinkEmulatorProcess([f"{router.outside}:{proxy}={bhost}:{bport}"], link)
                serve += ["--relays", f"{router.outside}:{proxy}"]
            prefix = router.prefix
        if emu is not None:
            emu.__enter__()
        server = Daemon("server", serve, tmp / f"{mode}-{rtt_ms}-server.log", prefix=prefix)
        server.start(env)
        daemons.append(server)
        server.wait_ready(300)
        if mode == "relay":
            _wait_relayed(tmp / f"{mode}-{rtt_ms}-server.log")
        return decode([f"{bhost}:{bport}"], args.new_tokens, args.runs)
    finally:
        stop_daemons(daemons)
        if emu is not None:
            emu.__exit__(None, None, None)
        remove_router(router)


def _wait_relayed(log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "relay.listening" not in log.read_text():
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the server never listened through a relay; its log:\n{log.read_text()}"
            )
        time.sleep(0.5)
    time.sleep(6.0)  # its record with the relay is announced right after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtts", default="0,100", help="round trips in ms, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    try:
        remove_router(make_router(29))
    except RouterError as exc:
        raise SystemExit(f"bench/relay.py: {exc}") from None
    rows = []
    with tempfile.TemporaryDirectory(prefix="beed-relay-bench-") as tmp:
        for rtt in (float(x) for x in args.rtts.split(",")):
            for mode in ("direct", "relay"):
                tps, ms = run_row(mode, rtt, args, Path(tmp))
                print(f"# {mode}, RTT {rtt:g} ms: {tps:.1f} tok/s, {ms:.1f} ms/token", flush=True)
                rows.append((rtt, mode, tps, ms))
    print(
        f"# {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; smollm2-135m "
        f"float32, 1 server of 30 blocks, batch 1, {args.new_tokens} new tokens, median of "
        f"{args.runs}"
    )
    print("| RTT ms | path | tok/s | ms/token | vs direct |")
    print("|---:|---|---:|---:|---:|")
    direct = {rtt: tps for rtt, mode, tps, _ in rows if mode == "direct"}
    for rtt, mode, tps, ms in rows:
        print(f"| {rtt:g} | {mode} | {tps:.1f} | {ms:.1f} | {tps / direct[rtt]:.2f}x |")


if __name__ == "__main__":
    main()
