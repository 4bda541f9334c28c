"""The `beed` command line: parses argv and environment, builds configs, runs the daemon."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from beed.dht.peers import initial_peers_callback
from beed.logs import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Verbosity of the log on stderr.",
)
def main(log_level: str) -> None:
    """beed: serve transformer blocks of a large language model to a swarm."""
    setup_logging(log_level)


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind the UDP port.")
@click.option(
    "--port",
    default=31340,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="UDP port of the DHT (0 picks a free one).",
)
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ed25519 key file; created with mode 0600 if missing. Without it the peer id changes "
    "on every start.",
)
@click.option(
    "--initial-peers",
    multiple=True,
    callback=initial_peers_callback,
    help="Other bootstrap nodes, HOST:PORT ([IPv6]:PORT), repeated or comma-separated.",
)
def bootstrap(
    host: str, port: int, identity_path: Path | None, initial_peers: list[tuple[str, int]]
) -> None:
    """Run a DHT-only node that others join through.

    Prints one line to stdout, `--initial-peers HOST:PORT`, to pass to `beed serve` and
    `beectl`; logs go to stderr. Exits with code 0 on SIGINT or SIGTERM.
    """
    from beed.bootstrap import run_bootstrap

    def on_ready(value: str) -> None:
        click.echo(f"--initial-peers {value}")
        sys.stdout.flush()

    sys.exit(asyncio.run(run_bootstrap(host, port, identity_path, initial_peers, on_ready)))


if __name__ == "__main__":
    main()
