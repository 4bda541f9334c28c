"""Relay preambles: the few messages a relay reads before it splices two TCP streams.

A server that cannot be dialled (behind NAT) keeps a control connection to a relay; a client or
an upstream server that wants it connects to the relay instead and names it; the relay asks the
server to dial in once more, and then copies bytes between the two connections. What follows the
preamble is the ordinary beed stream (TLS, Hello, frames, docs/protocol.md), end to end between
the two peers: the relay reads only these preambles.

Every preamble message is `MAGIC` (4 bytes), its body length (u32 little-endian) and a msgpack
map with an "op" field. The magic differs from a frame's (b"BEED") and from a TLS record's first
byte (0x16), so one TCP port can serve all three.

Ops, by who sends them:
- listen (server -> relay, on its control connection): peer_id, pk (Ed25519 public key), ts
  (unix time), sig (signature of `signed_bytes`), sp (private swarms: the key's proof);
- connect (client -> relay): target (the server's peer id), ts, sp;
- accept (server -> relay, on a fresh connection): peer_id, id (from an incoming), ts, sig, sp;
- incoming (relay -> server, on the control connection): id;
- ping / pong (either way on the control connection): n;
- ok / error (the answer to listen, connect and accept): error carries code and message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import MalformedHeaderError

MAGIC = b"BEER"
PREFIX = struct.Struct("<4sI")
MAX_BODY_BYTES = 4096
OPS = frozenset({"listen", "connect", "accept", "incoming", "ping", "pong", "ok", "error"})
MAX_ID = (1 << 63) - 1

_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "listen": {"peer_id": str, "pk": bytes, "ts": (int, float), "sig": bytes},
    "connect": {"target": str, "ts": (int, float)},
    "accept": {"peer_id": str, "id": int, "ts": (int, float), "sig": bytes},
    "incoming": {"id": int},
    "ping": {"n": int},
    "pong": {"n": int},
    "ok": {},
    "error": {"code": int, "message": str},
}
_MAX_STR = 256


@dataclass(frozen=True)
class RelayMessage:
    """One preamble message: its op and fields (validated for that op)."""

    op: str
    fields: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def encode_relay(op: str, **fields: Any) -> bytes:
    """The bytes of one preamble message; ValueError if it breaks the schema."""
    message = RelayMessage(op, dict(fields))
    _validate(message)
    body = bytes(msgpack.packb({"op": op, **fields}, use_bin_type=True))
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"relay message is {len(body)} bytes, over {MAX_BODY_BYTES}")
    return PREFIX.pack(MAGIC, len(body)) + body


def body_length(prefix: bytes) -> int:
    """The body length announced by an 8-byte prefix; MalformedHeaderError if it is not one."""
    if len(prefix) != PREFIX.size:
        raise MalformedHeaderError("relay prefix is 8 bytes")
    magic, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise MalformedHeaderError(f"not a relay preamble (magic {magic!r})")
    if length > MAX_BODY_BYTES:
        raise MalformedHeaderError(f"relay message of {length} bytes, over {MAX_BODY_BYTES}")
    return int(length)


def decode_relay(body: bytes) -> RelayMessage:
    """Parse one message body (after its prefix); MalformedHeaderError if it breaks the schema."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedHeaderError(f"relay message is not msgpack: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise MalformedHeaderError("relay message is not a map with an op")
    op = raw.pop("op")
    message = RelayMessage(op, raw)
    try:
        _validate(message)
    except ValueError as exc:
        raise MalformedHeaderError(str(exc)) from exc
    return message


def signed_bytes(op: str, peer_id: str, ts: float, request_id: int = 0) -> bytes:
    """What a server signs in listen and accept (and a private swarm's proof covers, with the
    target of a connect as `peer_id`): op, peer id, request id and time, domain-separated."""
    return b"\0".join(
        [
            b"beed relay v1",
            op.encode(),
            peer_id.encode(),
            str(request_id).encode(),
            repr(ts).encode(),
        ]
    )


def _validate(message: RelayMessage) -> None:
    spec = _FIELDS.get(message.op)
    if spec is None:
        raise ValueError(f"unknown relay op {message.op!r}")
    for name, kind in spec.items():
        value = message.fields.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"relay {message.op}: field {name!r} missing or ill-typed")
        if isinstance(value, str) and not 0 < len(value) <= _MAX_STR:
            raise ValueError(f"relay {message.op}: field {name!r} must be 1..{_MAX_STR} chars")
        if isinstance(value, bytes) and len(value) > _MAX_STR:
            raise ValueError(f"relay {message.op}: field {name!r} is too long")
        if isinstance(value, int) and not 0 <= value <= MAX_ID:
            raise ValueError(f"relay {message.op}: field {name!r} is out of range")
    proof = message.fields.get("sp")
    if proof is not None and not (isinstance(proof, str) and len(proof) <= 128):
        raise ValueError(f"relay {message.op}: bad swarm proof")
