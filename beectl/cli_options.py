"""Options shared by the `beectl` commands, and how a command runs its coroutine."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from beed.dht.peers import initial_peers_callback
from protocol.errors import BeeError

DEFAULT_MODEL = "smollm2-135m"


def generation_options(f: Any) -> Any:
    options = [
        click.option(
            "--model", default=DEFAULT_MODEL, show_default=True, help="Model name or path."
        ),
        click.option("--max-new-tokens", type=click.IntRange(0), default=64, show_default=True),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Sample with this temperature (default: greedy).",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(0),
            default=None,
            help="Sample from the k most likely tokens.",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="Sample from the smallest set with this probability mass.",
        ),
        click.option(
            "--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=None
        ),
        click.option(
            "--seed", type=int, default=None, help="Seed for sampling (implies sampling)."
        ),
        click.option(
            "--speculate",
            default="auto",
            show_default=True,
            metavar="auto|off|N|NxW",
            help="Speculative decoding: draft tokens locally and verify several per trip "
            "through the swarm; auto: the draft length and tree width follow the measured "
            "acceptance and round trip (off where it does not pay); N: always up to N drafts; "
            "NxW: a tree of W candidate branches, N deep, verified in one step.",
        ),
        click.option(
            "--draft-model",
            default=None,
            help="Draft with this local model (same tokenizer) instead of prompt lookup.",
        ),
        click.option(
            "--raw", is_flag=True, help="Send the prompt as is, without the chat template."
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print one JSON object with the text and timings.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def verify_option(f: Any) -> Any:
    return click.option(
        "--verify-rate",
        type=click.FloatRange(0.0, 1.0),
        default=0.02,
        show_default=True,
        help="Share of each server's steps re-run on other servers of the same blocks and "
        "compared (a new server's first 2 steps always are); a server caught answering wrong is "
        "banned and its steps recomputed. 0 checks nothing.",
    )(f)


def quant_option(f: Any) -> Any:
    return click.option(
        "--allow-quant",
        is_flag=True,
        help="Chain servers of different weight quantizations (beed serve --quant) in one "
        "route; by default a route is of one quantization (unquantized first).",
    )(f)


def peers_option(f: Any) -> Any:
    return click.option(
        "--initial-peers",
        multiple=True,
        callback=initial_peers_callback,
        envvar="BEED_INITIAL_PEERS",
        help="DHT address printed by `beed bootstrap`, HOST:PORT (repeated or comma-separated; "
        "env BEED_INITIAL_PEERS).",
    )(f)


def require_peers(initial_peers: list[tuple[str, int]]) -> None:
    if not initial_peers:
        raise click.UsageError(
            "no --initial-peers given: pass the address printed by `beed bootstrap` "
            "(or run `beectl demo` for a swarm on this machine)"
        )


def run_cli(coro: Any) -> None:
    """Run a command's coroutine; user-facing errors become one line, Ctrl-C exits 130."""
    from beectl.runner import new_event_loop

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(coro)
    except BeeError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted; sessions closed", err=True)
        sys.exit(130)
