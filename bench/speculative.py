"""Speculative decoding through emulated links: tokens/s with speculation off, auto, fixed, tree.

    python bench/speculative.py                          # RTT 0 and 100 ms, batch 1 and 8
    python bench/speculative.py --rtts 100 --batches 1 --new-tokens 48
    python bench/speculative.py --modes 'off,tree 4x3'  # some modes only

Three servers (blocks 0:10, 10:20, 20:30) behind the link emulator of bench/wan.py (they
announce 127.0.0.2; every client->server and server->server hop crosses a link of the given
round trip, 1 Gbit/s), push on. Per task, RTT and batch size, one greedy generation per
speculation mode after a warm-up: tokens/s (all new tokens over the whole generation, prefill
included), drafted and accepted tokens, the ratio to speculation off in the same run, and whether
the tokens equal those of speculation off (they must). Tasks: `rewrite` (the answer repeats a
given paragraph: drafts from prompt lookup help), `code` (continue a repetitive function) and
`chat` (an open question: drafts rarely help). Batch 8 runs 8 different prompts of the task.
Petals 2.2 (bench/petals_swarm.sh: the same three spans, its own venv, no speculation) then
generates the same batches through the same kind of links, after beed (never at the same time),
and every row gets its ratio to Petals; `--no-petals` leaves it out. Petals takes no padding
mask, so its padded rows attend to their pads: the same work, other tokens for those rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from linkemu import LinkEmulatorProcess
from wan import (
    PETALS_MODEL,
    PETALS_PORTS,
    PETALS_PREFIX,
    BeedSwarm,
    PetalsSwarm,
    link_for,
    proxy_maps,
    run_petals_client,
)

PARAGRAPHS = [
    "The library opens at nine in the morning and closes at six in the evening. Members may "
    "borrow up to five books at a time for three weeks, and renew them twice online.",
    "Our team meets every Monday to plan the week. Each person reports what they finished, what "
    "they will do next and what is blocking them, and the meeting ends within twenty minutes.",
    "The recipe needs two cups of flour, one cup of sugar, three eggs and a spoon of butter. Mix "
    "them well, pour the batter into a pan and bake it for thirty minutes.",
    "Trains to the airport leave every fifteen minutes from platform four. The journey takes "
    "twenty-five minutes and tickets can be bought from the machines or on the train.",
]
CODE = [
    "def add(a, b):\n    return a + b\n\n\ndef subtract(a, b):\n    return a - b\n\n\n"
    "def multiply(a, b):\n    return a * b\n\n\ndef ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __add__(self, other):\n        return Point(self.x + other.x, self.y + other.y)\n\n"
    "    def __sub__(self, other):\n",
]
CHAT = [
    "What should I pack for a weekend of hiking in the mountains?",
    "Give me three ideas for a birthday present for my sister.",
    "Why do cats purr?",
    "How do I start learning to play the guitar?",
]
MODES = {"off": "off", "auto": "auto", "fixed 6": "6", "tree 4x3": "4x3"}

# Run by the Petals venv's python: each cell's batch once as a warm-up (4 tokens), then timed
# like beed's rows (all new tokens over the whole generate call); one JSON line on stdout.
PETALS_CLIENT = r"""
import json, os, sys, time
import torch
from petals import AutoDistributedModelForCausalLM

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model = AutoDistributedModelForCausalLM.from_pretrained(
    args["model_dir"], initial_peers=[args["peer"]], dht_prefix=args["prefix"],
    torch_dtype=torch.float32,
)
model.eval()
out = {}
try:
    for cell in args["cells"]:
        ids = torch.tensor(cell["ids"])
        n = args["new_tokens"]
        # Petals 2.2 refuses attention masks with padding: its rows attend to the pads (the
        # same amount of work; other tokens where a row was padded). Every row generates all
        # its tokens, as beed's do: min_new_tokens keeps EOS from ending it (transformers 4.33
        # stops at the model's EOS whatever eos_token_id says), so after an EOS its tokens differ.
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, **kw)
            began = time.perf_counter()
            seq = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            seconds = time.perf_counter() - began
        new = seq[:, ids.shape[1]:]
        assert new.shape[1] == n, f"Petals generated {new.shape[1]} tokens, not {n}"
        out[cell["key"]] = {"seconds": seconds, "tokens": new.tolist()}
        print(cell["key"], seconds, file=sys.stderr, flush=True)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out), flush=True)
# petals 2.2 can hang at interpreter exit: shut the client's DHT (and its p2pd) down, exit hard.
try:
    sm = model.transformer.h.sequence_manager
    sm.shutdown()
    sm.dht.shutdown()
except Exception as exc:
    print("client shutdown:", repr(exc), file=sys.stderr)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def petals_cells(
    swarm: PetalsSwarm,
    rtt: float,
    cells: dict[str, tuple[torch.Tensor, torch.Tensor]],
    new_tokens: int,
    log_dir: Path,
) -> dict[str, dict]:
    """Petals' seconds and new tokens for each cell (key -> ids, mask) through links of `rtt`."""
    payload = {
        "model_dir": str(PETALS_MODEL),
        "peer": swarm.initial_peer,
        "prefix": PETALS_PREFIX,
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "cells": [
            {"key": key, "ids": ids.tolist(), "mask": mask.tolist()}
            for key, (ids, mask) in cells.items()
        ],
    }
    timeout = 300 + len(cells) * (new_tokens + 4) * (1 + 8 * rtt / 1000)
    emu = LinkEmulatorProcess(proxy_maps(PETALS_PORTS), link_for(rtt, 1000))
    with emu:
        return run_petals_client(PETALS_CLIENT, payload, timeout, log_dir / "petals_client.log")


