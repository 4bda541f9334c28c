"""What `beectl swarm` shows (its table, `--json` and the live page): models, blocks, servers."""

from __future__ import annotations

from typing import Any

from beectl.routing import uncovered_blocks
from beectl.swarm import Swarm
from beed.dht.records import ServerState


async def swarm_snapshot(swarm: Swarm, model_name: str | None = None) -> list[dict[str, Any]]:
    """Per model: its blocks' replica counts (online servers), the blocks no one serves, and its
    servers (newest record each, offline ones left out), read from the DHT now."""
    result = []
    for m in await swarm.models():
        if model_name not in (None, m.model_name):
            continue
        servers = await swarm.servers_announcing(m.fingerprint, m.num_blocks)
        replicas = [0] * m.num_blocks
        for s in servers:
            if s.state == ServerState.ONLINE:
                for i in range(max(0, s.span_start), min(m.num_blocks, s.span_end)):
                    replicas[i] += 1
        result.append(
            {
                "model": m.model_name,
                "fingerprint": m.fingerprint,
                "num_blocks": m.num_blocks,
                "uncovered_blocks": uncovered_blocks(servers, m.num_blocks),
                "replicas": replicas,
                "servers": [
                    {
                        "peer_id": s.peer_id,
                        "host": s.host,
                        "port": s.port,
                        "blocks": [s.span_start, s.span_end],
                        "state": s.state.value,
                        "dtype": s.dtype,
                        "quant": s.quant,
                        "compute_tokens_per_s": s.compute_tokens_per_s,
                        "free_kv_tokens": s.free_kv_tokens,
                        "software_version": s.software_version,
                    }
                    for s in servers
                ],
            }
        )
    return result
