"""`beectl swarm`: the models in the swarm and which servers serve which blocks (or a live page)."""

from __future__ import annotations

import json
from typing import Any

import click

from beectl.cli_options import peers_option, require_peers, run_cli
from beectl.config import ClientConfig
from beed.net.swarm_key import SwarmKey, swarm_key_option


@click.command()
@peers_option
@swarm_key_option
@click.option("--model", default=None, help="Show only this model's servers (name).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--serve", is_flag=True, help="Serve a live web page of the swarm instead.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--serve: address.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="--serve: port."
)
def swarm(
    initial_peers: list[tuple[str, int]],
    model: str | None,
    as_json: bool,
    serve: bool,
    host: str,
    port: int,
    swarm_key: SwarmKey | None,
) -> None:
    """List the models in the swarm and which servers serve which blocks.

    With --serve, a web page at http://HOST:PORT/ shows the same, refreshed every 2 s
    (`ready http://HOST:PORT` is printed once it listens; JSON at /api/swarm).
    """
    require_peers(initial_peers)
    config = ClientConfig(initial_peers=tuple(initial_peers), swarm_key=swarm_key)
    if serve:
        from beectl.swarm_page import serve_page

        run_cli(serve_page(config, host, port, model))
        return
    run_cli(_swarm(config, model, as_json))


async def _swarm(config: ClientConfig, model_name: str | None, as_json: bool) -> None:
    from beectl.swarm import Swarm
    from beectl.swarm_view import swarm_snapshot

    swarm_client = Swarm(config)
    try:
        await swarm_client.start()
        result = await swarm_snapshot(swarm_client, model_name)
    finally:
        await swarm_client.aclose()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not result:
        click.echo(
            "no models are served in this swarm"
            + (f" under the name {model_name!r}" if model_name else "")
        )
        return
    for m in result:
        gaps = m["uncovered_blocks"]
        status = "all blocks covered" if not gaps else f"UNCOVERED blocks: {_ranges(gaps)}"
        click.echo(
            f"{m['model']}  fingerprint {m['fingerprint']}  {m['num_blocks']} blocks  {status}"
        )
        click.echo(
            f"  {'blocks':>9}  {'state':<8} {'address':<22} {'dtype':<9} {'tok/s/blk':>9} {'free KV':>9}  peer"
        )
        for s in m["servers"]:
            start, end = s["blocks"]
            address = f"{s['host']}:{s['port']}"
            click.echo(
                f"  {start:>4}:{end:<4}  {s['state']:<8} {address:<22} "
                f"{_dtype(s):<9} {s['compute_tokens_per_s']:>9.0f} {s['free_kv_tokens']:>9}  {s['peer_id']}"
            )


def _ranges(blocks: list[int]) -> str:
    out: list[str] = []
    start = prev = blocks[0]
    for b in [*blocks[1:], None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        out.append(f"{start}:{prev + 1}")
        if b is not None:
            start = prev = b
    return ", ".join(out)


def _dtype(server: dict[str, Any]) -> str:
    """The dtype column: the compute dtype, or the weights' quantization when there is one."""
    quant = server.get("quant", "none")
    return str(server["dtype"]) if quant == "none" else str(quant)
