"""The `beectl` command line: generate text through a swarm, run a local demo swarm, list servers."""

from __future__ import annotations

import os

# Before torch is imported: libgomp lets each OpenMP worker spin ~4 ms after every parallel region
# by default. Between the processes of a swarm sharing cores, that spinning steals the CPU from
# whichever process computes next (see docs/performance.md); 30000 spins keeps a step's ops fast
# and stops within about a millisecond of the step's end. An explicit setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import json
import logging
import sys
import time
from typing import Any

import click

from beectl.cli_options import (
    generation_options,
    peers_option,
    quant_option,
    require_peers,
    run_cli,
    verify_option,
)
from beectl.config import ClientConfig
from beed.net.swarm_key import SwarmKey, swarm_key_option
from protocol.errors import BeeError

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("kademlia", "rpcudp", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Verbosity of the log on stderr.",
)
def main(log_level: str) -> None:
    """beectl: run a large language model through a beed swarm."""
    _setup_logging(log_level)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.File("r"),
    default=None,
    help="Generate for every line of this file (- for stdin) as one batch; prints JSON lines.",
)
@click.option(
    "--kv-wait",
    type=click.FloatRange(0.0),
    default=10.0,
    show_default=True,
    help="Seconds a full server may keep the session waiting for cache memory (then: busy).",
)
@click.option(
    "--routing",
    type=click.Choice(["latency", "throughput"]),
    default="latency",
    show_default=True,
    help="latency: the fastest chain of servers; throughput: spread sessions over replicas.",
)
@click.option(
    "--push/--no-push",
    default=True,
    show_default=True,
    help="Servers forward each step straight to the next server (--no-push: this client "
    "relays every hop, one round trip per server).",
)
@click.option(
    "--compression",
    type=click.Choice(["auto", "off"]),
    default="auto",
    show_default=True,
    help="auto: lossless compression of activations where a link's measured speed makes it "
    "pay; off: always raw.",
)
@click.option(
    "--allow-private-addresses",
    is_flag=True,
    help="Use servers whose records name loopback or private addresses even though the "
    "initial peers are public (by default only a swarm on such addresses may name them).",
)
@click.option(
    "--tuned-prompts",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Prompts trained by `beectl finetune` (a safetensors file): generate after them.",
)
@peers_option
@swarm_key_option
@verify_option
@quant_option
@generation_options
def generate(
    prompt: str | None,
    prompts_file: Any,
    tuned_prompts: str | None,
    kv_wait: float,
    routing: str,
    push: bool,
    compression: str,
    allow_private_addresses: bool,
    initial_peers: list[tuple[str, int]],
    swarm_key: SwarmKey | None,
    verify_rate: float,
    allow_quant: bool,
    **kwargs: Any,
) -> None:
    """Generate text after PROMPT through the swarm; text streams to stdout as it is produced.

    With --prompts FILE, every non-empty line is a prompt; they run as one batch (left-padded)
    and each finishes on its own; one JSON object per prompt is printed, in order.
    """
    require_peers(initial_peers)
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give either a PROMPT or --prompts FILE")
    config = ClientConfig(
        initial_peers=tuple(initial_peers),
        swarm_key=swarm_key,
        verify_rate=verify_rate,
        allow_quant=allow_quant,
        kv_wait_s=kv_wait,
        routing=routing,
        push=push,
        compression=compression,
        allow_private_addresses=allow_private_addresses or None,
    )
    if prompts_file is not None:
        prompts = [line.rstrip("\n") for line in prompts_file if line.strip()]
        if not prompts:
            raise click.UsageError("--prompts: the file has no prompt")
        run_cli(_generate_batch(prompts, config, tuned_prompts=tuned_prompts, **kwargs))
    else:
        run_cli(_generate(prompt or "", config, tuned_prompts=tuned_prompts, **kwargs))


def _tuned(remote: Any, path: str | None) -> Any:
    """The PromptTuning of --tuned-prompts (None without), checked against the model."""
    if path is None:
        return None
    from beectl.training.prompts import load_prompts, prompts_for
    from beectl.training.tuned import check_generates

    prompts = prompts_for(
        load_prompts(path),
        fingerprint=remote.files.fingerprint,
        hidden_size=remote.head.hidden_size,
        num_blocks=remote.files.num_blocks,
    )
    check_generates(prompts)
    return prompts


