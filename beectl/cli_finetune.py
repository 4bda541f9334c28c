"""`beectl finetune`: prompt-tune a model through the swarm on a JSONL file of examples."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from beectl.cli_options import DEFAULT_MODEL, peers_option, quant_option, require_peers
from beed.net.swarm_key import SwarmKey, swarm_key_option
from protocol.errors import BeeError


@click.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to save the trained prompts (safetensors; for generate --tuned-prompts).",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or path.")
@click.option("--steps", type=click.IntRange(1), default=100, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.02, show_default=True)
@click.option(
    "--num-prompts",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Trainable virtual tokens before every input.",
)
@click.option(
    "--tuning-mode",
    type=click.Choice(["ptune", "deep_ptune"]),
    default="ptune",
    show_default=True,
    help="ptune: virtual tokens only; deep_ptune: also a trainable prefix added to every "
    "block's input (its prompts cannot be used for generation yet).",
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option(
    "--max-tokens",
    type=click.IntRange(2),
    default=256,
    show_default=True,
    help="Examples are cut to this many tokens.",
)
@click.option(
    "--log-every",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Steps per loss line.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the examples' shuffling."
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per logged step (step, loss)."
)
@click.option(
    "--allow-private-addresses",
    is_flag=True,
    help="Use servers whose records name loopback or private addresses.",
)
@quant_option
@peers_option
@swarm_key_option
def finetune(
    data: Path,
    out: Path,
    model: str,
    steps: int,
    lr: float,
    num_prompts: int,
    tuning_mode: str,
    batch_size: int,
    max_tokens: int,
    log_every: int,
    seed: int,
    as_json: bool,
    allow_private_addresses: bool,
    allow_quant: bool,
    initial_peers: list[tuple[str, int]],
    swarm_key: SwarmKey | None,
) -> None:
    """Prompt-tune MODEL on DATA, a JSONL file of {"text": ...} (learn the text) or
    {"text": ..., "label": ...} (learn to continue the text with the label) examples.

    The servers' weights stay as they are: only the prompts, held here, are trained, and are
    saved to --out for `beectl generate --tuned-prompts FILE` (use --raw there: training sees
    the raw text, not the chat template).
    """
    require_peers(initial_peers)
    if not out.parent.is_dir():
        raise click.BadParameter(f"directory {out.parent} does not exist", param_hint="--out")
    try:
        _finetune(**locals())
    except BeeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing saved", err=True)
        sys.exit(130)


def _finetune(
    *,
    data: Path,
    out: Path,
    model: str,
    steps: int,
    lr: float,
    num_prompts: int,
    tuning_mode: str,
    batch_size: int,
    max_tokens: int,
    log_every: int,
    seed: int,
    as_json: bool,
    allow_private_addresses: bool,
    allow_quant: bool,
    initial_peers: list[tuple[str, int]],
    swarm_key: SwarmKey | None,
) -> None:
    import torch

    from beectl.api import AutoDistributedModelForCausalLM
    from beectl.training.data import batches, collate, load_examples

    torch.manual_seed(seed)
    with AutoDistributedModelForCausalLM.from_pretrained(
        model,
        [f"{host}:{port}" for host, port in initial_peers],
        tuning_mode=tuning_mode,
        num_prompts=num_prompts,
        swarm_key=swarm_key,
        allow_private_addresses=allow_private_addresses or None,
        allow_quant=allow_quant,
    ) as lm:
        tokenizer: Any = lm.tokenizer
        examples = load_examples(data, tokenizer, max_tokens=max_tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        trainable = [p for p in lm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        began = time.perf_counter()
        tokens = 0
        shown = {"loss": float("nan")}
        bar: Any = click.progressbar(
            length=steps,
            label="finetune",
            file=sys.stderr,
            item_show_func=lambda _: f"loss {shown['loss']:.4f}",
        )
        with bar:
            for step, batch in enumerate(batches(examples, batch_size, steps, seed), 1):
                inputs = collate(batch, pad)
                optimizer.zero_grad()
                loss = lm(**inputs).loss
                loss.backward()
                optimizer.step()
                tokens += int(inputs["attention_mask"].sum())
                shown["loss"] = loss.item()
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    elapsed = time.perf_counter() - began
                    line = {
                        "step": step,
                        "loss": round(shown["loss"], 6),
                        "tokens_per_s": round(tokens / elapsed, 2),
                        "recoveries": lm.remote_blocks.recoveries,
                    }
                    if as_json:
                        click.echo(json.dumps(line))
                    else:
                        click.echo(f"step {step}/{steps} loss {line['loss']:.4f}", err=True)
        lm.save_prompts(out)
        if not as_json:
            click.echo(f"saved {num_prompts} prompts to {out}")
