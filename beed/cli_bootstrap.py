"""`beed keygen` and `beed bootstrap`: a private swarm's key, and a DHT-only node to join through."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from beed.cli_config import config_option
from beed.cli_relay import relay_config_from, relay_options
from beed.dht.peers import initial_peers_callback
from beed.net.swarm_key import SwarmKey, SwarmKeyError, swarm_key_option


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Make a new private swarm key in PATH (mode 0600; never overwrites a file).

    Give the same file to every `beed bootstrap`, `beed serve` and `beectl` of the swarm as
    `--swarm-key PATH`; peers without it are ignored and refused. Prints the key's id (not
    secret): machines holding the same key print the same id at start.
    """
    try:
        key = SwarmKey.generate_file(path)
    except SwarmKeyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"swarm key {key.key_id} written to {path}")


@click.command()
@config_option
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
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (TCP, on --host) [default: off].",
)
@swarm_key_option
@relay_options
def bootstrap(
    host: str,
    port: int,
    identity_path: Path | None,
    initial_peers: list[tuple[str, int]],
    metrics_port: int | None,
    swarm_key: SwarmKey | None,
    **relay_options: Any,
) -> None:
    """Run a DHT-only node that others join through.

    Prints one line to stdout, `--initial-peers HOST:PORT`, to pass to `beed serve` and
    `beectl`; logs go to stderr. With --relay (the default) it also relays for servers behind
    NAT on the TCP port of the same number. Exits with code 0 on SIGINT or SIGTERM.
    """
    from beed.bootstrap import run_bootstrap
    from beed.dht.config import DHTConfig
    from protocol.errors import BeeError

    relay, relay_config = relay_config_from(relay_options)

    def on_ready(value: str) -> None:
        click.echo(f"--initial-peers {value}")
        sys.stdout.flush()

    try:
        code = asyncio.run(
            run_bootstrap(
                host,
                port,
                identity_path,
                initial_peers,
                on_ready,
                config=DHTConfig(swarm_key=swarm_key),
                metrics_port=metrics_port,
                relay=relay_config if relay else None,
            )
        )
    except BeeError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)
