"""Logging set-up for the daemon: one line per event on stderr, journald-friendly."""

from __future__ import annotations

import logging
import os
import sys

# journald adds its own timestamp; a terminal user wants one. JOURNAL_STREAM is set by systemd.
_JOURNAL_FORMAT = "<%(levelno_syslog)s>%(name)s: %(message)s"
_TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_SYSLOG_LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class _SyslogLevelFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno_syslog = _SYSLOG_LEVELS.get(record.levelno, 2)
        return True


def setup_logging(level: str = "INFO") -> None:
    """Send log records to stderr; with sd-daemon level prefixes when running under systemd."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter(_JOURNAL_FORMAT))
        handler.addFilter(_SyslogLevelFilter())
    else:
        handler.setFormatter(logging.Formatter(_TERMINAL_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kademlia and rpcudp are chatty at INFO/DEBUG.
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
