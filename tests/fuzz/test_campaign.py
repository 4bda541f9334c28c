"""Fuzz campaign against live daemons: 100,000+ random and mutated frames at a `beed serve`, and
100,000+ random and mutated datagrams at a `beed bootstrap` and the server's DHT port.

Afterwards both daemons are alive, the server's RSS stayed within its idle size + 1 GiB, it
still answers GetInfo, a real client still generates the text it generated before, and neither
daemon logged a traceback. Frames go out without waiting for answers (a reader per connection
drains them); every connection carries a burst of well-formed frames whose fields hold odd but
well-typed values ("soft": the connection must stay up, checked with a Ping), then at most one
broken frame ("hard": flipped bytes, truncations, lying lengths, bogus codecs/dtypes/shapes,
ill-typed fields, bombs) and a half-close, and the next connection starts.

Run: `.venv/bin/python -m pytest -m slow tests/fuzz -o log_cli=true --log-cli-level=INFO`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from beectl.local_swarm import Daemon, LocalSwarm
from protocol import FrameDecoder, encode_message_bytes
from protocol.frames import MAGIC, EncodedFrame
from protocol.limits import Limits
from protocol.messages import (
    Backward,
    Close,
    Error,
    Forward,
    GetInfo,
    Hello,
    OpenSession,
    Ping,
    Pong,
    Step,
    Truncate,
)
from tests.conftest import STORY, peers_of
from tests.fuzz.mutations import Mutator, corpus, dht_corpus, dht_mutation, pack
from tests.swarm.test_sessions import info

log = logging.getLogger(__name__)

FRAMES = 100_000
DATAGRAMS_PER_TARGET = 55_000
DATAGRAMS_PER_S = 2_500  # per target: a little over the DHT's global request budget (2,000/s)
WORKERS = 24  # connections at once
SOURCES = [f"127.0.0.{i}" for i in range(2, 255)]  # loopback peers (per-address caps)
GiB = 1 << 30
MARK = 0xF0F0  # Ping nonce after a connection's soft frames
OPENERS = {GetInfo.TYPE, OpenSession.TYPE, Forward.TYPE, Backward.TYPE}
ON_SESSION = {Step.TYPE, Truncate.TYPE, Close.TYPE}
READ_LIMITS = Limits(max_frame_bytes=1 << 30, max_decompressed_bytes=1 << 30)


# --- the TCP campaign ------------------------------------------------------------------------------


@dataclass
class Findings:
    """What the campaign saw; `examples` keeps the frames behind anything worth a look."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))

    def example(self, what: str, frames: list[bytes]) -> None:
        if len(self.examples[what]) < 5:
            self.examples[what].append(" | ".join(f.hex() for f in frames))


async def drain(reader: asyncio.StreamReader, findings: Findings) -> list[EncodedFrame]:
    """Everything the server sends until it closes the connection."""
    decoder = FrameDecoder(READ_LIMITS)
    got = []
    try:
        while data := await reader.read(1 << 20):
            decoder.feed(data)
            while (enc := decoder.next_encoded()) is not None:
                got.append(enc)
    except ConnectionResetError:
        findings.counts["reset"] += 1
    except Exception as exc:  # a frame from the server our decoder refuses
        findings.counts[f"bad answer {type(exc).__name__}"] += 1
    return got