def prompts(task: str, batch: int) -> list[tuple[str, bool]]:
    """(text, whether it goes through the chat template) for each row."""
    if task == "rewrite":
        rows = [(f"Repeat this paragraph word for word:\n\n{p}", True) for p in PARAGRAPHS]
    elif task == "code":
        rows = [(c, False) for c in CODE]
    else:
        rows = [(c, True) for c in CHAT]
    return [rows[i % len(rows)] for i in range(batch)]


def encode(tokenizer, rows: list[tuple[str, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    from beectl.generation import left_pad

    ids = []
    for text, chat in rows:
        if chat:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )
            ids.append(list(enc["input_ids"]))
        else:
            ids.append(list(tokenizer(text).input_ids))
    return left_pad(ids, 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtts", default="0,100", help="round trip times, ms")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tasks", default="rewrite,code,chat")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help="of: " + ", ".join(MODES))
    parser.add_argument("--no-petals", action="store_true", help="leave the Petals rows out")
    args = parser.parse_args()
    from beectl import AutoDistributedModelForCausalLM

    log_dir = Path(tempfile.mkdtemp(prefix="beed-spec-"))
    swarm = BeedSwarm("smollm2-135m", "float32", ["--num-threads", "1"], log_dir)
    swarm.start()
    rtts = [float(r) for r in args.rtts.split(",")]
    results = []
    cells: dict[float, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {r: {} for r in rtts}
    base: dict[tuple[float, str, int], torch.Tensor] = {}
    try:
        for rtt in rtts:
            emu = LinkEmulatorProcess(proxy_maps(swarm.ports), link_for(rtt, 1000))
            with emu:
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    "smollm2-135m", initial_peers=[swarm.initial_peers]
                )
                try:
                    for task in args.tasks.split(","):
                        for batch in [int(b) for b in args.batches.split(",")]:
                            ids, mask = encode(model.tokenizer, prompts(task, batch))
                            cells[rtt][f"{task}|{batch}"] = (ids, mask)
                            kw = dict(
                                eos_token_id=None, pad_token_id=0, return_dict_in_generate=True
                            )
                            model.generate(ids, mask, max_new_tokens=4, speculate="off", **kw)
                            for name in args.modes.split(","):
                                value = MODES[name]
                                began = time.perf_counter()
                                out = model.generate(
                                    ids, mask, max_new_tokens=args.new_tokens, speculate=value, **kw
                                )
                                seconds = time.perf_counter() - began
                                new = out.sequences[:, ids.shape[1] :]
                                base.setdefault((rtt, task, batch), new)
                                tps = batch * args.new_tokens / seconds
                                s = out.speculation
                                same = torch.equal(new, base[(rtt, task, batch)])
                                results.append(
                                    (rtt, task, batch, name, tps, s.proposed, s.accepted, same)
                                )
                                print(results[-1], file=sys.stderr, flush=True)
                finally:
                    model.close()
    finally:
        swarm.stop()
    if not args.no_petals:
        petals = PetalsSwarm(log_dir)
        try:
            petals.start()
            for rtt in rtts:
                data = petals_cells(petals, rtt, cells[rtt], args.new_tokens, log_dir)
                for key, cell in data.items():
                    task, b = key.split("|")
                    batch = int(b)
                    tokens = torch.tensor(cell["tokens"])
                    ref = base.get((rtt, task, batch))
                    same = ref is not None and torch.equal(tokens, ref)
                    tps = batch * args.new_tokens / cell["seconds"]
                    results.append((rtt, task, batch, "petals", tps, None, None, same))
                    print(results[-1], file=sys.stderr, flush=True)
        except Exception as exc:
            print(f"# Petals: {type(exc).__name__}: {exc} (logs in {log_dir})", flush=True)
        finally:
            petals.stop()
    print(
        f"# 3 servers (10 blocks each, float32, push) behind emulated links, smollm2-135m greedy, "
        f"{args.new_tokens} new tokens per row; speculation by prompt lookup; Petals 2.2 with the "
        f"same spans and links, no speculation"
    )
    print(
        "| RTT ms | task | batch | speculation | tok/s | drafted | accepted | vs off | vs Petals "
        "| same tokens |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---|")
    off = {(r[0], r[1], r[2]): r[4] for r in results if r[3] == "off"}
    pet = {(r[0], r[1], r[2]): r[4] for r in results if r[3] == "petals"}
    for rtt, task, batch, name, tps, proposed, accepted, same in results:
        key = (rtt, task, batch)
        ratio = f"{tps / off[key]:.2f}x" if key in off else "-"
        vs_petals = f"{tps / pet[key]:.2f}x" if key in pet else "-"
        counts = "| - | - |" if proposed is None else f"| {proposed} | {accepted} |"
        print(
            f"| {rtt:.0f} | {task} | {batch} | {name} | {tps:.1f} {counts} {ratio} | "
            f"{vs_petals} | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
