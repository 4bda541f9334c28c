"""User mistakes get one clear line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beectl.local_swarm import LocalSwarm
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir
from beed.net.peer import PeerConnection
from protocol.messages import OpenSession
from tests.conftest import peers_of
from tests.swarm.test_sessions import info, wait_sessions
from tests.tiny_models import make_tiny_llama


def beectl(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "beectl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unknown_model():
    result = beectl("generate", "hi", "--model", "no-such-model", "--initial-peers", "127.0.0.1:9")
    assert_user_error(result, "unknown model 'no-such-model'", "smollm2-135m")


def test_bootstrap_unreachable():
    port = free_udp_port()
    result = beectl("generate", "hi", "--initial-peers", f"127.0.0.1:{port}")
    assert_user_error(result, f"127.0.0.1:{port}")


def test_missing_initial_peers_and_bad_address():
    for result in (
        beectl("generate", "hi"),
        beectl("generate", "hi", "--initial-peers", "localhost"),
    ):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "--initial-peers" in result.stderr


def test_blocks_not_covered_and_server_full(model_path):
    with LocalSwarm(spans=[(0, 15)]) as swarm:
        result = beectl("generate", "hi", "--initial-peers", peers_of(swarm)[0])
        assert_user_error(result, "no online server covers block 15", "beed serve")

    with LocalSwarm(
        spans=[(0, 30)], extra_args=["--kv-budget-tokens", "100", "--max-kv-share-per-peer", "1"]
    ) as swarm:
        fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")

        async def hold_and_generate() -> subprocess.CompletedProcess[str]:
            conn = PeerConnection(*swarm.servers[0].address, tls=True)
            await conn.connect(5.0)
            try:
                await conn.request(OpenSession(conn.new_stream_id(), fingerprint, 0, 30, 80), 10.0)
                return await asyncio.to_thread(
                    beectl,
                    "generate",
                    "Tell me a story",
                    "--max-new-tokens",
                    "30",
                    "--kv-wait",
                    "1",
                    "--initial-peers",
                    peers_of(swarm)[0],
                )
            finally:
                await conn.aclose()

        result = asyncio.run(hold_and_generate())
        assert_user_error(result, "server full", "20 of 100 free")


def test_other_weights_under_the_same_name(tmp_path: Path, model_path):
    served = make_tiny_llama(tmp_path / "a" / "tiny-llama", seed=0, tokenizer_from=model_path)
    mine = make_tiny_llama(tmp_path / "b" / "tiny-llama", seed=1, tokenizer_from=model_path)
    with LocalSwarm(model=str(served), spans=[(0, 4)]) as swarm:
        result = beectl(
            "generate", "hi", "--raw", "--model", str(mine), "--initial-peers", peers_of(swarm)[0]
        )
        assert_user_error(result, "other weights", "tiny-llama")
        ok = beectl(
            "generate",
            "hi",
            "--raw",
            "--max-new-tokens",
            "3",
            "--model",
            str(served),
            "--initial-peers",
            peers_of(swarm)[0],
            "--json",
        )
        assert ok.returncode == 0, ok.stderr


def test_ctrl_c_closes_sessions_on_both_ends(swarm2):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beectl.cli",
            "generate",
            "Write a long story about a dragon.",
            "--max-new-tokens",
            "2000",
            "--initial-peers",
            peers_of(swarm2)[0],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while not proc.stdout.read(1):  # the first streamed character
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        during = asyncio.run(info(swarm2.servers[0]))
        assert during["sessions"] == 1
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    for server in swarm2.servers:
        after = asyncio.run(wait_sessions(server, 0, timeout_s=5.0))
        assert after["sessions"] == 0 and after["used_kv_bytes"] == 0


@pytest.mark.parametrize(
    "args", [["--help"], ["generate", "--help"], ["swarm", "--help"], ["demo", "--help"]]
)
def test_help(args):
    result = beectl(*args)
    assert result.returncode == 0 and "Usage" in result.stdout
