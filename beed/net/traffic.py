"""Tensor bytes that crossed a process's connections, by direction and codec.

Each segment counts twice: its raw size (what the tensor holds) and its wire size (what its
codec made of it), so raw / wire is the compression ratio the links got. One tally is shared by
all the streams of a server (accepted connections and its pushes to next hops).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from protocol.codecs import Codec

DIRECTIONS = ("sent", "received")


class TensorTraffic:
    """Counters of tensor bytes, {direction: {codec name: [raw bytes, wire bytes]}}."""

    def __init__(self) -> None:
        self._bytes: dict[str, collections.defaultdict[str, list[int]]] = {
            d: collections.defaultdict(lambda: [0, 0]) for d in DIRECTIONS
        }

    def add(self, direction: str, segments: Iterable[tuple[int, int, int]]) -> None:
        """Count (codec id, raw length, wire length) of each segment of one frame."""
        table = self._bytes[direction]
        for codec, raw, wire in segments:
            entry = table[Codec(codec).wire_name]
            entry[0] += raw
            entry[1] += wire

    def as_dict(self) -> dict[str, dict[str, list[int]]]:
        return {d: {c: list(v) for c, v in sorted(t.items())} for d, t in self._bytes.items()}
