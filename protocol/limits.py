"""Hard limits a decoder enforces before allocating, and the per-connection stream table."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import StreamStateError, TooManyStreamsError

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one connection's decoder; every check happens before the matching allocation."""

    # Whole frame: prefix + header + payload, in bytes (announced in our Hello).
    max_frame_bytes: int = 256 * MiB
    # msgpack header, in bytes.
    max_header_bytes: int = 64 * 1024
    # Elements of one tensor segment.
    max_tensor_elements: int = 64 * MiB
    # Sum of the raw (decompressed) lengths of all tensor segments of one frame, in bytes.
    max_decompressed_bytes: int = 512 * MiB
    # Tensor segments in one frame.
    max_tensors_per_frame: int = 16
    # Dimensions of one tensor.
    max_tensor_ndim: int = 8
    # raw_len / enc_len of one compressed segment over 64 KiB; 0 = unchecked. Lossless codecs
    # shrink activations by at most ~2x: a frame claiming far more is a decompression bomb.
    max_compression_ratio: int = 0
    # Streams open at once on one connection (enforced by StreamTable in the connection layer).
    max_streams_per_connection: int = 256
    # Lossy codecs (q8) are refused unless the receiver consented (0: refused; the default keeps
    # every activation bit-exact).
    accept_lossy: int = 0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 0:
                raise ValueError(f"Limits.{name} must be >= 0")


class StreamTable:
    """Open stream ids of one connection; refuses a new stream beyond the limit or a reused id."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self._open: set[int] = set()

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._open

    def open(self, stream_id: int) -> None:
        """Register a new stream; raises StreamStateError if open, TooManyStreamsError if full."""
        if stream_id == 0:
            raise StreamStateError("stream 0 is the connection itself and cannot be opened")
        if stream_id in self._open:
            raise StreamStateError(f"stream {stream_id} is already open on this connection")
        if len(self._open) >= self.max_streams:
            raise TooManyStreamsError(
                f"stream {stream_id} refused: {len(self._open)} streams already open "
                f"(max_streams_per_connection={self.max_streams})"
            )
        self._open.add(stream_id)

    def close(self, stream_id: int) -> bool:
        """Forget a stream; returns whether it was open."""
        try:
            self._open.remove(stream_id)
        except KeyError:
            return False
        return True

    def ids(self) -> frozenset[int]:
        return frozenset(self._open)
