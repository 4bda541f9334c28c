"""WAN benchmark: beed (relayed and push, compression off and auto) against Petals through emulated links.

    python bench/wan.py                                    # RTT 0,20,100,200 ms x 100,1000 Mbit/s
    python bench/wan.py --rtts 0,100 --rates 1000 --new-tokens 16 --runs 1 --no-petals
    python bench/wan.py --rtts 100 --rates 1000 --modes push --codecs off --json /tmp/wan.json

Each server (3 of them: blocks 0:10, 10:20, 20:30) listens on 127.0.0.1:P and announces 127.0.0.2:P,
where a link emulator (bench/linkemu.py, one process per measured row) forwards to it with a
one-way delay of RTT/2 and the given bandwidth in each direction; client->server and server->server
traffic both cross it. Per row: decode at batch 1 (36-token prompt, --new-tokens greedy tokens,
tokens/s without the first token and the median ms/token) and the time to first token of a
512-token prompt (median of --runs after a warm-up). Petals 2.2 (bench/petals_swarm.sh, its own
venv) is measured through the same kind of proxies afterwards, never at the same time as beed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Petals processes get the environment this script started with; the beed client in this process
# gets the spin setting the beectl CLI uses (servers get it from the beed CLI).
_BASELINE_ENV = dict(os.environ)
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linkemu import Link, LinkEmulatorProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROXY_HOST = "127.0.0.2"  # servers announce this address; the link emulator listens on it
SPANS = ["0:10", "10:20", "20:30"]
PROMPT = (  # 36 tokens
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within fifty years"
)
LONG_TEXT = (
    "In a small village at the edge of the forest, an old clockmaker spent his evenings repairing "
    "broken watches for the children. The river carried timber down to the sawmill each spring, "
    "and the merchants who came up the valley road traded salt, cloth and iron for furs. "
)
SCRATCH = Path(os.environ.get("SCRATCH", Path.home() / ".cache" / "beed-peers"))
PETALS_PY = SCRATCH / "petals-venv" / "bin" / "python"
PETALS_MODEL = SCRATCH / "models" / "smollm2-135m-hf-petals"
PETALS_PREFIX = "smollm2-135m-hf"
PETALS_RUN_DIR = SCRATCH / "petals-wan-swarm"
PETALS_DHT_PORT = 31337
PETALS_PORTS = [PETALS_DHT_PORT + 1 + i for i in range(len(SPANS))]

# Run by the Petals venv's python: the same measurements as beed_row, printed as one JSON line.
PETALS_CLIENT = r"""
import json, os, sys, time
import torch
from petals import AutoDistributedModelForCausalLM

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model = AutoDistributedModelForCausalLM.from_pretrained(
    args["model_dir"], initial_peers=[args["peer"]], dht_prefix=args["prefix"],
    torch_dtype=torch.float32,
)
model.eval()


class Stamps:
    def __init__(self):
        self.times = []

    def put(self, ids):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def gen(ids, n, streamer=None):
    with torch.inference_mode():
        return model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0, streamer=streamer,
        )


out = {}
try:
    gen(args["decode_ids"], 4)  # warm-up: routes, connections
    stamps = Stamps()
    seq = gen(args["decode_ids"], args["new_tokens"], stamps)
    out["stamps"] = stamps.times[1:]  # the first put is the prompt
    out["tokens"] = seq[0, len(args["decode_ids"]):].tolist()
    gen(args["ttft_ids"], 1)  # warm-up
    times = []
    for _ in range(args["runs"]):
        began = time.perf_counter()
        seq = gen(args["ttft_ids"], 1)
        times.append(time.perf_counter() - began)
    out["ttft_runs_s"] = times
    out["ttft_token"] = int(seq[0, -1])
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out), flush=True)
# petals 2.2 can hang at interpreter exit: shut the client's DHT (and its p2pd) down, exit hard.
try:
    sm = model.transformer.h.sequence_manager
    sm.shutdown()
    sm.dht.shutdown()
except Exception as exc:
    print("client shutdown:", repr(exc), file=sys.stderr)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@dataclass
