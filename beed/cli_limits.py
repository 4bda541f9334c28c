"""`beed serve` options for what a stranger may take (PeerLimits; docs/security.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from beed.server.config import PeerLimits

_D = PeerLimits()
_OPTIONS: list[tuple[str, str, Any, str]] = [
    # (flag, PeerLimits field, click type, help)
    (
        "--max-connections",
        "max_connections",
        click.IntRange(1),
        "TCP connections at once; when full, the oldest idle connection is closed for a new one.",
    ),
    (
        "--max-connections-per-peer",
        "max_connections_per_peer",
        click.IntRange(1),
        "Connections from one address (IPv4, or IPv6 /64) at once.",
    ),
    (
        "--hello-timeout",
        "hello_timeout_s",
        click.FloatRange(0.1),
        "Seconds a new connection has to complete its Hello, however it trickles.",
    ),
    (
        "--idle-timeout",
        "idle_timeout_s",
        click.FloatRange(0.1),
        "Seconds a connection with no session and no request stays open.",
    ),
    (
        "--max-sessions-per-peer",
        "max_sessions_per_peer",
        click.IntRange(1),
        "Open sessions of one address, over all its connections.",
    ),
    (
        "--max-kv-share-per-peer",
        "max_kv_share_per_peer",
        click.FloatRange(0.0, 1.0, min_open=True),
        "Share of the KV cache budget one address's sessions may reserve.",
    ),
    (
        "--first-step-timeout",
        "first_step_timeout_s",
        click.FloatRange(0.1),
        "Seconds an opened session keeps its cache reservation without stepping.",
    ),
    (
        "--max-request-tokens",
        "max_request_tokens",
        click.IntRange(1),
        "Rows x tokens of one step, push or Forward.",
    ),
    (
        "--max-backward-tokens",
        "max_backward_tokens",
        click.IntRange(1),
        "Rows x tokens of one Backward (it runs in row groups, block by block).",
    ),
    (
        "--max-buffer-mib",
        "max_buffer_bytes",
        click.IntRange(16),
        "MiB of decoded request tensors held at once [default: four connections' worth of the "
        "largest request, at least 256].",
    ),
    (
        "--buffer-wait",
        "buffer_wait_s",
        click.FloatRange(0.0),
        "Seconds a frame waits for buffer memory before it is refused as busy (205).",
    ),
    (
        "--max-unread-kib",
        "max_unread_kib",
        click.IntRange(16),
        "KiB of answers a connection may leave unread before its next compute request waits "
        "for it to read (a peer that then reads nothing for 30 s is closed).",
    ),
]


def peer_limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add every PeerLimits option to a click command."""
    for flag, name, kind, help_text in reversed(_OPTIONS):
        default = getattr(_D, name)
        if name == "max_buffer_bytes":
            fn = click.option(flag, name, type=kind, default=None, help=help_text)(fn)
        else:
            fn = click.option(
                flag, name, type=kind, default=default, show_default=True, help=help_text
            )(fn)
    return fn


def peer_limits_from(kwargs: dict[str, Any]) -> PeerLimits:
    """Pop the PeerLimits options out of a command's keyword arguments."""
    values = {name: kwargs.pop(name) for _, name, _, _ in _OPTIONS}
    if values["max_buffer_bytes"] is not None:
        values["max_buffer_bytes"] *= 1 << 20
    return PeerLimits(**values)
