"""Server records announced in the DHT: the dataclass, its validation and its msgpack encoding."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from beed.dht.errors import RecordError
from beed.dht.identity import PUBLIC_KEY_BYTES, peer_id_for
from beed.net.relay import MAX_RELAYS, RelayAddress, parse_relays

SCHEMA_VERSION = 1

MAX_BLOCKS = 100_000
_MAX_STR = {"h": 255, "fp": 128, "mn": 128, "dt": 32, "sw": 64}
_MAX_CODECS = 16
_MAX_CODEC_LEN = 32
MAX_NEXT_RTTS = 32
MAX_RTT_MS = 60_000.0
REACHABILITY = frozenset({"", "public", "unreachable"})
QUANTS = ("none", "int8", "nf4")  # as beed/models/quant.py (the DHT package knows no models)


class ServerState(enum.Enum):
    """Lifecycle of a server as announced: joining → online → draining → offline."""

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass(frozen=True)
class ServerRecord:
    """What one server announces about the span of blocks it serves (see docs/protocol.md)."""

    peer_id: str  # printable id derived from the public key (identity.peer_id_for)
    state: ServerState  # lifecycle state; clients route only through online (or draining) ones
    span_start: int  # first block served
    span_end: int  # one past the last block served: the span is [span_start, span_end)
    host: str  # address clients connect to (IP or DNS name)
    port: int  # TCP port of the block server
    model_fingerprint: str  # hash of config + weights; the DHT key namespace
    model_name: str  # human name, e.g. "smollm2-135m"
    num_blocks: int  # number of blocks of the whole model
    dtype: str = "float32"  # dtype the served blocks compute in
    # Weight quantization of the blocks ("none", "int8", "nf4"); the fingerprint then ends in
    # "-<quant>" (beed/models/fingerprint.py served_fingerprint). Written only when not none.
    quant: str = "none"
    compute_tokens_per_s: float = 0.0  # measured per-block throughput
    network_bytes_per_s: float = 0.0  # measured network throughput
    free_kv_tokens: int = 0  # KV cache tokens still free
    protocol_version: int = 1  # wire protocol version spoken on the TCP port
    codecs: tuple[str, ...] = ("none",)  # tensor codecs supported
    software_version: str = ""  # beed version string
    # Measured round trips from this server to servers of the following blocks, in ms, by peer
    # id: routing adds a push hop's link from it (written only when non-empty).
    next_rtt_ms: tuple[tuple[str, float], ...] = ()
    # The TCP port speaks TLS with a certificate of public_key (beed/net/tls.py); written
    # only when true.
    tls: bool = False
    # Whether peers could dial host:port back ("public" / "unreachable"; "" = not checked: an
    # old server, or one without peers to ask). Written only when set.
    reachability: str = ""
    # Where an unreachable server listens instead: relays (beed/net/relay.py) that splice a
    # connection to it. Written only when non-empty.
    relays: tuple[RelayAddress, ...] = ()
    relaying: bool = False  # this server relays for servers behind NAT (--relay)
    public_key: bytes = b""  # Ed25519 public key; filled in by DHTNode.announce
    issued_at: float = 0.0  # unix time of issue; newer replaces older (replay ordering)
    expires_at: float = 0.0  # unix time of expiry; taken from the signed DHT entry

    @property
    def dial_relays(self) -> tuple[RelayAddress, ...]:
        """The relays to dial instead of host:port (none when the server is reachable)."""
        return self.relays if self.reachability == "unreachable" else ()

    @property
    def span(self) -> tuple[int, int]:
        return (self.span_start, self.span_end)

    def intersects(self, start: int, end: int) -> bool:
        """True when the half-open span [span_start, span_end) meets [start, end)."""
        return self.span_start < end and start < self.span_end

    def newer_than(self, other: ServerRecord) -> bool:
        return (self.issued_at, self.expires_at) > (other.issued_at, other.expires_at)


@dataclass(frozen=True)
class ModelEntry:
    """A model present in the swarm, summarised from the servers announcing it."""

    model_name: str
    fingerprint: str
    num_blocks: int
    num_servers: int  # distinct servers whose newest record is not offline
    covered_blocks: int  # blocks served by at least one of them


def encode_record(record: ServerRecord) -> bytes:
    """The msgpack bytes of a record (short keys, see docs/protocol.md); validates first."""
    validate_record(record)
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "pk": record.public_key,
        "st": record.state.value,
        "s": record.span_start,
        "e": record.span_end,
        "h": record.host,
        "p": record.port,
        "fp": record.model_fingerprint,
        "mn": record.model_name,
        "nb": record.num_blocks,
        "dt": record.dtype,
        "ct": float(record.compute_tokens_per_s),
        "nw": float(record.network_bytes_per_s),
        "kv": record.free_kv_tokens,
        "pv": record.protocol_version,
        "cd": list(record.codecs),
        "sw": record.software_version,
        "ia": float(record.issued_at),
    }
    if record.next_rtt_ms:
        fields["nr"] = {peer: float(ms) for peer, ms in record.next_rtt_ms}
    if record.tls:
        fields["tl"] = True
    if record.reachability:
        fields["rc"] = record.reachability
    if record.relays:
        fields["rl"] = [r.as_list() for r in record.relays]
    if record.relaying:
        fields["ry"] = True
    if record.quant != "none":
        fields["q"] = record.quant
    return bytes(msgpack.packb(fields, use_bin_type=True))


def decode_record(data: bytes, expires_at: float = 0.0) -> ServerRecord:
    """Parse record bytes from a peer; unknown keys are ignored; raises RecordError if invalid."""
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RecordError(f"record is not msgpack: {exc}") from exc
    if not isinstance(fields, dict):
        raise RecordError("record is not a msgpack map")
    version = fields.get("v")
    if not isinstance(version, int) or version < 1:
        raise RecordError(f"bad record schema version {version!r}")
    try:
        public_key = _typed(fields, "pk", bytes)
        state = ServerState(_typed(fields, "st", str))
        record = ServerRecord(
            peer_id=peer_id_for(public_key),
            state=state,
            span_start=_typed(fields, "s", int),
            span_end=_typed(fields, "e", int),
            host=_typed(fields, "h", str),
            port=_typed(fields, "p", int),
            model_fingerprint=_typed(fields, "fp", str),
            model_name=_typed(fields, "mn", str),
            num_blocks=_typed(fields, "nb", int),
            dtype=_typed(fields, "dt", str),
            quant=fields.get("q", "none"),
            compute_tokens_per_s=_number(fields, "ct"),
            network_bytes_per_s=_number(fields, "nw"),
            free_kv_tokens=_typed(fields, "kv", int),
            protocol_version=_typed(fields, "pv", int),
            codecs=tuple(_codecs(fields)),
            software_version=_typed(fields, "sw", str),
            next_rtt_ms=_next_rtts(fields),
            tls=fields.get("tl", False) is True,
            reachability=_reachability(fields),
            relays=parse_relays(fields.get("rl", []), "record field 'rl'"),
            relaying=fields.get("ry", False) is True,
            public_key=public_key,
            issued_at=_number(fields, "ia"),
            expires_at=expires_at,
        )
    except ValueError as exc:  # includes an unknown ServerState
        raise RecordError(f"bad record field: {exc}") from exc
    validate_record(record)
    return record


def validate_record(record: ServerRecord) -> None:
    """Raise RecordError unless every field is in range (used on encode and on decode)."""
    if len(record.public_key) != PUBLIC_KEY_BYTES:
        raise RecordError("record public_key must be 32 bytes (announce fills it in)")
    if record.peer_id != peer_id_for(record.public_key):
        raise RecordError("record peer_id does not derive from its public_key")
    if not 0 < record.num_blocks <= MAX_BLOCKS:
        raise RecordError(f"num_blocks out of range: {record.num_blocks}")
    if not 0 <= record.span_start < record.span_end <= record.num_blocks:
        raise RecordError(f"bad span {record.span_start}:{record.span_end}/{record.num_blocks}")
    if not 0 < record.port < 65536:
        raise RecordError(f"port out of range: {record.port}")
    for key, value in (
        ("h", record.host),
        ("fp", record.model_fingerprint),
        ("mn", record.model_name),
        ("dt", record.dtype),
        ("sw", record.software_version),
    ):
        if len(value) > _MAX_STR[key]:
            raise RecordError(f"field {key} longer than {_MAX_STR[key]} characters")
    if not record.model_fingerprint or not record.host:
        raise RecordError("model_fingerprint and host must not be empty")
    if len(record.codecs) > _MAX_CODECS or any(len(c) > _MAX_CODEC_LEN for c in record.codecs):
        raise RecordError("too many or too long codec names")
    for name in ("compute_tokens_per_s", "network_bytes_per_s", "issued_at"):
        value = getattr(record, name)
        if not (math.isfinite(value) and value >= 0):
            raise RecordError(f"{name} must be finite and non-negative")
    if record.free_kv_tokens < 0 or record.protocol_version < 0:
        raise RecordError("free_kv_tokens and protocol_version must be non-negative")
    if record.quant not in QUANTS:
        raise RecordError(f"quant must be one of {', '.join(QUANTS)}")
    if record.quant != "none" and not record.model_fingerprint.endswith(f"-{record.quant}"):
        raise RecordError(f"a {record.quant} record's fingerprint must end in -{record.quant}")
    if record.reachability not in REACHABILITY:
        raise RecordError(f"reachability must be one of {sorted(REACHABILITY)}")
    if len(record.relays) > MAX_RELAYS:
        raise RecordError(f"more than {MAX_RELAYS} relays")
    if len(record.next_rtt_ms) > MAX_NEXT_RTTS:
        raise RecordError(f"more than {MAX_NEXT_RTTS} next-hop round trips")
    for peer, ms in record.next_rtt_ms:
        if not (isinstance(peer, str) and 0 < len(peer) <= 128):
            raise RecordError("next-hop round trips must be keyed by peer ids")
        if not (math.isfinite(ms) and 0 <= ms <= MAX_RTT_MS):
            raise RecordError(f"next-hop round trip {ms!r} ms out of range")


def with_signing_fields(
    record: ServerRecord, public_key: bytes, issued_at: float, expires_at: float
) -> ServerRecord:
    """A copy of `record` carrying the signer's public key and the issue/expiry times."""
    return dataclasses.replace(
        record, public_key=public_key, issued_at=issued_at, expires_at=expires_at
    )


