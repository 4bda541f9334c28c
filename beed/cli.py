"""The `beed` command line: parses argv and environment, builds configs, runs the daemon."""

from __future__ import annotations

import click

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
