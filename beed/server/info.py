"""What a server answers to GetInfo: its record, load, limits and counters."""

from __future__ import annotations

import dataclasses
from typing import Any

import beed
from beed.dht.records import ServerRecord
from beed.server.service import ServerState


def server_info(state: ServerState, rec: ServerRecord) -> dict[str, Any]:
    """The Info dict of a running server (docs/protocol.md, GetInfo; docs/operations.md)."""
    scheduler = state.scheduler
    return {
        "peer_id": rec.peer_id,
        "model_name": rec.model_name,
        "model_fingerprint": rec.model_fingerprint,
        "span_start": rec.span_start,
        "span_end": rec.span_end,
        "num_blocks": rec.num_blocks,
        "dtype": rec.dtype,
        "quant": rec.quant,
        "weight_bytes": state.backend.info.weight_bytes,
        "state": "draining" if state.draining else rec.state.value,
        "free_kv_tokens": state.sessions.budget.free_tokens,
        "used_kv_bytes": state.sessions.budget.used_bytes,
        "sessions": len(state.sessions),
        "compute_tokens_per_s": rec.compute_tokens_per_s,
        "software_version": beed.__version__,
        "continuous_batching": state.config.scheduler.continuous_batching,
        "batch_matmul": "shared" if state.backend.shared_matmul else "per-session",
        "queued_steps": scheduler.queued_steps,
        "batches": scheduler.batches,
        "batched_steps": scheduler.batched_steps,
        "waiting_sessions": state.sessions.waiting,
        "batch_fallbacks": state.backend.batch_fallbacks,
        **state.backend.memory_info(),
        "connections": len(state.admission),
        "connections_refused": state.admission.refused,
        "connections_evicted": state.admission.evicted,
        "reader_waits": state.admission.reader_waits,
        "reader_closed": state.admission.reader_closed,
        "request_bytes_held": state.memory.used_bytes,
        "request_bytes_peak": state.memory.peak_bytes,
        "request_bytes_budget": state.memory.total_bytes,
        "requests_refused_for_memory": state.memory.refused,
        "max_request_tokens": state.config.limits.max_request_tokens,
        **dataclasses.asdict(state.push_stats),
        "errors_sent": {str(code): n for code, n in sorted(state.errors_sent.items())},
        "tensor_bytes": state.traffic.as_dict(),
    }
