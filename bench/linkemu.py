"""A user-space link emulator: a TCP proxy that adds delay, jitter and a bandwidth limit per direction.

    python bench/linkemu.py --map 127.0.0.2:31338=127.0.0.1:31338 --delay-ms 50 --rate-mbit 100

Prints `ready` once listening; on SIGTERM/SIGINT prints `stats {json}` (bytes per mapping), exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

READ_CHUNK_BYTES = 64 * 1024  # small enough that the bandwidth shaping is smooth
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # per direction: stop reading beyond this (backpressure)


@dataclass(frozen=True)
class Link:
    """One direction of a path: one-way delay, bandwidth (0 = unlimited) and jitter (uniform ±)."""

    delay_ms: float = 0.0
    rate_mbit: float = 0.0
    jitter_ms: float = 0.0

    @property
    def ideal(self) -> bool:
        return self.delay_ms <= 0 and self.rate_mbit <= 0 and self.jitter_ms <= 0


@dataclass(frozen=True)
class Mapping:
    """LISTEN_HOST:PORT -> TARGET_HOST:PORT; `up` shapes listen->target, `down` target->listen."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    up: Link = Link()
    down: Link = Link()

    @staticmethod
    def parse(text: str, up: Link, down: Link | None = None) -> Mapping:
        """`LISTEN_HOST:PORT=TARGET_HOST:PORT`."""
        listen, sep, target = text.partition("=")
        if not sep:
            raise ValueError(f"mapping {text!r} is not LISTEN_HOST:PORT=TARGET_HOST:PORT")
        lh, _, lp = listen.rpartition(":")
        th, _, tp = target.rpartition(":")
        if not (lh and th and lp.isdigit() and tp.isdigit()):
            raise ValueError(f"mapping {text!r} is not LISTEN_HOST:PORT=TARGET_HOST:PORT")
        return Mapping(lh, int(lp), th, int(tp), up, up if down is None else down)

    def __str__(self) -> str:
        return f"{self.listen_host}:{self.listen_port}={self.target_host}:{self.target_port}"


class LinkClock:
    """When each chunk sent over one link direction is delivered.

    A chunk of n bytes read at time t occupies the link for n*8/rate seconds once the link is free
    (FIFO), then travels for the one-way delay plus a uniform jitter draw in [-jitter, +jitter];
    the pipe delivers it no earlier than the chunk before it, so bytes never reorder.
    """

    def __init__(self, link: Link, rng: random.Random) -> None:
        self.link = link
        self.rng = rng
        self.busy_until = 0.0  # when the link finishes sending what it was given so far

    def transmit(self, nbytes: int, now: float) -> float:
        """The time the last byte of a chunk arriving `now` is off the wire (link FIFO)."""
        start = max(now, self.busy_until)
        if self.link.rate_mbit > 0:
            start += nbytes * 8 / (self.link.rate_mbit * 1e6)
        self.busy_until = start
        return start

    def propagate(self, sent: float) -> float:
        """Arrival at the far end of a chunk whose last byte was sent at `sent` (before ordering)."""
        delay = self.link.delay_ms
        if self.link.jitter_ms > 0:
            delay += self.rng.uniform(-self.link.jitter_ms, self.link.jitter_ms)
        return sent + max(0.0, delay) / 1000.0


@dataclass
class DirectionStats:
    bytes: int = 0
    chunks: int = 0


@dataclass
class MappingStats:
    connections: int = 0
    failed_connects: int = 0
    up: DirectionStats = field(default_factory=DirectionStats)
    down: DirectionStats = field(default_factory=DirectionStats)