async def _run_generation(
    remote: Any, session: Any, ids: Any, sampling: Any, prompts: Any, **kw: Any
) -> Any:
    """generation.generate, after the tuned prompts if there are any (sequences without them)."""
    from beectl.generation import generate as run_generation

    if prompts is None:
        return await run_generation(remote.head, session, ids, sampling, **kw)
    from beectl.training.tuned import generate_prompted, strip_prompts

    out = await generate_prompted(remote.head, session, ids, sampling, prompts, **kw)
    return strip_prompts(out, prompts)


def _encode(tokenizer: Any, prompt: str, raw: bool) -> list[int]:
    if not raw and tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return list(tokenizer(prompt).input_ids)


def _speculation(remote: Any, speculate: str, draft_model: str | None) -> dict[str, Any]:
    """generate()'s speculation arguments for --speculate and --draft-model."""
    from beectl.speculative.adaptive import SpeculationConfig

    try:
        config = SpeculationConfig.parse(speculate)
    except BeeError as exc:
        raise click.BadParameter(str(exc), param_hint="--speculate") from None
    draft = remote.draft_model(draft_model) if draft_model and config.enabled else None
    return {"speculation": config, "draft_model": draft}


def _sampling_config(remote: Any, tokenizer: Any, max_new_tokens: int, **opts: Any) -> Any:
    from beectl.generation import SamplingConfig

    gc = remote.generation_config
    eos = gc.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    sampling_args = (opts["temperature"], opts["top_k"], opts["top_p"], opts["seed"])
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        do_sample=any(v is not None for v in sampling_args),
        temperature=opts["temperature"] or 1.0,
        top_k=opts["top_k"] or 0,
        top_p=opts["top_p"] or 1.0,
        repetition_penalty=opts["repetition_penalty"] or 1.0,
        seed=opts["seed"],
        eos_token_ids=tuple(sorted(eos_ids)),
        pad_token_id=gc.pad_token_id if gc.pad_token_id is not None else 0,
    )


async def _generate_batch(
    prompts: list[str],
    config: ClientConfig,
    *,
    model: str,
    max_new_tokens: int,
    raw: bool,
    as_json: bool,
    speculate: str,
    draft_model: str | None,
    tuned_prompts: str | None = None,
    **opts: Any,
) -> None:
    from beectl.generation import left_pad, until_eos
    from beectl.model import RemoteModel

    remote = await RemoteModel.load(model, config)
    try:
        tuned = _tuned(remote, tuned_prompts)
        extra = 0 if tuned is None else tuned.num_prompts
        tokenizer: Any = remote.tokenizer
        rows = [_encode(tokenizer, p, raw) for p in prompts]
        sampling = _sampling_config(remote, tokenizer, max_new_tokens, **opts)
        ids, mask = left_pad(rows, sampling.pad_token_id)
        width = ids.shape[1]
        async with remote.inference_session(
            max_length=extra + width + max_new_tokens, batch_size=len(rows)
        ) as session:
            out = await _run_generation(
                remote,
                session,
                ids,
                sampling,
                tuned,
                attention_mask=mask,
                **_speculation(remote, speculate, draft_model),
            )
        for row, prompt in enumerate(prompts):
            new_ids = until_eos(out.sequences[row, width:].tolist(), sampling.eos_token_ids)
            click.echo(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": tokenizer.decode(new_ids, skip_special_tokens=True),
                        "prompt_tokens": len(rows[row]),
                        "new_tokens": len(new_ids),
                        "token_ids": new_ids,
                    }
                )
            )
    finally:
        await remote.aclose()


