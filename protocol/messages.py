"""Typed messages of the beed conversation, their wire type tags and the Hello negotiation."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

from protocol.codecs import ALL_CODECS
from protocol.errors import (
    BeeError,
    RemoteError,
    UnsupportedVersionError,
    error_class_for_code,
)
from protocol.limits import Limits

if TYPE_CHECKING:
    import torch

# Version of the frame layout and message set; equal versions are required (docs/protocol.md).
PROTOCOL_VERSION = 1
# Default Step/StepResult session lifetime without traffic, in seconds.
DEFAULT_SESSION_TIMEOUT_S = 300.0


class Kind(Enum):
    """How a message field travels and is checked on decode."""

    INT = "int"
    FLOAT = "float"
    STR = "str"
    BOOL = "bool"
    STRS = "tuple[str, ...]"
    DICT = "dict"
    DICTS = "tuple of dicts"
    TENSOR = "tensor"
    OPT_TENSOR = "tensor or nil"
    TENSORS = "tuple of tensors"


# Field annotations (strings: torch is never imported here) -> kind.
_KINDS: dict[str, Kind] = {
    "int": Kind.INT,
    "float": Kind.FLOAT,
    "str": Kind.STR,
    "bool": Kind.BOOL,
    "tuple[str, ...]": Kind.STRS,
    "dict[str, Any]": Kind.DICT,
    "tuple[dict[str, Any], ...]": Kind.DICTS,
    "torch.Tensor": Kind.TENSOR,
    "torch.Tensor | None": Kind.OPT_TENSOR,
    "tuple[torch.Tensor, ...]": Kind.TENSORS,
}
TENSOR_KINDS = frozenset({Kind.TENSOR, Kind.OPT_TENSOR, Kind.TENSORS})


class FieldSpec(NamedTuple):
    """One message field: its name, kind, whether the header may omit it, and the default the
    reference encoder leaves out (extension fields: frames without them stay as before)."""

    name: str
    kind: Kind
    required: bool
    omit: Any = MISSING  # a value equal to this is not written (MISSING: always written)


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages: TYPE is the wire tag, stream_id the multiplexed stream."""

    TYPE: ClassVar[int] = -1
    stream_id: int


MESSAGE_TYPES: dict[int, type[Message]] = {}
_SPECS: dict[type[Message], tuple[FieldSpec, ...]] = {}


def message_spec(cls: type[Message]) -> tuple[FieldSpec, ...]:
    """The cached field specs of a message class (computed once per class)."""
    return _SPECS[cls]


_M = TypeVar("_M", bound=type[Message])

# Extension fields: omitted from the header while they hold their default (docs/protocol.md §5).
_EXT: Any = {"omit_default": True}


def _register(cls: _M) -> _M:
    if cls.TYPE in MESSAGE_TYPES:
        raise RuntimeError(f"duplicate message type {cls.TYPE}")  # pragma: no cover
    specs = []
    for f in fields(cls):
        kind = _KINDS.get(str(f.type))
        if kind is None:  # pragma: no cover - a programming error in this module
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {f.type}")
        required = f.default is MISSING and f.default_factory is MISSING
        omit = f.default if f.metadata.get("omit_default") else MISSING
        specs.append(FieldSpec(f.name, kind, required, omit))
    MESSAGE_TYPES[cls.TYPE] = cls
    _SPECS[cls] = tuple(specs)
    return cls


# --- connection ----------------------------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame of each side; the server answers with the codecs both sides accept."""

    TYPE: ClassVar[int] = 1
    stream_id: int = 0
    protocol_version: int = PROTOCOL_VERSION
    software_version: str = ""
    codecs: tuple[str, ...] = ALL_CODECS
    peer_id: str = ""
    max_frame_bytes: int = Limits().max_frame_bytes
    max_streams: int = Limits().max_streams_per_connection
    features: tuple[str, ...] = ()
    # Private swarms: HMAC-SHA256 (hex) of the role under the swarm key, bound to the TLS
    # server's identity key (docs/protocol.md, "Private swarms"); "" in a public swarm.
    swarm_proof: str = field(default="", metadata=_EXT)


def negotiate(local: Hello, remote: Hello) -> tuple[int, tuple[str, ...]]:
    """Protocol version and codecs (local order, "none" always) both sides speak."""
    if local.protocol_version != remote.protocol_version:
        raise UnsupportedVersionError(
            f"peer speaks protocol version {remote.protocol_version}, "
            f"this side speaks {local.protocol_version}"
        )
    common = tuple(c for c in local.codecs if c in remote.codecs and c != "none")
    return local.protocol_version, ("none", *common)


