"""Frame encoding and the incremental, sans-I/O frame decoder (docs/protocol.md, "Frames")."""

from __future__ import annotations

import struct
import threading
from dataclasses import MISSING, dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from protocol.codecs import CodecPolicy
from protocol.errors import (
    BadMagicError,
    BadTensorError,
    FrameTooLargeError,
    HeaderTooLargeError,
    MalformedHeaderError,
    ProtocolError,
    TensorTooLargeError,
    TooManyTensorsError,
    TruncatedFrameError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from protocol.limits import Limits
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Kind, Message, message_spec
from protocol.tensors import SegmentInfo, decode_tensor, encode_tensor, parse_descriptor

if TYPE_CHECKING:
    import torch

MAGIC = b"BEED"
# magic, protocol version, flags (reserved, 0), header length, payload length; little-endian.
PREFIX = struct.Struct("<4sHHII")
PREFIX_SIZE = PREFIX.size
MAX_STREAM_ID = (1 << 32) - 1
_U32 = (1 << 32) - 1
_TENSOR_KINDS = (Kind.TENSOR, Kind.OPT_TENSOR, Kind.TENSORS)
_local = threading.local()
_ABSENT = object()


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """A decoded frame: its msgpack header (a dict) and its tensors in segment order."""

    type: int
    stream_id: int
    header: dict[str, Any]
    tensors: list[torch.Tensor]


@dataclass(frozen=True, slots=True, eq=False)
class EncodedFrame:
    """A complete frame whose header is parsed and checked but whose tensors are not decoded.

    Decoding (decompression) is the expensive part of a frame: a receiver can account for
    `raw_bytes` against a memory budget and run `decode_frame` where it likes (a worker thread).
    """

    type: int
    stream_id: int
    header: dict[str, Any]
    segments: list[tuple[SegmentInfo, memoryview]]

    @property
    def raw_bytes(self) -> int:
        """Bytes the tensors take once decoded (Σ raw_len, checked against the limits)."""
        return sum(info.raw_len for info, _ in self.segments)

    @property
    def compressed(self) -> bool:
        """Whether any segment is compressed (decoding it costs more than a copy)."""
        return any(info.codec != 0 for info, _ in self.segments)


def decode_frame(encoded: EncodedFrame) -> Frame:
    """Decode the tensors of a complete frame (any thread; raises ProtocolError subclasses)."""
    tensors = [decode_tensor(info, payload) for info, payload in encoded.segments]
    return Frame(encoded.type, encoded.stream_id, encoded.header, tensors)


# --- encoding -------------------------------------------------------------------------------------


def _packer() -> msgpack.Packer:
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode_frame(
    header: dict[str, Any], segments: list[tuple[list[Any], bytes | memoryview]]
) -> list[bytes | memoryview]:
    """Prefix+header as one buffer, then each segment payload as its own buffer (not copied)."""
    payload_len = 0
    if segments:
        descs = header["tensors"] = []
        for desc, _ in segments:
            descs.append(desc)
            payload_len += desc[4]
    packed: bytes = _packer().pack(header)
    if len(packed) > _U32 or payload_len > _U32:
        raise FrameTooLargeError(f"frame too large to encode ({len(packed)} + {payload_len} bytes)")
    out: list[bytes | memoryview] = [
        PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(packed), payload_len) + packed
    ]
    for _, payload in segments:
        if len(payload):
            out.append(payload)
    return out


def encode_message(
    msg: Message,
    codec_policy: CodecPolicy | None = None,
    descriptors: list[list[Any]] | None = None,
) -> list[bytes | memoryview]:
    """Buffers of one frame carrying msg, for transport.writelines (tensor bytes are not copied).

    The returned memoryviews alias the message's tensors: do not modify them until written.
    `descriptors`, when given, receives the tensor descriptors of the frame (traffic counts).
    """
    header: dict[str, Any] = {"type": msg.TYPE}
    segments: list[tuple[list[Any], bytes | memoryview]] = []
    for spec in message_spec(type(msg)):
        value = getattr(msg, spec.name)
        kind = spec.kind
        if kind not in _TENSOR_KINDS:
            if spec.omit is MISSING or value != spec.omit:
                header[spec.name] = value
        elif kind is Kind.TENSORS:
            header[spec.name] = list(range(len(segments), len(segments) + len(value)))
            segments.extend(encode_tensor(t, codec_policy) for t in value)
        elif value is not None:
            header[spec.name] = len(segments)
            segments.append(encode_tensor(value, codec_policy))
    if descriptors is not None:
        descriptors.extend(desc for desc, _ in segments)
    return encode_frame(header, segments)