class Row:
    """One measured configuration: a system/mode/codec through one (RTT, rate) link."""

    rtt_ms: float
    rate_mbit: float
    system: str  # "beed" or "petals"
    mode: str  # "relayed", "push" (beed); "-" (petals)
    codec: str  # "off", "auto" (beed); "-" (petals)
    decode_tok_s: float | None = None
    ms_per_token: float | None = None
    ttft_s: float | None = None
    intervals_ms: list[float] = field(default_factory=list)
    ttft_runs_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    ttft_token: int | None = None
    link_bytes: int = 0  # bytes the link emulator carried, both directions, all servers
    link_connections: int = 0
    same_tokens: bool | None = None
    error: str | None = None
    seconds: float = 0.0  # wall time of the whole row

    @property
    def label(self) -> str:
        return f"beed {self.mode}" if self.system == "beed" else "petals"

    def set_decode(self, stamps: list[float]) -> None:
        if len(stamps) < 2:
            raise RuntimeError(f"decode produced {len(stamps)} token stamps")
        self.intervals_ms = [1000 * (b - a) for a, b in itertools.pairwise(stamps)]
        self.decode_tok_s = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        self.ms_per_token = statistics.median(self.intervals_ms)

    def set_ttft(self, runs: list[float]) -> None:
        self.ttft_runs_s = runs
        self.ttft_s = statistics.median(runs)

    def set_link(self, stats: dict[str, dict[str, int]]) -> None:
        self.link_bytes = sum(s["up_bytes"] + s["down_bytes"] for s in stats.values())
        self.link_connections = sum(s["connections"] for s in stats.values())


