"""DHTConfig: every tunable of a DHT node, with units in the field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from beed.net.swarm_key import SwarmKey


@dataclass(frozen=True)
class DHTConfig:
    """Settings of one DHT node; tests shrink the periods, production keeps the defaults."""

    ksize: int = 20  # Kademlia k: bucket size and number of replicas a record is stored on
    # A private swarm's key: every datagram is sealed with it, others dropped (net/swarm_key.py).
    swarm_key: SwarmKey | None = None
    alpha: int = 3  # Kademlia alpha: parallel requests per lookup round
    rpc_timeout_s: float = 3.0  # wait for one UDP reply before counting it as missed
    bootstrap_timeout_s: float = 10.0  # whole bootstrap (pings + self lookup)
    lookup_timeout_s: float = 10.0  # one get_servers / list_models call, all keys together
    store_timeout_s: float = 15.0  # one announce call, all keys together
    default_ttl_s: float = 360.0  # record lifetime when announce gets no ttl (~3x server refresh)
    max_ttl_s: float = 3600.0  # storing nodes keep an entry at most this long after receiving it
    read_quorum: int = 3  # a lookup stops after this many nodes returned entries for the key
    max_pages: int = 64  # pages fetched from one node for one key (each page is one datagram)
    max_page_bytes: int = 7000  # entry bytes per reply page; keeps datagrams under 8 KiB
    max_missed_replies: int = 3  # consecutive missed replies before a contact is evicted
    stall_s: float = 0.5  # a lookup query silent this long stops holding one of the alpha slots
    liveness_period_s: float = 15.0  # contacts silent this long are pinged (0: never)
    table_refresh_s: float = 600.0  # period of the routing-table refresh (lonely buckets)
    republish_s: float = 3600.0  # re-store held entries not refreshed by their writer for this long
    max_subkeys_per_key: int = 4096  # entries one key may hold on one storing node
    max_keys: int = 65536  # keys one storing node holds
    socket_buffer_bytes: int = 1 << 20  # UDP send/receive buffer asked of the kernel (capped by it)
    # --- hostile peers (docs/security.md, "DHT"); refusals are logged at debug and counted ---
    max_subkeys_per_ip: int = 128  # new subkeys one key takes whose first STORE came from one IP
    max_subkeys_per_prefix: int = 256  # same, from one /24 (IPv4) or /48 (IPv6) network
    max_entries_per_ip: int = 8192  # entries of all keys whose first STORE came from one IP
    request_rate_per_address_hz: float = 200.0  # requests/s handled from one (ip, port)
    request_burst_per_address: int = 400  # requests one (ip, port) may send at once
    request_rate_per_ip_hz: float = 500.0  # requests/s handled from one IP, all ports
    request_burst_per_ip: int = 1000  # requests one IP may send at once
    request_rate_hz: float = 2000.0  # requests/s handled from everyone together
    request_burst: int = 4000  # requests everyone together may send at once
    store_rate_per_ip_hz: float = 100.0  # STORE signatures/s verified for one IP (~0.15 ms each)
    store_burst_per_ip: int = 500  # STORE signatures one IP may have verified at once
    store_rate_hz: float = 500.0  # STORE signatures/s verified for everyone together
    store_burst: int = 2000  # STORE signatures verified at once for everyone together
    rate_table_size: int = 4096  # sources whose token buckets are kept (least recent evicted)
    max_amplification: float = 3.0  # reply bytes / request bytes to an address not yet proven
    proven_address_ttl_s: float = 600.0  # an address that answered our request counts as proven
    max_dial_backs: int = 16  # reachability dial-backs in flight (reach requests past it: None)
    dial_back_timeout_s: float = 2.0  # a dial-back's TCP connect, before answering "closed"
    max_contact_checks: int = 64  # pings in flight checking new senders and moved node ids
    max_entry_lifetime_s: float = 86400.0  # entries expiring later than now + this are refused
    max_clock_skew_s: float = 600.0  # records issued later than now + this are refused
    max_span_blocks: int = 256  # records spanning more blocks are refused (32 keys to check)
