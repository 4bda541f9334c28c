"""The measuring side of bench/hostile.py: the honest client, the server's memory and CPU.

`measure_honest` generates with beectl again and again and reports its decode tok/s and tokens
(`Honest`); `RssSampler` samples the server's VmRSS on a thread and keeps its peak;
`wait_quiet` waits until the server stops computing (`cpu_seconds`); `get_info` and
`server_counters` read the server's GetInfo counters; `dht_answers` checks that its DHT port
answers; `scan_logs` counts tracebacks and warnings in the daemons' logs; `machine` describes
the host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import platform
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostile_wire import HELLO, MiB, pack

from protocol.frames import FrameDecoder, encode_message_bytes
from protocol.messages import GetInfo, Info


class RssSampler:
    """VmRSS of one process every period_s on a thread; `reset_peak()` starts a new window."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid = pid
        self.period_s = period_s
        self.current = self._read()
        self.peak = self.current
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _read(self) -> int:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) * 1024 if m else 0

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.current = self._read()
            self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.current = self._read()
        self.peak = self.current

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Honest:
    """What the honest client did during one measurement."""

    tok_s: float | None = None
    runs: int = 0
    decoded_tokens: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)  # wall time of each generation


async def measure_honest(
    model: Any, ids: Any, new_tokens: int, seconds: float, grace_s: float
) -> Honest:
    """Generate again and again for `seconds` (a run then in progress may take `grace_s` more)."""
    from beectl.generation import SamplingConfig, generate
    from protocol.errors import BeeError

    out = Honest()
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + seconds + grace_s
    decode_s = 0.0
    while loop.time() - began < seconds:
        stamps: list[float] = []
        toks: list[int] = []

        def on_tokens(t: Any, stamps: list[float] = stamps, toks: list[int] = toks) -> None:
            stamps.append(time.perf_counter())
            toks.append(int(t[0]))

        t0 = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                async with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                    await generate(
                        model.head, session, ids, SamplingConfig(max_new_tokens=new_tokens),
                        on_tokens=on_tokens,
                    )  # fmt: skip
        except TimeoutError:
            out.errors.append(f"cut at the deadline after {len(toks)} tokens")
        except (BeeError, OSError) as exc:
            out.errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
            await asyncio.sleep(0.5)
        out.run_s.append(time.perf_counter() - t0)
        if toks:
            out.tokens.append(toks)
            out.runs += 1
        if len(stamps) >= 2:
            out.decoded_tokens += len(stamps) - 1
            decode_s += stamps[-1] - stamps[0]
        if loop.time() >= deadline:
            break
    out.tok_s = out.decoded_tokens / decode_s if decode_s > 0 else 0.0
    return out


async def get_info(host: str, port: int, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The server's Info dict over a fresh connection from 127.0.0.1, or None."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(HELLO + encode_message_bytes(GetInfo(1)))
                decoder = FrameDecoder()
                while True:
                    data = await reader.read(MiB)
                    if not data:
                        return None
                    decoder.feed(data)
                    while (msg := decoder.next_message()) is not None:
                        if isinstance(msg, Info):
                            return msg.info
            finally:
                writer.transport.abort()
    except (OSError, TimeoutError):
        return None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process so far, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_quiet(pid: int, max_s: float, busy_cores: float = 0.15) -> float:
    """Seconds until the process uses less than `busy_cores` over a second (at most max_s): work
    an attacker left queued or running (a Forward that runs as one piece) ends first."""
    began = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - began < max_s:
        await asyncio.sleep(1.0)
        now = cpu_seconds(pid)
        if now - last < busy_cores:
            return time.monotonic() - began - 1.0
        last = now
    return time.monotonic() - began


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"


def dht_answers(host: str, port: int) -> bool:
    """Whether a DHT node answers a ping at host:port (UDP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(b"\x00" + os.urandom(20) + pack(["ping", [b""]]), (host, port))
        try:
            return s.recv(4096)[:1] == b"\x01"
        except (TimeoutError, OSError):
            return False


SERVER_DELTAS = [
    "connections_refused",
    "connections_evicted",
    "requests_refused_for_memory",
    "reader_waits",
    "reader_closed",
    "batches",
    "batched_steps",
]


def server_counters(before: dict[str, Any] | None, during: dict[str, Any] | None) -> dict[str, Any]:
    if not during:
        return {"GetInfo": "no answer during the attack"}
    out: dict[str, Any] = {
        "connections": during.get("connections"),
        "sessions": during.get("sessions"),
        "request_MiB_held": round(during.get("request_bytes_held", 0) / MiB, 1),
        "request_MiB_peak": round(during.get("request_bytes_peak", 0) / MiB, 1),
    }
    for key in SERVER_DELTAS:
        if before and key in during:
            out[key] = during[key] - before.get(key, 0)
    return out


def scan_logs(daemons: list[Any]) -> dict[str, collections.Counter[str]]:
    """Per daemon log: tracebacks, and WARNING/ERROR lines by event name."""
    found = {}
    for d in daemons:
        try:
            text = d.log_path.read_text(errors="replace")
        except OSError:
            continue
        events = collections.Counter[str]()
        events["Traceback"] = text.count("Traceback")
        for m in re.finditer(r" (WARNING|ERROR|CRITICAL) [\w.]+: (\S+)", text):
            events[f"{m.group(1)} {m.group(2)}"] += 1
        found[d.name] = +events
    return found