class _Pipe:
    """One direction of one connection: read chunks, stamp delivery times, write them then."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        clock: LinkClock,
        stats: DirectionStats,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.clock = clock
        self.stats = stats
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.last_delivery = 0.0
        self.grown = asyncio.Event()  # set when a chunk is queued
        self.shrunk = asyncio.Event()  # set when a chunk leaves the queue

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._read())
            tg.create_task(self._write())

    def _push(self, data: bytes) -> None:
        now = time.monotonic()
        if self.clock.link.ideal:
            at = now
        elif data:
            at = self.clock.propagate(self.clock.transmit(len(data), now))
        else:  # EOF: no serialization time, but it follows the bytes before it
            at = self.clock.propagate(max(now, self.clock.busy_until))
        at = max(at, self.last_delivery)
        self.last_delivery = at
        self.queue.append((at, data))
        self.queued_bytes += len(data)
        self.grown.set()

    async def _read(self) -> None:
        while True:
            while self.queued_bytes > MAX_QUEUED_BYTES:
                self.shrunk.clear()
                await self.shrunk.wait()
            data = await self.reader.read(READ_CHUNK_BYTES)
            self._push(data)
            if not data:
                return

    async def _write(self) -> None:
        while True:
            while not self.queue:
                self.grown.clear()
                await self.grown.wait()
            at, data = self.queue[0]
            await _WAKER.until(at)
            self.queue.popleft()
            self.queued_bytes -= len(data)
            self.shrunk.set()
            if not data:
                if self.writer.can_write_eof() and not self.writer.is_closing():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            self.stats.bytes += len(data)
            self.stats.chunks += 1
            await self.writer.drain()


class _Waker:
    """Sleeps until a monotonic deadline, accurate to a fraction of a millisecond.

    Loop timers have millisecond resolution and fire ~0.5 ms late on average (uvloop rounds the
    delay, the loop's clock is cached): the sleep is cut short by the measured lateness (a moving
    average) and the rest is waited out by yielding to the loop, a short spin."""

    def __init__(self) -> None:
        self.lateness_s = 0.0005

    async def until(self, deadline: float) -> None:
        asked = deadline - time.monotonic() - self.lateness_s
        if asked > 0:
            began = time.monotonic()
            await asyncio.sleep(asked)
            late = time.monotonic() - began - asked
            self.lateness_s = min(0.002, max(0.0, 0.9 * self.lateness_s + 0.1 * late))
        for _ in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0)


_WAKER = _Waker()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LinkEmulator:
    """`await LinkEmulator([Mapping(...)]).start()` listens on every mapping; `aclose()` stops
    listening and tears down every connection (no task outlives it).

    Every accepted connection is piped to its mapping's target; each direction of each connection
    is its own link (LinkClock), or with `shared_link` all connections of a mapping share one link
    per direction. Half-closes are passed on; a reset on one side aborts both.
    """

    def __init__(
        self, mappings: list[Mapping], *, shared_link: bool = False, seed: int | None = None
    ) -> None:
        self.mappings = list(mappings)
        self.shared_link = shared_link
        self.rng = random.Random(seed)
        self.stats: dict[str, MappingStats] = {str(m): MappingStats() for m in self.mappings}
        self._shared: dict[str, tuple[LinkClock, LinkClock]] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def ports(self) -> list[int]:
        """The bound listen port of each mapping (useful with listen port 0)."""
        return [s.sockets[0].getsockname()[1] for s in self._servers]

    async def start(self) -> None:
        try:
            for mapping in self.mappings:
                self._shared[str(mapping)] = (
                    LinkClock(mapping.up, self.rng),
                    LinkClock(mapping.down, self.rng),
                )
                server = await asyncio.start_server(
                    functools.partial(self._accept, mapping),
                    mapping.listen_host,
                    mapping.listen_port,
                    reuse_address=True,
                    limit=READ_CHUNK_BYTES,
                )
                self._servers.append(server)
        except BaseException:
            await self.aclose()
            raise

    def _accept(
        self, mapping: Mapping, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handle(mapping, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(
        self, mapping: Mapping, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
    ) -> None:
        stats = self.stats[str(mapping)]
        t_writer: asyncio.StreamWriter | None = None
        clean = False
        try:
            try:
                t_reader, t_writer = await asyncio.open_connection(
                    mapping.target_host, mapping.target_port, limit=READ_CHUNK_BYTES
                )
            except OSError:
                stats.failed_connects += 1
                return
            stats.connections += 1
            _nodelay(c_writer)
            _nodelay(t_writer)
            if self.shared_link:
                up, down = self._shared[str(mapping)]
            else:
                up, down = LinkClock(mapping.up, self.rng), LinkClock(mapping.down, self.rng)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_Pipe(c_reader, t_writer, up, stats.up).run())
                tg.create_task(_Pipe(t_reader, c_writer, down, stats.down).run())
            clean = True
        except* OSError:
            pass  # one side reset: tear both down (abort below sends the reset on)
        except* Exception as group:
            traceback.print_exception(group, file=sys.stderr)
        finally:
            for w in (c_writer, t_writer):
                if w is None:
                    continue
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            for w in (c_writer, t_writer):
                if w is not None and clean:
                    with contextlib.suppress(OSError, TimeoutError):
                        await asyncio.wait_for(w.wait_closed(), 5.0)

    async def aclose(self) -> None:
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        self._servers.clear()

    def stats_dict(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "connections": s.connections,
                "failed_connects": s.failed_connects,
                "up_bytes": s.up.bytes,
                "down_bytes": s.down.bytes,
            }
            for name, s in self.stats.items()
        }

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class LinkEmulatorProcess:
    """This script as a subprocess: `with LinkEmulatorProcess(maps, link) as emu:` starts it,
    waits for `ready` and stops it on exit (SIGTERM, then SIGKILL); `emu.stats` after stop."""

    def __init__(
        self,
        maps: list[str],
        link: Link,
        *,
        down: Link | None = None,
        shared_link: bool = False,
        seed: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.cmd = [sys.executable, str(Path(__file__).resolve())]
        for m in maps:
            self.cmd += ["--map", m]
        self.cmd += [
            "--delay-ms",
            str(link.delay_ms),
            "--rate-mbit",
            str(link.rate_mbit),
            "--jitter-ms",
            str(link.jitter_ms),
        ]
        if down is not None:
            self.cmd += [
                "--down-delay-ms",
                str(down.delay_ms),
                "--down-rate-mbit",
                str(down.rate_mbit),
                "--down-jitter-ms",
                str(down.jitter_ms),
            ]
        if shared_link:
            self.cmd.append("--shared-link")
        if seed is not None:
            self.cmd += ["--seed", str(seed)]
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self._lines: list[str] = []

    def start(self, timeout_s: float = 30.0) -> None:
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(open(self.log_path, "a")) if self.log_path else None
            self.process = subprocess.Popen(
                self.cmd,
                stdout=subprocess.PIPE,
                stderr=log if log is not None else subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        ready = threading.Event()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self._lines.append(line.rstrip("\n"))
                if line.startswith("ready"):
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout_s) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"link emulator did not start: {' '.join(self.cmd)}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._pump.join(5.0)
        for line in self._lines:
            if line.startswith("stats "):
                self.stats = json.loads(line[len("stats ") :])
        self.process = None

    def __enter__(self) -> LinkEmulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(emulator: LinkEmulator) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await emulator.start()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await emulator.aclose()
        print("stats " + json.dumps(emulator.stats_dict()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--map",
        action="append",
        required=True,
        metavar="LISTEN_HOST:PORT=TARGET_HOST:PORT",
        help="a port to listen on and where to forward it (repeatable)",
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth (0: unlimited)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± jitter")
    for name in ("delay-ms", "rate-mbit", "jitter-ms"):
        parser.add_argument(
            f"--down-{name}",
            type=float,
            default=None,
            help=f"{name} of the target->listen direction [default: as --{name}]",
        )
    parser.add_argument(
        "--shared-link",
        action="store_true",
        help="all connections of a mapping share one link per direction",
    )
    parser.add_argument("--seed", type=int, default=None, help="jitter random seed")
    args = parser.parse_args(argv)
    up = Link(args.delay_ms, args.rate_mbit, args.jitter_ms)
    down = Link(
        up.delay_ms if args.down_delay_ms is None else args.down_delay_ms,
        up.rate_mbit if args.down_rate_mbit is None else args.down_rate_mbit,
        up.jitter_ms if args.down_jitter_ms is None else args.down_jitter_ms,
    )
    emulator = LinkEmulator(
        [Mapping.parse(m, up, down) for m in args.map], shared_link=args.shared_link, seed=args.seed
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(emulator))


if __name__ == "__main__":
    main()
