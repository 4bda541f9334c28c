"""sd_notify(3) without libsystemd: readiness and stopping reported to systemd (Type=notify)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_systemd(message: str) -> None:
    """Send one datagram such as "READY=1" to $NOTIFY_SOCKET; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("systemd.notify_failed error=%s", exc)
