"""`--relay/--no-relay` and `--relay-bandwidth` of `beed serve` and `beed bootstrap`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from beed.dht.peers import initial_peers_callback
from beed.relay.service import RelayConfig

_D = RelayConfig()


def relays_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`beed serve --relays HOST:PORT,...`: the relays to listen through when unreachable."""
    return click.option(
        "--relays",
        "relays",
        multiple=True,
        callback=initial_peers_callback,
        help="Relays (HOST:PORT of a relaying server or bootstrap node) this server listens "
        "through when it finds itself unreachable, in this order [default: relaying servers "
        "found in the DHT, then the initial peers].",
    )(fn)


def relay_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--relay-bandwidth",
        type=click.FloatRange(0),
        default=_D.bandwidth_bytes_per_s / 1e6,
        show_default=True,
        help="Cap on the bytes per second (in MB/s, both ways, all of them together) this node "
        "relays for servers behind NAT; 0: no cap.",
    )(fn)
    return click.option(
        "--relay/--no-relay",
        default=True,
        show_default=True,
        help="Relay connections to servers behind NAT or a firewall (they listen here; clients "
        "reach them through this node's TCP port; the relay only copies encrypted bytes). Only "
        "while this node is reachable itself.",
    )(fn)


def relay_config_from(kwargs: dict[str, Any]) -> tuple[bool, RelayConfig]:
    """Pop the relay options out of a command's keyword arguments: (relay on, its config)."""
    relay = kwargs.pop("relay")  # the caller pops --relays (serve only) itself
    bandwidth = kwargs.pop("relay_bandwidth")
    return relay, RelayConfig(bandwidth_bytes_per_s=bandwidth * 1e6)
