"""`beed serve --config FILE`: a real server takes its options from TOML; the command line wins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beectl.local_swarm import Daemon, LocalSwarm
from tests.swarm.test_faults import server_info


def test_a_server_reads_its_options_from_toml_and_the_command_line_wins(tmp_path):
    with LocalSwarm(num_servers=1) as swarm:
        host, port = swarm.initial_peers[0]
        peer = f"{host}:{port}"
        config = tmp_path / "serve.toml"
        config.write_text(
            "\n".join(
                [
                    'model = "smollm2-135m"',
                    'block-indices = "0:30"',
                    "kv-budget-tokens = 1000",
                    "continuous-batching = false",
                    'batch-matmul = "shared"',
                    f'initial-peers = ["{peer}"]',
                    'host = "127.0.0.1"',
                    "port = 0",
                ]
            )
        )
        daemon = Daemon(
            "configured",
            ["serve", "--config", str(config), "--kv-budget-tokens", "2000"],
            tmp_path / "log",
        )
        daemon.start(dict(os.environ))
        try:
            daemon.wait_ready(180)
            info = server_info(daemon.address)
        finally:
            assert daemon.process is not None
            daemon.process.terminate()
            daemon.process.wait(timeout=60)
    assert (info["span_start"], info["span_end"]) == (0, 30)
    assert info["free_kv_tokens"] == 2000  # the command line won over the file's 1000
    assert info["continuous_batching"] is False and info["batch_matmul"] == "shared"


def test_an_unknown_key_or_broken_toml_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, expected in (
        ("kv-budget = 3\n", "'kv-budget' is not an option of"),
        ("port = [1\n", "is not valid TOML"),
        ("port = [1, 2]\n", "'port' takes one value"),
    ):
        bad.write_text(text)
        run = subprocess.run(
            [sys.executable, "-m", "beed.cli", "serve", "--config", str(bad)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and expected in run.stderr, run.stderr


def test_the_shipped_config_files_are_accepted():
    for command, path in (("serve", "deploy/serve.toml"), ("bootstrap", "deploy/bootstrap.toml")):
        run = subprocess.run(
            [sys.executable, "-m", "beed.cli", command, "--config", path, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd here")
def test_systemd_accepts_the_units(tmp_path):
    root = Path(__file__).resolve().parents[2]
    for unit in ("beed.service", "beed-bootstrap.service"):
        text = (root / "deploy" / unit).read_text().replace("/opt/beed", str(root))
        assert "--config /etc/beed/" in text
        (tmp_path / unit).write_text(text)
        run = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / unit)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0 and unit not in run.stderr, run.stderr
