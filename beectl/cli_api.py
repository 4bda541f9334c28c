"""`beectl api`: the OpenAI-compatible HTTP server (beectl/openai_api/)."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from beectl.cli_options import DEFAULT_MODEL, peers_option, quant_option, verify_option
from beectl.config import ClientConfig
from beed.net.swarm_key import SwarmKey, swarm_key_option
from protocol.errors import BeeError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free."
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or path.")
@click.option(
    "--api-key",
    envvar="BEECTL_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` (env BEECTL_API_KEY) [default: no key].",
)
@click.option(
    "--device", default="cpu", show_default=True, help="torch device of the embeddings and head."
)
@click.option(
    "--kv-wait",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds a new session may wait for a full server's cache to free up.",
)
@click.option(
    "--speculate",
    default="auto",
    show_default=True,
    metavar="auto|off|N",
    help="Speculative decoding for requests that do not ask (their `speculate` field).",
)
@click.option(
    "--draft-model", default=None, help="Draft with this local model instead of prompt lookup."
)
@peers_option
@swarm_key_option
@verify_option
@quant_option
def api(
    host: str,
    port: int,
    model: str,
    api_key: str | None,
    device: str,
    kv_wait: float,
    speculate: str,
    draft_model: str | None,
    initial_peers: list[tuple[str, int]],
    swarm_key: SwarmKey | None,
    verify_rate: float,
    allow_quant: bool,
) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) over the swarm.

    Prints `ready http://HOST:PORT model NAME` once listening; SIGINT/SIGTERM stop it.
    """
    if not initial_peers:
        raise click.UsageError(
            "no --initial-peers given: pass the address printed by `beed bootstrap`"
        )
    from beectl.openai_api.server import ApiConfig, serve_api
    from beectl.runner import new_event_loop
    from beectl.speculative.adaptive import SpeculationConfig

    try:
        SpeculationConfig.parse(speculate)
    except BeeError as exc:
        raise click.BadParameter(str(exc), param_hint="--speculate") from None

    config = ClientConfig(
        initial_peers=tuple(initial_peers),
        swarm_key=swarm_key,
        verify_rate=verify_rate,
        allow_quant=allow_quant,
        kv_wait_s=kv_wait,
    )

    async def run() -> None:
        from beectl.model import RemoteModel

        remote = await RemoteModel.load(model, config, device=device)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            if task is not None:
                loop.add_signal_handler(sig, task.cancel)

        def ready(bound_host: str, bound_port: int) -> None:
            click.echo(f"ready http://{bound_host}:{bound_port} model {remote.files.name}")
            sys.stdout.flush()

        try:
            await serve_api(remote, ApiConfig(host, port, api_key, speculate, draft_model), ready)
        finally:
            await remote.aclose()

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(run())
    except BeeError as exc:
        raise click.ClickException(str(exc)) from None
    except (asyncio.CancelledError, KeyboardInterrupt):
        click.echo("api: stopped", err=True)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
