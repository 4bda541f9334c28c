"""--initial-peers parsing and formatting."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from beed.dht import InitialPeersError, format_initial_peers, parse_initial_peers
from beed.dht.peers import initial_peers_callback, reachable_host


def test_repeated_and_comma_separated() -> None:
    values = ["10.0.0.1:31340,host.example:1", " [::1]:31341 ", "10.0.0.1:31340,"]
    assert parse_initial_peers(values) == [
        ("10.0.0.1", 31340),
        ("host.example", 1),
        ("::1", 31341),
    ]


@pytest.mark.parametrize(
    "bad", ["10.0.0.1", "10.0.0.1:", ":31340", "h:0", "h:70000", "h:x", "::1:5", "[::1]5", "[zz]:1"]
)
def test_bad_items_name_the_item(bad: str) -> None:
    with pytest.raises(InitialPeersError, match=r"expected|port|IPv6"):
        parse_initial_peers([bad])


def test_format_round_trips() -> None:
    peers = [("127.0.0.1", 5), ("::1", 6)]
    text = format_initial_peers(peers)
    assert text == "127.0.0.1:5,[::1]:6"
    assert parse_initial_peers([text]) == peers


def test_click_callback_gives_a_usage_error() -> None:
    @click.command()
    @click.option("--initial-peers", multiple=True, callback=initial_peers_callback)
    def cmd(initial_peers: list[tuple[str, int]]) -> None:
        click.echo(repr(initial_peers))

    ok = CliRunner().invoke(cmd, ["--initial-peers", "1.2.3.4:5", "--initial-peers", "[::1]:6"])
    assert ok.exit_code == 0 and "('::1', 6)" in ok.output
    bad = CliRunner().invoke(cmd, ["--initial-peers", "nope"])
    assert bad.exit_code == 2 and "Invalid value for '--initial-peers'" in bad.output


def test_reachable_host() -> None:
    assert reachable_host("127.0.0.1") == "127.0.0.1"
    assert reachable_host("example.org") == "example.org"
    assert reachable_host("0.0.0.0") != "0.0.0.0"
