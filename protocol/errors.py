"""The one error tree of beed, beectl and protocol, with the stable codes that travel in Error frames.

```
BeeError                          base of everything we raise on purpose
├── ProtocolError                 100 bytes on the wire break the spec; the connection is closed
│   ├── BadMagicError             101 the frame does not start with the magic bytes b"BEED"
│   ├── UnsupportedVersionError   102 frame or Hello protocol version not spoken here
│   ├── TruncatedFrameError       103 the connection ended inside a frame
│   ├── MalformedHeaderError      104 header is not a msgpack map, or a field is missing/ill-typed
│   │   └── UnknownMessageTypeError 105 the header's message type is not known
│   ├── BadTensorError            106 tensor descriptor inconsistent (dtype, shape, lengths, bool bytes)
│   ├── CodecError                107 a codec could not be applied
│   │   ├── UnknownCodecError     108 codec id unknown, or not negotiated
│   │   └── DecompressionError    109 corrupt payload, or output size differs from raw length (bombs)
│   ├── LimitExceededError        110 a hard limit was exceeded (checked before allocating)
│   │   ├── FrameTooLargeError    111 prefix announces more than max_frame_bytes
│   │   ├── HeaderTooLargeError   112 header longer than max_header_bytes
│   │   ├── TensorTooLargeError   113 too many elements, or too many decompressed bytes
│   │   ├── TooManyTensorsError   114 more tensor segments than max_tensors_per_frame
│   │   └── TooManyStreamsError   115 more open streams than max_streams_per_connection - retryable
│   └── StreamStateError          116 stream id misuse (reused while open, Hello not first, ...)
├── RequestError                  200 a well-formed request that cannot be served (codes 2xx)
│   ├── UnknownSessionError       201 the stream/session does not exist (closed, timed out)
│   ├── BadRequestError           202 arguments out of range (positions, span, shapes)
│   ├── ModelMismatchError        203 the peer serves other weights (fingerprint differs)
│   ├── SpanNotServedError        204 the requested blocks are not served here
│   ├── ServerBusyError           205 no capacity now (KV cache budget, queue full) - retryable
│   ├── DrainingError             206 the server is shutting down - retryable elsewhere
│   ├── PushRefusedError          207 a Push names no session that accepts it (token, sender, step)
│   ├── QuotaExceededError        208 the peer holds its share (connections, sessions, KV) - retryable
│   ├── RequestTooLargeError      209 more tokens or bytes in one request than this server takes
│   ├── UnauthorizedError         210 the peer did not prove the private swarm's key in its Hello
│   ├── RelayRefusedError         211 a relay does not splice to that peer (not listening there, full) - retryable
│   └── InternalServerError       299 a bug on the peer - retryable elsewhere
└── ClientError                   300 raised by beectl for user-facing failures (3xx, never on the wire)
    ├── ModelNotFoundError        301 unknown model name or path
    ├── NoRouteError              302 no chain of servers covers the blocks
    ├── PeerUnreachableError      303 bootstrap / server could not be reached
    ├── PhaseTimeoutError         304 a phase (connect, step, ...) ran past its timeout
    ├── ConnectionClosed          305 the peer closed the connection, or it broke - retryable
    ├── (306: a local test swarm's daemon failed to start; beectl.local_swarm)
    ├── InvalidReplyError         307 a server's answer failed the client's checks - retryable
    └── AddressRefusedError       308 an address a stranger named is not one this side dials
```

Every error carries a numeric `code`, a human `message` and `retryable`. `RemoteError` wraps an
Error frame received from a peer, keeping the peer's code, message and retryable flag.
`error_class_for_code(code)` maps a wire code (1xx, 2xx) back to its class; codes are stable
(docs/protocol.md lists them) and never reused.
"""

from __future__ import annotations

from typing import ClassVar


class BeeError(Exception):
    """Base of every error we raise on purpose."""

    code: ClassVar[int] = 0
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- protocol errors (1xx): the bytes on the wire break docs/protocol.md --------------------------


class ProtocolError(BeeError):
    """The peer's bytes break the wire spec; the connection that carried them is closed."""

    code = 100


