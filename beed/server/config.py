"""ServerConfig: every setting of one `beed serve` process, with units in the field names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from beed.dht.config import DHTConfig
from beed.net.swarm_key import SwarmKey
from beed.relay.service import RelayConfig
from protocol.errors import BadRequestError


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_decode_threads(cores: int) -> int:
    """Intra-op threads for decode-sized steps: a quarter of the cores, at least 1.

    A one-token step is a chain of small matrix-vector products: one thread is nearly as fast
    as two, and an OpenMP team that sleeps between steps (as it does whenever the next step is a
    network round trip away) has to be woken for every one of its parallel regions. Measured on
    the 2-core reference machine through 100 ms links (docs/performance.md, "WAN"): a 10-block
    decode step took 45 ms with two threads and 25-27 ms with one, idle gaps or not; on loopback
    both took 27 ms. Prefill chunks keep every thread (1.3 s against 2.4 s for 512 tokens).
    """
    return max(1, cores // 4)


@dataclass(frozen=True)
class SchedulerConfig:
    """How steps are merged; `continuous_batching=False` runs one step per forward, in order."""

    continuous_batching: bool = True
    # Linear layers of a merged forward: "per-session" multiplies each session's rows alone
    # (bit-identical to it alone), "shared" once over all rows, "auto" per-session in float32.
    batch_matmul: str = "auto"
    max_batch_tokens: int = 2048  # rows × tokens of one batched forward (a lone step may exceed)
    prefill_chunk_tokens: int = 256  # rows × tokens of one prefill chunk when others are active
    active_window_s: float = 1.0  # a session that stepped this recently counts as active
    batch_wait_s: float = 0.005  # how long a step may wait for active sessions' steps to join it
    # Rows x tokens of one group of a Forward/Backward's rows through one block (one job): the
    # autograd graph held at once, and the size of its products (1 row of 128 tokens at a time
    # made training 1.3x slower on 2 cores than groups of 1024).
    stateless_group_tokens: int = 1024
    # Bytes of autograd graphs all Backwards of this server keep at once between a block's
    # forward and its backward; blocks beyond it are recomputed (a second forward) instead.
    backward_graph_bytes: int = 512 << 20
    stateless_max_wait_s: float = 2.0  # Forward/Backward older than this run before steps
    compute_threads: int = 0  # torch intra-op threads for large steps and stateless work (0: as is)
    decode_threads: int = 0  # ... for steps of at most DECODE_STEP_TOKENS rows x tokens (0: as is)


@dataclass(frozen=True)
class PeerLimits:
    """What a stranger may take from one server (docs/security.md lists each with its flag).

    A *peer* is the remote address of a connection: an IPv4 address, or an IPv6 /64 prefix.
    """

    max_connections: int = 1024  # TCP connections at once; when full, the oldest idle one closes
    max_connections_per_peer: int = 64  # ... from one peer; one more is closed at once
    hello_timeout_s: float = 5.0  # a new connection must complete its Hello within this, in all
    idle_timeout_s: float = 120.0  # a connection with no session and no request closes after this
    max_sessions_per_peer: int = 256  # open sessions of one peer (all its connections)
    max_kv_share_per_peer: float = 0.5  # share of the KV budget one peer's sessions may reserve
    first_step_timeout_s: float = 30.0  # a session that never steps gives its cache back after this
    max_request_tokens: int = 16384  # rows x tokens of one Step, Push or Forward
    max_backward_tokens: int = 1024  # rows x tokens of one Backward (runs in row groups)
    max_buffer_bytes: int | None = None  # decoded request tensors held at once; None: 4 requests
    buffer_wait_s: float = 10.0  # a frame waits this long for buffer room, then is refused (205)
    # Answers a connection may leave unread (our buffers and the kernel's) before its next
    # Step/Forward/Backward waits; one that reads nothing for write_timeout_s is closed.
    max_unread_kib: int = 64


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one block server; only the CLI reads argv and environment to build it."""

    model: str  # embedded name, local directory or hub id
    block_indices: tuple[int, int] | None = None  # pinned span [start, end); None: choose one
    num_blocks: int | None = None  # span length to choose when block_indices is None
    host: str = "0.0.0.0"  # TCP (and DHT UDP) bind address
    port: int = 31337  # TCP port for activations; 0 picks a free one
    dht_port: int | None = None  # UDP port of the DHT node; None: same number as the TCP port
    public_host: str | None = None  # address announced to clients; None: derived from host
    public_port: int | None = None  # TCP port announced to clients; None: the bound port
    initial_peers: tuple[tuple[str, int], ...] = ()  # DHT peers to join through
    identity_path: Path | None = None  # Ed25519 key file; None: a fresh identity per start
    device: str = "cpu"  # torch device of the blocks
    dtype: str = "float32"  # float32, bfloat16 or float16
    quant: str = "none"  # weight quantization of the blocks' linear layers: none, int8, nf4
    kv_cache: str = (
        "auto"  # sessions' caches: "dynamic", "paged" (preallocated), "auto" (paged on CUDA)
    )
    cuda_graphs: bool = True  # one-token steps replayed as CUDA graphs (CUDA, paged caches)
    metrics_port: int | None = None  # Prometheus /metrics on host:port (0: any); None: off
    torch_compile: bool = False  # the graphs hold the forward as torch.compile fuses it
    offload_weights: float | str | None = None  # share of blocks kept in host memory, or "auto"
    num_threads: int | None = None  # torch intra-op threads for large steps; None: all cores
    decode_threads: int | None = None  # ... for steps of few tokens; None: default_decode_threads
    kv_budget_tokens: int | None = None  # KV cache tokens for all sessions; None: from memory
    kv_memory_fraction: float = 0.25  # share of free memory for KV when kv_budget_tokens is None
    max_session_length: int = 8192  # longest max_length a session may ask for, in tokens
    session_timeout_s: float = 300.0  # cap on a session's idle lifetime (client may ask less)
    announce_period_s: float = 60.0  # refresh interval of the DHT record
    record_ttl_s: float = 180.0  # lifetime of each announced record (about 3x the period)
    drain_grace_s: float = 30.0  # SIGTERM or a move: how long running sessions may finish
    rebalance_period_s: float = 120.0  # how often a --blocks server re-checks its placement
    write_timeout_s: float = 30.0  # one reply's drain to a slow client
    max_streams_per_connection: int = 256  # open sessions and requests on one connection
    max_inflight_per_connection: int = 64  # requests running at once; past that, stop reading
    max_kv_wait_s: float = 60.0  # longest a new session may wait for cache memory to free up
    compression: str = "auto"  # "auto": lossless codecs where a link's measured speed pays; "off"
    encryption: bool = True  # the TCP port speaks TLS with the identity's certificate (net/tls.py)
    swarm_key: SwarmKey | None = None  # a private swarm's key (net/swarm_key.py); needs encryption
    push_connect_timeout_s: float = 5.0  # connecting to a next hop to push to it (Hello included)
    # Push to loopback/private next hops: True always, None (auto) when our own address is one.
    allow_private_addresses: bool | None = None
    push_ack_timeout_s: float = 10.0  # a next hop's Ack to one Push (it accepts before running)
    # Servers behind NAT (beed/server/reach.py): relay for them while reachable (--relay), how
    # many relays to listen through while unreachable, how often to check.
    relay: bool = True
    relay_config: RelayConfig = field(default_factory=RelayConfig)
    relays_wanted: int = 2
    relays: tuple[tuple[str, int], ...] = ()  # --relays: these, in order, instead of discovery
    reachability_period_s: float = 600.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: PeerLimits = field(default_factory=PeerLimits)
    dht: DHTConfig = field(default_factory=DHTConfig)

    def __post_init__(self) -> None:
        if self.swarm_key is not None and not self.encryption:
            raise BadRequestError("a private swarm (--swarm-key) needs encryption on")
