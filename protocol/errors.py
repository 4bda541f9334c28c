"""The one error tree of beed, beectl and protocol, with the stable codes that travel in Error frames.

```
BeeError                          base of everything we raise on purpose
├── ProtocolError                 bytes on the wire break the spec (codes 1xx); the connection is closed
│   └── ...                       (frame, header, tensor, codec and limit errors: see below)
├── RequestError                  a well-formed request that cannot be served (codes 2xx)
│   ├── UnknownSessionError       201 the stream/session does not exist (closed, timed out)
│   ├── BadRequestError           202 arguments out of range (positions, span, shapes)
│   ├── ModelMismatchError        203 the peer serves other weights (fingerprint differs)
│   ├── SpanNotServedError        204 the requested blocks are not served here
│   ├── ServerBusyError           205 no capacity now (KV cache budget, queue full) - retryable
│   ├── DrainingError             206 the server is shutting down - retryable elsewhere
│   └── InternalServerError       299 a bug on the peer - retryable elsewhere
└── ClientError                   raised by beectl for user-facing failures (codes 3xx, never on the wire)
    ├── ModelNotFoundError        301 unknown model name or path
    ├── NoRouteError              302 no chain of servers covers the blocks
    ├── PeerUnreachableError      303 bootstrap / server could not be reached
    └── TimeoutError_             304 a phase (connect, step, ...) ran past its timeout
```

Every error carries a numeric `code`, a human `message` and `retryable`. `RemoteError` wraps an
Error frame received from a peer, keeping the peer's code, message and retryable flag.
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


class RemoteError(BeeError):
    """An Error frame received from a peer: its code, message and retryable flag as sent."""

    def __init__(self, code: int, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.remote_code = code
        self.remote_retryable = retryable

    @property
    def is_retryable(self) -> bool:
        return self.remote_retryable
