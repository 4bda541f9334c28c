"""ReplyReader: validates the replies of find_node and find_value, verifying each entry once."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from beed.dht.config import DHTConfig
from beed.dht.envelope import SignedEntry, check_entry
from beed.dht.errors import RecordError
from beed.dht.identity import NODE_ID_BYTES
from beed.dht.records import ServerRecord

log = logging.getLogger(__name__)

VERIFIED_CACHE_ENTRIES = 4096  # verified entries remembered (least recently used dropped first)

VerifiedEntry = tuple[SignedEntry, ServerRecord]
Contact = tuple[bytes, str, int]


class ReplyReader:
    """Turns a peer's reply into checked values; never raises on peer input (None: unusable)."""

    def __init__(self, config: DHTConfig, own_id: bytes) -> None:
        self.config = config
        self.own_id = own_id
        # Every holder of a key sends the same entries: their signatures are checked once.
        self._verified: collections.OrderedDict[tuple[bytes, SignedEntry], ServerRecord] = (
            collections.OrderedDict()
        )

    def node_list(self, reply: Any) -> list[Contact] | None:
        """The well-formed contacts of a find_node reply (at most 2k), or None if not a list."""
        if not isinstance(reply, list):
            return None
        nodes = []
        for item in reply[: self.config.ksize * 2]:
            if (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], bytes)
                and len(item[0]) == NODE_ID_BYTES
                and isinstance(item[1], str)
                and isinstance(item[2], int)
                and 0 < item[2] < 65536
                and item[0] != self.own_id
            ):
                nodes.append((item[0], item[1], item[2]))
        return nodes

    def value_reply(self, key: bytes, reply: Any) -> Any:
        """A contact list, or {"value": [(entry, record)...], "next", "sum"}, or None."""
        if isinstance(reply, list):
            return self.node_list(reply)
        if not isinstance(reply, dict) or not isinstance(reply.get("value"), list):
            return None
        cursor = reply.get("next")
        verified: list[VerifiedEntry] = []
        now = time.time()
        for item in reply["value"]:
            try:
                entry = SignedEntry.from_wire(item)
                verified.append((entry, self.checked(key, entry, now)))
            except RecordError as exc:
                log.debug("dht.entry_rejected reason=%s", exc)
        count, digest = reply.get("n"), reply.get("sum")
        summary = None
        if isinstance(count, int) and isinstance(digest, bytes) and len(digest) == 8:
            summary = (count, digest)
        return {
            "value": verified,
            "next": cursor if isinstance(cursor, str) else None,
            "sum": summary,
        }

    def checked(self, key: bytes, entry: SignedEntry, now: float) -> ServerRecord:
        """check_entry, remembering the entries already verified; raises RecordError."""
        record = self._verified.get((key, entry))
        if record is None:
            record = check_entry(key, entry, now, self.config)
            self._verified[(key, entry)] = record
            while len(self._verified) > VERIFIED_CACHE_ENTRIES:
                self._verified.popitem(last=False)
        else:
            self._verified.move_to_end((key, entry))
            if entry.expires_at <= now:
                raise RecordError("entry expired")
        return record
