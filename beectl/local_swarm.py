"""A swarm on this machine: a bootstrap node and block servers as subprocesses (demo and tests)."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from beed.dht.peers import parse_initial_peers
from protocol.errors import BeeError

START_TIMEOUT_S = 300.0  # the first start converts the embedded model


class LocalSwarmError(BeeError):
    code = 306


@dataclass
class Daemon:
    """One `beed` subprocess and the first line it printed on stdout."""

    name: str
    args: list[str]
    log_path: Path
    module: str = "beed.cli"  # what `python -m` runs (tests run wrappers of the server)
    prefix: list[str] = field(default_factory=list)  # runs it under (`ip netns exec NS`)
    process: subprocess.Popen[str] | None = None
    ready_line: str = ""
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _ready_lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, env: dict[str, str]) -> None:
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                self.module,
                "--log-level",
                env.get("BEED_LOG_LEVEL", "INFO"),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        log.close()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        if self.process is None or self.process.stdout is None:
            return
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float) -> str:
        """The first stdout line (the ready line), waiting for it once; safe from any thread."""
        with self._ready_lock:
            if self.ready_line:
                return self.ready_line
            return self._read_ready(timeout_s)

    def _read_ready(self, timeout_s: float) -> str:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise LocalSwarmError(
                f"{self.name} printed nothing in {timeout_s:.0f} s; log:\n{self.tail()}"
            ) from None
        if line is None:
            raise LocalSwarmError(f"{self.name} exited before it was ready; log:\n{self.tail()}")
        self.ready_line = line
        return line

    @property
    def address(self) -> tuple[str, int]:
        """HOST, PORT from a server's ready line (`ready HOST:PORT blocks ...`)."""
        host, _, port = self.ready_line.split()[1].rpartition(":")
        return host, int(port)

    @property
    def peer_id(self) -> str:
        """The peer id from a server's ready line (`... peer_id ID ...`)."""
        words = self.ready_line.split()
        return words[words.index("peer_id") + 1]

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _on_gpu(args: list[str]) -> bool:
    return any(a == "--device" and v != "cpu" for a, v in itertools.pairwise(args))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalSwarm:
    """`with LocalSwarm(model="smollm2-135m", num_servers=2) as swarm:` — servers split the
    blocks evenly with --block-indices; `swarm.initial_peers` is what clients pass.

    The servers share this machine's cores: unless `num_threads` says otherwise, each gets
    cores / servers torch threads (at least one). OpenMP teams that together ask for more
    threads than there are cores wait on each other at every parallel region: on the 2-core
    reference machine, 32 concurrent requests through two servers of two threads each reached
    29 tok/s, and 106 tok/s with one thread each (docs/performance.md, "OpenAI API")."""

    def __init__(
        self,
        *,
        model: str = "smollm2-135m",
        num_servers: int = 2,
        spans: list[tuple[int, int]] | None = None,
        extra_args: list[str] | None = None,
        dtype: str = "float32",
        num_threads: int | None = None,
        swarm_key: Path | None = None,
    ) -> None:
        self.model = model
        # A private swarm: every daemon gets --swarm-key (clients need the same file).
        self.key_args = [] if swarm_key is None else ["--swarm-key", str(swarm_key)]
        self.num_servers = num_servers
        self.spans = spans
        self.extra_args = extra_args or []
        self.dtype = dtype
        self.num_threads = num_threads
        self._tmp = tempfile.TemporaryDirectory(prefix="beed-swarm-")
        self.bootstrap: Daemon | None = None
        self.servers: list[Daemon] = []
        self.initial_peers: list[tuple[str, int]] = []
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def _server_count(self) -> int:
        return len(self.spans) if self.spans is not None else self.num_servers

    def _split(self) -> list[tuple[int, int]]:
        if self.spans is not None:
            return self.spans
        from beed.models.adapters import load_config, num_blocks
        from beed.models.registry import resolve_model

        total = num_blocks(load_config(resolve_model(self.model).path))
        n = min(self.num_servers, total)
        bounds = [round(i * total / n) for i in range(n + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(n)]

    def __enter__(self) -> LocalSwarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        tmp = Path(self._tmp.name)
        spans = self._split()  # converts the embedded model once, before servers race for it
        self.bootstrap = Daemon(
            "bootstrap",
            ["bootstrap", "--host", "127.0.0.1", "--port", "0", *self.key_args],
            tmp / "bootstrap.log",
        )
        self.bootstrap.start(self.env)
        line = self.bootstrap.wait_ready(60.0)
        self.initial_peers = parse_initial_peers([line.split()[-1]])
        peers = line.split()[-1]
        for i, (start, end) in enumerate(spans):
            self.add_server(f"{start}:{end}", name=f"server{i}", peers=peers)
        for server in self.servers:
            server.wait_ready(START_TIMEOUT_S)

    def add_server(
        self,
        block_indices: str,
        *,
        name: str | None = None,
        peers: str | None = None,
        extra_args: list[str] | None = None,
        module: str = "beed.cli",
    ) -> Daemon:
        """Start one more server (not waited for: call `wait_ready` on the result)."""
        tmp = Path(self._tmp.name)
        name = name or f"server{len(self.servers)}"
        args = [
            "serve",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--initial-peers",
            peers or ",".join(f"{h}:{p}" for h, p in self.initial_peers),
            "--dtype",
            self.dtype,
            *self.key_args,
            *self.extra_args,
            *(extra_args or []),
        ]
        if block_indices:
            args += ["--block-indices", block_indices]
        if self.num_threads or not _on_gpu(args):  # a GPU server picks its own (one)
            threads = self.num_threads or max(1, _cores() // max(1, self._server_count()))
            args += ["--num-threads", str(threads)]
        daemon = Daemon(name, args, tmp / f"{name}.log", module)
        daemon.start(self.env)
        self.servers.append(daemon)
        return daemon

    def describe(self) -> list[str]:
        lines = [f"bootstrap --initial-peers {','.join(f'{h}:{p}' for h, p in self.initial_peers)}"]
        lines += [f"{s.name}: {' '.join(s.ready_line.split()[:4])}" for s in self.servers]
        return lines

    def stop(self) -> None:
        stop_daemons([*self.servers, *([self.bootstrap] if self.bootstrap else [])])
        self._tmp.cleanup()


def stop_daemons(daemons: list[Daemon], timeout_s: float = 20.0) -> None:
    """SIGTERM every daemon, wait for all (together at most timeout_s), kill the stragglers."""
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for daemon in daemons:
        if daemon.process is None:
            continue
        try:
            daemon.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
