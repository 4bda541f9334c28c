"""The `beed` command line: parses argv and environment, builds configs, runs the daemon."""

from __future__ import annotations

import os

# Before torch is imported: libgomp lets each OpenMP worker spin ~4 ms after every parallel region
# by default. Between the processes of a swarm sharing cores, that spinning steals the CPU from
# whichever process computes next (see docs/performance.md); 30000 spins keeps a step's ops fast
# and stops within about a millisecond of the step's end. An explicit setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from beed.cli_bootstrap import bootstrap, keygen
from beed.cli_config import config_option
from beed.cli_limits import peer_limit_options, peer_limits_from
from beed.cli_relay import relay_config_from, relay_options, relays_option
from beed.dht.peers import initial_peers_callback
from beed.logs import setup_logging
from beed.net.swarm_key import SwarmKey, swarm_key_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Verbosity of the log on stderr.",
)
def main(log_level: str) -> None:
    """beed: serve transformer blocks of a large language model to a swarm."""
    setup_logging(log_level)


if TYPE_CHECKING:  # generic from click 8.2 on; pyproject allows 8.1
    _FractionType = click.ParamType[float | str, Any]
else:
    _FractionType = click.ParamType


main.add_command(keygen)
main.add_command(bootstrap)


class OffloadFraction(_FractionType):
    """--offload-weights: a share of the span's blocks between 0 and 1, or "auto"."""

    name = "FRACTION|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str:
        if isinstance(value, float) or value == "auto":
            return value
        try:
            fraction = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number between 0 and 1 nor 'auto'", param, ctx)
        if not 0.0 <= fraction <= 1.0:
            self.fail(f"{value!r} is not between 0 and 1", param, ctx)
        return fraction


