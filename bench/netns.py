"""A home router for tests and benchmarks: a network namespace that can dial out but not be dialled.

`make_router(net)` (root, iproute2) makes namespace `beednat<net>` joined to this machine by a
veth pair (10.77.<net>.1 outside, .2 inside) and adds a policy rule inside that drops every
packet sent from TCP port `port`: a connection to the server listening there never gets its
SYN-ACK, as behind NAT, while the namespace's own outbound connections work. `remove_router`
undoes it. tc/netem and iptables are not needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


class RouterError(Exception):
    """The namespace cannot be made here (not root, no iproute2, no namespaces)."""


@dataclass(frozen=True)
class Router:
    ns: str
    outside: str  # this machine's address on the veth pair
    inside: str  # the address behind the "router"
    port: int  # the TCP port inside whose inbound connections are dropped
    link: str  # the outside end of the veth pair

    @property
    def prefix(self) -> list[str]:
        """Run a command inside: `[*router.prefix, python, ...]`."""
        return ["ip", "netns", "exec", self.ns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def make_router(net: int) -> Router:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        raise RouterError("needs Linux, root and iproute2 to make a network namespace")
    outer, inner = f"bn{net}o", f"bn{net}i"
    r = Router(f"beednat{net}", f"10.77.{net}.1", f"10.77.{net}.2", 41000 + net, outer)
    remove_router(r)
    try:
        _ip("netns", "add", r.ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", r.ns)
        _ip("addr", "add", f"{r.outside}/24", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", r.ns, "addr", "add", f"{r.inside}/24", "dev", inner)
        _ip("-n", r.ns, "link", "set", inner, "up")
        _ip("-n", r.ns, "link", "set", "lo", "up")
        _ip("-n", r.ns, "rule", "add", "ipproto", "tcp", "sport", str(r.port), "prohibit")
    except (subprocess.CalledProcessError, OSError) as exc:
        remove_router(r)
        raise RouterError(f"cannot make a network namespace here: {exc}") from exc
    return r


def remove_router(r: Router) -> None:
    subprocess.run(["ip", "netns", "del", r.ns], capture_output=True)
    subprocess.run(["ip", "link", "del", r.link], capture_output=True)