def encode_message_bytes(msg: Message, codec_policy: CodecPolicy | None = None) -> bytes:
    """One frame carrying msg, as a single bytes object."""
    return b"".join(encode_message(msg, codec_policy))


# --- decoding -------------------------------------------------------------------------------------


def _check_uint(header: dict[str, Any], key: str, maximum: int) -> int:
    value = header.get(key)
    if type(value) is not int or not 0 <= value <= maximum:
        raise MalformedHeaderError(f"header field {key!r} must be an integer in [0, {maximum}]")
    return value


class FrameDecoder:
    """Bytes in, frames out: feed() what the socket gave, then call next_frame() until None.

    Limits are checked as soon as the bytes that announce a size arrive, before allocating.
    After a ProtocolError the decoder is broken: every later call raises the same error.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self._buf = bytearray()
        self._pos = 0  # start of the current frame in _buf
        self._prefix: tuple[int, int] | None = None  # header_len, payload_len of current frame
        self._header: dict[str, Any] | None = None
        self._segments: list[SegmentInfo] = []
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (any split, even one byte at a time)."""
        if self._error is not None:
            raise self._error
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        if self._prefix is None:
            self._check_magic()

    def feed_eof(self) -> None:
        """The peer closed the connection; raises TruncatedFrameError inside a frame."""
        if self._error is not None:
            raise self._error
        if self.buffered_bytes:
            self._fail(
                TruncatedFrameError(
                    f"connection closed inside a frame ({self.buffered_bytes} bytes buffered)"
                )
            )

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more data is needed."""
        encoded = self.next_encoded()
        if encoded is None:
            return None
        try:
            return decode_frame(encoded)
        except ProtocolError as exc:
            self._fail(exc)
        return None  # pragma: no cover - _fail raises

    def next_encoded(self) -> EncodedFrame | None:
        """The next complete frame with its tensors still encoded, or None if more data is
        needed. A ProtocolError from decode_frame(result) must be treated as fatal too."""
        if self._error is not None:
            raise self._error
        try:
            if self._prefix is None:
                self._check_magic()
            return self._next_frame()
        except ProtocolError as exc:
            self._fail(exc)
        except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # pragma: no cover
            self._fail(MalformedHeaderError(f"undecodable frame: {type(exc).__name__}: {exc}"))
        return None  # pragma: no cover - _fail raises

    def next_message(self) -> Message | None:
        """The next complete frame as a typed message, or None if more data is needed."""
        frame = self.next_frame()
        return None if frame is None else message_from_frame(frame)

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        raise exc

    def _check_magic(self) -> None:
        have = bytes(self._buf[self._pos : self._pos + 4])
        if have != MAGIC[: len(have)]:
            self._fail(BadMagicError(f"frame starts with {have!r}, expected magic {MAGIC!r}"))

    def _next_frame(self) -> EncodedFrame | None:
        limits = self.limits
        start = self._pos
        avail = len(self._buf) - start
        if self._prefix is None:
            if avail < PREFIX_SIZE:
                return None
            magic, version, flags, header_len, payload_len = PREFIX.unpack_from(self._buf, start)
            if magic != MAGIC:
                raise BadMagicError(f"frame starts with {magic!r}, expected magic {MAGIC!r}")
            if version != PROTOCOL_VERSION:
                raise UnsupportedVersionError(
                    f"frame has protocol version {version}, this side speaks {PROTOCOL_VERSION}"
                )
            if flags != 0:
                raise MalformedHeaderError(f"frame has reserved flag bits set ({flags:#06x})")
            if header_len > limits.max_header_bytes:
                raise HeaderTooLargeError(
                    f"header of {header_len} bytes exceeds max_header_bytes="
                    f"{limits.max_header_bytes}"
                )
            total = PREFIX_SIZE + header_len + payload_len
            if total > limits.max_frame_bytes:
                raise FrameTooLargeError(
                    f"frame of {total} bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
                )
            self._prefix = (header_len, payload_len)
        header_len, payload_len = self._prefix
        if self._header is None:
            if avail < PREFIX_SIZE + header_len:
                return None
            hstart = start + PREFIX_SIZE
            with memoryview(self._buf) as view:
                self._header = self._parse_header(view[hstart : hstart + header_len], payload_len)
        if avail < PREFIX_SIZE + header_len + payload_len:
            return None
        header = self._header
        end = start + PREFIX_SIZE + header_len + payload_len
        if end == len(self._buf):
            # The frame ends the buffer: hand the buffer over instead of copying the payloads.
            buf: bytes | bytearray = self._buf
            offset = start
            self._buf = bytearray()
            self._pos = 0
        else:
            buf = bytes(memoryview(self._buf)[start:end])
            offset = 0
            self._pos = end
        segments: list[tuple[SegmentInfo, memoryview]] = []
        pos = offset + PREFIX_SIZE + header_len
        view = memoryview(buf)
        for info in self._segments:
            segments.append((info, view[pos : pos + info.enc_len]))
            pos += info.enc_len
        self._prefix = None
        self._header = None
        self._segments = []
        # Bytes after this frame are checked on the next call: a complete frame followed by
        # garbage in the same read is still returned (the garbage then fails the connection).
        return EncodedFrame(header["type"], header["stream_id"], header, segments)

    def _parse_header(self, raw: memoryview, payload_len: int) -> dict[str, Any]:
        limits = self.limits
        try:
            header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack raises many types; all mean a malformed header
            raise MalformedHeaderError(f"header is not valid msgpack: {exc}") from None
        if not isinstance(header, dict):
            raise MalformedHeaderError(f"header must be a msgpack map, got {type(header).__name__}")
        _check_uint(header, "type", _U32)
        _check_uint(header, "stream_id", MAX_STREAM_ID)
        descs = header.get("tensors", [])
        if not isinstance(descs, list):
            raise MalformedHeaderError("header field 'tensors' must be an array")
        if len(descs) > limits.max_tensors_per_frame:
            raise TooManyTensorsError(
                f"frame has {len(descs)} tensor segments, max_tensors_per_frame="
                f"{limits.max_tensors_per_frame}"
            )
        segments = [parse_descriptor(d, limits) for d in descs]
        raw_total = enc_total = 0
        for seg in segments:
            raw_total += seg.raw_len
            enc_total += seg.enc_len
        if raw_total > limits.max_decompressed_bytes:
            raise TensorTooLargeError(
                f"frame tensors decompress to {raw_total} bytes, max_decompressed_bytes="
                f"{limits.max_decompressed_bytes}"
            )
        if enc_total != payload_len:
            raise BadTensorError(
                f"tensor encoded lengths add up to {enc_total}, prefix says payload is "
                f"{payload_len} bytes"
            )
        self._segments = segments
        return header


# --- frames to messages ---------------------------------------------------------------------------


def message_from_frame(frame: Frame) -> Message:
    """The typed message of a frame; unknown header keys are ignored, missing optional ones default."""
    cls = MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise UnknownMessageTypeError(f"unknown message type {frame.type}")
    header = frame.header
    kwargs: dict[str, Any] = {}
    for name, kind, required, _omit in message_spec(cls):
        value = header.get(name, _ABSENT)
        if value is _ABSENT:
            if required:
                raise MalformedHeaderError(f"{cls.__name__} header lacks field {name!r}")
        elif kind is Kind.INT and type(value) is int:
            kwargs[name] = value
        else:
            kwargs[name] = _field_value(cls.__name__, name, kind, value, frame.tensors)
    return cls(**kwargs)


def _field_value(
    cls_name: str, name: str, kind: Kind, value: Any, tensors: list[torch.Tensor]
) -> Any:
    ok = False
    if kind is Kind.STR:
        ok = type(value) is str
    elif kind is Kind.TENSOR or (kind is Kind.OPT_TENSOR and value is not None):
        if type(value) is int and 0 <= value < len(tensors):
            return tensors[value]
    elif kind is Kind.OPT_TENSOR:
        return None
    elif kind is Kind.FLOAT:
        ok = type(value) in (float, int)
        value = float(value) if ok else value
    elif kind is Kind.BOOL:
        ok = type(value) is bool
    elif kind is Kind.STRS:
        ok = type(value) is list and all(type(v) is str for v in value)
        value = tuple(value) if ok else value
    elif kind is Kind.DICT:
        ok = type(value) is dict
    elif kind is Kind.DICTS:
        ok = type(value) is list and all(type(v) is dict for v in value)
        value = tuple(value) if ok else value
    elif kind is Kind.TENSORS:
        ok = type(value) is list and all(type(i) is int and 0 <= i < len(tensors) for i in value)
        value = tuple(tensors[i] for i in value) if ok else value
    if not ok:
        raise MalformedHeaderError(
            f"{cls_name}.{name} must be {kind.value}, got {type(value).__name__}: {value!r:.60}"
        )
    return value
