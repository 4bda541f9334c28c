"""ClientConfig: every setting of one beectl client, with units in the field names."""

from __future__ import annotations

from dataclasses import dataclass, field

from beed.dht.config import DHTConfig
from beed.net.swarm_key import SwarmKey


@dataclass(frozen=True)
class ClientConfig:
    """How a client finds servers and how long it waits for them; built by the CLI or the API."""

    initial_peers: tuple[tuple[str, int], ...] = ()  # DHT nodes to join through
    swarm_key: SwarmKey | None = None  # a private swarm's key (beed/net/swarm_key.py)
    connect_timeout_s: float = 5.0  # TCP connect plus Hello exchange with one server
    open_timeout_s: float = 30.0  # OpenSession answer, on top of kv_wait_s
    kv_wait_s: float = 10.0  # how long a full server may keep a new session waiting for memory
    step_timeout_s: float = 60.0  # one step's answer from one server (prefill included)
    # Decode steps wait 10x the hop's typical answer time, at least this (beectl/timeouts.py).
    min_step_timeout_s: float = 5.0
    close_timeout_s: float = 2.0  # Close answer when a session ends; then we just drop it
    discovery_timeout_s: float = 10.0  # one DHT read of the servers of a model
    session_timeout_s: float = 300.0  # idle lifetime we ask servers to keep our session for
    route_cache_s: float = 30.0  # routes may come from a DHT read this old (then a fresh one)
    failover_timeout_s: float = 60.0  # how long a session keeps looking for a replacement server
    retry_delay_s: float = 0.2  # first pause between failover attempts (doubles, max 5 s)
    routing: str = "latency"  # "latency": fastest route; "throughput": spread over replicas
    compression: str = "auto"  # "auto": lossless codecs where the measured link pays; "off": raw
    measure_servers: int = 8  # before routing, connect to at most this many unmeasured servers
    measure_timeout_s: float = 1.5  # and wait this long for each one's Hello round trip
    # Training (beectl/training/remote.py): rows x tokens of one Forward/Backward request (the
    # servers' default Backward limit); a batch is cut into chunks of at most this many.
    train_chunk_tokens: int = 1024
    train_pipeline_chunks: int = 4  # and into at least this many (rows allowing): a pipeline
    push: bool = True  # servers forward each step to the next hop (False: the client relays)
    # Spot checks (beectl/verify.py): this share of each hop's steps, and every new server's
    # first verify_first_steps, are re-run on other servers of the same blocks and compared.
    verify_rate: float = 0.02
    verify_first_steps: int = 2
    # Loopback/private addresses named by records: True dials them, False never, None (auto)
    # only when the initial peers are such addresses themselves (a LAN or test swarm).
    allow_private_addresses: bool | None = None
    # Routes may chain servers of different weight quantizations (beed serve --quant); by
    # default every hop of a route (and its replacements) is of one quantization.
    allow_quant: bool = False
    # Reads wait for each queried node up to rpc_timeout_s, and a lookup round waits for its
    # slowest node: right after a server dies its DHT node is still in routing tables, so the
    # client uses a shorter RPC timeout than servers (1 s is still ~3x a long WAN round trip).
    dht: DHTConfig = field(default_factory=lambda: DHTConfig(rpc_timeout_s=1.0))