def _typed(fields: dict[str, Any], key: str, kind: type) -> Any:
    value = fields.get(key)
    # bool is an int subclass; a bool is never a valid int field here.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RecordError(f"record field {key!r} missing or not {kind.__name__}")
    return value


def _number(fields: dict[str, Any], key: str) -> float:
    value = fields.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RecordError(f"record field {key!r} missing or not a number")
    return float(value)


def _reachability(fields: dict[str, Any]) -> str:
    value = fields.get("rc", "")
    if value not in REACHABILITY:
        raise RecordError(f"record field 'rc' must be one of {sorted(REACHABILITY)}")
    return str(value)


def _codecs(fields: dict[str, Any]) -> list[str]:
    value = fields.get("cd")
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RecordError("record field 'cd' must be a list of strings")
    return value


def _next_rtts(fields: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    value = fields.get("nr", {})
    if not isinstance(value, dict) or len(value) > MAX_NEXT_RTTS:
        raise RecordError(f"record field 'nr' must be a map of at most {MAX_NEXT_RTTS} entries")
    out = []
    for peer, ms in value.items():
        if not isinstance(ms, int | float) or isinstance(ms, bool):
            raise RecordError("record field 'nr' values must be numbers")
        out.append((peer, float(ms)))
    return tuple(sorted(out))