async def one_connection(
    host: str, port: int, source: str, mutator: Mutator, findings: Findings
) -> int:
    """Open, send a burst, half-close, read to the end; returns the fuzz frames it carried."""
    rng = mutator.rng
    soft: list[tuple[int, bytes]] = []  # (stream id, frame)
    sid, sessions = 0, []
    hard: bytes | None = None
    first_hard = rng.random() < 0.08
    if first_hard:
        hard = mutator.hard(rng.choice(mutator.by_type[Hello.TYPE] + mutator.templates[:8]))
    else:
        for _ in range(rng.randrange(50)):
            t = rng.choice(mutator.templates)
            if t.type in OPENERS:
                sid += 1
                use = sid
                if t.type == OpenSession.TYPE:
                    sessions.append(sid)
            elif t.type in ON_SESSION and sessions and rng.random() < 0.7:
                use = rng.choice(sessions)
            else:
                use = rng.randrange(1, 2**32)
            soft.append((use, mutator.soft(t, use)))
        if rng.random() < 0.9:
            hard = mutator.hard(rng.choice(mutator.templates))
    frames = [f for _, f in soft] + ([hard] if hard is not None else [])
    head = [] if first_hard else [encode_message_bytes(Hello(peer_id="fuzz"))]
    marker = [] if first_hard else [encode_message_bytes(Ping(0, MARK))]
    data = b"".join([*head, *frames[: len(soft)], *marker, *([hard] if hard else [])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        findings.counts["connect failed"] += 1
        return 0
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        reading = asyncio.ensure_future(drain(reader, findings))
        try:
            if rng.random() < 0.03:  # trickled: the server reads the frames in small pieces
                cut = min(len(data), 3000)
                for i in range(0, cut, 7):
                    writer.write(data[i : min(i + 7, cut)])
                    await writer.drain()
                data = data[cut:]
            writer.write(data)
            await writer.drain()
            writer.write_eof()
        except OSError:
            findings.counts["write failed (closed early)"] += 1
        try:
            got = await asyncio.wait_for(reading, 20)
        except TimeoutError:
            findings.counts["stalled (no close within 20 s of our EOF)"] += 1
            findings.example("stalled", frames)
            return len(frames)
    finally:
        writer.transport.abort()
    findings.counts["connections"] += 1
    by_stream = {s: f for s, f in soft}
    for enc in got:
        if enc.type == Error.TYPE:
            code = enc.header.get("code")
            findings.counts[f"E{code}"] += 1
            if code == 299:
                culprit = by_stream.get(enc.stream_id)
                findings.example("299 InternalServerError", [culprit] if culprit else frames)
        elif enc.type == Pong.TYPE and enc.header.get("nonce") == MARK:
            findings.counts["soft bursts answered"] += 1
    if not first_hard and not any(
        e.type == Pong.TYPE and e.header.get("nonce") == MARK for e in got
    ):
        codes = [e.header.get("code") for e in got if e.type == Error.TYPE and e.stream_id == 0]
        if codes == [101] and hard is not None and not hard.startswith(MAGIC):
            # protocol/frames.py checks the magic of the bytes after a complete frame before
            # returning that frame: the Ping just before the broken frame is dropped with it.
            findings.counts["Ping dropped with the bad-magic frame after it"] += 1
            findings.example("Ping dropped (101 raised early)", [*frames[len(soft) :]])
        else:
            findings.counts["soft burst not answered"] += 1
            findings.example(f"soft burst not answered (stream-0 errors {codes})", frames)
    return len(frames)


async def tcp_campaign(host: str, port: int, server: Daemon, findings: Findings, fp: str) -> int:
    mutator = Mutator(random.Random(20250601), corpus(fp))
    sent = 0
    index = 0

    async def worker() -> None:
        nonlocal sent, index
        while sent < FRAMES and server.process is not None and server.process.poll() is None:
            index += 1
            n = await one_connection(host, port, SOURCES[index % len(SOURCES)], mutator, findings)
            sent += n

    async with asyncio.TaskGroup() as tg:
        for _ in range(WORKERS):
            tg.create_task(worker())
    return sent


# --- the DHT campaign ------------------------------------------------------------------------------


async def dht_campaign(targets: list[tuple[str, int]], findings: Findings) -> int:
    rng = random.Random(77)
    corpus_ = dht_corpus(rng)
    socks = []
    for src in SOURCES:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    sent = 0
    try:
        began = time.monotonic()
        while sent < DATAGRAMS_PER_TARGET * len(targets):
            for _ in range(100):
                data = dht_mutation(rng, corpus_) if rng.random() < 0.8 else rng.choice(corpus_)
                s = socks[sent % len(socks)]
                for target in targets:
                    try:
                        s.sendto(data[:65507], target)
                    except BlockingIOError:
                        findings.counts["udp send blocked"] += 1
                    sent += 1
            for s in socks[: len(socks) // 8]:
                while True:
                    try:
                        s.recv(65536)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    findings.counts["udp replies (some sources)"] += 1
            ahead = sent / (DATAGRAMS_PER_S * len(targets)) - (time.monotonic() - began)
            await asyncio.sleep(max(0.0, ahead))
    finally:
        for s in socks:
            s.close()
    return sent


def dht_answers(target: tuple[str, int]) -> bool:
    """Whether the DHT node at target answers a ping (from 127.0.0.1, client mode)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        for _ in range(3):  # the node may be shedding load: a few tries
            s.sendto(b"\x00" + random.randbytes(20) + pack(["ping", [b""]]), target)
            try:
                if s.recv(4096)[:1] == b"\x01":
                    return True
            except TimeoutError:
                continue
    return False


# --- health -----------------------------------------------------------------------------------------


class RssPeak:
    """Peak VmRSS of some processes, sampled every 50 ms on a thread."""

    def __init__(self, daemons: list[Daemon]) -> None:
        self.pids = {d.name: d.process.pid for d in daemons if d.process is not None}
        self.idle = {name: rss(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss(pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss(pid: int) -> int:
    try:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def generate_text(swarm: LocalSwarm, tokenizer: Any) -> list[int]:
    from beectl import AutoDistributedModelForCausalLM

    ids = tokenizer(STORY, return_tensors="pt").input_ids
    with AutoDistributedModelForCausalLM.from_pretrained(
        "smollm2-135m", initial_peers=peers_of(swarm)
    ) as model:
        out = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    return [int(x) for x in out[0, ids.shape[1] :].tolist()]


def tracebacks(daemons: list[Daemon]) -> dict[str, str]:
    found = {}
    for d in daemons:
        text = d.log_path.read_text(errors="replace")
        if "Traceback" in text:
            at = text.index("Traceback")
            found[d.name] = text[max(0, at - 600) : at + 3000]
    return found


def assert_healthy(swarm: LocalSwarm, peaks: RssPeak, reference: list[int], tokenizer: Any) -> None:
    daemons = [*swarm.servers, *([swarm.bootstrap] if swarm.bootstrap else [])]
    for d in daemons:
        assert d.process is not None and d.process.poll() is None, f"{d.name} died:\n{d.tail(40)}"
    for name, peak in peaks.peak.items():
        assert peak <= peaks.idle[name] + GiB, (name, peaks.idle[name], peak)
    current = asyncio.run(info(swarm.servers[0]))
    assert current["span_start"] == 0 and current["span_end"] == 30, current
    assert generate_text(swarm, tokenizer) == reference
    assert not tracebacks(daemons), tracebacks(daemons)


@pytest.fixture(scope="module")
def campaign_swarm() -> Iterator[LocalSwarm]:
    # Plain TCP: the campaign's frames reach the framing layer (the same code behind TLS).
    with LocalSwarm(num_servers=1, extra_args=["--no-encryption"]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def reference(campaign_swarm: LocalSwarm, tokenizer: Any) -> list[int]:
    return generate_text(campaign_swarm, tokenizer)


def log_events(daemons: list[Daemon]) -> dict[str, collections.Counter[str]]:
    """WARNING/ERROR lines of each daemon's log, by event name."""
    found = {}
    for d in daemons:
        text = d.log_path.read_text(errors="replace")
        found[d.name] = collections.Counter(
            m.group(1) for m in re.finditer(r" (?:WARNING|ERROR|CRITICAL) [\w.]+: (\S+)", text)
        )
    return found


def report(what: str, sent: int, seconds: float, findings: Findings, peaks: RssPeak) -> None:
    log.info("%s: %d sent in %.0f s; %s", what, sent, seconds, dict(findings.counts))
    log.info("rss idle %s peak %s", peaks.idle, peaks.peak)
    for kind, frames in findings.examples.items():
        for hexes in frames:
            log.info("example %s: %s", kind, hexes[:600])


@pytest.mark.slow
def test_frames_campaign(campaign_swarm: LocalSwarm, reference: list[int], tokenizer: Any) -> None:
    server = campaign_swarm.servers[0]
    host, port = server.address
    fingerprint = server.ready_line.split()[server.ready_line.split().index("fingerprint") + 1]
    findings = Findings()
    with RssPeak([server]) as peaks:
        began = time.monotonic()
        sent = asyncio.run(tcp_campaign(host, port, server, findings, fingerprint))
        seconds = time.monotonic() - began
    report("frames", sent, seconds, findings, peaks)
    log.info("daemon log warnings: %s", log_events(campaign_swarm.servers))
    assert sent >= FRAMES
    assert not findings.examples.get("299 InternalServerError"), findings.examples
    # Well-formed frames (odd values, right kinds) are answered and the connection stays.
    assert not findings.counts["soft burst not answered"], findings.examples
    assert_healthy(campaign_swarm, peaks, reference, tokenizer)


@pytest.mark.slow
def test_datagrams_campaign(
    campaign_swarm: LocalSwarm, reference: list[int], tokenizer: Any
) -> None:
    server, bootstrap = campaign_swarm.servers[0], campaign_swarm.bootstrap
    assert bootstrap is not None
    targets = [campaign_swarm.initial_peers[0], server.address]  # the server's DHT: its TCP port
    for target in targets:
        assert dht_answers(target), f"no DHT node answers at UDP {target}"
    findings = Findings()
    with RssPeak([server, bootstrap]) as peaks:
        began = time.monotonic()
        sent = asyncio.run(dht_campaign(targets, findings))
        seconds = time.monotonic() - began
    report("datagrams", sent, seconds, findings, peaks)
    log.info("daemon log warnings: %s", log_events([server, bootstrap]))
    assert sent >= 100_000
    for target in targets:
        assert dht_answers(target), f"the DHT node at UDP {target} stopped answering"
    assert_healthy(campaign_swarm, peaks, reference, tokenizer)