class Stamps:
    """A generate streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def free_port(taken: set[int]) -> int:
    """A port free for TCP on 127.0.0.1 and PROXY_HOST and for UDP on 127.0.0.1 (the DHT)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port in taken:
            continue
        try:
            with socket.socket() as t:
                t.bind((PROXY_HOST, port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        taken.add(port)
        return port
    raise RuntimeError("no free port found")


def ports_free(ports: list[int]) -> bool:
    for host in ("127.0.0.1", PROXY_HOST):
        for port in ports:
            try:
                with socket.socket() as s:
                    s.bind((host, port))
            except OSError:
                return False
    return True


def proxy_maps(ports: list[int]) -> list[str]:
    return [f"{PROXY_HOST}:{p}=127.0.0.1:{p}" for p in ports]


def link_for(rtt_ms: float, rate_mbit: float) -> Link:
    return Link(delay_ms=rtt_ms / 2, rate_mbit=rate_mbit)


class BeedSwarm:
    """A bootstrap node and one server per span on fixed ports, announcing PROXY_HOST:PORT."""

    def __init__(self, model: str, dtype: str, extra_args: list[str], log_dir: Path) -> None:
        self.model, self.dtype, self.extra_args = model, dtype, extra_args
        self.log_dir = log_dir / ("beed" + "".join(f"_{a.lstrip('-')}" for a in extra_args))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.daemons: list[Any] = []
        self.ports: list[int] = []
        self.initial_peers = ""

    def start(self) -> None:
        from beectl.local_swarm import START_TIMEOUT_S, Daemon

        boot = Daemon(
            "bootstrap",
            ["bootstrap", "--host", "127.0.0.1", "--port", "0"],
            self.log_dir / "bootstrap.log",
        )
        self.daemons.append(boot)
        boot.start(self.env)
        self.initial_peers = boot.wait_ready(60.0).split()[-1]
        taken: set[int] = set()
        self.ports = [free_port(taken) for _ in SPANS]
        servers = []
        for i, (span, port) in enumerate(zip(SPANS, self.ports, strict=True)):
            args = [
                "serve",
                "--model",
                self.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--public-host",
                PROXY_HOST,
                "--initial-peers",
                self.initial_peers,
                "--dtype",
                self.dtype,
                "--block-indices",
                span,
                *self.extra_args,
            ]
            server = Daemon(f"server{i}", args, self.log_dir / f"server{i}-{port}.log")
            self.daemons.append(server)
            server.start(self.env)
            servers.append(server)
        for server in servers:
            server.wait_ready(START_TIMEOUT_S)

    def stop(self) -> None:
        from beectl.local_swarm import stop_daemons

        stop_daemons(list(reversed(self.daemons)))
        self.daemons.clear()


def beed_row(
    swarm: BeedSwarm,
    args: argparse.Namespace,
    row: Row,
    ids: torch.Tensor,
    long_ids: torch.Tensor,
    client_codec: bool,
) -> None:
    from beectl import AutoDistributedModelForCausalLM

    config: dict[str, Any] = {"push": row.mode == "push"}
    if client_codec:
        config["compression"] = row.codec
    dtype = getattr(torch, args.dtype)
    kwargs: dict[str, Any] = {"eos_token_id": None, "pad_token_id": 0}
    emu = LinkEmulatorProcess(
        proxy_maps(swarm.ports), link_for(row.rtt_ms, row.rate_mbit), log_path=args.linkemu_log
    )
    with emu:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=[swarm.initial_peers], dtype=dtype, **config
        )
        try:
            model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up: routes, connections
            stamps = Stamps()
            out = model.generate(ids, max_new_tokens=args.new_tokens, streamer=stamps, **kwargs)
            row.tokens = out[0, ids.shape[1] :].tolist()
            row.set_decode(stamps.times)
            model.generate(long_ids, max_new_tokens=1, **kwargs)  # warm-up
            runs = []
            for _ in range(args.runs):
                began = time.perf_counter()
                out = model.generate(long_ids, max_new_tokens=1, **kwargs)
                runs.append(time.perf_counter() - began)
            row.ttft_token = int(out[0, -1])
            row.set_ttft(runs)
        finally:
            model.close()
    row.set_link(emu.stats)


class PetalsSwarm:
    """bench/petals_swarm.sh with ANNOUNCE_HOST=PROXY_HOST, in its own run directory."""

    def __init__(self, log_dir: Path) -> None:
        self.script = REPO / "bench" / "petals_swarm.sh"
        self.env = dict(_BASELINE_ENV, ANNOUNCE_HOST=PROXY_HOST, RUN_DIR=str(PETALS_RUN_DIR))
        self.env["DHT_PORT"] = str(PETALS_DHT_PORT)
        self.env["SPANS"] = " ".join(SPANS)
        self.log = log_dir / "petals_swarm.log"
        self.initial_peer = ""

    def start(self) -> None:
        if not PETALS_PY.exists() or not PETALS_MODEL.exists():
            raise RuntimeError(f"Petals is not installed ({PETALS_PY}, {PETALS_MODEL})")
        if not ports_free([PETALS_DHT_PORT, *PETALS_PORTS]):
            raise RuntimeError(f"Petals ports {PETALS_DHT_PORT}-{PETALS_PORTS[-1]} are in use")
        # The servers reach each other through the announced addresses: a plain proxy meanwhile.
        with LinkEmulatorProcess(proxy_maps(PETALS_PORTS), Link()), open(self.log, "a") as log:
            result = subprocess.run(
                ["bash", str(self.script), "start"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=900,
            )
        if result.returncode != 0:
            raise RuntimeError(f"petals_swarm.sh start failed; see {self.log}")
        self.initial_peer = (PETALS_RUN_DIR / "initial_peer").read_text().strip()

    def stop(self) -> None:
        with open(self.log, "a") as log:
            subprocess.run(
                ["bash", str(self.script), "stop"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=300,
                check=False,
            )


def run_petals_client(script: str, payload: dict[str, Any], timeout: float, log: Path) -> Any:
    """Run `script` with the Petals venv's python and `payload` as its JSON argument; the JSON
    after its `RESULT ` line (RuntimeError when there is none, or it reports an error). The
    client runs in its own session: Ctrl-C here does not reach it, and its whole process group
    (any DHT or p2pd child it left) is ended afterwards."""
    with open(log, "a") as log_file:
        proc = subprocess.Popen(
            [str(PETALS_PY), "-c", script, json.dumps(payload)],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_BASELINE_ENV,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                if sig == signal.SIGTERM:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the Petals client printed no result (exit {proc.returncode})")
    data = json.loads(lines[-1][len("RESULT ") :])
    if "error" in data:
        raise RuntimeError(data["error"])
    return data


def petals_row(
    swarm: PetalsSwarm,
    args: argparse.Namespace,
    row: Row,
    ids: torch.Tensor,
    long_ids: torch.Tensor,
) -> None:
    payload = {
        "model_dir": str(PETALS_MODEL),
        "peer": swarm.initial_peer,
        "prefix": PETALS_PREFIX,
        "threads": torch.get_num_threads(),
        "decode_ids": ids[0].tolist(),
        "ttft_ids": long_ids[0].tolist(),
        "new_tokens": args.new_tokens,
        "runs": args.runs,
    }
    per_token_s = 0.5 + 8 * row.rtt_ms / 1000
    timeout = 300 + (args.new_tokens + 10 * (args.runs + 1)) * per_token_s
    emu = LinkEmulatorProcess(
        proxy_maps(PETALS_PORTS), link_for(row.rtt_ms, row.rate_mbit), log_path=args.linkemu_log
    )
    with emu:
        data = run_petals_client(
            PETALS_CLIENT, payload, timeout, args.linkemu_log.parent / "petals_client.log"
        )
    row.set_link(emu.stats)
    row.tokens = data["tokens"]
    row.set_decode(data["stamps"])
    row.ttft_token = data["ttft_token"]
    row.set_ttft(data["ttft_runs_s"])


def serve_supports(option: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "beed.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return option in result.stdout


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted with `spec` ("8.1f"), or a dash as wide."""
    return f"{'-':>{spec.split('.')[0]}}" if value is None else format(value, spec)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def push_compute_ms(rows: list[Row]) -> float | None:
    """Compute per token of the push chain (ms): the median RTT-0 push ms/token, if measured."""
    zero = [
        r.ms_per_token
        for r in rows
        if r.system == "beed" and r.mode == "push" and r.rtt_ms == 0 and r.ms_per_token
    ]
    return statistics.median(zero) if zero else None


def print_table(rows: list[Row]) -> None:
    petals = {(r.rtt_ms, r.rate_mbit): r for r in rows if r.system == "petals" and not r.error}
    head = (
        f"| {'RTT ms':>6} | {'Mbit/s':>6} | {'system/mode':<12} | {'codec':<5} | {'tok/s':>7} | "
        f"{'ms/token':>8} | {'TTFT512 s':>9} | {'tok/s vs Petals':>15} | {'TTFT vs Petals':>14} | "
        f"{'link MB':>8} | same tokens |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head[1:-1].split("|")) + "|")
    for r in rows:
        p = petals.get((r.rtt_ms, r.rate_mbit))
        tps_ratio = ttft_ratio = "-"
        if p is not None and r.decode_tok_s and p.decode_tok_s:
            tps_ratio = f"{r.decode_tok_s / p.decode_tok_s:.2f}x"
        if p is not None and r.ttft_s and p.ttft_s:
            ttft_ratio = f"{p.ttft_s / r.ttft_s:.2f}x"
        same = "-" if r.same_tokens is None else "yes" if r.same_tokens else "NO"
        if r.error:
            same = f"ERROR: {r.error[:60]}"
        print(
            f"| {r.rtt_ms:>6g} | {r.rate_mbit:>6g} | {r.label:<12} | {r.codec:<5} | "
            f"{fmt(r.decode_tok_s, '7.2f')} | {fmt(r.ms_per_token, '8.1f')} | "
            f"{fmt(r.ttft_s, '9.3f')} | {tps_ratio:>15} | {ttft_ratio:>14} | "
            f"{r.link_bytes / 1e6:>8.2f} | {same} |"
        )
    print(
        "tok/s: decode without the first token; ms/token: median interval; ratios: tok/s ÷ Petals "
        "tok/s and Petals TTFT ÷ TTFT (above 1x: faster than Petals); link MB: bytes through the "
        "emulated links in the whole row (warm-ups included)"
    )


def print_checks(rows: list[Row], ref: Row | None) -> None:
    mismatched = [r for r in rows if r.same_tokens is False]
    if mismatched and ref is not None:
        print(
            f"\nWARNING: {len(mismatched)} row(s) generated other tokens than "
            f"{ref.label} {ref.codec} at RTT {ref.rtt_ms:g} ms, {ref.rate_mbit:g} Mbit/s: "
            + "; ".join(f"{r.label} {r.codec} RTT {r.rtt_ms:g} {r.rate_mbit:g}" for r in mismatched)
        )


def print_floor(
    rows: list[Row], rtts: list[float], modes: list[str]
) -> tuple[dict[float, float], float | None]:
    """The push floor per RTT, (servers + 1) one-way delays + compute; returns it and compute."""
    compute_ms = push_compute_ms(rows)
    floors: dict[float, float] = {}
    if compute_ms is None:
        if "push" in modes:
            print("\npush floor: needs a push row at RTT 0 (the compute estimate); add 0 to --rtts")
        return floors, None
    hops = len(SPANS) + 1
    print(
        f"\npush floor = ({len(SPANS)} servers + 1) one-way delays + compute "
        f"({compute_ms:.1f} ms/token, the RTT-0 push ms/token)"
    )
    for rtt in rtts:
        floor = floors[rtt] = hops * rtt / 2 + compute_ms
        best = [
            r.ms_per_token
            for r in rows
            if r.system == "beed" and r.mode == "push" and r.rtt_ms == rtt and r.ms_per_token
        ]
        line = f"  RTT {rtt:g} ms: {floor:.1f} ms/token ({1000 / floor:.2f} tok/s)"
        if best:
            line += f"; best push {min(best):.1f} ms/token ({min(best) / floor:.2f}x floor)"
        print(line)
    return floors, compute_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rtts", default="0,20,100,200", help="round trip times, ms")
    parser.add_argument("--rates", default="100,1000", help="bandwidths, Mbit/s (0: unlimited)")
    parser.add_argument("--modes", default="relayed,push", help="beed modes: relayed, push")
    parser.add_argument("--codecs", default="off,auto", help="beed compression: off, auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="TTFT runs (median)")
    parser.add_argument("--no-petals", action="store_true")
    parser.add_argument("--json", metavar="OUT", help="write all results here")
    parser.add_argument(
        "--server-args", default="", help="extra `beed serve` arguments, e.g. '--num-threads 1'"
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the daemons' logs (BEED_LOG_LEVEL=DEBUG logs every step's compute time)",
    )
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both end in the teardown below (also where a shell left SIGINT ignored:
    # the daemons started from here then get the default disposition back).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    rtts = [float(x) for x in args.rtts.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    modes = args.modes.split(",")
    codecs = args.codecs.split(",")
    if not set(modes) <= {"relayed", "push"} or not set(codecs) <= {"off", "auto"}:
        parser.error("--modes takes relayed,push and --codecs takes off,auto")
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3")

    from transformers import AutoTokenizer

    from beectl.config import ClientConfig
    from beed.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(args.model).path))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    long_ids = tok(LONG_TEXT * 20, return_tensors="pt").input_ids[:, :512]
    client_codec = "compression" in {f.name for f in dataclasses.fields(ClientConfig)}
    server_codec = serve_supports("--compression")
    log_dir = Path(tempfile.mkdtemp(prefix="beed-wan-"))
    args.linkemu_log = log_dir / "linkemu.log"
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; model {args.model} {args.dtype}; {len(SPANS)} servers "
        f"{' '.join(SPANS)}; decode: prompt {ids.shape[1]} tokens, {args.new_tokens} new, batch 1; "
        f"TTFT: prompt {long_ids.shape[1]} tokens, median of {args.runs}; links: one-way delay "
        f"RTT/2 and the rate, each direction; compression setting: client "
        f"{'yes' if client_codec else 'NO'}, servers {'yes' if server_codec else 'NO'}",
        flush=True,
    )
    if not (client_codec and server_codec) and len(codecs) > 1:
        print(
            "# note: without the compression setting on both sides, codec rows differ only in name"
        )

    rows: list[Row] = []
    began = time.perf_counter()
    interrupted = petals_failed = False

    def run_row(row: Row, measure: Any) -> None:
        t0 = time.perf_counter()
        try:
            measure(row)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        print(
            f"  {row.rtt_ms:g} ms {row.rate_mbit:g} Mbit/s {row.label} {row.codec}: "
            + (
                f"ERROR {row.error}"
                if row.error
                else f"{row.decode_tok_s:.2f} tok/s, {row.ms_per_token:.1f} ms/token, TTFT "
                f"{row.ttft_s:.3f} s, link {row.link_bytes / 1e6:.2f} MB"
            )
            + f" ({row.seconds:.0f} s)",
            flush=True,
        )

    try:
        # One swarm per server compression setting (one swarm when servers have none).
        for server_codecs in [[c] for c in codecs] if server_codec else [codecs]:
            extra = ["--compression", server_codecs[0]] if server_codec else []
            extra += args.server_args.split()
            swarm = BeedSwarm(args.model, args.dtype, extra, log_dir)
            try:
                t0 = time.perf_counter()
                swarm.start()
                print(
                    f"# beed swarm {' '.join(extra) or ''} up in {time.perf_counter() - t0:.0f} s "
                    f"(ports {','.join(map(str, swarm.ports))})",
                    flush=True,
                )
                for rtt in rtts:
                    for rate in rates:
                        for mode in modes:
                            for codec in server_codecs:
                                run_row(
                                    Row(rtt, rate, "beed", mode, codec),
                                    lambda r, s=swarm: beed_row(
                                        s, args, r, ids, long_ids, client_codec
                                    ),
                                )
            finally:
                swarm.stop()
        if not args.no_petals:
            petals = PetalsSwarm(log_dir)
            try:
                t0 = time.perf_counter()
                petals.start()
                print(f"# Petals swarm up in {time.perf_counter() - t0:.0f} s", flush=True)
                for rtt in rtts:
                    for rate in rates:
                        run_row(
                            Row(rtt, rate, "petals", "-", "-"),
                            lambda r, p=petals: petals_row(p, args, r, ids, long_ids),
                        )
            except Exception as exc:
                petals_failed = True
                print(f"# Petals: {type(exc).__name__}: {exc}", flush=True)
            finally:
                petals.stop()
    except KeyboardInterrupt:
        interrupted = True
        print("\n# interrupted: everything is stopped; partial results follow", flush=True)

    ref = next((r for r in rows if r.tokens and r.system == "beed"), None) or next(
        (r for r in rows if r.tokens), None
    )
    for r in rows:
        if r.tokens and ref is not None:
            r.same_tokens = r.tokens == ref.tokens and r.ttft_token == ref.ttft_token
    order = {"relayed": 0, "push": 1, "off": 0, "auto": 1}
    rows.sort(
        key=lambda r: (
            r.rtt_ms,
            r.rate_mbit,
            r.system == "petals",
            order.get(r.mode, 2),
            order.get(r.codec, 2),
        )
    )
    print(f"\n# {len(rows)} rows in {time.perf_counter() - began:.0f} s")
    print_table(rows)
    print_checks(rows, ref)
    floors, compute_ms = print_floor(rows, rtts, modes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k != "linkemu_log"}
                    | {
                        "servers": SPANS,
                        "prompt_tokens": ids.shape[1],
                        "ttft_prompt_tokens": long_ids.shape[1],
                        "client_compression_setting": client_codec,
                        "server_compression_setting": server_codec,
                        "cores": os.cpu_count(),
                        "torch": torch.__version__,
                    },
                    "rows": [dataclasses.asdict(r) for r in rows],
                    "push_floor_ms": {str(k): v for k, v in floors.items()},
                    "push_compute_ms": compute_ms,
                    "interrupted": interrupted,
                },
                f,
                indent=1,
            )
        print(f"results written to {args.json}")
    if args.keep_logs or interrupted or petals_failed or any(r.error for r in rows):
        print(f"logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