class BadMagicError(ProtocolError):
    code = 101


class UnsupportedVersionError(ProtocolError):
    code = 102


class TruncatedFrameError(ProtocolError):
    code = 103


class MalformedHeaderError(ProtocolError):
    code = 104


class UnknownMessageTypeError(MalformedHeaderError):
    code = 105


class BadTensorError(ProtocolError):
    code = 106


class CodecError(ProtocolError):
    code = 107


class UnknownCodecError(CodecError):
    code = 108


class DecompressionError(CodecError):
    code = 109


class LimitExceededError(ProtocolError):
    code = 110


class FrameTooLargeError(LimitExceededError):
    code = 111


class HeaderTooLargeError(LimitExceededError):
    code = 112


class TensorTooLargeError(LimitExceededError):
    code = 113


class TooManyTensorsError(LimitExceededError):
    code = 114


class TooManyStreamsError(LimitExceededError):
    code = 115
    retryable = True


class StreamStateError(ProtocolError):
    code = 116


# --- request errors (2xx): well-formed requests a server refuses ---------------------------------


class RequestError(BeeError):
    """A well-formed request that cannot be served."""

    code = 200


class UnknownSessionError(RequestError):
    code = 201


class BadRequestError(RequestError):
    code = 202


class ModelMismatchError(RequestError):
    code = 203


class SpanNotServedError(RequestError):
    code = 204


class ServerBusyError(RequestError):
    code = 205
    retryable = True


class DrainingError(RequestError):
    code = 206
    retryable = True


class PushRefusedError(RequestError):
    code = 207


class QuotaExceededError(RequestError):
    """One peer (an IPv4 address or IPv6 /64) already holds its share of this server."""

    code = 208
    retryable = True


class RequestTooLargeError(RequestError):
    """One request asks for more tokens or bytes than this server takes in one request."""

    code = 209


class UnauthorizedError(RequestError):
    """The connection did not prove the private swarm's key (docs/security.md); closed."""

    code = 210


class RelayRefusedError(RequestError):
    """A relay refused a connect or a listen: the target does not listen there, or the relay is
    at its cap, or the preamble did not prove what it must; another relay may serve it."""

    code = 211
    retryable = True


class InternalServerError(RequestError):
    code = 299
    retryable = True


# --- client errors (3xx): user-facing failures in beectl, never sent on the wire ----------------


class ClientError(BeeError):
    code = 300


class ModelNotFoundError(ClientError):
    code = 301


class NoRouteError(ClientError):
    code = 302
    retryable = True


class PeerUnreachableError(ClientError):
    code = 303
    retryable = True


class PhaseTimeoutError(ClientError):
    code = 304
    retryable = True


class ConnectionClosed(ClientError):
    """The peer closed the connection (or it broke) while we were reading or writing."""

    code = 305
    retryable = True


class InvalidReplyError(ClientError):
    """A server answered with something the request cannot have produced (wrong shape or
    dtype, non-finite values): the client treats it as a failed server."""

    code = 307
    retryable = True


class AddressRefusedError(ClientError):
    """A record or route names an address this side does not dial (private, loopback, ...)."""

    code = 308


class RemoteError(BeeError):
    """An Error frame received from a peer: its code, message and retryable flag as sent."""

    def __init__(self, code: int, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.remote_code = code
        self.remote_retryable = retryable

    @property
    def is_retryable(self) -> bool:
        return self.remote_retryable


def _wire_classes() -> dict[int, type[BeeError]]:
    table: dict[int, type[BeeError]] = {}
    pending: list[type[BeeError]] = [ProtocolError, RequestError]
    while pending:
        cls = pending.pop()
        if cls.code in table:
            raise RuntimeError(f"duplicate error code {cls.code}")  # pragma: no cover
        table[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return table


_BY_CODE: dict[int, type[BeeError]] = _wire_classes()


def error_class_for_code(code: int) -> type[BeeError] | None:
    """The class of a wire error code (1xx, 2xx), or None if the code is unknown here."""
    return _BY_CODE.get(code)