@_register
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Liveness and round-trip probe; answered by Pong with the same nonce."""

    TYPE: ClassVar[int] = 2
    nonce: int = 0


@_register
@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[int] = 3
    nonce: int = 0


@_register
@dataclass(frozen=True, slots=True)
class GetInfo(Message):
    """Ask a server for its Info (span, model, throughput, load, ...)."""

    TYPE: ClassVar[int] = 4


@_register
@dataclass(frozen=True, slots=True)
class Info(Message):
    TYPE: ClassVar[int] = 5
    info: dict[str, Any] = field(default_factory=dict)


@_register
@dataclass(frozen=True, slots=True)
class Error(Message):
    """Answer to a failed request (or to the connection: stream 0); code is from the error tree."""

    TYPE: ClassVar[int] = 6
    code: int
    message: str
    retryable: bool = False

    @classmethod
    def from_exception(cls, stream_id: int, exc: BeeError) -> Error:
        if isinstance(exc, RemoteError):
            return cls(stream_id, exc.remote_code, exc.message, exc.remote_retryable)
        return cls(stream_id, exc.code, exc.message, exc.retryable)

    def to_exception(self) -> BeeError:
        """The matching error class for a known 1xx/2xx code, else RemoteError."""
        err_cls = error_class_for_code(self.code)
        if err_cls is None:
            return RemoteError(self.code, self.message, self.retryable)
        return err_cls(self.message)


@_register
@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Success answer without a payload (Truncate, Close)."""

    TYPE: ClassVar[int] = 7


# --- inference sessions --------------------------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True)
class OpenSession(Message):
    """Open an inference session for blocks [span_start, span_end) on this stream."""

    TYPE: ClassVar[int] = 10
    model_fingerprint: str
    span_start: int
    span_end: int
    max_length: int
    batch_size: int = 1
    timeout_s: float = DEFAULT_SESSION_TIMEOUT_S
    wait_s: float = 0.0  # how long the server may wait for cache memory before answering 205
    push_token: str = field(
        default="", metadata=_EXT
    )  # 32 hex digits: this session accepts Pushes that carry it ("" = none)


@_register
@dataclass(frozen=True, slots=True)
class SessionOpened(Message):
    TYPE: ClassVar[int] = 11
    span_start: int
    span_end: int
    max_length: int


@_register
@dataclass(frozen=True, slots=True, eq=False)
class Step(Message):
    """Run the session's blocks on hidden, whose first token is at `position` in the session.

    `next_hops`: the rest of the route, each {"host", "port", "peer_id", "token"}: the server
    pushes its output to the first of them (which pushes on to the next) and answers this Step
    with a copy; () = answer only (the client relays)."""

    TYPE: ClassVar[int] = 12
    step_id: int
    position: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    next_hops: tuple[dict[str, Any], ...] = field(default=(), metadata=_EXT)
    # A tree step (feature "tree"): each token's parent in the step, -1 for one that follows
    # the cache; a token sees only its ancestors and sits at position + its depth.
    tree: torch.Tensor | None = None


@_register
@dataclass(frozen=True, slots=True, eq=False)
class StepResult(Message):
    """`draining`: the server is shutting down (or retiring these blocks); move the session.
    `push_error`: why the push of this output to the next hop failed ("" = it was accepted, or
    there was none); the client then sends that hop the output itself."""

    TYPE: ClassVar[int] = 13
    step_id: int
    hidden: torch.Tensor
    draining: bool = False
    push_error: str = field(default="", metadata=_EXT)


@_register
@dataclass(frozen=True, slots=True)
class Truncate(Message):
    """Roll the session back so its next step starts at `position`; answered by Ack."""

    TYPE: ClassVar[int] = 14
    position: int


@_register
@dataclass(frozen=True, slots=True, eq=False)
class Push(Message):
    """Server to server: a hop's Step output, as the next hop's input for the session opened with
    `token`; runs like that session's Step. Answered by Ack once accepted (or Error); the
    result goes to the session's owner as a StepResult on the session's own stream."""

    TYPE: ClassVar[int] = 15
    token: str
    step_id: int
    position: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    next_hops: tuple[dict[str, Any], ...] = field(default=(), metadata=_EXT)
    tree: torch.Tensor | None = None  # as in Step


@_register
@dataclass(frozen=True, slots=True)
class Close(Message):
    """End the session (or request) on this stream; answered by Ack."""

    TYPE: ClassVar[int] = 16


# --- stateless forward / backward (training) ------------------------------------------------------


@_register
@dataclass(frozen=True, slots=True, eq=False)
class Forward(Message):
    """Stateless: run `hidden` [batch, tokens, hidden] through blocks [span_start, span_end)
    from position 0, keeping nothing. `prompts` (feature "prompts"): deep prompts
    [span_end - span_start, batch, prefix, hidden], block i's slice added to the first `prefix`
    positions of its input."""

    TYPE: ClassVar[int] = 20
    model_fingerprint: str
    span_start: int
    span_end: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None


@_register
@dataclass(frozen=True, slots=True, eq=False)
class ForwardResult(Message):
    TYPE: ClassVar[int] = 21
    hidden: torch.Tensor


@_register
@dataclass(frozen=True, slots=True, eq=False)
class Backward(Message):
    """Stateless: the gradient of the span's output (as Forward computes it from `hidden`,
    `attention_mask` and `prompts`) with respect to `hidden` and `prompts`, given the gradient
    `grad_output` of its output; weights never change."""

    TYPE: ClassVar[int] = 22
    model_fingerprint: str
    span_start: int
    span_end: int
    hidden: torch.Tensor
    grad_output: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None


@_register
@dataclass(frozen=True, slots=True, eq=False)
class BackwardResult(Message):
    """`grad_prompts`: the gradient of the Backward's `prompts` (absent when it had none)."""

    TYPE: ClassVar[int] = 23
    grad_input: torch.Tensor
    grad_prompts: torch.Tensor | None = None