def _parse_block_indices(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        start_text, end_text = value.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected START:END, e.g. 0:15", ctx, param) from None
    if not 0 <= start < end:
        raise click.BadParameter(f"{value!r}: need 0 <= START < END (END excluded)", ctx, param)
    return start, end


@main.command()
@config_option
@click.option(
    "--model",
    default="smollm2-135m",
    show_default=True,
    help="Embedded model name, local model directory, or Hugging Face id in the local cache.",
)
@click.option(
    "--blocks",
    "num_blocks",
    type=click.IntRange(1),
    default=None,
    help="Serve this many blocks, placed where the swarm needs them most.",
)
@click.option(
    "--block-indices",
    callback=_parse_block_indices,
    default=None,
    help="Serve exactly blocks START:END (END excluded), e.g. 0:15.",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind (TCP and UDP).")
@click.option(
    "--port",
    default=31337,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port for activations (0 picks a free one).",
)
@click.option(
    "--dht-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="UDP port of the DHT node [default: the TCP port's number].",
)
@click.option(
    "--public-host", default=None, help="Address announced to clients [default: derived]."
)
@click.option(
    "--compression",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: lossless compression of activations on links whose measured speed makes it "
    "pay (never on fast links); off: always send raw.",
)
@swarm_key_option
@click.option(
    "--encryption/--no-encryption",
    default=True,
    show_default=True,
    help="Activation connections use TLS 1.3, this server authenticated as the identity its "
    "DHT record names (docs/security.md); --no-encryption serves them in the clear.",
)
@click.option(
    "--public-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="TCP port announced to clients, when a proxy or port forward in front of this server "
    "listens on another port [default: the bound port].",
)
@click.option(
    "--initial-peers",
    multiple=True,
    callback=initial_peers_callback,
    help="DHT peers to join through, HOST:PORT, repeated or comma-separated.",
)
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ed25519 key file; created with mode 0600 if missing.",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda:0.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="dtype the blocks run in.",
)
@click.option(
    "--quant",
    type=click.Choice(["none", "int8", "nf4"]),
    default="none",
    show_default=True,
    help="Quantize the blocks' linear weights: int8 (per row) or nf4 (4-bit, blocks of 64); "
    "announced with the fingerprint, so clients chain such servers only with --allow-quant "
    "or on a route of one quantization.",
)
@click.option(
    "--num-threads",
    type=click.IntRange(1),
    default=None,
    help="torch intra-op CPU threads for prefills and batches [default: the CPU cores this "
    "process may use; 1 with a GPU --device, where the host only copies activations].",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(1),
    default=None,
    help="torch intra-op CPU threads for steps of at most 8 tokens (decode) [default: a quarter "
    "of the cores, at least 1; see docs/performance.md, WAN].",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["auto", "dynamic", "paged"]),
    default="auto",
    show_default=True,
    help="Sessions' KV caches: dynamic (grown as they fill), paged (preallocated once from the "
    "KV budget; what CUDA graphs need); auto is paged on CUDA, dynamic on a CPU.",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=True,
    show_default=True,
    help="Replay one-token decode steps as CUDA graphs (CUDA with paged caches; not with "
    "--offload-weights).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (on --host; 0: a free port, "
    "logged) [default: off].",
)
@click.option(
    "--torch-compile/--no-torch-compile",
    default=False,
    show_default=True,
    help="Fuse what the decode graphs hold with torch.compile (inductor): fewer, larger "
    "kernels; compiles for a minute or so per span at start-up and per new batch shape.",
)
@click.option(
    "--offload-weights",
    type=OffloadFraction(),
    default=None,
    metavar="FRACTION|auto",
    help="Keep this share of the span's blocks in pinned host memory and stream each in just "
    "before it runs; auto: what does not fit in free device memory [default: none].",
)
@click.option(
    "--kv-budget-tokens",
    type=click.IntRange(0),
    default=None,
    help="KV cache tokens for all sessions together [default: a quarter of free memory].",
)
@click.option(
    "--max-session-length",
    type=click.IntRange(1),
    default=8192,
    show_default=True,
    help="Longest session (prompt + generated tokens) a client may open.",
)
@click.option(
    "--session-timeout",
    type=click.FloatRange(1.0),
    default=300.0,
    show_default=True,
    help="Seconds an idle session keeps its cache.",
)
@click.option(
    "--announce-period",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    help="Seconds between DHT announcements (records live 3x as long).",
)
@click.option(
    "--rebalance-period",
    type=click.FloatRange(0.0),
    default=120.0,
    show_default=True,
    help="Seconds between placement re-checks of a --blocks server (0: never move).",
)
@click.option(
    "--drain-grace",
    type=click.FloatRange(0.0),
    default=30.0,
    show_default=True,
    help="Seconds running sessions get to move off on SIGTERM or when the server moves.",
)
@click.option(
    "--max-kv-wait",
    type=click.FloatRange(0.0),
    default=60.0,
    show_default=True,
    help="Longest a new session may wait for cache memory before it is refused as busy.",
)
@click.option(
    "--continuous-batching/--no-continuous-batching",
    default=True,
    show_default=True,
    help="Merge concurrent sessions' steps into one forward per batch.",
)
@click.option(
    "--batch-matmul",
    type=click.Choice(["auto", "shared", "per-session"]),
    default="auto",
    show_default=True,
    help="Linear layers of a merged forward: once over all sessions' rows (shared: faster where "
    "weights come from memory), or once per session (bit-identical to each session alone); "
    "auto is per-session in float32, shared otherwise.",
)
@click.option(
    "--max-batch-tokens",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Tokens (rows x positions) of one batched forward.",
)
@click.option(
    "--batch-wait",
    type=click.FloatRange(0.0, 1.0),
    default=0.005,
    show_default=True,
    help="Seconds a step may wait for other active sessions' steps to join its batch.",
)
@click.option(
    "--prefill-chunk-tokens",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Long prompts run in chunks of this many tokens while other sessions are decoding.",
)
@click.option(
    "--backward-graph-mib",
    type=click.IntRange(0),
    default=512,
    show_default=True,
    help="MiB of autograd graphs all training Backwards keep at once; blocks beyond it run "
    "their forward twice instead (0: always).",
)
@click.option(
    "--allow-private-addresses",
    is_flag=True,
    help="Push to next servers at loopback or private addresses even when this server's own "
    "announced address is public (by default only a swarm on such addresses may name them).",
)
@relay_options
@relays_option
@peer_limit_options
def serve(
    model: str,
    num_blocks: int | None,
    block_indices: tuple[int, int] | None,
    host: str,
    port: int,
    dht_port: int | None,
    public_host: str | None,
    public_port: int | None,
    compression: str,
    encryption: bool,
    swarm_key: SwarmKey | None,
    initial_peers: list[tuple[str, int]],
    identity_path: Path | None,
    device: str,
    dtype: str,
    quant: str,
    num_threads: int | None,
    decode_threads: int | None,
    kv_cache: str,
    cuda_graphs: bool,
    metrics_port: int | None,
    torch_compile: bool,
    offload_weights: float | str | None,
    kv_budget_tokens: int | None,
    max_session_length: int,
    session_timeout: float,
    announce_period: float,
    rebalance_period: float,
    drain_grace: float,
    max_kv_wait: float,
    continuous_batching: bool,
    batch_matmul: str,
    max_batch_tokens: int,
    prefill_chunk_tokens: int,
    backward_graph_mib: int,
    batch_wait: float,
    allow_private_addresses: bool,
    **limit_options: Any,
) -> None:
    """Load a span of a model's blocks and serve it to the swarm.

    Prints one line to stdout when ready: `ready HOST:PORT blocks START:END peer_id ID`.
    SIGTERM drains running sessions, announces offline and exits 0.
    """
    from beed.dht.config import DHTConfig
    from beed.server.config import SchedulerConfig, ServerConfig
    from beed.server.server import BlockServer, Ready
    from protocol.errors import BeeError

    if num_blocks is not None and block_indices is not None:
        raise click.UsageError("give either --blocks or --block-indices, not both")
    if swarm_key is not None and not encryption:
        raise click.UsageError(
            "a private swarm (--swarm-key) needs encryption: drop --no-encryption"
        )
    _check_device(device)
    relay, relay_config = relay_config_from(limit_options)
    config = ServerConfig(
        relay=relay,
        relay_config=relay_config,
        relays=tuple(limit_options.pop("relays")),
        model=model,
        block_indices=block_indices,
        num_blocks=num_blocks,
        host=host,
        port=port,
        dht_port=dht_port,
        public_host=public_host,
        public_port=public_port,
        compression=compression,
        encryption=encryption,
        swarm_key=swarm_key,
        initial_peers=tuple(initial_peers),
        identity_path=identity_path,
        device=device,
        dtype=dtype,
        quant=quant,
        num_threads=num_threads,
        decode_threads=decode_threads,
        kv_cache=kv_cache,
        cuda_graphs=cuda_graphs,
        metrics_port=metrics_port,
        torch_compile=torch_compile,
        offload_weights=offload_weights,
        kv_budget_tokens=kv_budget_tokens,
        max_session_length=max_session_length,
        session_timeout_s=session_timeout,
        announce_period_s=announce_period,
        rebalance_period_s=rebalance_period,
        drain_grace_s=drain_grace,
        max_kv_wait_s=max_kv_wait,
        scheduler=SchedulerConfig(
            continuous_batching=continuous_batching,
            batch_matmul=batch_matmul,
            max_batch_tokens=max_batch_tokens,
            prefill_chunk_tokens=prefill_chunk_tokens,
            backward_graph_bytes=backward_graph_mib << 20,
            batch_wait_s=batch_wait,
        ),
        limits=peer_limits_from(limit_options),
        allow_private_addresses=allow_private_addresses or None,
        record_ttl_s=3 * announce_period,
        dht=DHTConfig(default_ttl_s=3 * announce_period),
    )

    def on_ready(ready: Ready) -> None:
        click.echo(
            f"ready {ready.host}:{ready.port} blocks {ready.span[0]}:{ready.span[1]} "
            f"peer_id {ready.peer_id} model {ready.model_name} fingerprint {ready.fingerprint}"
        )
        sys.stdout.flush()

    try:
        _run(BlockServer(config).run(on_ready))
    except BeeError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, RuntimeError, ValueError) as exc:
        logging.getLogger(__name__).debug("serve.failed", exc_info=True)
        raise click.ClickException(f"cannot start: {exc}") from None


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise click.BadParameter(
            f"{device!r} is not a torch device ({exc})", param_hint="--device"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(
            f"{device!r}: this torch build has no usable CUDA device", param_hint="--device"
        )
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= count:
        raise click.BadParameter(f"{device!r}: only {count} CUDA device(s)", param_hint="--device")


def _run(coro: Any) -> Any:
    """asyncio.run on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
