"""`beectl swarm --serve`: the live page in headless Chromium (Debian's `chromium`), and --json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from beectl.local_swarm import LocalSwarm
from tests.conftest import peers_of

PEER = r'data-peer="([0-9A-Za-z]{16,})"'  # rendered rows, not the page's script
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, *flags: str) -> str:
    run = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_the_page_shows_every_block_and_server_and_follows_a_server_that_leaves(tmp_path):
    with LocalSwarm(num_servers=2) as swarm:
        peers = ",".join(peers_of(swarm))
        listing = json.loads(
            subprocess.run(
                [sys.executable, "-m", "beectl.cli", "swarm", "--json", "--initial-peers", peers],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
        )
        assert listing[0]["replicas"] == [1] * 30 and len(listing[0]["servers"]) == 2
        page = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "beectl.cli",
                "swarm",
                "--serve",
                "--port",
                "0",
                "--initial-peers",
                peers,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert page.stdout is not None
            url = page.stdout.readline().split()[1]
            shot = tmp_path / "swarm.png"
            browse(url, f"--screenshot={shot}", "--window-size=1200,700")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
            dom = browse(url, "--dump-dom")
            assert len(re.findall(r'data-block="\d+"', dom)) == 30
            assert re.findall(r'data-replicas="(\d+)"', dom) == ["1"] * 30
            shown = set(re.findall(PEER, dom))
            assert shown == {s.peer_id for s in swarm.servers}
            leaving = swarm.servers[1]
            leaving.process.terminate()  # drains, announces offline, exits
            leaving.process.wait(timeout=60)
            dom = browse(url, "--dump-dom")
            assert set(re.findall(PEER, dom)) == {swarm.servers[0].peer_id}
            replicas = [int(n) for n in re.findall(r'data-replicas="(\d+)"', dom)]
            start, end = (
                int(x) for x in leaving.ready_line.split("blocks")[1].split()[0].split(":")
            )
            assert all(replicas[i] == 0 for i in range(start, end)) and sum(replicas) == 30 - (
                end - start
            )
        finally:
            page.terminate()
            page.wait(timeout=20)
