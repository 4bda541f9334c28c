"""Hostile-peer benchmark: an honest client's decode speed and the server's memory under attacks.

    python bench/hostile.py                                  # every attack, 15 s each
    python bench/hostile.py --attacks bomb,udp --seconds 10 --json /tmp/hostile.json

One bootstrap and one server holding all 30 blocks of smollm2-135m run on 127.0.0.1. The honest
client (beectl's Python API, greedy, a 10-token prompt, --new-tokens new tokens, one session per
generation) connects from 127.0.0.1 and generates again and again. Each attack runs in its own
subprocess, niced (on a real network the attacker's CPU is not the server's), from its own range
of source addresses in 127.0.0.2-254 (the server sees as many peers), while the honest client
generates for --seconds:

  bomb      compression bombs: Step/Forward/Backward frames whose zstd, lz4, shuffle-zstd or
            planes-zstd payload of zeros is a few KB but decodes to 2 x max_request_tokens rows,
            and lies (a zstd frame declaring another size, a corrupt one, lz4 past its ratio, a
            frame over the decode limit), sent back to back on 8 connections
  forward   Forward requests of max_request_tokens rows x tokens (1024 x 16 and 16 x 1024), two
            in flight on each of 2 connections; one of max_request_tokens + 1 (expect 209)
  backward  Backward requests of max_backward_tokens (1 x 2048 and 64 x 32), two in flight on
            each of 2 connections; one over the limit (expect 209)
  sessions  one address opens sessions of --max-session-length tokens on 2 connections as fast
            as they are answered (expect 208), and steps each once so it keeps its cache
  idle      --idle-connections connections from 20 addresses: half a Hello, a Hello trickled a
            byte a second, a Hello and nothing, or a Hello then a frame prefix announcing a
            37 MB Forward whose payload trickles; each is reopened when the server closes it
  udp       a datagram flood at the server's DHT port from 16 addresses: random ping, store,
            find_node and find_value requests (valid framing, random ids and entries) and garbage
  slowloris 8 connections with a 4 KB receive buffer open a session, then pipeline one-token
            steps, Pings and GetInfos and never read an answer

Per row: the honest decode tok/s (tokens after each generation's first, over their time), its
ratio to the baseline (the mean of two rows without an attack, first and last, in the same run:
the machine is shared and its speed drifts), whether its tokens equal the first generation's,
the server's RSS just before the attack (idle) and its peak during it and until the server is
idle again (VmRSS every 50 ms), the attack's own counters (frames sent, answers by error code)
and the server's (GetInfo). Target: tok/s >= 0.5x baseline and RSS peak <= idle + 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_attacks import ATTACK_FUNCS, ATTACKS
from hostile_measure import (
    Honest,
    RssSampler,
    dht_answers,
    get_info,
    machine,
    measure_honest,
    scan_logs,
    server_counters,
    wait_quiet,
)
from hostile_wire import Ctx, MiB

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
SOURCES_PER_ATTACK = 30  # attack i uses 127.0.0.(2 + 30 i) ... (31 + 30 i)
RSS_TARGET_BYTES = 1 << 30
RATIO_TARGET = 0.5
SCRIPT = Path(__file__).resolve()


# --- the attacker side (runs in `--worker NAME` subprocesses) ------------------------------------


async def worker_main(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    start, end = (int(x) for x in args.span.split(":"))
    first = int(args.sources.split(":")[0])
    ctx = Ctx(
        host=host,
        port=int(port),
        dht_port=args.dht_port,
        fingerprint=args.fingerprint,
        span=(start, end),
        sources=[f"127.0.0.{first + i}" for i in range(int(args.sources.split(":")[1]))],
        max_request_tokens=args.max_request_tokens,
        max_backward_tokens=args.max_backward_tokens,
        max_session_length=args.max_session_length,
        idle_connections=args.idle_connections,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    began = time.monotonic()
    error = None
    try:
        attack = asyncio.ensure_future(ATTACK_FUNCS[args.worker](ctx))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait(
            {attack, stopper}, timeout=args.max_seconds, return_when="FIRST_COMPLETED"
        )
        for task in (attack, stopper):
            task.cancel()
        await asyncio.wait({attack, stopper})
        if not attack.cancelled() and attack.exception() is not None:
            exc = attack.exception()
            error = f"{type(exc).__name__}: {exc}"
    finally:
        counts: dict[str, Any] = dict(ctx.counts)
        if "bytes sent" in counts:
            counts["MB sent"] = round(counts.pop("bytes sent") / MiB, 1)
        notes = {k: round(sum(v) / len(v), 1) for k, v in ctx.notes.items() if v}
        result = {
            "counts": counts,
            "mean": notes,
            "seconds": time.monotonic() - began,
            "error": error,
        }
        print("RESULT " + json.dumps(result), flush=True)


# --- the measuring side ---------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    honest: Honest
    ratio: float | None = None
    same_tokens: bool | None = None
    rss_idle: int = 0
    rss_peak: int = 0
    counts: dict[str, Any] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    busy_after_s: float = 0.0  # the server kept computing this long after the attacker left

    @property
    def rss_ok(self) -> bool:
        return self.rss_peak <= self.rss_idle + RSS_TARGET_BYTES

    @property
    def passed(self) -> bool:
        return self.ratio is not None and self.ratio >= RATIO_TARGET and self.rss_ok


def log_file(path: Path) -> Any:
    return open(path, "w")


class Bench:
    def __init__(self, args: argparse.Namespace, swarm: Any, model: Any, ids: Any) -> None:
        self.args = args
        self.swarm = swarm
        self.server = swarm.servers[0]
        self.model = model
        self.ids = ids
        words = self.server.ready_line.split()
        self.host, self.port = self.server.address
        self.fingerprint = words[words.index("fingerprint") + 1]
        self.span = words[words.index("blocks") + 1]
        self.dht_port = args.dht_port or self.port
        self.log_dir = args.log_dir

    async def honest(self) -> Honest:
        a = self.args
        return await measure_honest(self.model, self.ids, a.new_tokens, a.seconds, a.grace)

    @staticmethod
    def finish(rows: list[Row]) -> float | None:
        """Ratios against the baseline: the mean tok/s of the rows without an attack (before and
        after: the machine is shared, its speed drifts); tokens against the first generation."""
        quiet = [r.honest for r in rows if r.attack.startswith("none") and r.honest.tok_s]
        base = sum(h.tok_s or 0.0 for h in quiet) / len(quiet) if quiet else None
        ref = quiet[0].tokens[0] if quiet and quiet[0].tokens else None
        for row in rows:
            if base and row.honest.tok_s is not None:
                row.ratio = row.honest.tok_s / base
            if ref is not None and row.honest.tokens:
                row.same_tokens = all(t == ref[: len(t)] for t in row.honest.tokens)
        return base

    async def quiet_row(self, name: str, seconds: float) -> Row:
        await asyncio.sleep(2.0)
        rss = self.rss
        rss.reset_peak()
        idle = rss.current
        t0 = time.perf_counter()
        a = self.args
        honest = await measure_honest(self.model, self.ids, a.new_tokens, seconds, a.grace)
        return Row(name, honest, rss_idle=idle, rss_peak=rss.peak, seconds=time.perf_counter() - t0)

    async def attack_row(self, index: int, name: str) -> Row:
        a = self.args
        assert self.server.process is not None
        await asyncio.sleep(a.settle)
        rss = self.rss
        rss.reset_peak()
        idle = rss.current
        before = await get_info(self.host, self.port)
        t0 = time.perf_counter()
        first = 2 + SOURCES_PER_ATTACK * index
        cmd = [
            sys.executable, str(SCRIPT), "--worker", name,
            "--target", f"{self.host}:{self.port}", "--dht-port", str(self.dht_port),
            "--fingerprint", self.fingerprint, "--span", self.span,
            "--sources", f"{first}:{SOURCES_PER_ATTACK}",
            "--max-request-tokens", str(a.max_request_tokens),
            "--max-backward-tokens", str(a.max_backward_tokens),
            "--max-session-length", str(a.max_session_length),
            "--idle-connections", str(a.idle_connections),
            "--max-seconds", str(3 * a.seconds + a.grace + 60), "--nice", str(a.nice),
        ]  # fmt: skip
        with log_file(self.log_dir / f"worker-{name}.log") as log:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL
            )
        assert proc.stdout is not None
        row = Row(name, Honest(), rss_idle=idle)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if line.strip() != b"READY":
                raise RuntimeError(f"the {name} worker did not start: {line!r}")
            await asyncio.sleep(a.ramp)
            row.honest = await self.honest()
            row.server = server_counters(before, await get_info(self.host, self.port))
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                rest = await asyncio.wait_for(proc.stdout.read(), 30)
            except TimeoutError:
                proc.kill()
                rest = b""
            await proc.wait()
        row.busy_after_s = await wait_quiet(self.server.process.pid, a.max_quiet_wait)
        row.rss_peak = rss.peak
        row.seconds = time.perf_counter() - t0
        results = [x for x in rest.decode(errors="replace").splitlines() if x.startswith("RESULT ")]
        if results:
            data = json.loads(results[-1][len("RESULT ") :])
            row.counts, row.means = data["counts"], data["mean"]
            if data["error"] and row.error is None:
                row.error = f"worker: {data['error']}"
        elif row.error is None:
            row.error = f"the worker printed no result (exit {proc.returncode})"
        if self.server.process is not None and self.server.process.poll() is not None:
            row.error = f"THE SERVER DIED (exit {self.server.process.returncode})"
        return row

    async def run(self) -> list[Row]:
        a = self.args
        rows: list[Row] = []
        assert self.server.process is not None
        with RssSampler(self.server.process.pid) as self.rss:
            from beectl.generation import SamplingConfig, generate

            async with self.model.inference_session(max_length=self.ids.shape[1] + 4) as s:
                await generate(self.model.head, s, self.ids, SamplingConfig(max_new_tokens=4))
            rows.append(await self.quiet_row("none (before)", a.baseline_seconds))
            report(rows[-1])
            for name in a.attacks:
                rows.append(await self.attack_row(ATTACKS.index(name), name))
                report(rows[-1])
                if rows[-1].error and "SERVER DIED" in rows[-1].error:
                    break
            else:
                rows.append(await self.quiet_row("none (after)", a.baseline_seconds))
                report(rows[-1])
        self.finish(rows)
        return rows


def mib(n: int) -> str:
    return f"{n / MiB:.0f}"


def report(row: Row) -> None:
    h = row.honest
    tok = "-" if h.tok_s is None else f"{h.tok_s:.2f}"
    print(
        f"  {row.attack}: {tok} tok/s over {h.runs} runs, RSS {mib(row.rss_idle)} -> "
        f"{mib(row.rss_peak)} MiB ({row.seconds:.0f} s)"
        + (f" ERROR {row.error}" if row.error else "")
        + (f"; honest errors: {h.errors[:3]}" if h.errors else ""),
        flush=True,
    )


def print_table(rows: list[Row]) -> None:
    head = (
        f"| {'attack':<15} | {'honest tok/s':>12} | {'vs base':>7} | {'same tokens':<11} | "
        f"{'runs':>4} | {'RSS idle MiB':>12} | {'RSS peak MiB':>12} | {'peak-idle':>9} | "
        f"{'busy after s':>12} | result |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head[1:-1].split("|")) + "|")
    for r in rows:
        h = r.honest
        same = "-" if r.same_tokens is None else "yes" if r.same_tokens else "NO"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        tok = "-" if h.tok_s is None else f"{h.tok_s:.2f}"
        result = "-" if r.attack.startswith("none") else "PASS" if r.passed else "MISS"
        if r.error:
            result += " (error)"
        print(
            f"| {r.attack:<15} | {tok:>12} | {ratio:>7} | {same:<11} | {h.runs:>4} | "
            f"{mib(r.rss_idle):>12} | {mib(r.rss_peak):>12} | "
            f"{mib(r.rss_peak - r.rss_idle):>9} | {r.busy_after_s:>12.0f} | {result} |"
        )
    print(
        f"honest tok/s: decode tokens after each generation's first, over their time; baseline "
        f"{Bench.finish(rows) or 0:.2f} tok/s, the mean of the rows without an attack; target "
        f">= {RATIO_TARGET}x the baseline and RSS peak <= idle + {RSS_TARGET_BYTES // MiB} MiB; "
        "busy after: how long the server kept computing once the attacker had gone (RSS peak "
        "includes it)"
    )
    print("\nattack counters (the attacker's: frames sent, server answers by type and error code)")
    for r in rows:
        if r.attack.startswith("none"):
            continue
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items(), key=lambda kv: kv[0]))
        print(f"  {r.attack}: {counts or '-'}")
        if r.means:
            print(f"    means: {', '.join(f'{k} {v}' for k, v in r.means.items())}")
        print(f"    server: {', '.join(f'{k} {v}' for k, v in r.server.items()) or '-'}")
        if r.honest.errors:
            errors = collections.Counter(e.split(":")[0] for e in r.honest.errors)
            print(f"    honest client errors: {dict(errors)}; first: {r.honest.errors[0]}")
        if r.error:
            print(f"    ERROR: {r.error}")


def parse_args() -> argparse.Namespace:
    from beed.server.config import PeerLimits, ServerConfig

    limits = PeerLimits()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--attacks", default=",".join(ATTACKS), help=f"comma list of {','.join(ATTACKS)}"
    )
    p.add_argument(
        "--seconds", type=float, default=15.0, help="honest generation under each attack"
    )
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--json", metavar="PATH", help="write all results here")
    p.add_argument(
        "--baseline-seconds", type=float, default=10.0, help="each no-attack row (first, last)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="a generation running at the end may take this long",
    )
    p.add_argument("--ramp", type=float, default=2.0, help="seconds of attack before measuring")
    p.add_argument("--settle", type=float, default=2.0, help="pause between attacks")
    p.add_argument(
        "--max-quiet-wait",
        type=float,
        default=45.0,
        help="after an attack, wait at most this long for the server to stop computing",
    )
    p.add_argument("--idle-connections", type=int, default=500)
    p.add_argument("--nice", type=int, default=19, help="niceness of the attacker processes")
    p.add_argument("--server-args", default="", help="extra `beed serve` arguments")
    p.add_argument("--dht-port", type=int, default=0, help="the server's DHT port [its TCP port]")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--max-request-tokens", type=int, default=limits.max_request_tokens)
    p.add_argument("--max-backward-tokens", type=int, default=limits.max_backward_tokens)
    p.add_argument("--max-session-length", type=int, default=ServerConfig.max_session_length)
    args = p.parse_args()
    args.attacks = [x for x in args.attacks.split(",") if x]
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; choose from {ATTACKS}")
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3")
    # The server's limits follow --server-args where it sets them.
    flags = args.server_args.split()
    for flag, name in [
        ("--max-request-tokens", "max_request_tokens"),
        ("--max-backward-tokens", "max_backward_tokens"),
        ("--max-session-length", "max_session_length"),
    ]:
        if flag in flags:
            setattr(args, name, int(flags[flags.index(flag) + 1]))
    return args


def worker_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=ATTACKS)
    for name in ("--target", "--fingerprint", "--span", "--sources"):
        p.add_argument(name, required=True)
    for name in (
        "--dht-port", "--max-request-tokens", "--max-backward-tokens", "--max-session-length",
        "--idle-connections", "--nice",
    ):  # fmt: skip
        p.add_argument(name, type=int, required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    return p.parse_args()


async def amain(args: argparse.Namespace) -> list[Row]:
    from transformers import AutoTokenizer

    from beectl.config import ClientConfig
    from beectl.local_swarm import LocalSwarm
    from beectl.model import RemoteModel
    from beed.dht.peers import parse_initial_peers
    from beed.models.registry import resolve_model

    unretrieved = collections.Counter[str]()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        unretrieved[f"{context.get('message')}: {type(exc).__name__}: {exc}"[:160]] += 1

    asyncio.get_running_loop().set_exception_handler(on_loop_error)
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m").path))
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :10]
    t0 = time.perf_counter()
    # Plain TCP: the attack tools write raw frames (the framing layer is the same behind TLS).
    swarm = LocalSwarm(num_servers=1, extra_args=["--no-encryption", *args.server_args.split()])
    await asyncio.to_thread(swarm.start)
    try:
        print(
            f"# swarm up in {time.perf_counter() - t0:.0f} s: {'; '.join(swarm.describe())}",
            flush=True,
        )
        host, port = swarm.servers[0].address
        if not dht_answers(host, args.dht_port or port):
            print(
                f"# WARNING: no DHT answer at UDP {host}:{args.dht_port or port}; give --dht-port"
            )
        peers = [f"{h}:{p}" for h, p in swarm.initial_peers]
        config = ClientConfig(initial_peers=tuple(parse_initial_peers(peers)))
        model = await RemoteModel.load("smollm2-135m", config)
        try:
            rows = await Bench(args, swarm, model, ids).run()
        finally:
            await model.aclose()
        if unretrieved:
            print("# the client's event loop reported (asyncio's exception handler):")
            for text, count in unretrieved.items():
                print(f"#   {count} x {text}")
        daemons = [*swarm.servers, *([swarm.bootstrap] if swarm.bootstrap else [])]
        found = scan_logs(daemons)
        for name, events in found.items():
            print(f"# {name} log: {dict(events) or 'no traceback, warning or error'}")
        if any(found.values()) or args.keep_logs:
            for d in daemons:
                shutil.copy(d.log_path, args.log_dir / d.log_path.name)
    finally:
        await asyncio.to_thread(swarm.stop)
    return rows


def main() -> None:
    if "--worker" in sys.argv:
        wargs = worker_args()
        os.nice(wargs.nice)
        asyncio.run(worker_main(wargs))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args()
    args.log_dir = Path(tempfile.mkdtemp(prefix="beed-hostile-"))
    import torch

    torch.set_num_threads(1)  # the client's head: one core of two stays the server's
    print(
        f"# {machine()}, torch "
        f"{torch.__version__}; smollm2-135m float32, 1 server 0:30; honest client: prompt 10 "
        f"tokens, {args.new_tokens} new, greedy, for {args.seconds:g} s under each attack "
        f"(after {args.ramp:g} s of it); attackers niced {args.nice}; server args "
        f"'{args.server_args}'",
        flush=True,
    )
    began = time.perf_counter()
    rows = asyncio.run(amain(args))
    print(f"\n# {len(rows)} rows in {time.perf_counter() - began:.0f} s")
    print_table(rows)
    if any(r.same_tokens is False for r in rows):
        print("\nWARNING: the honest client generated other tokens than the baseline in some rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "cores": os.cpu_count(),
                    "rows": [dataclasses.asdict(r) | {"passed": r.passed} for r in rows],
                },
                f,
                indent=1,
            )
        print(f"results written to {args.json}")
    print(f"logs in {args.log_dir}")


if __name__ == "__main__":
    main()