async def _generate(
    prompt: str,
    config: ClientConfig,
    *,
    model: str,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    speculate: str,
    draft_model: str | None,
    raw: bool,
    as_json: bool,
    tuned_prompts: str | None = None,
) -> None:
    import torch

    from beectl.generation import until_eos
    from beectl.model import RemoteModel

    began = time.perf_counter()
    remote = await RemoteModel.load(model, config)
    try:
        tuned = _tuned(remote, tuned_prompts)
        extra = 0 if tuned is None else tuned.num_prompts
        tokenizer: Any = remote.tokenizer
        ids = torch.tensor([_encode(tokenizer, prompt, raw)])
        sampling = _sampling_config(
            remote,
            tokenizer,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        load_s = time.perf_counter() - began
        streamer = _TextStream(tokenizer, enabled=not as_json)
        async with remote.inference_session(
            max_length=extra + ids.shape[1] + max_new_tokens
        ) as session:
            route = [
                (h.start, h.end, h.server.host, h.server.port, h.peer_id) for h in session.route
            ]
            out = await _run_generation(
                remote,
                session,
                ids,
                sampling,
                tuned,
                on_tokens=streamer.put,
                **_speculation(remote, speculate, draft_model),
            )
        streamer.end()
        new_ids = out.sequences[0, ids.shape[1] :].tolist()
        text_ids = until_eos(new_ids, sampling.eos_token_ids)
        if as_json:
            decode_tokens = max(out.num_new_tokens - 1, 0)
            click.echo(
                json.dumps(
                    {
                        "model": remote.files.name,
                        "fingerprint": remote.files.fingerprint,
                        "prompt": prompt,
                        "text": tokenizer.decode(text_ids, skip_special_tokens=True),
                        "prompt_tokens": ids.shape[1],
                        "new_tokens": out.num_new_tokens,
                        "token_ids": new_ids,
                        "route": [
                            {"blocks": [s, e], "host": h, "port": p, "peer_id": pid}
                            for s, e, h, p, pid in route
                        ],
                        "speculation": {
                            "mode": speculate,
                            "draft": draft_model or "prompt lookup",
                            **out.speculation.as_dict(),
                        },
                        "verification": {
                            "rate": remote.config.verify_rate,
                            **remote.swarm.verifier.stats.as_dict(),
                        },
                        "timings": {
                            "load_s": round(load_s, 4),
                            "prefill_s": round(out.prefill_s, 4),
                            "decode_s": round(out.decode_s, 4),
                            "decode_tokens_per_s": round(decode_tokens / out.decode_s, 3)
                            if out.decode_s > 0
                            else None,
                            "ms_per_token": round(1000 * out.decode_s / decode_tokens, 3)
                            if decode_tokens
                            else None,
                        },
                    }
                )
            )
    finally:
        await remote.aclose()


class _TextStream:
    """Prints newly decoded text as tokens arrive (whole characters only)."""

    def __init__(self, tokenizer: Any, *, enabled: bool) -> None:
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.ids: list[int] = []
        self.printed = 0

    def put(self, ids: Any) -> None:
        if not self.enabled:
            return
        self.ids.append(int(ids[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


@main.command()
@click.argument("prompt", default="Why is the sky blue?")
@generation_options
@click.option(
    "--servers",
    type=click.IntRange(1, 8),
    default=2,
    show_default=True,
    help="How many servers to split the blocks over.",
)
def demo(prompt: str, servers: int, **kwargs: Any) -> None:
    """Start a bootstrap node and servers on this machine, generate once, and tear down.

    Everything runs on 127.0.0.1 with free ports; the processes are stopped at the end.
    """
    from beectl.local_swarm import LocalSwarm

    model = kwargs["model"]
    click.echo(
        f"demo: starting a bootstrap node and {servers} servers for {model} on 127.0.0.1 ...",
        err=True,
    )
    try:
        with LocalSwarm(model=model, num_servers=servers) as local:
            for line in local.describe():
                click.echo(f"demo: {line}", err=True)
            config = ClientConfig(initial_peers=tuple(local.initial_peers))
            run_cli(_generate(prompt, config, **kwargs))
    except BeeError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted; swarm stopped", err=True)
        sys.exit(130)
    click.echo("demo: swarm stopped", err=True)


from beectl.cli_api import api  # noqa: E402  (commands in their own modules; they import
from beectl.cli_chat import chat  # noqa: E402  nothing of this one)
from beectl.cli_finetune import finetune  # noqa: E402
from beectl.cli_swarm import swarm  # noqa: E402

main.add_command(api)
main.add_command(chat)
main.add_command(finetune)
main.add_command(swarm)

if __name__ == "__main__":
    main()
